//! CPU training step throughput: `cpu::loss_and_grad::<f32>` (forward with saved activations,
//! SUBS cross-entropy, backward to every parameter), the path the CPU demo trains with.
//! `cargo bench --bench cpu_train [-- NAME_FILTER]`. Prints the median and min of 7 steps
//! after a warm-up, tokens/s, and GFLOP/s against the step's matmul and attention FLOPs
//! (forward ≈ 2·rows·params, backward ≈ twice that), plus the forward-only `log_probs::<f32>`.
//!
//! Measured 2026-11-23 on a 2-core AMD EPYC (Zen 3, KVM, AVX2+FMA) shared with other builds
//! (load average 4-13, so the spread is the neighbours'):
//! - D=128, H=4, 4 blocks, L=8, V=65, B=256 (IMDM, 10.7 GFLOP): 108 ms at best (99 GFLOP/s),
//!   typically 180-200 ms, 270-370 ms at load 12; forward alone 38-66 ms.
//! - D=256, H=8, 4 blocks, L=128, V=65, B=16 (45.3 GFLOP): 422 ms at best (107 GFLOP/s),
//!   650 ms at load 5, 1.0-1.5 s at load 9-12.
//!
//! sgemm is about 70% of a step; two Zen 3 cores peak near 220 GFLOP/s, so the first step
//! cannot go below about 50 ms on this machine.

use std::time::Instant;

use imdm_engine::cpu::{log_probs, loss_and_grad, TrainOpts};
use imdm_engine::diffusion::LossBatch;
use imdm_engine::model::init::random_params;
use imdm_engine::model::{Algo, DitConfig, DitParams, NoiseType};
use imdm_engine::rng::seeded_eps;
use imdm_engine::tensor::Tokens;

#[allow(clippy::too_many_arguments)]
fn config(d: usize, heads: usize, blocks: usize, len: usize, vocab: usize, nd: usize) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: vocab,
        mask_index: vocab - 1,
        length: len,
        hidden: d,
        heads,
        blocks,
        cond_dim: 128,
        mlp_ratio: 4,
        dropout: 0.0,
        softcap: 0.0,
        algo: Algo::Imdm,
        noise_dim: nd,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    }
}

/// Matmul and attention FLOPs of one training step with `masked` rows through the eps MLP.
fn step_flops(c: &DitConfig, batch: usize, masked: usize) -> f64 {
    let (d, m, l) = (c.hidden as f64, c.mlp_hidden() as f64, c.length as f64);
    let rows = batch as f64 * l;
    let per_block = 4.0 * d * d + 2.0 * d * m;
    let attn = 4.0 * batch as f64 * l * l * d; // QK^T and PV over all heads
    let fwd = 2.0 * rows * (c.blocks as f64 * per_block + d * c.vocab_size as f64)
        + c.blocks as f64 * attn
        + 2.0 * masked as f64 * (c.noise_dim as f64 * 4.0 * d + 4.0 * d * d);
    3.0 * fwd
}

/// (median, min) wall milliseconds of `reps` calls after one warm-up call. On a shared machine
/// the minimum is the better estimate of the uncontended speed.
fn time_ms(mut f: impl FnMut(), reps: usize) -> (f64, f64) {
    f();
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    (ms[reps / 2], ms[0])
}

fn main() {
    println!(
        "cpu::loss_and_grad::<f32> on {} rayon thread(s); matrixmultiply threads: MATMUL_NUM_THREADS \
         (default: physical cores, at most 4); load average {}",
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let cases = [
        (
            "synthetic-like D128 H4 4 blk L8 V65",
            config(128, 4, 4, 8, 65, 128),
            256,
        ),
        (
            "tiny-like D256 H8 4 blk L128 V65",
            config(256, 8, 4, 128, 65, 256),
            16,
        ),
    ];
    // `cargo bench --bench cpu_train -- tiny` runs only the cases whose name contains "tiny".
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    for (name, c, batch) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let p = random_params(&c, 0);
        let (l, v) = (c.length, c.vocab_size);
        let rows = batch * l;
        // Half the positions masked, as at t = 0.5.
        let x0: Vec<u32> = (0..rows).map(|i| (i * 7 % (v - 1)) as u32).collect();
        let xt_ids: Vec<u32> = x0
            .iter()
            .enumerate()
            .map(|(i, &t)| if i % 2 == 0 { c.mask_index as u32 } else { t })
            .collect();
        let masked = rows.div_ceil(2);
        let xt = Tokens::new(batch, l, xt_ids, v).unwrap();
        let x0 = Tokens::new(batch, l, x0, v).unwrap();
        let seeds: Vec<i64> = (0..batch as i64).collect();
        let eps = seeded_eps(&seeds, l, c.noise_dim, c.noise_type, 1.0);
        let weight = vec![2.0f32; rows];
        let batch_ref = LossBatch {
            xt: &xt,
            x0: &x0,
            eps: Some(&eps),
            weight: &weight,
            norm: rows as f64,
            sigma: None,
        };
        let mut grads = DitParams::zeros(&c);
        let (step, step_min) = time_ms(
            || {
                std::hint::black_box(
                    loss_and_grad::<f32>(&p, &batch_ref, &TrainOpts::default(), &mut grads)
                        .unwrap(),
                );
            },
            7,
        );
        let (fwd, _) = time_ms(
            || {
                std::hint::black_box(log_probs::<f32>(&p, &xt, Some(&eps), None).unwrap());
            },
            7,
        );
        let gflop = step_flops(&c, batch, masked) / 1e9;
        println!(
            "{name} B={batch} ({} params, {gflop:.2} GFLOP/step): step median {step:7.1} ms \
             (min {step_min:7.1}; {:6.0} tok/s, {:5.1} GFLOP/s at the min); forward {fwd:6.1} ms",
            p.count(),
            rows as f64 / (step / 1e3),
            gflop / (step_min / 1e3),
        );
    }
}
