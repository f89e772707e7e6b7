//! Tests of `sample`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::cuda::ops::subs;
use crate::diffusion::posterior::{masked_weights, probs_from_log, sample_masked, temper, Outcome};
use crate::diffusion::schedule::alpha;
use crate::diffusion::stats::{binomial_within, chi_square_gof};
use crate::diffusion::{SamplerStream, StepAlphas, TokenFilter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One step's inputs on the host: x (rows), SUBS log-probs from random logits, per-row
/// alphas (some noise-removal rows, one α_s > 1 row when `edge`), eps (bf16-exact values).
struct Case {
    x: Vec<u32>,
    log_probs: Vec<f32>,
    alphas: Vec<f64>,
    eps: Vec<f32>,
}

fn case(seed: u64, (b, l, v, mask): (usize, usize, usize, usize), nd: usize) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = b * l;
    let x: Vec<u32> = (0..rows)
        .map(|_| {
            if rng.random_bool(0.7) {
                mask as u32
            } else {
                let t = rng.random_range(0..v - 1);
                (t + (t >= mask) as usize) as u32
            }
        })
        .collect();
    // Peaked and flat rows alike: logits of scale 0.5 to 8.
    let logits: Vec<f32> = (0..rows * v)
        .map(|i| rng.random_range(-1.0f32..1.0) * (0.5 + (i / v % 4) as f32 * 2.5))
        .collect();
    let (log_probs, _) = subs::cpu::subs_fwd(&logits, &x, mask, v);
    let alphas = (0..b)
        .flat_map(|r| {
            let t: f64 = rng.random_range(0.01..1.0);
            let s = t - rng.random_range(0.0..t);
            match r % 3 {
                2 => [alpha(t), 1.0],
                _ => [alpha(t), alpha(s)],
            }
        })
        .collect();
    let eps = (0..rows * nd)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
        .collect();
    Case {
        x,
        log_probs,
        alphas,
        eps,
    }
}

#[test]
fn params_layout_matches_the_kernel() {
    // The kernel's struct: 13 u32, an f32, ld and the pad, then the f64 at byte 64
    // (static_assert 72).
    assert_eq!(std::mem::offset_of!(SampleParams, noise_scale), 52);
    assert_eq!(std::mem::offset_of!(SampleParams, ld), 56);
    assert_eq!(std::mem::offset_of!(SampleParams, temperature), 64);
    let p = SampleParams::new(
        SamplerKind::MdlmPosterior,
        (2, 3, 5, 4),
        0x1234_5678_9abc,
        7,
    );
    assert_eq!(
        (p.key_lo, p.key_hi, p.seed()),
        (0x5678_9abc, 0x1234, 0x1234_5678_9abc)
    );
    assert_eq!((p.rows, p.eps_step, p.kind, p.ld), (6, 8, 1, 5));
}

