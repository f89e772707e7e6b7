//! Tests of `adamw`.

use super::cpu::HostTensor;
use super::*;
use crate::cuda::gpu_for_tests;
use crate::model::{init::random_params, DitConfig, DitParams};
use crate::testing::inputs::rand_f32_from;
use crate::train::optim::{clip_coef, clip_grad_norm, global_norm, AdamW, AdamWConfig};
use crate::train::Ema;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn small_config() -> DitConfig {
    let mut c = DitConfig::minimini();
    c.vocab_size = 13;
    c.mask_index = 12;
    c.blocks = 1;
    c
}

fn random_like(p: &DitParams, seed: u64, scale: f32) -> DitParams {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut g = p.clone();
    for (_, t) in g.named_mut() {
        t.data
            .iter_mut()
            .for_each(|x| *x = rng.random_range(-scale..scale));
    }
    g
}

fn host_tensors(p: &DitParams, g: &DitParams) -> Vec<HostTensor> {
    p.named()
        .into_iter()
        .zip(g.named())
        .map(|((_, p), (_, g))| HostTensor {
            p: p.data.clone(),
            g: g.data.clone(),
            m: vec![0.0; p.numel()],
            v: vec![0.0; p.numel()],
            w16: Some(vec![bf16::ZERO; p.numel()]),
            w32: None,
        })
        .collect()
}

#[test]
fn chunk_plan_covers_every_element_once() {
    let lens = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 0, 5];
    let plan = plan_chunks(&lens).unwrap();
    let mut covered = vec![0usize; lens.len()];
    let mut last = (-1i32, -1i64);
    for c in &plan {
        let n = lens[c.tensor as usize] as i64;
        assert!(c.start < n && c.start % CHUNK as i64 == 0, "{c:?}");
        assert!((c.tensor, c.start) > last, "chunks out of order");
        last = (c.tensor, c.start);
        covered[c.tensor as usize] += (n - c.start).min(CHUNK as i64) as usize;
    }
    assert_eq!(covered, lens);
    assert_eq!(plan.len(), 1 + 1 + 1 + 2 + 4 + 1);
}

