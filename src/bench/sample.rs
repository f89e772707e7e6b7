//! `imdm-engine bench sample`: the sampler on the GPU at a reference shape (random weights).
//!
//! - One step = DiT forward with the SUBS log-softmax + the fused `sample_fwd_f32` step (IMDM
//!   or MDLM posterior, f64 race over V(+1) categories, at every position masked, as at the
//!   first step), each timed alone with the shared [`Timer`]; the step kernel's napkin maths:
//!   it must read the B·L·V f32 log-probs once (GB/s against the device's copy peak).
//! - Whole runs of 8 and 32 steps (and `--steps`) through `GpuDenoiser::generate`, all-mask
//!   start: ms per run and per step, NFE, samples/s.
//! - Beside the PyTorch torch.compile "sample step" of docs/benchmarks.md (forward + one
//!   categorical draw over the full logits, H100, 2026-11-23): OWT 72.2 ms, LM1B 93.6 ms; the
//!   goal is 3x.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::timing::Timer;
use super::Shape;
use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::dit::{ForwardOpts, GpuDit, Keep, Workspace};
use crate::cuda::ops::sample::{sample_fwd_f32, SampleParams};
use crate::cuda::Gpu;
use crate::diffusion::{SamplerConfig, SamplerKind};
use crate::error::Result;
use crate::model::init::random_params;
use crate::model::{Algo, DitConfig, Preset};
use crate::rng::seeded_eps;
use crate::tensor::Tokens;

/// One whole sampling run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunResult {
    pub steps: usize,
    pub ms_total: f64,
    pub ms_per_step: f64,
    pub nfe: usize,
    pub samples_per_s: f64,
}

/// `bench sample`'s result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SampleResult {
    pub preset: String,
    pub shape: String,
    pub algo: String,
    pub sampler: String,
    pub batch: usize,
    pub len: usize,
    pub vocab: usize,
    /// Forward with SUBS; the fused step kernel; their sum (one step with a forward).
    pub ms_forward: f64,
    pub ms_step_kernel: f64,
    pub ms_step: f64,
    /// Log-prob bytes the step kernel reads, per second (GB/s), and % of the copy peak.
    pub step_kernel_gbps: f64,
    pub step_kernel_pct_peak: f64,
    pub runs: Vec<RunResult>,
    /// PyTorch torch.compile sample step at this shape (docs/benchmarks.md) and our speed-up on it.
    pub torch_compile_step_ms: f64,
    pub speedup_vs_torch_compile: f64,
    /// GPU memory of the model and one workspace (GiB).
    pub memory_gib: f64,
}

/// The model config of a reference shape.
fn config(preset: Preset, shape: Shape, algo: Algo) -> DitConfig {
    let (_, l, v, mask, softcap) = shape.dims();
    let mut c = DitConfig::preset(preset);
    (c.vocab_size, c.mask_index, c.softcap, c.length, c.algo) = (v, mask, softcap, l, algo);
    c
}

