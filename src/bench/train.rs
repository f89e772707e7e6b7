//! `imdm-engine bench train`: GPU training steps of a preset at a reference shape (reference
//! initialisation, random tokens), reported as the PyTorch figures of docs/benchmarks.md are.
//!
//! - One step = what `Trainer::step` runs on a resident [`GpuTrainer`]: per micro-batch the
//!   upload of (xt, x0, weights, eps), the recorded forward, the fused SUBS loss and the tape
//!   backward; then the conditioning gradients, the per-tensor sums of squares (one sync for
//!   the clip norm), one fused AdamW launch, one EMA launch and the modulation refresh. The
//!   host-side noising (masks, eps) is prepared once and excluded; the peers' step (forward,
//!   cross-entropy, backward, clip, AdamW) has no EMA, ours does.
//! - Time: wall clock over `steps` steps after 2 warm-up steps (each step ends synchronised,
//!   since the clip norm is read on the host).
//! - MFU: `6 · N · tokens / time / 989 TFLOP/s` (N = all parameters, the peers' convention),
//!   and with the attention matmuls added (`12 · blocks · B · L² · D` per step: forward
//!   `4 B L² D` per layer, backward twice that), which is how the peers' 0.33-0.34 come out.
//! - Memory: device memory in use after the steps minus before the model was created (the
//!   engine allocates everything up front, so this is the peak).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Shape;
use crate::cpu::TrainOpts;
use crate::cuda::trainer::{device_memory_used, GpuTrainOptions, GpuTrainer};
use crate::cuda::Gpu;
use crate::diffusion::noising::{micro_batch, nelbo_batch, NoisedBatch};
use crate::diffusion::schedule::antithetic_times;
use crate::error::{Error, Result};
use crate::model::init::init_params;
use crate::model::{Algo, DitConfig, Preset};
use crate::tensor::Tokens;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::{Ema, LossInput, Resident};

/// One row of the PyTorch reference (docs/benchmarks.md, H100 80GB HBM3, 2026-11-23).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerRow {
    pub mode: &'static str,
    pub tok_per_s: f64,
    pub ms_step: f64,
    pub mfu: f64,
    pub memory_gib: f64,
}

/// The peers' training rows at `shape` (eager, torch.compile).
pub fn peers(shape: Shape) -> [PeerRow; 2] {
    let row = |mode, tok_per_s, ms_step, mfu, memory_gib| PeerRow {
        mode,
        tok_per_s,
        ms_step,
        mfu,
        memory_gib,
    };
    match shape {
        Shape::Lm1b => [
            row("eager", 208_095.0, 314.9, 0.18, 65.8),
            row("torch.compile", 384_603.0, 170.4, 0.33, 54.0),
        ],
        Shape::Owt => [
            row("eager", 187_136.0, 175.1, 0.21, 42.6),
            row("torch.compile", 295_687.0, 110.8, 0.34, 36.7),
        ],
    }
}

/// `bench train`'s result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainResult {
    pub preset: String,
    pub shape: String,
    pub algo: String,
    pub batch: usize,
    pub micro_batch: usize,
    pub len: usize,
    pub vocab: usize,
    pub params: usize,
    pub steps: usize,
    pub autotune: bool,
    pub ms_step: f64,
    pub tok_per_s: f64,
    /// 6·N·tokens per step (TFLOP) and with the attention matmuls
    pub tflop_6n: f64,
    pub tflop_total: f64,
    pub mfu_6n: f64,
    pub mfu_total: f64,
    pub memory_gib: f64,
    /// Loss of the last timed step (a sanity check: finite, near ln V at the start).
    pub last_loss: f64,
    pub peers: [PeerRow; 2],
}