#[test]
fn bad_shapes_are_rejected_before_any_work() {
    let dims = (2, 3, 5, 4);
    let p = SampleParams::new(SamplerKind::ImdmPosterior, dims, 1, 0);
    let ok = |p: &SampleParams, eps: Option<usize>| p.check(6, 6, eps, 2, 30, 4);
    ok(&p, None).unwrap();
    p.with_ld(8).check(6, 6, None, 2, 48, 4).unwrap();
    let bad = [
        p.check(5, 6, None, 2, 30, 4),
        p.check(6, 6, None, 2, 29, 4),
        p.check(6, 6, None, 2, 30, 2),
        p.check(6, 6, None, 1, 30, 4),
        ok(&p.with_eps(3, NoiseType::Rand, 1.0, true), None),
        ok(&p.with_eps(3, NoiseType::Rand, 1.0, false), Some(17)),
        ok(&p.with_temperature(0.0), None),
        ok(&SampleParams { mask_index: 5, ..p }, None),
        ok(&SampleParams { len: 4, ..p }, None),
        ok(&p.with_ld(4), None),
        ok(&p.with_ld(6), None),
        ok(
            &SampleParams::new(SamplerKind::MdlmPosterior, dims, 1, 0).with_eps(
                3,
                NoiseType::Rand,
                1.0,
                true,
            ),
            Some(18),
        ),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
}

/// The twin's bookkeeping: cat, x, counters and eps follow each position's outcome, and
/// the outcome is `sample_masked` with the stream's race uniforms.
#[test]
fn twin_applies_each_outcome_as_the_cpu_driver_does() {
    let dims = (3, 11, 9, 8);
    let nd = 5;
    for (kind, seed) in [
        (SamplerKind::ImdmPosterior, 1u64),
        (SamplerKind::MdlmPosterior, 2),
    ] {
        let c = case(seed, dims, nd);
        let p = SampleParams::new(kind, dims, seed + 40, 3).with_eps(
            nd,
            NoiseType::Randn,
            0.5,
            kind == SamplerKind::ImdmPosterior,
        );
        let (mut x, mut cat, mut eps, mut n) = (c.x.clone(), vec![0; 33], c.eps.clone(), [0; 2]);
        cpu::sample_fwd(
            &mut x,
            &mut cat,
            Some(&mut eps),
            &mut n,
            &c.log_probs,
            &c.alphas,
            &p,
        )
        .unwrap();
        let s = SamplerStream::new(seed + 40);
        let mut want_n = [0u32; 2];
        for pos in 0..33 {
            let row_eps = |e: &[f32]| e[pos * nd..(pos + 1) * nd].to_vec();
            if c.x[pos] != 8 {
                assert_eq!((cat[pos], x[pos]), (NONE, c.x[pos]), "pos {pos}");
                assert_eq!(row_eps(&eps), row_eps(&c.eps));
                continue;
            }
            let a = StepAlphas {
                alpha_t: c.alphas[2 * (pos / 11)],
                alpha_s: c.alphas[2 * (pos / 11) + 1],
            };
            let row = &c.log_probs[pos * 9..(pos + 1) * 9];
            let want = sample_masked(
                kind,
                a,
                row,
                8,
                TokenFilter::NONE,
                s.race_uniforms(3, pos as u32),
            );
            match want {
                Outcome::Token(t) => {
                    assert_eq!((cat[pos], x[pos]), (t, t));
                    want_n[0] += 1;
                }
                Outcome::Stay => assert_eq!((cat[pos], x[pos]), (8, 8)),
                Outcome::Reset => {
                    assert_eq!((cat[pos], x[pos]), (9, 8));
                    want_n[1] += 1;
                    let fresh: Vec<f32> = (0..nd as u32)
                        .map(|d| s.reset_eps(4, pos as u32, d, NoiseType::Randn, 0.5))
                        .collect();
                    assert_eq!(row_eps(&eps), fresh, "pos {pos}");
                }
            }
            if !matches!(want, Outcome::Reset) {
                assert_eq!(row_eps(&eps), row_eps(&c.eps));
            }
        }
        assert_eq!(n, want_n, "{kind:?}");
        assert!(want_n[0] > 0, "the case exercises unmasks");
    }
}

/// GPU and twin on the same inputs: identical x, cat, counters and bf16 eps. The race is
/// f64 on both sides with the same operation order and Philox counters; only exp/ln/pow
/// may differ in the last ulp, which flips a draw with probability ~1e-16 per position, so
/// no mismatch is allowed.
fn check_gpu(gpu: &Gpu, c: &Case, p: &SampleParams, tag: &str) {
    let s = &gpu.stream;
    let rows = c.x.len();
    let with_eps = p.noise_dim > 0;
    let mut dx = s.clone_htod(&c.x).unwrap();
    let mut dcat = s.alloc_zeros::<u32>(rows).unwrap();
    let mut dn = s.clone_htod(&[5u32, 7]).unwrap();
    let eps16: Vec<bf16> = c.eps.iter().map(|&e| bf16::from_f32(e)).collect();
    let mut deps = s.clone_htod(&eps16).unwrap();
    // Padded rows (p.ld > V) hold NaN in the padding: a read there would poison a draw.
    let (v, ld) = (p.vocab as usize, p.ld as usize);
    let mut padded = vec![f32::NAN; rows * ld];
    for r in 0..rows {
        padded[r * ld..r * ld + v].copy_from_slice(&c.log_probs[r * v..(r + 1) * v]);
    }
    let dlp = s.clone_htod(&padded).unwrap();
    let dal = s.clone_htod(&c.alphas).unwrap();
    sample_fwd_f32(
        gpu,
        &mut dx,
        &mut dcat,
        with_eps.then_some(&mut deps),
        &mut dn,
        &dlp,
        &dal,
        p,
    )
    .unwrap();
    let (mut x, mut cat, mut eps, mut n) = (c.x.clone(), vec![0; rows], c.eps.clone(), [5, 7]);
    let eps_arg = with_eps.then_some(eps.as_mut_slice());
    cpu::sample_fwd(
        &mut x,
        &mut cat,
        eps_arg,
        &mut n,
        &c.log_probs,
        &c.alphas,
        &p.with_ld(v),
    )
    .unwrap();
    let gx = s.clone_dtoh(&dx).unwrap();
    let gcat = s.clone_dtoh(&dcat).unwrap();
    let gn = s.clone_dtoh(&dn).unwrap();
    let bad: Vec<usize> = (0..rows)
        .filter(|&i| gcat[i] != cat[i] || gx[i] != x[i])
        .collect();
    assert!(
        bad.is_empty(),
        "{tag}: {} of {rows} positions differ; first {}: gpu cat {} x {}, twin cat {} x {}",
        bad.len(),
        bad[0],
        gcat[bad[0]],
        gx[bad[0]],
        cat[bad[0]],
        x[bad[0]]
    );
    assert_eq!(gn, n, "{tag}: counters");
    let geps = s.clone_dtoh(&deps).unwrap();
    let want: Vec<bf16> = eps.iter().map(|&e| bf16::from_f32(e)).collect();
    let bad = (0..geps.len()).find(|&i| geps[i].to_bits() != want[i].to_bits());
    assert!(
        bad.is_none(),
        "{tag}: eps differs at {bad:?}: gpu {:?} twin {:?}",
        bad.map(|i| geps[i]),
        bad.map(|i| want[i])
    );
}

#[test]
fn gpu_matches_twin_exactly() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (B, L, V, mask): tiny, awkward, the real OWT and LM1B vocabularies.
    for (i, &dims) in [
        (2, 7, 13, 12),
        (1, 1, 2, 1),
        (5, 3, 6, 0),
        (3, 129, 1001, 500),
        (2, 64, 50258, 50257),
        (4, 32, 30522, 103),
    ]
    .iter()
    .enumerate()
    {
        let nd = [3, 1, 8, 17, 64, 32][i];
        let c = case(100 + i as u64, dims, nd);
        for kind in [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior] {
            let imdm = kind == SamplerKind::ImdmPosterior;
            let base = SampleParams::new(kind, dims, 0xdead_beef_0000 + i as u64, 5);
            for (name, p) in [
                ("T=1", base),
                ("T=0.7", base.with_temperature(0.7)),
                ("T=1.3", base.with_temperature(1.3)),
                ("greedy", base.with_greedy(true)),
                ("padded rows", base.with_ld(dims.2.next_multiple_of(64))),
                ("padded greedy", base.with_ld(dims.2 + 1).with_greedy(true)),
                ("rand eps", base.with_eps(nd, NoiseType::Rand, 1.0, imdm)),
                ("randn eps", base.with_eps(nd, NoiseType::Randn, 0.5, imdm)),
                ("eps kept", base.with_eps(nd, NoiseType::Rand, 1.0, false)),
            ] {
                check_gpu(&gpu, &c, &p, &format!("{dims:?} {kind:?} {name}"));
            }
        }
    }
    // Structured inputs: every row masked with uniform log-probs (ties everywhere), and
    // a step at α_s > 1 (quirk 4: negative stay/reset weights, a forced unmask).
    let dims = (2, 50, 101, 100);
    let mut c = case(7, dims, 4);
    c.x.fill(100);
    let (lp, _) = subs::cpu::subs_fwd(&vec![0.0; 100 * 101], &c.x, 100, 101);
    c.log_probs = lp;
    c.alphas = vec![alpha(0.5), alpha(0.25), alpha(1e-6), alpha(-1e-5)];
    for kind in [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior] {
        let p = SampleParams::new(kind, dims, 3, 0);
        check_gpu(&gpu, &c, &p, &format!("uniform rows {kind:?}"));
        check_gpu(
            &gpu,
            &c,
            &p.with_greedy(true),
            &format!("uniform greedy {kind:?}"),
        );
    }
}

