//! SEDD: the score-entropy loss against the torch fixture and finite differences, and the
//! analytic and denoiser steps against the fixture's steps on fixed draws.

use super::*;
use crate::testing::algos_fixture::{assert_rel, f64s, int, num, section, u32s};
use crate::testing::grad::{assert_grad, fd_grad};
use crate::testing::Tol;

/// The loss (σ on both sides of the expm1 switch) and its logit gradient equal the fixture;
/// the gradient equals central finite differences; unmasked rows and the mask column get 0.
#[test]
fn sedd_loss_matches_fixture_and_finite_differences() {
    let fx = section("sedd");
    let (v, mask, len, norm) = (
        int(&fx, "v"),
        int(&fx, "mask"),
        int(&fx, "len"),
        num(&fx, "norm"),
    );
    let (z, sigma) = (f64s(&fx, "logits"), f64s(&fx, "sigma"));
    let (xt, x0) = (u32s(&fx, "xt"), u32s(&fx, "x0"));
    assert!(xt.iter().any(|&t| t as usize == mask) && xt.iter().any(|&t| t as usize != mask));
    let run = |x: &mut [f64]| loss_in_place(x, &xt, &x0, &sigma, len, norm, mask, v);
    let mut g = z.clone();
    let loss = run(&mut g);
    assert_rel("SEDD loss", &[loss], &[num(&fx, "loss")]);
    assert_rel("SEDD grad", &g, &f64s(&fx, "grad"));
    let fd = fd_grad(|x| run(&mut x.to_vec()), &z, 1e-5, None);
    assert_grad(
        "SEDD grad vs FD",
        &g,
        &fd,
        Tol {
            abs: 1e-7,
            rel: 1e-6,
        },
    );
    for (r, row) in g.chunks(v).enumerate() {
        assert_eq!(row[mask], 0.0);
        if xt[r] as usize != mask {
            assert!(row.iter().all(|&x| x == 0.0), "unmasked row {r}");
        }
    }
}

/// The analytic step (staggered score times the transposed transition) and the last,
/// denoiser step give the fixture's weights and, with its uniforms, its token.
#[test]
fn sedd_steps_match_fixture() {
    let fx = section("sedd");
    let (v, mask) = (int(&fx, "v"), int(&fx, "mask"));
    for (kind, last) in [("analytic", false), ("denoiser", true)] {
        let s = &fx[kind];
        let score = score_row(&f64s(s, "logits"), mask as u32, num(s, "sigma"));
        assert_eq!(score[mask], 1.0);
        let p = step_probs(&score, num(s, "dsigma"), mask, last);
        assert_rel(&format!("SEDD {kind} weights"), &p, &f64s(s, "probs"));
        let u = f64s(s, "uniforms");
        let tok = exp_race(v, |j| p[j], |j| u[j]);
        assert_eq!(tok, int(s, "token"), "{kind}");
    }
}

/// dσ is −α'/α of the schedule, and the score offset switches rule at σ = 0.5 continuously.
#[test]
fn sedd_schedule_helpers() {
    for t in [1e-3, 0.3, 0.999] {
        let s = sigma_at(t);
        let want = (1.0 - SAMPLING_EPS) / alpha(t);
        assert!((dsigma(s) - want).abs() <= 1e-12 * want);
    }
    let (a, b) = (log_expm1(0.5 - 1e-12), log_expm1(0.5));
    assert!((a - b).abs() < 1e-9);
}
