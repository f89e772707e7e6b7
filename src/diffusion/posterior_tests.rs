//! Tests of the per-position posterior maths and the exponential race.

use super::*;
use crate::diffusion::schedule::alpha;
use crate::diffusion::stats::{binomial_within, chi_square_gof};
use crate::diffusion::stream::SamplerStream;

const NEG: f32 = -1_000_000.0;

/// SUBS-like log-probs over V = probs.len() + 1 with the mask appended last (log p = −1e6).
fn subs_row(probs: &[f64]) -> Vec<f32> {
    let z: f64 = probs.iter().sum();
    let mut row: Vec<f32> = probs.iter().map(|p| (p / z).ln() as f32).collect();
    row.push(NEG);
    row
}

/// Exactly normalised f64 probabilities over V = tok.len() + 1, mask (p = 0) last.
fn probs_f64(tok: &[f64]) -> Vec<f64> {
    let z: f64 = tok.iter().sum();
    let mut p: Vec<f64> = tok.iter().map(|x| x / z).collect();
    p.push(0.0);
    p
}

/// (α_t, α_s) pairs: the first sampler steps, a mid step, a tiny step, noise removal.
fn alpha_pairs() -> Vec<StepAlphas> {
    let mut v = vec![];
    for (t, s) in [
        (1.0, 0.99),
        (1.0, 0.5),
        (0.7, 0.3),
        (0.2, 0.19999),
        (0.05, 0.0),
    ] {
        v.push(StepAlphas {
            alpha_t: alpha(t),
            alpha_s: alpha(s),
        });
    }
    v.push(StepAlphas {
        alpha_t: alpha(1e-5),
        alpha_s: 1.0,
    });
    v
}

#[test]
fn imdm_weights_sum_to_one_at_masked_positions() {
    let probs = probs_f64(&[0.1, 0.25, 0.05, 0.3, 0.2, 0.1]);
    let mask = probs.len() - 1;
    for a in alpha_pairs() {
        let w = masked_weights(SamplerKind::ImdmPosterior, a, &probs, mask);
        assert_eq!(w.len(), probs.len() + 1);
        let sum: f64 = w.iter().sum();
        assert!((sum - 1.0).abs() < 1e-12, "{a:?}: sum {sum}");
        assert!(w.iter().all(|&x| x >= 0.0), "{a:?}: {w:?}");
        // The closed forms of spec 5.3.
        let (at, as_) = (a.alpha_t, a.alpha_s);
        let r = at / as_;
        let stay = r * (1.0 - as_) / (1.0 - at);
        let reset = (1.0 - r) * (1.0 - as_) / (1.0 - at);
        assert!((w[mask] - stay).abs() < 1e-15, "{a:?}: stay {}", w[mask]);
        assert!((w[probs.len()] - reset).abs() < 1e-15, "{a:?}: reset");
        for v in 0..mask {
            let want = (as_ - at) * probs[v] / (1.0 - at);
            assert!((w[v] - want).abs() < 1e-15);
        }
    }
}

#[test]
fn noise_removal_step_has_no_mask_or_reset_mass() {
    let row = subs_row(&[0.5, 0.2, 0.2, 0.1]);
    let probs = probs_from_log(&row);
    let mask = row.len() - 1;
    let a = StepAlphas {
        alpha_t: alpha(1e-5),
        alpha_s: 1.0,
    };
    let w = masked_weights(SamplerKind::ImdmPosterior, a, &probs, mask);
    assert_eq!(w[mask], 0.0, "stay mass");
    assert_eq!(w[row.len()], 0.0, "reset mass");
    for v in 0..mask {
        assert!(
            (w[v] - probs[v]).abs() < 1e-15,
            "token {v}: {} vs {}",
            w[v],
            probs[v]
        );
    }
    let q = masked_weights(SamplerKind::MdlmPosterior, a, &probs, mask);
    assert_eq!(q.len(), row.len());
    assert_eq!(q[mask], 0.0);
    // A draw therefore never keeps the mask.
    let s = SamplerStream::new(3);
    for pos in 0..2000 {
        for kind in [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior] {
            let o = sample_masked(
                kind,
                a,
                &row,
                mask,
                TokenFilter::NONE,
                s.race_uniforms(0, pos),
            );
            assert!(
                matches!(o, Outcome::Token(v) if (v as usize) < mask),
                "{o:?}"
            );
        }
    }
}