/// One fixed row replicated at 200,000 masked positions: the GPU's category counts against
/// the (tempered, normalised) posterior weights, and the stay / reset / unmask frequencies
/// within binomial bounds.
#[test]
fn gpu_draws_follow_the_posterior() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let tok = [0.1f64, 0.25, 0.15, 0.5, 0.0];
    let (v, mask) = (6usize, 5usize);
    let row: Vec<f32> = tok
        .iter()
        .map(|&q| if q > 0.0 { q.ln() as f32 } else { -1e6 })
        .chain([-1e6])
        .collect();
    let (b, l) = (200, 1000);
    let rows = b * l;
    let lp = s.clone_htod(&row.repeat(rows)).unwrap();
    let probs = probs_from_log(&row);
    for (kind, (t, sv), temp) in [
        (SamplerKind::ImdmPosterior, (0.6, 0.4), 1.0),
        (SamplerKind::ImdmPosterior, (1.0, 0.9), 1.0),
        (SamplerKind::ImdmPosterior, (0.6, 0.4), 0.5),
        (SamplerKind::ImdmPosterior, (0.3, -1.0), 1.0),
        (SamplerKind::MdlmPosterior, (0.6, 0.4), 1.0),
        (SamplerKind::MdlmPosterior, (0.6, 0.4), 2.0),
    ] {
        let a = StepAlphas {
            alpha_t: alpha(t),
            alpha_s: if sv < 0.0 { 1.0 } else { alpha(sv) },
        };
        let w: Vec<f64> = masked_weights(kind, a, &probs, mask)
            .into_iter()
            .map(|x| temper(x, temp))
            .collect();
        let mut dx = s.clone_htod(&vec![mask as u32; rows]).unwrap();
        let mut dcat = s.alloc_zeros::<u32>(rows).unwrap();
        let mut dn = s.alloc_zeros::<u32>(2).unwrap();
        let dal = s.clone_htod(&[a.alpha_t, a.alpha_s].repeat(b)).unwrap();
        let p = SampleParams::new(kind, (b, l, v, mask), 77, 2).with_temperature(temp);
        sample_fwd_f32(&gpu, &mut dx, &mut dcat, None, &mut dn, &lp, &dal, &p).unwrap();
        let cat = s.clone_dtoh(&dcat).unwrap();
        let n = s.clone_dtoh(&dn).unwrap();
        let mut counts = vec![0u64; w.len()];
        for &c in &cat {
            counts[c as usize] += 1;
        }
        let tag = format!("{kind:?} t {t} s {sv} T {temp}");
        let (stat, dof, pv) = chi_square_gof(&counts, &w);
        assert!(
            pv > 1e-4,
            "{tag}: chi2 {stat} dof {dof} p {pv} counts {counts:?}"
        );
        let z: f64 = w.iter().sum();
        let resets = counts.get(v).copied().unwrap_or(0);
        assert_eq!(
            n,
            [(rows as u64 - counts[mask] - resets) as u32, resets as u32],
            "{tag}"
        );
        assert!(
            binomial_within(counts[mask], rows as u64, w[mask] / z, 1e-4),
            "{tag} stay"
        );
        if kind == SamplerKind::ImdmPosterior {
            assert!(
                binomial_within(resets, rows as u64, w[v] / z, 1e-4),
                "{tag} reset"
            );
        }
        if sv < 0.0 {
            assert_eq!(
                counts[mask] + resets,
                0,
                "{tag}: noise removal leaves no mask"
            );
        }
    }
}

