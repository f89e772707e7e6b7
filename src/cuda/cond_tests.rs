//! Tests of `cond`.

use super::*;
use crate::model::init::random_params;

/// The sigma map's host backward equals central finite differences of `r · c` for a fixed
/// random `r`, for every weight and bias entry.
#[test]
fn host_backward_matches_finite_differences() {
    let mut cfg = DitConfig::minimini();
    cfg.cond_dim = 5;
    let p = random_params(&cfg, 3);
    let s = p.sigma_map.as_ref().unwrap();
    let r: Vec<f64> = (0..5).map(|k| 0.3 * k as f64 - 0.7).collect();
    let loss = |fc1: &Linear, fc2: &Linear| -> f64 {
        CondHost::forward(fc1, fc2)
            .c
            .iter()
            .zip(&r)
            .map(|(a, b)| a * b)
            .sum()
    };
    let host = CondHost::forward(&s.fc1, &s.fc2);
    let [(dw1, db1), (dw2, db2)] = host.backward(&s.fc2, &r);
    let h = 1e-3f32;
    let check = |which: usize, bias: bool, k: usize, an: f64| {
        let (mut f1, mut f2) = (s.fc1.clone(), s.fc2.clone());
        let l = if which == 1 { &mut f1 } else { &mut f2 };
        let t = if bias {
            l.bias.as_mut().unwrap()
        } else {
            &mut l.weight
        };
        let orig = t.data[k];
        t.data[k] = orig + h;
        let up = loss(&f1, &f2);
        let (mut f1, mut f2) = (s.fc1.clone(), s.fc2.clone());
        let l = if which == 1 { &mut f1 } else { &mut f2 };
        let t = if bias {
            l.bias.as_mut().unwrap()
        } else {
            &mut l.weight
        };
        t.data[k] = orig - h;
        let dn = loss(&f1, &f2);
        let fd = (up - dn) / ((orig + h) as f64 - (orig - h) as f64);
        assert!(
            (fd - an).abs() <= 1e-6 + 1e-4 * fd.abs(),
            "fc{which} {} [{k}]: analytic {an} vs finite difference {fd}",
            if bias { "bias" } else { "weight" }
        );
    };
    // fc1's inputs are the constant feature: only its first 128 columns get gradient.
    for k in [0, 1, 127, 128, 255, 256, 5 * 256 - 1] {
        check(1, false, k, dw1[k]);
    }
    assert!(dw1[128..256].iter().all(|&x| x == 0.0));
    for (k, &g) in db1.iter().enumerate() {
        check(1, true, k, g);
    }
    for (k, &g) in dw2.iter().enumerate() {
        check(2, false, k, g);
    }
    for (k, &g) in db2.iter().enumerate() {
        check(2, true, k, g);
    }
    // c agrees with the reference's cond_vector.
    let want = crate::model::dit_ref::cond_vector(&p, 0.0).unwrap();
    for (a, b) in host.c.iter().zip(&want) {
        assert!((a - *b as f64).abs() < 1e-6, "{a} vs {b}");
    }
}
