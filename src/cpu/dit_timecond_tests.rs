//! Time conditioning (one sigma per sequence, spec 2.2): gradients of every parameter, the
//! sigma map included, against f64 finite differences with sigma varying across the batch; the
//! forward against `dit_ref` in f32 and f64; sigma = 0 reproducing the constant path; each
//! sequence conditioned on its own sigma only; micro-batch accumulation; f32 against f64.

use super::*;

fn timecond(algo: Algo, softcap: f64) -> DitConfig {
    DitConfig {
        time_conditioning: true,
        ..tiny(algo, softcap, false)
    }
}

#[test]
fn timecond_grads_match_fd() {
    check_grads_against_fd(
        timecond(Algo::Mdlm, 0.0),
        TrainOpts::default(),
        "MDLM time-conditioned",
    );
    check_grads_against_fd(
        timecond(Algo::Imdm, 2.0),
        TrainOpts::default(),
        "IMDM softcap time-conditioned",
    );
}

#[test]
fn timecond_dropout_grads_match_fd() {
    let c = DitConfig {
        dropout: 0.2,
        ..timecond(Algo::Mdlm, 0.0)
    };
    let on = TrainOpts {
        dropout: Some((5, 7)),
    };
    check_grads_against_fd(c, on, "MDLM time-conditioned dropout 0.2");
}

/// The sin half of the time feature is 0 at sigma = 0, so the constant path never moves those
/// columns of `sigma_map.mlp.0.weight`; with per-sequence sigma they get a gradient, and it
/// matches finite differences entry by entry.
fn fc1(p: &mut DitParams) -> &mut Vec<f32> {
    &mut p.sigma_map.as_mut().unwrap().fc1.weight.data
}

#[test]
fn sigma_map_sin_columns_get_their_gradient() {
    let c = timecond(Algo::Mdlm, 0.0);
    let mut p = quantised_params(&c, 3);
    let k = Case::new(&c, 3, 7);
    let opts = TrainOpts::default();
    let mut g = DitParams::zeros(&c);
    loss_and_grad::<f64>(&p, &k.batch(), &opts, &mut g).unwrap();
    let half = crate::model::params::TIME_FEATURES / 2;
    let width = 2 * half;
    let (mut got, mut want) = (vec![], vec![]);
    for (row, col) in [
        (0, half),
        (1, half + 3),
        (5, half + 40),
        (7, width - 1),
        (2, 9),
    ] {
        let i = row * width + col;
        let orig = fc1(&mut p)[i];
        let mut at = |x: f64| {
            fc1(&mut p)[i] = x as f32;
            loss64(&p, &k, &opts)
        };
        let (up, down) = (at(orig as f64 + FD_STEP), at(orig as f64 - FD_STEP));
        fc1(&mut p)[i] = orig;
        got.push(fc1(&mut g)[i] as f64);
        want.push((up - down) / (2.0 * FD_STEP));
    }
    assert!(got[..4].iter().all(|&x| x != 0.0), "sin columns: {got:?}");
    let tol = Tol {
        abs: 1e-8,
        rel: 1e-5,
    };
    assert_grad("sigma_map.mlp.0.weight sin columns", &got, &want, tol);
}

#[test]
fn timecond_log_probs_match_dit_ref() {
    for (c, tag) in [
        (timecond(Algo::Mdlm, 0.0), "MDLM time-conditioned"),
        (timecond(Algo::Imdm, 2.0), "IMDM softcap time-conditioned"),
    ] {
        let p = random_params(&c, 5);
        let k = Case::new(&c, 4, 9);
        check_forward(&p, &k, tag);
    }
    let mut c = timecond(Algo::Imdm, 0.0);
    (c.hidden, c.heads, c.vocab_size, c.mask_index, c.noise_dim) = (64, 4, 37, 3, 20);
    for len in [1, 13] {
        c.length = len;
        let p = random_params(&c, 6);
        let k = Case::new(&c, 3, 10);
        check_forward(&p, &k, &format!("D64 L{len} time-conditioned"));
    }
}

