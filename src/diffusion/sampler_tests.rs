//! Driver tests on analytic denoisers (`super::super::toy`).

use super::*;
use crate::diffusion::metrics::exact_match_rate;
use crate::diffusion::posterior::masked_weights;
use crate::diffusion::stats::{binomial_within, chi_square_gof};
use crate::diffusion::toy::{toy_config, AllEqual, EpsToken, FixedMarginals, Recorder};
use crate::model::Algo;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn all_mask(batch: usize, len: usize, vocab: usize) -> Tokens {
    Tokens::new(batch, len, vec![(vocab - 1) as u32; batch * len], vocab).unwrap()
}

fn cfg(steps: usize, kind: SamplerKind, seed: u64) -> SamplerConfig {
    SamplerConfig {
        kind,
        seed,
        ..SamplerConfig::new(steps)
    }
}

/// The model algo that goes with a posterior in the reference: IMDM posterior on an IMDM
/// model, MDLM posterior on an MDLM model.
fn algo_of(kind: SamplerKind) -> Algo {
    match kind {
        SamplerKind::ImdmPosterior => Algo::Imdm,
        SamplerKind::MdlmPosterior => Algo::Mdlm,
    }
}

const KINDS: [SamplerKind; 2] = [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior];

#[test]
fn config_validation_and_time_grid() {
    let c = SamplerConfig::new(4);
    c.validate().unwrap();
    let (t0, s0) = c.step_times(0, 1.0);
    assert_eq!(t0, 1.0);
    // dt = (given_t + eps)/N, not the grid spacing (1 − eps)/N (quirk 2).
    assert!((t0 - s0 - (1.0 + 1e-5) / 4.0).abs() < 1e-15);
    let (t1, _) = c.step_times(1, 1.0);
    assert!((t0 - t1 - (1.0 - 1e-5) / 4.0).abs() < 1e-15);
    let (t3, _) = c.step_times(3, 0.5);
    assert!((t3 - 0.5 * (1.0 - 3.0 * (1.0 - 1e-5) / 4.0)).abs() < 1e-15);
    for bad in [
        SamplerConfig::new(0),
        SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::new(2)
        },
        SamplerConfig {
            nucleus_p: f64::NAN,
            ..SamplerConfig::new(2)
        },
        SamplerConfig {
            time_eps: 1.0,
            ..SamplerConfig::new(2)
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn generated_marginals_match_a_context_free_denoiser() {
    // V = 6 (5 real tokens + mask), L = 3, a different law per position, zeros included.
    let probs = vec![
        vec![0.1, 0.2, 0.3, 0.4, 0.0],
        vec![0.5, 0.0, 0.25, 0.125, 0.125],
        vec![0.2, 0.2, 0.2, 0.2, 0.2],
    ];
    let (b, len, v) = (3000, 3, 6);
    for kind in KINDS {
        for steps in [1, 8] {
            let mut den = FixedMarginals::new(toy_config(v, len, algo_of(kind), 2), &probs);
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let out = generate(
                &mut den,
                &cfg(steps, kind, 17 + steps as u64),
                &all_mask(b, len, v),
                None,
                None,
                &mut rng,
            )
            .unwrap();
            for l in 0..len {
                let mut counts = vec![0u64; v];
                for r in 0..b {
                    counts[out.tokens.ids[r * len + l] as usize] += 1;
                }
                let (stat, dof, p) = chi_square_gof(&counts, &den.probs(l));
                assert!(
                    p > 1e-4,
                    "{kind:?} N={steps} position {l}: chi2 {stat} dof {dof} p {p} {counts:?}"
                );
            }
        }
    }
}

#[test]
fn mdlm_needs_many_steps_for_the_all_equal_joint() {
    // V = 8: 7 real tokens, L = 3. One step samples positions independently from the uniform
    // marginal: P(all equal) = 7^-2. Many steps with the exact conditionals: ≈ 1.
    let (len, v) = (3, 8);
    for kind in KINDS {
        let mut den = AllEqual::new(toy_config(v, len, algo_of(kind), 2));
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n1 = 4000;
        let one = generate(
            &mut den,
            &cfg(1, kind, 5),
            &all_mask(n1, len, v),
            None,
            None,
            &mut rng,
        )
        .unwrap();
        let hits = (exact_match_rate(&one.tokens, 7) * n1 as f64).round() as u64;
        assert!(
            binomial_within(hits, n1 as u64, 1.0 / 49.0, 1e-4),
            "{kind:?} 1 step: {hits} of {n1} exact, expected {:.1}",
            n1 as f64 / 49.0
        );
        let many = generate(
            &mut den,
            &cfg(1000, kind, 6),
            &all_mask(400, len, v),
            None,
            None,
            &mut rng,
        )
        .unwrap();
        let rate = exact_match_rate(&many.tokens, 7);
        // Failure needs two positions to unmask in the same step before any is visible:
        // about 3/N·6/7 ≈ 0.3% here.
        assert!(rate >= 0.97, "{kind:?} 1000 steps: exact-match {rate}");
    }
}

#[test]
fn cache_skips_the_forward_when_nothing_changed() {
    let probs = vec![vec![0.3, 0.3, 0.4]; 3];
    let (len, v, steps) = (3, 4, 500);
    // MDLM: the cache is dropped only by unmasking, at most once per position.
    let den = FixedMarginals::new(toy_config(v, len, Algo::Mdlm, 2), &probs);
    let mut rec = Recorder::new(den);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let c = cfg(steps, SamplerKind::MdlmPosterior, 9);
    let out = generate(&mut rec, &c, &all_mask(1, len, v), None, None, &mut rng).unwrap();
    assert_eq!(out.nfe, rec.calls.len());
    assert!(out.nfe >= 1 && out.nfe <= len + 1, "nfe {}", out.nfe);
    for w in rec.calls.windows(2) {
        assert_ne!(w[0].xt, w[1].xt, "a forward ran although x did not change");
        let masks = |x: &[u32]| x.iter().filter(|&&t| t == 3).count();
        assert!(masks(&w[1].xt) < masks(&w[0].xt));
    }
    assert!(out.eps.is_none() && rec.calls.iter().all(|c| c.eps.is_none()));

    // IMDM: resets also drop the cache; every forward sees a new x or a new eps.
    let den = FixedMarginals::new(toy_config(v, len, Algo::Imdm, 2), &probs);
    let mut rec = Recorder::new(den);
    let c = cfg(steps, SamplerKind::ImdmPosterior, 10);
    let out = generate(&mut rec, &c, &all_mask(2, len, v), None, None, &mut rng).unwrap();
    assert_eq!(out.nfe, rec.calls.len());
    assert!(out.nfe < steps, "nfe {} of {steps}", out.nfe);
    assert!(out.resets > 0);
    for w in rec.calls.windows(2) {
        assert!(
            w[0].xt != w[1].xt || w[0].eps != w[1].eps,
            "a forward ran although neither x nor eps changed"
        );
    }
}

#[test]
fn prefix_and_infill_positions_are_kept() {
    let (len, v) = (6, 8);
    let m = 7u32;
    let templates: [[u32; 6]; 3] = [[3, m, m, m, m, m], [m, m, 5, m, m, 5], [m, 2, m, 2, m, m]];
    let reps = 40;
    let ids: Vec<u32> = (0..reps)
        .flat_map(|_| templates.iter().flatten().copied())
        .collect();
    let x_t = Tokens::new(3 * reps, len, ids.clone(), v).unwrap();
    for kind in KINDS {
        for steps in [1, 5] {
            let mut den = AllEqual::new(toy_config(v, len, algo_of(kind), 2));
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let out =
                generate(&mut den, &cfg(steps, kind, 12), &x_t, None, None, &mut rng).unwrap();
            for (r, row) in out.tokens.ids.chunks(len).enumerate() {
                let tpl = &templates[r % 3];
                let anchor = *tpl.iter().find(|&&t| t != m).unwrap();
                for l in 0..len {
                    if tpl[l] != m {
                        assert_eq!(row[l], tpl[l], "{kind:?} N={steps}: kept position changed");
                    }
                    // The exact conditional fills every gap with the visible token.
                    assert_eq!(row[l], anchor, "{kind:?} N={steps} row {r}: {row:?}");
                }
            }
        }
    }
}

#[test]
fn seeded_eps_is_reproducible() {
    let (len, v, nd) = (4, 9, 3);
    let model = toy_config(v, len, Algo::Imdm, nd);
    let seeds = [0i64, 1, 2, 42, 7, 7];
    let x_t = all_mask(seeds.len(), len, v);
    let c = cfg(6, SamplerKind::ImdmPosterior, 77);
    let run = |rng_seed: u64, s: Option<&[i64]>| {
        let mut rec = Recorder::new(EpsToken::new(model.clone()));
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let out = generate(&mut rec, &c, &x_t, None, s, &mut rng).unwrap();
        (out, rec.calls)
    };
    let (a, calls_a) = run(1, Some(&seeds));
    let (b, calls_b) = run(2, Some(&seeds));
    // Same seeds: same initial eps (the reference's hash), whatever the RNG; same samples.
    let want = crate::rng::seeded_eps(&seeds, len, nd, model.noise_type, 1.0);
    assert_eq!(calls_a[0].eps.as_deref(), Some(&want.data[..]));
    assert_eq!(calls_a, calls_b);
    assert_eq!(a, b);
    let per_row = len * nd;
    assert_eq!(
        want.data[4 * per_row..5 * per_row],
        want.data[5 * per_row..]
    );
    // Different seeds give different eps and (through EpsToken) different samples.
    let (c2, calls_c) = run(1, Some(&[5, 6, 8, 9, 10, 11]));
    assert_ne!(calls_c[0].eps, calls_a[0].eps);
    assert_ne!(c2.tokens, a.tokens);
    // Unseeded: the RNG decides.
    let (u1, _) = run(1, None);
    let (u1_again, _) = run(1, None);
    let (u2, _) = run(2, None);
    assert_eq!(u1, u1_again);
    assert_ne!(u1.eps, u2.eps);
}

#[test]
fn fix_eps_keeps_eps_and_resets_redraw_it_otherwise() {
    let (len, v, nd, b) = (5, 6, 3, 8);
    let probs = vec![vec![0.2; 5]; len];
    let x_t = all_mask(b, len, v);
    for fix in [true, false] {
        let den = FixedMarginals::new(toy_config(v, len, Algo::Imdm, nd), &probs);
        let mut rec = Recorder::new(den);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let c = SamplerConfig {
            fix_eps: fix,
            ..cfg(20, SamplerKind::ImdmPosterior, 31)
        };
        let out = generate(&mut rec, &c, &x_t, None, None, &mut rng).unwrap();
        assert!(
            out.resets > 0,
            "no reset happened; the test would prove nothing"
        );
        let first = rec.calls[0].eps.clone().unwrap();
        if fix {
            for call in &rec.calls {
                assert_eq!(call.eps.as_ref(), Some(&first), "fix_eps changed eps");
            }
            assert_eq!(out.eps.unwrap().data, first);
        } else {
            let mut redrawn = 0;
            for w in rec.calls.windows(2) {
                let (e0, e1) = (w[0].eps.as_ref().unwrap(), w[1].eps.as_ref().unwrap());
                for pos in 0..b * len {
                    let (a0, a1) = (&e0[pos * nd..][..nd], &e1[pos * nd..][..nd]);
                    if a0 != a1 {
                        redrawn += 1;
                        // Only a masked position can have reset, and it is still masked.
                        assert_eq!(w[0].xt[pos], 5);
                        assert_eq!(w[1].xt[pos], 5);
                        assert!(a1.iter().all(|x| (-1.0..1.0).contains(x)));
                    }
                }
            }
            // Each reset is redrawn exactly once, before the next forward.
            assert_eq!(redrawn, out.resets);
        }
    }
}

#[test]
fn first_imdm_step_frequencies_match_the_posterior() {
    // N = 2 from all-mask: step 0 goes from t = 1 to s = 1 − (1 + 1e-5)/2; the second forward
    // shows which positions unmasked, and eps reveals which reset.
    let (len, v, nd, b) = (5, 5, 2, 2000);
    let tok = vec![0.1, 0.2, 0.3, 0.4];
    let den = FixedMarginals::new(toy_config(v, len, Algo::Imdm, nd), &vec![tok.clone(); len]);
    let mut rec = Recorder::new(den);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let c = cfg(2, SamplerKind::ImdmPosterior, 8);
    let out = generate(&mut rec, &c, &all_mask(b, len, v), None, None, &mut rng).unwrap();
    assert_eq!(rec.calls.len(), 2);
    let (t, s) = c.step_times(0, 1.0);
    let a = StepAlphas {
        alpha_t: alpha(t),
        alpha_s: alpha(s),
    };
    let mut p = rec.inner.probs(0);
    p[4] = 0.0;
    let w = masked_weights(SamplerKind::ImdmPosterior, a, &p, 4);
    let (x1, e0, e1) = (
        &rec.calls[1].xt,
        rec.calls[0].eps.as_ref().unwrap(),
        rec.calls[1].eps.as_ref().unwrap(),
    );
    let n = (b * len) as u64;
    let (mut unmask, mut reset, mut stay) = (0u64, 0u64, 0u64);
    let mut tokens = vec![0u64; 4];
    for pos in 0..b * len {
        if x1[pos] != 4 {
            unmask += 1;
            tokens[x1[pos] as usize] += 1;
        } else if e0[pos * nd..][..nd] != e1[pos * nd..][..nd] {
            reset += 1;
        } else {
            stay += 1;
        }
    }
    assert_eq!(reset as usize, out.resets, "all resets happen in step 0");
    for (name, k, pr) in [
        ("unmask", unmask, w[..4].iter().sum::<f64>()),
        ("stay", stay, w[4]),
        ("reset", reset, w[5]),
    ] {
        assert!(
            binomial_within(k, n, pr, 1e-4),
            "{name}: {k} of {n}, p {pr}"
        );
    }
    let (stat, dof, pv) = chi_square_gof(&tokens, &tok);
    assert!(pv > 1e-4, "tokens chi2 {stat} dof {dof} p {pv}");
}

#[test]
fn greedy_noise_removal_takes_the_argmax() {
    let probs = vec![vec![0.1, 0.6, 0.3], vec![0.5, 0.2, 0.3]];
    let (len, v) = (2, 4);
    let mut den = FixedMarginals::new(toy_config(v, len, Algo::Mdlm, 2), &probs);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let c = SamplerConfig {
        noise_removal: NoiseRemoval::Greedy,
        ..cfg(1, SamplerKind::MdlmPosterior, 1)
    };
    let out = generate(&mut den, &c, &all_mask(50, len, v), None, None, &mut rng).unwrap();
    assert!(out.tokens.ids.chunks(2).all(|r| r == [1, 0]));
    assert_eq!(out.nfe, 1);
}

#[test]
fn bad_inputs_are_reported() {
    let (len, v) = (3, 4);
    let mut den = AllEqual::new(toy_config(v, len, Algo::Imdm, 2));
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let c = SamplerConfig::new(2);
    let x = all_mask(2, len, v);
    let err = |r: Result<SampleOutput>| r.unwrap_err().to_string();
    let e = err(generate(&mut den, &c, &x, Some(&[1.0]), None, &mut rng));
    assert!(e.contains("given_t has 1 entries"), "{e}");
    let e = err(generate(
        &mut den,
        &c,
        &x,
        Some(&[1.0, 0.0]),
        None,
        &mut rng,
    ));
    assert!(e.contains("given_t[1]"), "{e}");
    let e = err(generate(&mut den, &c, &x, None, Some(&[1, 2, 3]), &mut rng));
    assert!(e.contains("3 eps seeds"), "{e}");
    let bad = Tokens {
        batch: 1,
        len,
        ids: vec![0, 4, 3],
    };
    let e = err(generate(&mut den, &c, &bad, None, None, &mut rng));
    assert!(e.contains("outside the vocabulary"), "{e}");
    // A row without masks may have given_t = 0: nothing to generate.
    let clean = Tokens::new(1, len, vec![1, 1, 1], v).unwrap();
    let out = generate(&mut den, &c, &clean, Some(&[0.0]), None, &mut rng).unwrap();
    assert_eq!(out.tokens, clean);
}

#[test]
fn temperature_and_nucleus_reach_the_draw() {
    // One step = noise removal: the draw is from the filtered p, raised to 1/T.
    let tok = vec![0.1, 0.2, 0.3, 0.4];
    let (len, v, b) = (2, 5, 6000);
    for kind in KINDS {
        let mut den = FixedMarginals::new(
            toy_config(v, len, algo_of(kind), 2),
            &vec![tok.clone(); len],
        );
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let count = |out: &SampleOutput| {
            let mut c = vec![0u64; 4];
            out.tokens.ids.iter().for_each(|&t| c[t as usize] += 1);
            c
        };
        let hot = SamplerConfig {
            temperature: 0.5,
            ..cfg(1, kind, 40)
        };
        let out = generate(&mut den, &hot, &all_mask(b, len, v), None, None, &mut rng).unwrap();
        let (stat, dof, p) = chi_square_gof(&count(&out), &[0.01, 0.04, 0.09, 0.16]);
        assert!(p > 1e-4, "{kind:?} T=0.5: chi2 {stat} dof {dof} p {p}");
        // Nucleus 0.6: sorted 0.4, 0.3 (cum 0.7 > 0.6), shifted: keep {3, 2} -> 3/7, 4/7.
        let top = SamplerConfig {
            nucleus_p: 0.6,
            ..cfg(1, kind, 41)
        };
        let out = generate(&mut den, &top, &all_mask(b, len, v), None, None, &mut rng).unwrap();
        let (stat, dof, p) = chi_square_gof(&count(&out), &[0.0, 0.0, 0.3, 0.4]);
        assert!(p > 1e-4, "{kind:?} top-p 0.6: chi2 {stat} dof {dof} p {p}");
    }
}

#[test]
fn given_t_scales_each_rows_grid() {
    // Rows alternate given_t = 1 and 0.25 (IM-ReDi datagen). After step 0 of N = 4, the
    // unmasked fraction of each row group is (α_s − α_t)/(1 − α_t) at that row's own times.
    let (len, v, nd, b) = (4, 5, 2, 3000);
    let tok = vec![0.25; 4];
    for kind in KINDS {
        let den = FixedMarginals::new(
            toy_config(v, len, algo_of(kind), nd),
            &vec![tok.clone(); len],
        );
        let mut rec = Recorder::new(den);
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let g: Vec<f64> = (0..b)
            .map(|r| if r % 2 == 0 { 1.0 } else { 0.25 })
            .collect();
        let c = cfg(4, kind, 50);
        let out = generate(&mut rec, &c, &all_mask(b, len, v), Some(&g), None, &mut rng).unwrap();
        assert!(!out.tokens.ids.contains(&4), "masks remain");
        let x1 = &rec.calls[1].xt;
        for parity in [0, 1] {
            let (t, s) = c.step_times(0, g[parity]);
            let p = (alpha(s) - alpha(t)) / (1.0 - alpha(t));
            let rows = (parity..b).step_by(2);
            let n = (rows.len() * len) as u64;
            let k = rows
                .flat_map(|r| &x1[r * len..(r + 1) * len])
                .filter(|&&x| x != 4)
                .count() as u64;
            assert!(
                binomial_within(k, n, p, 1e-4),
                "{kind:?} given_t {}: {k} of {n} unmasked, p {p}",
                g[parity]
            );
        }
    }
}
