//! Tests of `denoiser`.

use super::*;
use crate::cpu::CpuDenoiser;
use crate::cuda::gpu_for_tests;
use crate::diffusion::generate;
use crate::diffusion::toy::{toy_config, AllEqual, EpsToken, FixedMarginals};
use crate::model::init::random_params;
use crate::model::Algo;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Sampler configurations covering every branch of the loop: both posteriors, one step,
/// many steps (cache hits), fix_eps, greedy removal, temperature, distinct seeds.
fn configs() -> Vec<SamplerConfig> {
    let mut v = vec![];
    for kind in [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior] {
        for (steps, fix_eps, greedy, temp) in [
            (1, false, false, 1.0),
            (3, false, false, 1.0),
            (8, true, false, 1.0),
            (16, false, true, 1.0),
            (32, false, false, 0.8),
            (5, true, true, 1.5),
        ] {
            v.push(SamplerConfig {
                kind,
                fix_eps,
                temperature: temp,
                noise_removal: if greedy {
                    NoiseRemoval::Greedy
                } else {
                    NoiseRemoval::Ancestral
                },
                seed: 1000 + steps as u64 + 7 * fix_eps as u64,
                ..SamplerConfig::new(steps)
            });
        }
    }
    v
}

/// All-mask rows, one row with a prefix and one with an infill gap.
fn start(batch: usize, len: usize, v: usize) -> Tokens {
    let mask = (v - 1) as u32;
    let mut ids = vec![mask; batch * len];
    for (l, id) in ids.iter_mut().take(len.min(3)).enumerate() {
        *id = (l % (v - 1)) as u32;
    }
    if batch > 1 && len > 2 {
        ids[len + len - 1] = 1;
    }
    Tokens::new(batch, len, ids, v).unwrap()
}

fn same(a: &SampleOutput, b: &SampleOutput, tag: &str) {
    assert_eq!(a.tokens, b.tokens, "{tag}: tokens");
    assert_eq!((a.nfe, a.resets), (b.nfe, b.resets), "{tag}: (nfe, resets)");
    assert_eq!(a.eps, b.eps, "{tag}: eps");
}

/// The device driver's loop (run with the twin) equals the CPU driver on toy denoisers
/// and a small random DiT, for every configuration: same tokens, NFE, resets and eps.
#[test]
fn twin_driver_matches_the_cpu_driver() {
    let (len, v) = (5, 9);
    let marg: Vec<Vec<f64>> = (0..len)
        .map(|l| (0..v - 1).map(|k| ((k + l) % 4) as f64).collect())
        .collect();
    let mut dit_cfg = crate::model::DitConfig::minimini();
    dit_cfg.vocab_size = 23;
    dit_cfg.mask_index = 22;
    dit_cfg.length = 6;
    dit_cfg.noise_dim = 4;
    let mut dens: Vec<(String, Box<dyn Denoiser>)> = vec![
        (
            "marginals".into(),
            Box::new(FixedMarginals::new(
                toy_config(v, len, Algo::Imdm, 3),
                &marg,
            )),
        ),
        (
            "all-equal mdlm".into(),
            Box::new(AllEqual::new(toy_config(v, len, Algo::Mdlm, 3))),
        ),
        (
            "eps-token".into(),
            Box::new(EpsToken::new(toy_config(v, len, Algo::Imdm, 3))),
        ),
    ];
    for (algo, nt) in [
        (Algo::Imdm, NoiseType::Randn),
        (Algo::Mdlm, NoiseType::Rand),
    ] {
        let mut c = dit_cfg.clone();
        (c.algo, c.noise_type) = (algo, nt);
        let p = random_params(&c, 3);
        dens.push((
            format!("dit {algo:?}"),
            Box::new(CpuDenoiser::new(p).unwrap()),
        ));
    }
    let (mut resets, mut hits) = (0, 0);
    for (name, den) in dens.iter_mut() {
        let (v, len) = (den.config().vocab_size, den.config().length);
        let x = start(3, len, v);
        for (k, cfg) in configs().iter().enumerate() {
            let tag = format!("{name} {:?} N={} case {k}", cfg.kind, cfg.steps);
            let g = [1.0, 0.7, 0.35];
            let seeds = [5, 6, 7];
            let (gt, sd) = match k % 3 {
                0 => (None, Some(&seeds[..])),
                1 => (Some(&g[..]), Some(&seeds[..])),
                _ => (None, None), // unseeded: both draw eps from the same rng state
            };
            let mut r1 = ChaCha8Rng::seed_from_u64(k as u64);
            let mut r2 = ChaCha8Rng::seed_from_u64(k as u64);
            let want = generate(den.as_mut(), cfg, &x, gt, sd, &mut r1).unwrap();
            let got = generate_twin(den.as_mut(), cfg, &x, gt, sd, &mut r2).unwrap();
            same(&got, &want, &tag);
            resets += want.resets;
            hits += cfg.steps - want.nfe;
        }
    }
    // The comparison covered resets and cache hits.
    assert!(resets > 0 && hits > 0, "resets {resets}, cache hits {hits}");
}