#[test]
fn mdlm_weights_follow_the_formula_and_match_imdm_marginals() {
    let probs = probs_f64(&[0.4, 0.1, 0.3, 0.2]);
    let mask = probs.len() - 1;
    for a in alpha_pairs() {
        let q = masked_weights(SamplerKind::MdlmPosterior, a, &probs, mask);
        assert_eq!(q[mask], 1.0 - a.alpha_s);
        for v in 0..mask {
            assert_eq!(q[v], probs[v] * (a.alpha_s - a.alpha_t));
        }
        // Normalised, MDLM unmasks like IMDM and its mask mass is IMDM's stay + reset.
        let z: f64 = q.iter().sum();
        assert!((z - (1.0 - a.alpha_t)).abs() < 1e-12);
        let w = masked_weights(SamplerKind::ImdmPosterior, a, &probs, mask);
        for v in 0..mask {
            assert!((q[v] / z - w[v]).abs() < 1e-12);
        }
        assert!((q[mask] / z - (w[mask] + w[mask + 1])).abs() < 1e-12);
    }
}

#[test]
fn nucleus_matches_hand_worked_examples() {
    let ln = |p: &[f64]| -> Vec<f32> { p.iter().map(|x| x.ln() as f32).collect() };
    let close = |got: Vec<f64>, want: &[f64]| {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "got {got:?} want {want:?}");
        }
    };
    // cum = [0.5, 0.8, 1.0]; > 0.6 marks [F, T, T]; shifted [F, F, T]: keep the top two.
    close(
        nucleus_probs(&ln(&[0.5, 0.3, 0.2]), 0.6),
        &[0.625, 0.375, 0.0],
    );
    // Same order scrambled: the rule follows the sorted order, not the index order.
    close(
        nucleus_probs(&ln(&[0.2, 0.5, 0.3]), 0.6),
        &[0.0, 0.625, 0.375],
    );
    // Just above the top token's mass, the second token is the first one past the threshold.
    close(
        nucleus_probs(&ln(&[0.5, 0.3, 0.2]), 0.5001),
        &[0.625, 0.375, 0.0],
    );
    // Everything is over 0.4: the shift keeps only the top token.
    close(nucleus_probs(&ln(&[0.5, 0.3, 0.2]), 0.4), &[1.0, 0.0, 0.0]);
    // cum reaches 1.0 > 0.99 only at the last token, which the shift keeps.
    close(nucleus_probs(&ln(&[0.5, 0.3, 0.2]), 0.99), &[0.5, 0.3, 0.2]);
    // Ties keep index order (stable sort): 0.25 ≤ 0.3 < 0.5, keep two of four.
    close(
        nucleus_probs(&ln(&[0.25, 0.25, 0.25, 0.25]), 0.3),
        &[0.5, 0.5, 0.0, 0.0],
    );
    // The SUBS mask entry (−1e6) has zero mass and is never kept unless it is on top.
    let mut row = ln(&[0.6, 0.4]);
    row.push(NEG);
    close(nucleus_probs(&row, 0.7), &[0.6, 0.4, 0.0]);
    close(nucleus_probs(&row, 0.5), &[1.0, 0.0, 0.0]);
    // Applied before the posterior: removed tokens get zero weight, the rest renormalise.
    let row = subs_row(&[0.5, 0.3, 0.2]);
    let a = StepAlphas {
        alpha_t: 0.2,
        alpha_s: 0.6,
    };
    let f = TokenFilter {
        nucleus_p: 0.6,
        temperature: 1.0,
    };
    let s = SamplerStream::new(11);
    for pos in 0..3000 {
        let o = sample_masked(
            SamplerKind::ImdmPosterior,
            a,
            &row,
            3,
            f,
            s.race_uniforms(0, pos),
        );
        assert_ne!(o, Outcome::Token(2), "a filtered token was drawn");
    }
}

#[test]
fn temperature_raises_weights_to_one_over_t() {
    assert_eq!(temper(0.25, 1.0), 0.25);
    assert!((temper(0.25, 0.5) - 0.0625).abs() < 1e-15);
    assert!((temper(0.25, 2.0) - 0.5).abs() < 1e-15);
    assert_eq!(temper(0.0, 0.7), 0.0);
    // T = 0.5 on weights [1, 2, 3] draws with probabilities ∝ [1, 4, 9].
    let s = SamplerStream::new(5);
    let n = 60_000u32;
    let mut counts = [0u64; 3];
    for pos in 0..n {
        let c = exp_race(3, |c| temper((c + 1) as f64, 0.5), s.race_uniforms(0, pos));
        counts[c] += 1;
    }
    let (stat, dof, p) = chi_square_gof(&counts, &[1.0, 4.0, 9.0]);
    assert!(p > 1e-4, "chi2 {stat} dof {dof} p {p} counts {counts:?}");
    // ... and is clearly not the untempered law.
    assert!(chi_square_gof(&counts, &[1.0, 2.0, 3.0]).2 < 1e-10);
}

