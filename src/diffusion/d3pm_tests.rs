//! D3PM: L_vb (both α_s rules) and the reconstruction term against the torch fixture and
//! finite differences, the time discretisation, and the ancestral step on fixed draws.

use super::*;
use crate::testing::algos_fixture::{assert_rel, f64s, int, num, section, u32s};
use crate::testing::grad::{assert_grad, fd_grad};
use crate::testing::Tol;

/// L_vb as the reference writes it (α_s = t − dt) and corrected, each equal to the fixture
/// with its gradient, the gradient also equal to finite differences.
#[test]
fn d3pm_vb_matches_fixture_and_finite_differences() {
    let fx = section("d3pm");
    let (v, mask, len, norm) = (
        int(&fx, "v"),
        int(&fx, "mask"),
        int(&fx, "len"),
        num(&fx, "norm"),
    );
    let (z, alpha_t) = (f64s(&fx, "logits"), f64s(&fx, "alpha_t"));
    let (xt, x0) = (u32s(&fx, "xt"), u32s(&fx, "x0"));
    for (rule, name) in [
        (AlphaS::AsWritten, "as_written"),
        (AlphaS::Corrected, "corrected"),
    ] {
        let o = D3pmOptions {
            steps: int(&fx, "T"),
            alpha_s: rule,
            subs_masking: false,
        };
        let run = |x: &mut [f64]| vb_in_place(x, &xt, &x0, &alpha_t, len, norm, mask, v, &o);
        let mut g = z.clone();
        let loss = run(&mut g);
        assert_rel(
            &format!("D3PM vb {name}"),
            &[loss],
            &[num(&fx, &format!("vb_{name}"))],
        );
        assert_rel(
            &format!("D3PM grad {name}"),
            &g,
            &f64s(&fx, &format!("grad_{name}")),
        );
        let fd = fd_grad(|x| run(&mut x.to_vec()), &z, 1e-5, None);
        assert_grad(
            &format!("D3PM grad {name} vs FD"),
            &g,
            &fd,
            Tol {
                abs: 1e-7,
                rel: 1e-6,
            },
        );
    }
}

/// The reconstruction term −log x_θ(x0) over every position equals the fixture, and so does
/// its gradient; finite differences agree.
#[test]
fn d3pm_recon_matches_fixture_and_finite_differences() {
    let fx = section("d3pm");
    let (v, mask, norm) = (int(&fx, "v"), int(&fx, "mask"), num(&fx, "norm"));
    let (z, x0) = (f64s(&fx, "recon_logits"), u32s(&fx, "x0"));
    let run = |x: &mut [f64]| recon_in_place(x, &x0, norm, mask, v, false);
    let mut g = z.clone();
    let loss = run(&mut g);
    assert_rel("D3PM recon", &[loss], &[num(&fx, "recon")]);
    assert_rel("D3PM recon grad", &g, &f64s(&fx, "recon_grad"));
    let fd = fd_grad(|x| run(&mut x.to_vec()), &z, 1e-5, None);
    assert_grad(
        "D3PM recon vs FD",
        &g,
        &fd,
        Tol {
            abs: 1e-8,
            rel: 1e-6,
        },
    );
}

/// The ancestral step's weights and token equal the fixture's on its draws.
#[test]
fn d3pm_step_matches_fixture() {
    let fx = section("d3pm");
    let (v, mask) = (int(&fx, "v"), int(&fx, "mask"));
    let s = &fx["step"];
    let q = step_weights(
        &f64s(s, "logits"),
        num(s, "alpha_t"),
        num(s, "alpha_s"),
        mask,
        false,
    );
    assert_rel("D3PM step weights", &q, &f64s(s, "weights"));
    let u = f64s(s, "uniforms");
    assert_eq!(exp_race(v, |j| q[j], |j| u[j]), int(s, "token"));
}

/// Training times land on the grid {2/T, …, 1}, as `Diffusion.nll` computes them.
#[test]
fn d3pm_times_are_discrete() {
    for &t in &[1e-3, 0.0015, 0.5, 0.9994, 0.99999] {
        let d = discretize(t, 1000);
        let k = d * 1000.0;
        assert!(
            (k - k.round()).abs() < 1e-9 && (2.0..=1000.0).contains(&k.round()),
            "{t} -> {d}"
        );
    }
    assert_eq!(discretize(0.25, 4), 0.5);
}

/// The corrected L_vb is a KL divergence, never negative; the written rule is unbounded below
/// at late times (α_t < 1 − α_t) once x_θ puts its mass on the mask: about −T·ln 2 per masked
/// position at t → 1.
#[test]
fn d3pm_written_rule_is_not_a_bound() {
    let (v, mask, len) = (5usize, 4usize, 1usize);
    let mut worst_corrected = f64::INFINITY;
    let mut written_at_mask = 0.0;
    for (k, &alpha_t) in [0.9, 0.6, 0.3, 0.05, 0.001].iter().enumerate() {
        for &zm in &[-3.0, 0.0, 3.0, 12.0] {
            let z = [0.3, -0.2, 0.1 * k as f64, 0.5, zm];
            for (rule, out) in [
                (AlphaS::Corrected, &mut worst_corrected),
                (AlphaS::AsWritten, &mut written_at_mask),
            ] {
                let o = D3pmOptions {
                    steps: 1000,
                    alpha_s: rule,
                    subs_masking: false,
                };
                let l = vb_in_place(
                    &mut z.to_vec(),
                    &[mask as u32],
                    &[1],
                    &[alpha_t],
                    len,
                    1.0,
                    mask,
                    v,
                    &o,
                );
                match rule {
                    AlphaS::Corrected => *out = out.min(l),
                    AlphaS::AsWritten if alpha_t == 0.001 && zm == 12.0 => *out = l,
                    AlphaS::AsWritten => {}
                }
            }
        }
    }
    assert!(
        worst_corrected >= -1e-9,
        "corrected L_vb {worst_corrected} < 0"
    );
    assert!(
        written_at_mask < -600.0,
        "written rule at t -> 1: {written_at_mask}"
    );
}
