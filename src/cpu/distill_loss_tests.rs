use super::*;
use crate::model::dit_ref::NEG_INF;
use crate::testing::grad::{assert_grad, fd_grad};
use crate::testing::inputs::rand_vec;
use crate::testing::Tol;

const MODES: [DistillMode; 4] = [
    DistillMode::KlBwd,
    DistillMode::KlFwd,
    DistillMode::Mse,
    DistillMode::Tvd,
];

/// Teacher log-probs: a log-softmax over the non-mask columns, the mask column at −1e6.
fn teacher_rows(seed: u64, rows: usize, v: usize, mask: usize) -> Vec<f32> {
    let raw = rand_vec(seed, rows * v, -3.0, 3.0);
    let mut out = vec![0f32; rows * v];
    for (o, r) in out.chunks_mut(v).zip(raw.chunks(v)) {
        let lse = r
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != mask)
            .map(|(_, x)| x.exp())
            .sum::<f64>()
            .ln();
        for (j, (o, x)) in o.iter_mut().zip(r).enumerate() {
            *o = if j == mask { NEG_INF } else { (x - lse) as f32 };
        }
    }
    out
}

/// The in-place gradient equals central finite differences of the loss, in f64, for every
/// mode, on rows masked and unmasked, with the mask column in the middle of the row.
#[test]
fn gradient_matches_finite_differences_for_every_mode() {
    let (rows, v, mask) = (5, 7, 3);
    let xt: Vec<u32> = vec![3, 1, 3, 3, 6];
    let target = teacher_rows(11, rows, v, mask);
    let norm = 3.0;
    for (k, mode) in MODES.into_iter().enumerate() {
        let z = rand_vec(20 + k as u64, rows * v, -2.0, 2.0);
        let mut g = z.clone();
        let loss = distill_loss_in_place(&mut g, &target, &xt, mode, norm, mask, v);
        let f = |x: &[f64]| {
            let mut s = x.to_vec();
            distill_loss_in_place(&mut s, &target, &xt, mode, norm, mask, v)
        };
        assert_eq!(
            loss,
            f(&z),
            "{mode:?}: the loss depends on nothing but the logits"
        );
        let fd = fd_grad(f, &z, 1e-6, None);
        assert_grad(
            &format!("{mode:?} dlogits"),
            &g,
            &fd,
            Tol {
                abs: 1e-8,
                rel: 1e-6,
            },
        );
        for r in 0..rows {
            let gr = &g[r * v..(r + 1) * v];
            if xt[r] as usize != mask {
                assert!(gr.iter().all(|&x| x == 0.0), "{mode:?}: unmasked row {r}");
            } else {
                assert_eq!(gr[mask], 0.0, "{mode:?}: mask column of row {r}");
                assert!(
                    gr.iter().any(|&x| x != 0.0),
                    "{mode:?}: row {r} has a gradient"
                );
            }
        }
        // Every gradient row of the SUBS softmax sums to zero except through tvd's and mse's
        // non-normalised terms; for the KLs it must (the loss is shift-invariant in z).
        if matches!(mode, DistillMode::KlBwd | DistillMode::KlFwd) {
            for r in [0, 2, 3] {
                let s: f64 = g[r * v..(r + 1) * v].iter().sum();
                assert!(s.abs() < 1e-12, "{mode:?} row {r}: gradient sums to {s}");
            }
        }
        let per_row = distill_row_losses(&z, &target, &xt, mode, mask, v);
        assert!((per_row.iter().sum::<f64>() / norm - loss).abs() < 1e-12);
    }
}