/// Reset eps: only reset rows change, their values follow the stream, and distinct rows get
/// distinct eps; without write_eps nothing changes.
#[test]
fn gpu_reset_eps_rows() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let (b, l, v, mask, nd) = (8, 500, 7, 6, 16);
    let rows = b * l;
    let row: Vec<f32> = [0.2f64, 0.2, 0.2, 0.2, 0.1, 0.1]
        .iter()
        .map(|q| q.ln() as f32)
        .chain([-1e6])
        .collect();
    let lp = s.clone_htod(&row.repeat(rows)).unwrap();
    let dal = s.clone_htod(&[alpha(0.9), alpha(0.5)].repeat(b)).unwrap();
    for write in [true, false] {
        let mut dx = s.clone_htod(&vec![mask as u32; rows]).unwrap();
        let mut dcat = s.alloc_zeros::<u32>(rows).unwrap();
        let mut dn = s.alloc_zeros::<u32>(2).unwrap();
        let mut deps = s.clone_htod(&vec![bf16::from_f32(9.0); rows * nd]).unwrap();
        let p = SampleParams::new(SamplerKind::ImdmPosterior, (b, l, v, mask), 5, 0).with_eps(
            nd,
            NoiseType::Rand,
            1.0,
            write,
        );
        sample_fwd_f32(
            &gpu,
            &mut dx,
            &mut dcat,
            Some(&mut deps),
            &mut dn,
            &lp,
            &dal,
            &p,
        )
        .unwrap();
        let cat = s.clone_dtoh(&dcat).unwrap();
        let eps = s.clone_dtoh(&deps).unwrap();
        let n = s.clone_dtoh(&dn).unwrap();
        let st = SamplerStream::new(5);
        let mut seen = std::collections::HashSet::new();
        for pos in 0..rows {
            let e = &eps[pos * nd..(pos + 1) * nd];
            if write && cat[pos] == v as u32 {
                for (d, x) in e.iter().enumerate() {
                    let want = st.reset_eps(1, pos as u32, d as u32, NoiseType::Rand, 1.0);
                    assert_eq!(x.to_bits(), bf16::from_f32(want).to_bits(), "pos {pos}");
                }
                assert!(seen.insert(e.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
            } else {
                assert!(e.iter().all(|x| x.to_f32() == 9.0), "pos {pos} changed");
            }
        }
        assert!(n[1] > 100, "resets {}", n[1]);
    }
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::{define, struct_size};
    use std::mem::size_of;
    assert_eq!(THREADS as u64, define("sample.cu", "SAMPLE_THREADS"));
    assert_eq!(NONE as u64, define("sample.cu", "SAMPLE_NONE"));
    assert_eq!(
        size_of::<SampleParams>(),
        struct_size("sample.cu", "SampleParams")
    );
}