/// sigma = 0 for every sequence is the constant conditioning: the same loss, gradients and
/// log-probs as the model with time conditioning off.
#[test]
fn zero_sigma_reproduces_the_constant_path() {
    let off = tiny(Algo::Imdm, 0.0, false);
    let on = timecond(Algo::Imdm, 0.0);
    let p_off = random_params(&off, 23);
    let p_on = DitParams {
        config: on.clone(),
        ..p_off.clone()
    };
    let mut k = Case::new(&on, 3, 24);
    k.sigma = Some(vec![0.0; 3]);
    let opts = TrainOpts::default();
    let (mut g_on, mut g_off) = (DitParams::zeros(&on), DitParams::zeros(&off));
    let l_on = loss_and_grad::<f64>(&p_on, &k.batch(), &opts, &mut g_on).unwrap();
    let b_off = LossBatch {
        sigma: None,
        ..k.batch()
    };
    let l_off = loss_and_grad::<f64>(&p_off, &b_off, &opts, &mut g_off).unwrap();
    assert!((l_on - l_off).abs() <= 1e-12 * l_off, "{l_on} vs {l_off}");
    let tight = Tol {
        abs: 1e-10,
        rel: 1e-9,
    };
    assert_grad("grads", &flat(&g_on), &flat(&g_off), tight);
    let lp_on = log_probs::<f32>(&p_on, &k.xt, k.eps.as_ref(), k.sigma.as_deref()).unwrap();
    let lp_off = log_probs::<f32>(&p_off, &k.xt, k.eps.as_ref(), None).unwrap();
    assert_close("f32 log-probs", &lp_on.data, &lp_off.data, Tol::F32);
}

/// Sequence b's outputs depend on sigma_b alone: changing sequence 1's sigma leaves sequences 0
/// and 2 bit for bit unchanged and moves sequence 1.
#[test]
fn each_sequence_sees_only_its_own_sigma() {
    let c = timecond(Algo::Mdlm, 0.0);
    let p = random_params(&c, 25);
    let k = Case::new(&c, 3, 26);
    let (xt, s) = (&k.xt, k.sigma.clone().unwrap());
    let mut s2 = s.clone();
    s2[1] += 0.75;
    let n = c.length * c.vocab_size;
    for f32_path in [true, false] {
        let run = |s: &[f64]| match f32_path {
            true => log_probs::<f32>(&p, xt, None, Some(s)).unwrap().data,
            false => log_probs::<f64>(&p, xt, None, Some(s)).unwrap().data,
        };
        let (a, b) = (run(&s), run(&s2));
        for seq in [0, 2] {
            let r = seq * n..(seq + 1) * n;
            assert!(
                a[r.clone()]
                    .iter()
                    .zip(&b[r])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "f32 {f32_path}: sequence {seq} moved with sigma_1"
            );
        }
        let moved = a[n..2 * n].iter().zip(&b[n..2 * n]).filter(|(x, y)| x != y);
        assert!(
            moved.count() > n / 4,
            "f32 {f32_path}: sigma_1 barely matters"
        );
    }
}

#[test]
fn timecond_half_batches_accumulate_to_the_full_batch() {
    let c = timecond(Algo::Imdm, 0.0);
    let p = random_params(&c, 13);
    let k = Case::new(&c, 4, 14);
    let opts = TrainOpts::default();
    let mut full = DitParams::zeros(&c);
    let l_full = loss_and_grad::<f64>(&p, &k.batch(), &opts, &mut full).unwrap();
    let mut acc = DitParams::zeros(&c);
    let l_a = loss_and_grad::<f64>(&p, &k.slice(0, 2).batch(), &opts, &mut acc).unwrap();
    let l_b = loss_and_grad::<f64>(&p, &k.slice(2, 4).batch(), &opts, &mut acc).unwrap();
    assert!(
        (l_a + l_b - l_full).abs() < 1e-12 * l_full,
        "{l_a} + {l_b} != {l_full}"
    );
    let tol = Tol {
        abs: 1e-7,
        rel: 1e-6,
    };
    assert_grad("accumulated grads", &flat(&acc), &flat(&full), tol);
}