/// Times `steps` GPU training steps of `preset` at `shape`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    gpu: Gpu,
    preset: Preset,
    shape: Shape,
    algo: Algo,
    steps: usize,
    micro: Option<usize>,
    autotune: bool,
) -> Result<TrainResult> {
    let (b, l, v, mask, softcap) = shape.dims();
    let m = micro.unwrap_or(b);
    if steps == 0 || m == 0 || b % m != 0 {
        return Err(Error::Config(format!(
            "bench train: --steps must be >= 1 and the batch {b} a multiple of --micro-batch {m}"
        )));
    }
    let mut c = DitConfig::preset(preset);
    (c.vocab_size, c.mask_index, c.softcap, c.length, c.algo) = (v, mask, softcap, l, algo);
    c.validate()?;
    let mem0 = device_memory_used()?;
    let params = init_params(&c, 0);
    let n_params = params.count();
    let mut trainer = GpuTrainer::new(gpu, GpuTrainOptions { autotune });
    let opt = AdamW::new(&params, AdamWConfig::default(), |_| false);
    let ema = Ema::new(&params, 0.9999);
    trainer.load(&params, &ema, &opt)?;
    drop((params, opt, ema));

    // One global batch of random non-mask tokens, noised once (host work excluded).
    let batches = noised_global_batch(&c, b, m, (b * l) as f64)?;
    let dropout = (c.dropout > 0.0).then_some((7u64, 0u64));
    let step = |s: u64, trainer: &mut GpuTrainer| -> Result<f64> {
        trainer.zero_grads()?;
        let mut loss = 0.0;
        for (k, nb) in batches.iter().enumerate() {
            let opts = TrainOpts {
                dropout: dropout.map(|(seed, _)| (seed, (s * 64 + k as u64) << 20)),
            };
            loss += trainer.accumulate(LossInput::Nelbo(nb.as_loss()), &opts)?;
        }
        trainer.update(s + 1, loss, 3e-4, 1.0)?;
        Ok(loss)
    };
    for s in 0..2 {
        step(s, &mut trainer)?;
    }
    trainer.gpu().sync()?;
    let t0 = std::time::Instant::now();
    let mut last_loss = f64::NAN;
    for s in 2..2 + steps as u64 {
        last_loss = step(s, &mut trainer)?;
    }
    trainer.gpu().sync()?;
    let secs = t0.elapsed().as_secs_f64() / steps as f64;
    let mem1 = device_memory_used()?;
    let tokens = (b * l) as f64;
    let flop_6n = 6.0 * n_params as f64 * tokens;
    let attn = 12.0 * c.blocks as f64 * b as f64 * (l * l) as f64 * c.hidden as f64;
    let peak = trainer.gpu().peak_bf16_tflops().unwrap_or(f64::NAN) * 1e12;
    Ok(TrainResult {
        preset: c.preset.clone(),
        shape: format!("{shape:?}").to_lowercase(),
        algo: format!("{algo:?}").to_lowercase(),
        batch: b,
        micro_batch: m,
        len: l,
        vocab: v,
        params: n_params,
        steps,
        autotune,
        ms_step: secs * 1e3,
        tok_per_s: tokens / secs,
        tflop_6n: flop_6n / 1e12,
        tflop_total: (flop_6n + attn) / 1e12,
        mfu_6n: flop_6n / secs / peak,
        mfu_total: (flop_6n + attn) / secs / peak,
        memory_gib: mem1.saturating_sub(mem0) as f64 / (1u64 << 30) as f64,
        last_loss,
        peers: peers(shape),
    })
}

/// Prints the result as the docs/benchmarks.md table (engine row first).
pub fn print(r: &TrainResult) {
    println!(
        "{} {} {} B={} (micro-batch {}) L={} V={}, {} parameters, {} timed steps{}:",
        r.preset,
        r.algo,
        r.shape,
        r.batch,
        r.micro_batch,
        r.len,
        r.vocab,
        r.params,
        r.steps,
        if r.autotune { ", GEMM autotuning" } else { "" }
    );
    println!(
        "| mode | train tok/s | train step | MFU (6N / 989 TF) | MFU (+ attention) | memory |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| imdm-engine | {:.0} | {:.1} ms | {:.3} | {:.3} | {:.1} GiB |",
        r.tok_per_s, r.ms_step, r.mfu_6n, r.mfu_total, r.memory_gib
    );
    for p in &r.peers {
        println!(
            "| PyTorch {} (docs/benchmarks.md) | {:.0} | {:.1} ms | - | {:.2} | {:.1} GiB |",
            p.mode, p.tok_per_s, p.ms_step, p.mfu, p.memory_gib
        );
    }
    let compiled = &r.peers[1];
    println!(
        "speed vs torch.compile: {:.2}x (goal 1.5x); last loss {:.4} ({:.1} TFLOP per step with \
         attention)",
        r.tok_per_s / compiled.tok_per_s,
        r.last_loss,
        r.tflop_total
    );
}

/// The benchmarks' input: one global batch of `b` random non-mask rows, noised once with
/// antithetic times and cut into micro-batches of `micro` rows, every loss divided by `norm`;
/// fixed seeds, so every benchmark of a shape sees the same tokens.
pub(super) fn noised_global_batch(
    c: &DitConfig,
    b: usize,
    micro: usize,
    norm: f64,
) -> Result<Vec<NoisedBatch>> {
    let (l, v, mask) = (c.length, c.vocab_size, c.mask_index);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..b * l)
        .map(|_| loop {
            let t = rng.random_range(0..v as u32);
            if t != mask as u32 {
                break t;
            }
        })
        .collect();
    let x0 = Tokens::new(b, l, ids, v)?;
    let t = antithetic_times(&mut rng, b);
    let mut eps = ChaCha8Rng::seed_from_u64(2);
    (0..b / micro)
        .map(|k| {
            let (xk, tk) = micro_batch(&x0, &t, micro, k)?;
            nelbo_batch(&mut rng, &mut eps, &xk, tk, c, norm)
        })
        .collect()
}