#[test]
fn exp_race_draws_follow_the_normalised_weights() {
    // Unnormalised weights with zeros, including the first and last category.
    let w = [0.0, 0.3, 2.5, 0.7, 0.0, 1.2, 3.0, 0.05, 0.0];
    let n = 200_000u32;
    let s = SamplerStream::new(2024);
    let mut counts = vec![0u64; w.len()];
    for pos in 0..n {
        counts[exp_race(w.len(), |c| w[c], s.race_uniforms(7, pos))] += 1;
    }
    for (c, &x) in w.iter().enumerate() {
        if x == 0.0 {
            assert_eq!(counts[c], 0, "zero-weight category {c} was drawn");
        }
    }
    let (stat, dof, p) = chi_square_gof(&counts, &w);
    assert_eq!(dof, 5);
    assert!(p > 1e-4, "chi2 {stat} dof {dof} p {p} counts {counts:?}");
    // The test has power: a 5% shift of mass from category 6 to 2 is rejected.
    let mut shifted = w;
    shifted[2] += 0.05 * 3.0;
    shifted[6] -= 0.05 * 3.0;
    assert!(chi_square_gof(&counts, &shifted).2 < 1e-4);
}

#[test]
fn exp_race_ties_go_to_the_first_index() {
    let same_u = |_c: usize| 0.5;
    assert_eq!(exp_race(4, |c| [1.0, 3.0, 3.0, 2.0][c], same_u), 1);
    assert_eq!(exp_race(3, |_| 1.0, same_u), 0);
    assert_eq!(exp_race(3, |_| 0.0, same_u), 0);
    // U = 0 gives the largest E (≈ 23.03) and U → 1 the smallest (≈ 1e-10).
    let u = |c: usize| [0.0, 0.999_999_999, 0.5][c];
    assert_eq!(exp_race(3, |_| 1.0, u), 1);
    assert_eq!(greedy_token(&[0.1, 0.7, 0.7, -1.0]), 1);
    assert_eq!(greedy_token(&[NEG, -3.0, -2.0]), 2);
}

#[test]
fn imdm_step_frequencies_are_within_binomial_bounds() {
    let tok = [0.1, 0.25, 0.05, 0.3, 0.2, 0.1];
    let row = subs_row(&tok);
    let mask = tok.len();
    let s = SamplerStream::new(99);
    let n = 200_000u32;
    for a in [
        StepAlphas {
            alpha_t: 0.3,
            alpha_s: 0.6,
        },
        StepAlphas {
            alpha_t: alpha(1.0),
            alpha_s: alpha(0.9),
        },
    ] {
        let w = masked_weights(SamplerKind::ImdmPosterior, a, &probs_from_log(&row), mask);
        let (mut stay, mut reset, mut unmask) = (0u64, 0u64, 0u64);
        let mut tokens = vec![0u64; tok.len()];
        for pos in 0..n {
            match sample_masked(
                SamplerKind::ImdmPosterior,
                a,
                &row,
                mask,
                TokenFilter::NONE,
                s.race_uniforms(1, pos),
            ) {
                Outcome::Stay => stay += 1,
                Outcome::Reset => reset += 1,
                Outcome::Token(v) => {
                    unmask += 1;
                    tokens[v as usize] += 1;
                }
            }
        }
        let p_unmask: f64 = w[..mask].iter().sum();
        for (name, k, p) in [
            ("stay", stay, w[mask]),
            ("reset", reset, w[mask + 1]),
            ("unmask", unmask, p_unmask),
        ] {
            assert!(
                binomial_within(k, n as u64, p, 1e-4),
                "{a:?} {name}: {k} of {n}, p {p}"
            );
        }
        // Given an unmask, the token follows p.
        let (stat, dof, pv) = chi_square_gof(&tokens, &tok);
        assert!(pv > 1e-4, "{a:?}: chi2 {stat} dof {dof} p {pv}");
    }
}