/// Times the sampler of `preset` at `shape`: one step (forward + fused step) and whole runs
/// of 8, 32 and `steps` steps.
pub fn sample(
    gpu: &Gpu,
    preset: Preset,
    shape: Shape,
    algo: Algo,
    steps: usize,
) -> Result<SampleResult> {
    let (b, l, v, mask, _) = shape.dims();
    let c = config(preset, shape, algo);
    algo.require_subs("--algo", "bench sample")?;
    let kind = match algo {
        Algo::Imdm => SamplerKind::ImdmPosterior,
        _ => SamplerKind::MdlmPosterior,
    };
    let params = random_params(&c, 0);
    let s = &gpu.stream;
    let rows = b * l;
    let seeds: Vec<i64> = (0..b as i64).collect();
    let eps = c
        .has_eps_mlp()
        .then(|| seeded_eps(&seeds, l, c.noise_dim, c.noise_type, 1.0));
    let all_mask = vec![mask as u32; rows];

    // One step, split: forward, then the fused step on an all-mask x (restored each repeat).
    let (ms_forward, ms_step_kernel, memory_gib) = {
        let (free0, _) = cudarc::driver::result::mem_get_info()?;
        let model = GpuDit::upload_inference(gpu, &params)?;
        let mut ws = Workspace::new(gpu, &c, b, l, Keep::None)?;
        let (free1, _) = cudarc::driver::result::mem_get_info()?;
        ws.load_inputs(gpu, &all_mask, eps.as_ref())?;
        let mut t = Timer::new(gpu)?;
        t.repeats = 10;
        let ms_forward = t.time(gpu, || model.forward(gpu, &mut ws, ForwardOpts::eval()))?;
        let pristine = s.clone_htod(&all_mask)?;
        let mut cat = s.alloc_zeros::<u32>(rows)?;
        let mut counters = s.alloc_zeros::<u32>(2)?;
        let cfg = SamplerConfig::new(steps.max(2));
        let (t1, s1) = cfg.step_times(0, 1.0);
        let alphas = s.clone_htod(
            &[
                crate::diffusion::schedule::alpha(t1),
                crate::diffusion::schedule::alpha(s1),
            ]
            .repeat(b),
        )?;
        let mut p = SampleParams::new(kind, (b, l, v, mask), 1, 0).with_ld(ws.logits_ld);
        if c.has_eps_mlp() {
            p = p.with_eps(c.noise_dim, c.noise_type, c.noise_scale as f32, true);
        }
        let ms_kernel = t.time(gpu, || {
            s.memcpy_dtod(&pristine, &mut ws.tokens)?;
            sample_fwd_f32(
                gpu,
                &mut ws.tokens,
                &mut cat,
                ws.eps.as_mut(),
                &mut counters,
                &ws.log_probs,
                &alphas,
                &p,
            )
        })?;
        let gib = free0.saturating_sub(free1) as f64 / (1u64 << 30) as f64;
        (ms_forward, ms_kernel, gib)
    };

    // Whole runs through the device-resident driver.
    let mut den = GpuDenoiser::new(gpu, &params)?;
    let x = Tokens::new(b, l, all_mask, v)?;
    let mut list = vec![8, 32];
    if !list.contains(&steps) {
        list.push(steps);
    }
    let mut runs = vec![];
    for n in list {
        let cfg = SamplerConfig {
            kind,
            ..SamplerConfig::new(n)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut nfe = 0;
        let mut t = Timer::new(gpu)?;
        (t.warmup, t.repeats) = (1, 3);
        let ms = t.time(gpu, || {
            nfe = den.generate(&cfg, &x, None, Some(&seeds), &mut rng)?.nfe;
            Ok(())
        })?;
        runs.push(RunResult {
            steps: n,
            ms_total: ms,
            ms_per_step: ms / n as f64,
            nfe,
            samples_per_s: b as f64 / (ms * 1e-3),
        });
    }
    let ms_step = ms_forward + ms_step_kernel;
    let gbps = (rows * v * 4) as f64 / (ms_step_kernel * 1e-3) / 1e9;
    let torch = match shape {
        Shape::Owt => 72.2,
        Shape::Lm1b => 93.6,
    };
    Ok(SampleResult {
        preset: c.preset.clone(),
        shape: format!("{shape:?}").to_lowercase(),
        algo: format!("{algo:?}").to_lowercase(),
        sampler: format!("{kind:?}"),
        batch: b,
        len: l,
        vocab: v,
        ms_forward,
        ms_step_kernel,
        ms_step,
        step_kernel_gbps: gbps,
        step_kernel_pct_peak: 100.0 * gbps / super::timing::peak_gbps(),
        runs,
        torch_compile_step_ms: torch,
        speedup_vs_torch_compile: torch / ms_step,
        memory_gib,
    })
}

/// Prints a result as the table of docs/benchmarks.md.
pub fn print(r: &SampleResult) {
    println!(
        "{} {} {} ({}) B={} L={} V={}: model + workspace {:.1} GiB",
        r.preset, r.algo, r.shape, r.sampler, r.batch, r.len, r.vocab, r.memory_gib
    );
    println!(
        "  one step: forward+SUBS {:.2} ms + fused step {:.2} ms ({:.0} GB/s of log-probs, \
         {:.1}% of copy peak) = {:.2} ms; torch.compile sample step {:.1} ms: {:.2}x",
        r.ms_forward,
        r.ms_step_kernel,
        r.step_kernel_gbps,
        r.step_kernel_pct_peak,
        r.ms_step,
        r.torch_compile_step_ms,
        r.speedup_vs_torch_compile
    );
    println!(
        "  {:>6} {:>11} {:>11} {:>5} {:>11}",
        "steps", "ms/run", "ms/step", "NFE", "samples/s"
    );
    for run in &r.runs {
        println!(
            "  {:>6} {:>11.1} {:>11.2} {:>5} {:>11.2}",
            run.steps, run.ms_total, run.ms_per_step, run.nfe, run.samples_per_s
        );
    }
}