/// V = 5 (mask 4), two masked positions and one unmasked: the batch loss equals the formulas
/// evaluated by hand (Python, f64): z1 = (1, 0, −1, 2), z2 = (0.5, 0.5, 0, −2), teacher
/// q1 = (0.1, 0.2, 0.3, 0.4), q2 = uniform; mean over the 2 masked positions.
#[test]
fn hand_case_v5_two_positions() {
    let (v, mask) = (5, 4);
    let z: Vec<f64> = vec![
        1.0, 0.0, -1.0, 2.0, 7.0, // masked; the mask logit must not matter
        0.5, 0.5, 0.0, -2.0, -3.0, // masked
        9.0, -9.0, 4.0, 0.0, 1.0, // unmasked (token 2)
    ];
    let ln = |x: f64| x.ln() as f32;
    let target: Vec<f32> = vec![
        ln(0.1),
        ln(0.2),
        ln(0.3),
        ln(0.4),
        NEG_INF,
        ln(0.25),
        ln(0.25),
        ln(0.25),
        ln(0.25),
        f32::NEG_INFINITY,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ];
    let xt = [4u32, 4, 2];
    let want = [
        (DistillMode::KlBwd, 0.28745749537955556),
        (DistillMode::KlFwd, 0.4565337738013532),
        (DistillMode::Mse, 5.704446102530099),
        (DistillMode::Tvd, 3.702732554054082),
    ];
    for (mode, w) in want {
        let mut g = z.clone();
        let got = distill_loss_in_place(&mut g, &target, &xt, mode, 2.0, mask, v);
        // The targets are f32-rounded logs of the hand values: ~1e-7 relative.
        assert!(
            (got - w).abs() <= 1e-6 * w.abs(),
            "{mode:?}: got {got}, by hand {w}"
        );
        let mut g32: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        let got32 = distill_loss_in_place(&mut g32, &target, &xt, mode, 2.0, mask, v);
        assert!(
            (got32 - w).abs() <= 1e-5 * w.abs(),
            "{mode:?}: f32 got {got32}, by hand {w}"
        );
        for (a, b) in g32.iter().zip(&g) {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{mode:?} f32 gradient"
            );
        }
    }
}

/// Student equal to teacher: every mode is at its minimum (0), and the smooth modes have a
/// zero gradient there (tvd's is a subgradient at d = 0).
#[test]
fn student_equal_to_teacher_is_the_minimum() {
    let (rows, v, mask) = (3, 6, 5);
    let target = teacher_rows(3, rows, v, mask);
    let xt = vec![5u32; rows];
    for mode in MODES {
        let mut z: Vec<f64> = target
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % v == mask { 0.0 } else { x as f64 + 1.5 })
            .collect();
        let loss = distill_loss_in_place(&mut z, &target, &xt, mode, 3.0, mask, v);
        // The f32 teacher row sums to 1 only up to f32 rounding.
        assert!(loss.abs() < 1e-6, "{mode:?}: loss {loss}");
        if mode != DistillMode::Tvd {
            assert!(z.iter().all(|g| g.abs() < 1e-6), "{mode:?}: gradient {z:?}");
        }
    }
}

/// A teacher that puts no mass on a column (log-prob −inf) contributes nothing there in
/// kl-fwd (q·(t − ls) with q = 0), as in the kernel's twin: the loss stays finite and equals
/// the sum over the other columns.
#[test]
fn kl_fwd_ignores_a_teacher_column_at_minus_infinity() {
    let (v, mask) = (4, 3);
    let xt = [3u32];
    let z = [0.3f64, -0.2, 1.1, 0.0];
    let target = [f32::NEG_INFINITY, 0.5f32.ln(), 0.5f32.ln(), NEG_INF];
    let mut g = z.to_vec();
    let loss = distill_loss_in_place(&mut g, &target, &xt, DistillMode::KlFwd, 1.0, mask, v);
    let lse = (z[0].exp() + z[1].exp() + z[2].exp()).ln();
    let want: f64 = [1, 2]
        .iter()
        .map(|&j| 0.5 * ((target[j] as f64) - (z[j] - lse)))
        .sum();
    assert!(
        loss.is_finite() && (loss - want).abs() < 1e-6,
        "{loss} vs {want}"
    );
    assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
}
