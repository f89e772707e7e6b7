//! Tests of `noising`.

use super::*;
use crate::diffusion::schedule::{antithetic_times, SAMPLING_EPS};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn cfg(algo: Algo) -> DitConfig {
    let mut c = DitConfig::minimini();
    c.algo = algo;
    c.length = 64;
    c.noise_dim = 5;
    c
}

fn x0(b: usize, l: usize) -> Tokens {
    Tokens {
        batch: b,
        len: l,
        ids: (0..b * l).map(|i| (i % 7) as u32).collect(),
    }
}

/// The masked count of n positions at mask probability p lies within 5 binomial standard
/// deviations of n·p, at several t.
#[test]
fn q_xt_mask_frequency_within_binomial_bounds() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &t in &[SAMPLING_EPS, 0.1, 0.5, 0.9, 1.0] {
        let (b, l) = (50, 400);
        let x = x0(b, l);
        let xt = q_xt(&mut rng, &x, &vec![t; b], 999).unwrap();
        let n = (b * l) as f64;
        let p = 1.0 - alpha(t);
        let k = xt.ids.iter().filter(|&&id| id == 999).count() as f64;
        let sd = (n * p * (1.0 - p)).sqrt();
        assert!(
            (k - n * p).abs() <= 5.0 * sd + 1.0,
            "t {t}: {k} masked of {n}, expected {} ± {sd}",
            n * p
        );
        // Unmasked positions keep their token.
        for (a, c) in xt.ids.iter().zip(&x.ids) {
            assert!(*a == 999 || a == c);
        }
    }
}

#[test]
fn nelbo_batch_weights_and_eps() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let c = cfg(Algo::Imdm);
    let x = x0(4, 64);
    let t = [0.2, 0.4, 0.6, 0.8];
    let mut erng = ChaCha8Rng::seed_from_u64(6);
    let nb = nelbo_batch(&mut rng, &mut erng, &x, &t, &c, 256.0).unwrap();
    let eps = nb.eps.as_ref().unwrap();
    assert_eq!(eps.shape, vec![4, 64, 5]);
    let mask = c.mask_index as u32;
    for (i, &id) in nb.xt.ids.iter().enumerate() {
        let row = &eps.data[i * 5..(i + 1) * 5];
        if id == mask {
            let want = 1.0 / t[i / 64];
            assert!((nb.weight[i] as f64 - want).abs() < 1e-5 * want);
            assert!(row.iter().all(|e| (-1.0..1.0).contains(e)));
            assert!(row.iter().any(|&e| e != 0.0));
        } else {
            assert_eq!(nb.weight[i], 0.0);
            assert!(row.iter().all(|&e| e == 0.0));
        }
    }
    assert!(nb.masked() > 0);
    let lb = nb.as_loss();
    assert_eq!(lb.norm, 256.0);
    // MDLM: no eps; its masks are those of q_xt on the mask stream, and equal the IMDM's
    // (the eps draws come from their own stream).
    let mut rng2 = ChaCha8Rng::seed_from_u64(5);
    let mut erng2 = ChaCha8Rng::seed_from_u64(6);
    let nb2 = nelbo_batch(&mut rng2, &mut erng2, &x, &t, &cfg(Algo::Mdlm), 256.0).unwrap();
    assert!(nb2.eps.is_none());
    assert_eq!(nb2.xt, nb.xt);
    assert_eq!(nb2.weight, nb.weight);
    let mut rng2 = ChaCha8Rng::seed_from_u64(5);
    assert_eq!(nb2.xt, q_xt(&mut rng2, &x, &t, mask).unwrap());
    // Same seeds, same batch; another eps seed changes only eps.
    let (mut rng3, mut erng3) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(6));
    assert_eq!(
        nelbo_batch(&mut rng3, &mut erng3, &x, &t, &c, 256.0).unwrap(),
        nb
    );
    let (mut rng4, mut erng4) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(7));
    let nb4 = nelbo_batch(&mut rng4, &mut erng4, &x, &t, &c, 256.0).unwrap();
    assert_eq!(nb4.xt, nb.xt);
    assert_ne!(nb4.eps, nb.eps);
}

#[test]
fn randn_eps_is_scaled_normal() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut v = vec![0f32; 20000];
    draw_eps_into(&mut rng, &mut v, NoiseType::Randn, 2.0);
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64;
    assert!(
        m.abs() < 0.07 && (var - 4.0).abs() < 0.2,
        "mean {m} var {var}"
    );
    draw_eps_into(&mut rng, &mut v, NoiseType::Rand, 0.5);
    assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
}

/// Global antithetic times chunked into 4 micro-batches: micro-batch k holds exactly the
/// strata [k/4, (k+1)/4) and the rows of x0 in order.
#[test]
fn antithetic_chunking_gives_each_micro_batch_its_band() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (n, m) = (32, 8);
    let t = antithetic_times(&mut rng, n);
    let x = x0(n, 3);
    for k in 0..n / m {
        let (xk, tk) = micro_batch(&x, &t, m, k).unwrap();
        assert_eq!(xk.ids, x.ids[k * m * 3..(k + 1) * m * 3]);
        for &tt in tk {
            let u = (tt - SAMPLING_EPS) / (1.0 - SAMPLING_EPS);
            let (lo, hi) = (k as f64 / 4.0, (k + 1) as f64 / 4.0);
            assert!(u >= lo - 1e-12 && u < hi + 1e-12, "t {tt} outside band {k}");
        }
    }
    assert!(micro_batch(&x, &t, m, 4).is_err());
}

/// Micro-batches drawn in order from one stream reproduce the whole batch's noise.
#[test]
fn micro_batches_draw_the_same_noise_as_the_whole_batch() {
    let c = cfg(Algo::Imdm);
    let t = antithetic_times(&mut ChaCha8Rng::seed_from_u64(1), 8);
    let x = x0(8, 64);
    let seeded = ChaCha8Rng::seed_from_u64;
    let whole = nelbo_batch(&mut seeded(2), &mut seeded(3), &x, &t, &c, 512.0).unwrap();
    let (mut rng, mut erng) = (seeded(2), seeded(3));
    for k in 0..4 {
        let (xk, tk) = micro_batch(&x, &t, 2, k).unwrap();
        let nb = nelbo_batch(&mut rng, &mut erng, &xk, tk, &c, 512.0).unwrap();
        let (lo, hi) = (k * 2 * 64, (k + 1) * 2 * 64);
        assert_eq!(nb.xt.ids, whole.xt.ids[lo..hi]);
        assert_eq!(nb.weight, whole.weight[lo..hi]);
        let e = nb.eps.unwrap();
        assert_eq!(e.data, whole.eps.as_ref().unwrap().data[lo * 5..hi * 5]);
    }
}