#[test]
fn prepare_rejects_what_the_cpu_driver_rejects() {
    let (len, v) = (3, 4);
    let mut den = AllEqual::new(toy_config(v, len, Algo::Imdm, 2));
    let c = SamplerConfig::new(2);
    let x = start(2, len, v);
    let bad_ids = Tokens {
        batch: 1,
        len,
        ids: vec![0, 4, 3],
    };
    type Case = (SamplerConfig, Tokens, Option<Vec<f64>>, Option<Vec<i64>>);
    let cases: Vec<Case> = vec![
        (c.clone(), x.clone(), Some(vec![1.0]), None),
        (c.clone(), x.clone(), Some(vec![1.0, 0.0]), None),
        (c.clone(), x.clone(), Some(vec![1.0, 1.5]), None),
        (c.clone(), x.clone(), None, Some(vec![1, 2, 3])),
        (c.clone(), bad_ids, None, None),
        (SamplerConfig::new(0), x.clone(), None, None),
    ];
    for (cfg, x, g, s) in cases {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let want = generate(&mut den, &cfg, &x, g.as_deref(), s.as_deref(), &mut rng);
        let got = generate_twin(&mut den, &cfg, &x, g.as_deref(), s.as_deref(), &mut rng);
        let (want, got) = (want.unwrap_err().to_string(), got.unwrap_err().to_string());
        assert_eq!(got, want);
    }
    // Nucleus: the CPU driver runs it, the device loop refuses with a pointer to it.
    let nuc = SamplerConfig {
        nucleus_p: 0.9,
        ..c
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert!(generate(&mut den, &nuc, &x, None, None, &mut rng).is_ok());
    let e = generate_twin(&mut den, &nuc, &x, None, None, &mut rng).unwrap_err();
    assert!(e.to_string().contains("CPU posterior"), "{e}");
}

/// The small DiT configuration of the GPU tests (head dim 32, odd vocabulary).
fn gpu_test_config(algo: Algo, noise_type: NoiseType) -> DitConfig {
    let mut c = DitConfig::minimini();
    (c.vocab_size, c.mask_index, c.length, c.noise_dim) = (1001, 1000, 37, 16);
    (c.algo, c.noise_type, c.noise_scale) = (algo, noise_type, 0.5);
    c
}

/// The fast path against the CPU driver on the same GPU denoiser: identical tokens, NFE,
/// resets, and eps up to its bf16 rounding.
#[test]
fn gpu_generate_matches_the_cpu_driver_on_the_gpu_denoiser() {
    let Some(gpu) = gpu_for_tests() else { return };
    for (algo, nt) in [
        (Algo::Imdm, NoiseType::Rand),
        (Algo::Imdm, NoiseType::Randn),
        (Algo::Mdlm, NoiseType::Rand),
    ] {
        let c = gpu_test_config(algo, nt);
        let mut den = GpuDenoiser::new(&gpu, &random_params(&c, 11)).unwrap();
        for (batch, len) in [(3, 37), (1, 1), (2, 64)] {
            let x = start(batch, len, c.vocab_size);
            let seeds: Vec<i64> = (0..batch as i64).map(|b| 40 + b).collect();
            let g: Vec<f64> = (0..batch).map(|b| 1.0 - 0.3 * b as f64).collect();
            for (k, cfg) in configs().iter().enumerate() {
                let tag = format!(
                    "{algo:?} {nt:?} {batch}x{len} {:?} N={}",
                    cfg.kind, cfg.steps
                );
                let gt = (k % 2 == 1).then_some(&g[..]);
                let mut rng = ChaCha8Rng::seed_from_u64(0);
                let want = generate(&mut den, cfg, &x, gt, Some(&seeds), &mut rng).unwrap();
                let got = den.generate(cfg, &x, gt, Some(&seeds), &mut rng).unwrap();
                let want = SampleOutput {
                    eps: want.eps.as_ref().map(round_bf16),
                    ..want
                };
                same(&got, &want, &tag);
                let mask = c.mask_index as u32;
                assert!(!got.tokens.ids.contains(&mask), "{tag}: masks left");
            }
        }
    }
}

/// Through the GPU denoiser, carried-over positions give log p = 0 at their token, and
/// the fast path refuses nucleus and bad inputs with the CPU driver's messages.
#[test]
fn gpu_denoiser_contract_and_errors() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = gpu_test_config(Algo::Imdm, NoiseType::Rand);
    let mut den = GpuDenoiser::new(&gpu, &random_params(&c, 2)).unwrap();
    let x = start(2, 9, c.vocab_size);
    let eps = crate::rng::seeded_eps(&[1, 2], 9, c.noise_dim, c.noise_type, 0.5);
    let lp = den.log_probs(&x, Some(&eps)).unwrap();
    assert_eq!(lp.shape, vec![2, 9, c.vocab_size]);
    assert_eq!(
        lp.data[c.vocab_size + 1],
        0.0,
        "carry-over of token 1 at position 1"
    );
    assert!(den.log_probs(&x, None).is_err(), "IMDM needs eps");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let nuc = SamplerConfig {
        nucleus_p: 0.5,
        ..SamplerConfig::new(4)
    };
    assert!(den.generate(&nuc, &x, None, None, &mut rng).is_err());
    let e = den
        .generate(&SamplerConfig::new(4), &x, Some(&[1.0]), None, &mut rng)
        .unwrap_err();
    assert!(e.to_string().contains("given_t has 1 entries"), "{e}");
}