/// Two steps of the twin with clipping and weight decay are bit-identical to
/// `clip_grad_norm` followed by `AdamW::step`, the CPU trainer's sequence.
#[test]
fn twin_is_bit_identical_to_the_cpu_optimizer() {
    let c = small_config();
    let p0 = random_params(&c, 1);
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut p = p0.clone();
    let mut opt = AdamW::new(&p, cfg, |_| false);
    let mut twin = host_tensors(&p0, &p0);
    let all = vec![true; p.named().len()];
    for (step, (seed, lr)) in [(3u64, 0.01), (4, 0.02)].into_iter().enumerate() {
        let g = random_like(&p0, seed, 2.0);
        // The CPU trainer: clip (in place), then AdamW.
        let mut gc = g.clone();
        let norm = clip_grad_norm(&mut gc, &all, 1.0);
        opt.step(&mut p, &gc, lr).unwrap();
        // The twin: per-tensor sums of squares -> the same norm -> the clip coefficient
        // folded into the update.
        let gs: Vec<&[f32]> = g.named().iter().map(|(_, t)| &t.data[..]).collect();
        let sq = cpu::sumsq(&gs);
        let norm2 = sq.iter().sum::<f64>().sqrt();
        assert!((norm - norm2).abs() <= 1e-12 * norm, "{norm} vs {norm2}");
        assert!((norm - global_norm(&g, &all)).abs() <= 1e-12 * norm);
        let coef = clip_coef(norm, 1.0);
        assert!(coef.is_some(), "the test should clip");
        for (t, (_, gt)) in twin.iter_mut().zip(g.named()) {
            t.g.copy_from_slice(&gt.data);
        }
        let k = AdamWCoeffs::new(&cfg, step as u64 + 1, lr);
        let bad = cpu::adamw(&mut twin, &k, coef);
        assert!(bad.iter().all(|&b| !b));
        for ((name, want), (t, st)) in p.named().into_iter().zip(twin.iter().zip(&opt.state)) {
            let st = st.as_ref().unwrap();
            assert!(
                t.p.iter()
                    .zip(&want.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: twin weights differ from AdamW::step"
            );
            assert_eq!(t.m, st.exp_avg.data, "{name} m");
            assert_eq!(t.v, st.exp_avg_sq.data, "{name} v");
            let w16: Vec<bf16> = want.data.iter().map(|&x| bf16::from_f32(x)).collect();
            assert_eq!(t.w16.as_ref().unwrap(), &w16, "{name} bf16 copy");
        }
    }
}

#[test]
fn twin_ema_matches_ema_update_and_flags_non_finite() {
    let c = small_config();
    let p0 = random_params(&c, 2);
    let p1 = random_like(&p0, 5, 1.0);
    let mut ema = Ema::new(&p0, 0.999);
    ema.update(&p1).unwrap();
    let omd = (1.0 - ema.decay_at(1)) as f32;
    for ((_, s0), ((_, p), (_, want))) in p0
        .named()
        .into_iter()
        .zip(p1.named().into_iter().zip(ema.shadow.named()))
    {
        let mut s = s0.data.clone();
        cpu::ema(&mut s, &p.data, omd, false);
        assert_eq!(s, want.data);
        cpu::ema(&mut s, &p.data, omd, true);
        assert_eq!(s, p.data);
    }
    let mut ts = vec![HostTensor {
        p: vec![1.0, 2.0],
        g: vec![f32::NAN, 0.0],
        m: vec![0.0; 2],
        v: vec![0.0; 2],
        w16: None,
        w32: Some(vec![0.0; 2]),
    }];
    let k = AdamWCoeffs::new(&AdamWConfig::default(), 1, 1e-3);
    assert_eq!(cpu::adamw(&mut ts, &k, None), vec![true]);
    assert_eq!(ts[0].w32.as_ref().unwrap()[1], ts[0].p[1]);
}

/// The kernels against the twin: AdamW bit for bit (weights, moments, bf16 and f32 working
/// copies, clip and decay on), sums of squares to 1e-12, EMA bit for bit, non-finite flags;
/// lengths 1, CHUNK - 1, CHUNK + 1, 3 CHUNK + 7 and an empty tensor.
#[test]
fn gpu_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let lens = [1usize, CHUNK - 1, CHUNK + 1, 0, 3 * CHUNK + 7];
    let mut host: Vec<HostTensor> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| HostTensor {
            p: rand_f32_from(&mut rng, n, -1.0, 1.0),
            g: rand_f32_from(&mut rng, n, -3.0, 3.0),
            m: rand_f32_from(&mut rng, n, -0.1, 0.1),
            v: rand_f32_from(&mut rng, n, -0.1, 0.1)
                .iter()
                .map(|x| x.abs())
                .collect(),
            w16: (i % 2 == 0).then(|| vec![bf16::ZERO; n]),
            w32: (i % 2 == 1).then(|| vec![0.0; n]),
        })
        .collect();
    host[4].g[CHUNK + 3] = f32::INFINITY;
    // Device copies (one element at least: no zero-sized allocations).
    let up = |v: &[f32]| {
        let mut v = v.to_vec();
        if v.is_empty() {
            v.push(0.0);
        }
        s.clone_htod(&v).unwrap()
    };
    let dev: Vec<[CudaSlice<f32>; 5]> = host
        .iter()
        .map(|t| {
            let w32 = t.w32.clone().unwrap_or_else(|| vec![0.0; t.p.len().max(1)]);
            [up(&t.p), up(&t.g), up(&t.m), up(&t.v), up(&w32)]
        })
        .collect();
    let w16: Vec<CudaSlice<bf16>> = host
        .iter()
        .map(|t| s.alloc_zeros::<bf16>(t.p.len().max(1)).unwrap())
        .collect();
    let descs: Vec<AdamwTensor> = host
        .iter()
        .enumerate()
        .map(|(i, t)| AdamwTensor {
            p: device_addr(&gpu, &dev[i][0]),
            g: device_addr(&gpu, &dev[i][1]),
            m: device_addr(&gpu, &dev[i][2]),
            v: device_addr(&gpu, &dev[i][3]),
            w16: if t.w16.is_some() {
                device_addr(&gpu, &w16[i])
            } else {
                0
            },
            w32: if t.w32.is_some() {
                device_addr(&gpu, &dev[i][4])
            } else {
                0
            },
            n: t.p.len() as i64,
        })
        .collect();
    // SAFETY: every buffer above lives until the end of the test and holds n elements.
    let mut table = unsafe { AdamwTable::new(&gpu, &descs) }.unwrap();
    let sq = table.sumsq(&gpu).unwrap();
    let gs: Vec<&[f32]> = host.iter().map(|t| &t.g[..]).collect();
    let want_sq = cpu::sumsq(&gs);
    for (i, (a, b)) in sq.iter().zip(&want_sq).enumerate() {
        assert!(
            a == b || (a - b).abs() <= 1e-12 * b.abs(),
            "sumsq tensor {i}: {a} vs {b}"
        );
    }
    assert!(sq[4].is_infinite() && sq[..4].iter().all(|x| x.is_finite()));
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let k = AdamWCoeffs::new(&cfg, 3, 2e-3);
    let clip = Some(0.37f32);
    table.step(&gpu, AdamwParams::new(&k, clip)).unwrap();
    let want_bad = cpu::adamw(&mut host, &k, clip);
    assert_eq!(table.take_bad(&gpu).unwrap(), want_bad);
    assert_eq!(want_bad, vec![false, false, false, false, true]);
    // Bit equality, except that any NaN equals any NaN (x86 and CUDA produce different NaN
    // payloads for inf/inf; tensor 4 holds NaNs on purpose).
    let same = |a: &[f32], b: &[f32]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    };
    for (i, t) in host.iter().enumerate() {
        let got = |j: usize| s.clone_dtoh(&dev[i][j]).unwrap();
        let n = t.p.len();
        assert!(same(&got(0)[..n], &t.p), "tensor {i} p");
        assert!(same(&got(2)[..n], &t.m), "tensor {i} m");
        assert!(same(&got(3)[..n], &t.v), "tensor {i} v");
        if let Some(w) = &t.w32 {
            assert!(same(&got(4)[..n], w), "tensor {i} w32");
        }
        if let Some(w) = &t.w16 {
            let g16: Vec<f32> = s.clone_dtoh(&w16[i]).unwrap()[..n]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let w: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
            assert!(same(&g16, &w), "tensor {i} w16");
        }
    }
    // EMA of the updated weights into fresh shadows, then a copy.
    let shadows: Vec<Vec<f32>> = host
        .iter()
        .map(|t| rand_f32_from(&mut rng, t.p.len(), -1.0, 1.0))
        .collect();
    let dshadow: Vec<CudaSlice<f32>> = shadows.iter().map(|v| up(v)).collect();
    let edescs: Vec<EmaTensor> = host
        .iter()
        .enumerate()
        .map(|(i, t)| EmaTensor {
            s: device_addr(&gpu, &dshadow[i]),
            p: device_addr(&gpu, &dev[i][0]),
            n: t.p.len() as i64,
        })
        .collect();
    // SAFETY: as above.
    let et = unsafe { EmaTable::new(&gpu, &edescs) }.unwrap();
    let omd = 1.0 - 0.99f32;
    et.update(&gpu, omd, false).unwrap();
    for (i, t) in host.iter().enumerate() {
        let mut want = shadows[i].clone();
        cpu::ema(&mut want, &t.p, omd, false);
        let got = s.clone_dtoh(&dshadow[i]).unwrap();
        assert!(same(&got[..t.p.len()], &want), "ema tensor {i}");
    }
    et.update(&gpu, omd, true).unwrap();
    for (i, t) in host.iter().enumerate() {
        let got = s.clone_dtoh(&dshadow[i]).unwrap();
        assert!(same(&got[..t.p.len()], &t.p), "ema copy tensor {i}");
    }
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::{define, struct_size};
    use std::mem::size_of;
    assert_eq!(THREADS as u64, define("adamw.cu", "MT_THREADS"));
    assert_eq!(CHUNK as u64, define("adamw.cu", "MT_CHUNK"));
    assert_eq!(
        size_of::<AdamwTensor>(),
        struct_size("adamw.cu", "AdamwTensor")
    );
    assert_eq!(size_of::<EmaTensor>(), struct_size("adamw.cu", "EmaTensor"));
    assert_eq!(size_of::<MtChunk>(), struct_size("adamw.cu", "MtChunk"));
    assert_eq!(
        size_of::<AdamwParams>(),
        struct_size("adamw.cu", "AdamwParams")
    );
}