#[test]
fn timecond_f32_is_deterministic_and_close_to_f64() {
    let mut c = timecond(Algo::Imdm, 0.0);
    (c.hidden, c.heads, c.length, c.dropout) = (32, 2, 16, 0.1);
    let p = random_params(&c, 15);
    let k = Case::new(&c, 64, 16);
    let opts = TrainOpts {
        dropout: Some((1, 2)),
    };
    let run = || {
        let mut g = DitParams::zeros(&c);
        let l = loss_and_grad::<f32>(&p, &k.batch(), &opts, &mut g).unwrap();
        (l, g)
    };
    let (l1, g1) = run();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (l2, g2) = pool.install(run);
    assert_eq!(
        l1.to_bits(),
        l2.to_bits(),
        "loss depends on the thread count"
    );
    assert!(g1 == g2, "gradients depend on the thread count");
    let mut g64 = DitParams::zeros(&c);
    let l64 = loss_and_grad::<f64>(&p, &k.batch(), &opts, &mut g64).unwrap();
    assert!((l1 - l64).abs() < 1e-5 * l64, "f32 loss {l1} vs f64 {l64}");
    let scale = flat(&g64).iter().fold(0f64, |m, x| m.max(x.abs()));
    let tol = Tol {
        abs: 1e-4 * scale,
        rel: 1e-3,
    };
    assert_grad("f32 grads vs f64", &flat(&g1), &flat(&g64), tol);
}

#[test]
fn sigma_must_match_the_config() {
    let c = timecond(Algo::Mdlm, 0.0);
    let p = random_params(&c, 27);
    let k = Case::new(&c, 2, 28);
    let e = log_probs::<f32>(&p, &k.xt, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("time-conditioned") && e.contains("2 values"),
        "{e}"
    );
    let e = dit_ref::forward(&p, &k.xt, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("time-conditioned"), "{e}");
    let mut den = CpuDenoiser::new(p.clone()).unwrap();
    assert!(
        den.log_probs(&k.xt, None).is_err(),
        "the denoiser has no sigma"
    );
    let mut g = DitParams::zeros(&c);
    let b = LossBatch {
        sigma: None,
        ..k.batch()
    };
    let e = loss_and_grad::<f32>(&p, &b, &TrainOpts::default(), &mut g).unwrap_err();
    assert!(e.to_string().contains("sigma"), "{e}");
    let off = tiny(Algo::Mdlm, 0.0, false);
    let p_off = random_params(&off, 27);
    let s = [1.0, 2.0];
    let e = log_probs::<f64>(&p_off, &k.xt, None, Some(&s))
        .unwrap_err()
        .to_string();
    assert!(e.contains("without time conditioning"), "{e}");
}

/// The distillation loss uses the student's per-sequence sigma: against its own log-probs at
/// the same sigma the KL is 0 with a zero gradient; at another sigma it is positive, and the
/// evaluation entry point agrees with the training one.
#[test]
fn distillation_conditions_the_student_on_its_sigma() {
    use crate::cpu::{distill_loss_and_grad, distill_loss_eval};
    use crate::diffusion::{DistillBatch, DistillMode};
    let c = timecond(Algo::Mdlm, 0.0);
    let p = random_params(&c, 29);
    let k = Case::new(&c, 3, 30);
    let s = k.sigma.clone().unwrap();
    let own = log_probs::<f64>(&p, &k.xt, None, Some(&s)).unwrap();
    let masked =
        k.xt.ids
            .iter()
            .filter(|&&t| t as usize == c.mask_index)
            .count();
    let base = DistillBatch {
        xt: &k.xt,
        eps: None,
        target: &own.data,
        mode: DistillMode::KlBwd,
        norm: masked as f64,
        sigma: None,
    };
    let batch = |sigma| DistillBatch {
        sigma: Some(sigma),
        ..base
    };
    let opts = TrainOpts::default();
    let mut g = DitParams::zeros(&c);
    let same = distill_loss_and_grad::<f64>(&p, &batch(&s[..]), &opts, &mut g).unwrap();
    // the target is the f32 rounding of the student's f64 log-probs
    assert!(same.abs() < 1e-7, "KL to itself {same}");
    let gmax = flat(&g).iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(gmax < 1e-6, "gradient at the minimum {gmax}");
    let other: Vec<f64> = s.iter().map(|x| x + 1.0).collect();
    let mut g = DitParams::zeros(&c);
    let moved = distill_loss_and_grad::<f64>(&p, &batch(&other[..]), &opts, &mut g).unwrap();
    assert!(moved > 1e-4, "KL at another sigma {moved}");
    let eval = distill_loss_eval::<f64>(&p, &batch(&other[..])).unwrap();
    assert!((eval - moved).abs() <= 1e-12 * moved, "{eval} vs {moved}");
}
