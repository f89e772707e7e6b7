//! `imdm-engine bench distill`: GPU SDTT steps of a preset at a reference shape (reference
//! initialisation for the student, an independent one for the teacher, random tokens), split
//! the way the step is built (`distill::sdtt`, `SdttGpu`):
//!
//! - **Teacher rollout**, per micro-batch, all on the device (`cuda::rollout`): x_t and eps
//!   up, then K = 2 times the teacher forward, the fused sampler step (f64 posterior, which
//!   positions unmask) and the target kernel; the target stays on the device. Host wall clock
//!   up to a device synchronisation.
//! - **Student**: per micro-batch the recorded forward, the fused `distill_kl` loss reading the
//!   rollout's target in place and the tape backward; then the conditioning gradients, the clip
//!   norm, AdamW and EMA (`Resident::update`). Host wall clock, synchronised.
//! - **Forward**: one eval forward with SUBS of the global batch on the device (CUDA events,
//!   median; no download), the unit of the reference's cost model.
//!
//! The reference's step is 2 teacher forwards + 1 student forward + 1 backward, all on the
//! device; its equivalent from our figures is `3 · forward + backward`, with backward = student
//! − forward (the student's backward, loss and optimizer). The ratio ours / that says what the
//! sampler and target kernels and the host orchestration cost beyond the reference's model; the
//! rollout's share beyond its K forwards is `ms_rollout_extra`. The noising is prepared once
//! and excluded.

use std::time::Instant;

use super::timing::Timer;
use super::train::noised_global_batch;
use super::Shape;
use crate::cpu::TrainOpts;
use crate::cuda::dit::{ForwardOpts, GpuDit, Keep, Workspace};
use crate::cuda::trainer::{device_memory_used, GpuTrainOptions};
use crate::cuda::Gpu;
use crate::diffusion::noising::NoisedBatch;
use crate::diffusion::schedule::SAMPLING_EPS;
use crate::diffusion::DistillMode;
use crate::distill::rollout::Spacing;
use crate::distill::sdtt::SdttGpu;
use crate::error::{Error, Result};
use crate::model::init::init_params;
use crate::model::{Algo, DitConfig, DitParams, Preset};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::{Ema, Resident};

/// Teacher steps per student step (the reference's K).
const K: usize = 2;
/// The round-0 dt of the reference's 1024 original steps.
const ORIG_STEPS: f64 = 1024.0;

/// `bench distill`'s result (milliseconds per optimizer step of the global batch).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DistillResult {
    pub preset: String,
    pub shape: String,
    pub algo: String,
    pub batch: usize,
    pub micro_batch: usize,
    pub len: usize,
    pub vocab: usize,
    pub params: usize,
    pub distill_steps: usize,
    pub steps: usize,
    /// Teacher rollout + student.
    pub ms_step: f64,
    /// K teacher forwards, fused sampler steps and target kernels, on the device.
    pub ms_rollout: f64,
    /// Forward, fused loss, backward, clip, AdamW, EMA.
    pub ms_student: f64,
    /// One eval forward with SUBS of the global batch on the device.
    pub ms_forward: f64,
    /// `ms_student − ms_forward`.
    pub ms_backward: f64,
    /// The reference's step from our figures: `3 · ms_forward + ms_backward`.
    pub ms_reference_equiv: f64,
    /// `ms_step / ms_reference_equiv`.
    pub ratio: f64,
    /// `ms_rollout − K · ms_forward`: what the rollout costs beyond its forwards (the sampler
    /// and target kernels, the inputs' and alphas' uploads, launch and synchronisation).
    pub ms_rollout_extra: f64,
    pub tok_per_s: f64,
    pub memory_gib: f64,
    /// Loss of the last timed step (finite; the KL of two random models).
    pub last_loss: f64,
}

/// Times `steps` GPU distillation steps of `preset` at `shape` (after one warm-up step).
pub fn distill(
    gpu: Gpu,
    preset: Preset,
    shape: Shape,
    algo: Algo,
    steps: usize,
    micro: usize,
) -> Result<DistillResult> {
    let (b, l, v, mask, softcap) = shape.dims();
    if steps == 0 || micro == 0 || b % micro != 0 {
        return Err(Error::Config(format!(
            "bench distill: --steps must be >= 1 and the batch {b} a multiple of --micro-batch \
             {micro}"
        )));
    }
    let mut c = DitConfig::preset(preset);
    (c.vocab_size, c.mask_index, c.softcap, c.length, c.algo) = (v, mask, softcap, l, algo);
    c.validate()?;
    let mem0 = device_memory_used()?;
    let student = init_params(&c, 0);
    let teacher = init_params(&c, 1);
    let n_params = student.count();

    // One global batch of random non-mask tokens, noised once (host work excluded).
    let batches = noised_global_batch(&c, b, micro, 1.0)?;
    let norm = batches.iter().map(|nb| nb.masked()).sum::<usize>().max(1) as f64;

    let ms_forward = forward_ms(&gpu, &teacher, &batches[0])? * (b / micro) as f64;

    let mut dev = SdttGpu::new(gpu, GpuTrainOptions::default());
    {
        let opt = AdamW::new(&student, AdamWConfig::default(), |_| false);
        let ema = Ema::new(&student, 0.9999);
        dev.trainer().load(&student, &ema, &opt)?;
    }
    drop(student);
    let dt = (1.0 - SAMPLING_EPS) / ORIG_STEPS;
    let dropout = (c.dropout > 0.0).then_some((7u64, 0u64));
    // (rollout s, student s, loss) of step `s`.
    let mut step = |s: u64| -> Result<(f64, f64, f64)> {
        let (mut r, mut st, mut loss) = (0.0, 0.0, 0.0);
        let t0 = Instant::now();
        dev.trainer().zero_grads()?;
        st += t0.elapsed().as_secs_f64();
        for (k, nb) in batches.iter().enumerate() {
            let t0 = Instant::now();
            let key = s * 64 + k as u64;
            let eps = nb.eps.as_ref();
            dev.rollout(
                &teacher,
                &nb.xt,
                &nb.t,
                eps,
                (K, dt, Spacing::Reference),
                key,
            )?;
            dev.gpu().sync()?;
            let t1 = Instant::now();
            r += (t1 - t0).as_secs_f64();
            let opts = TrainOpts {
                dropout: dropout.map(|(seed, _)| (seed, (s * 64 + k as u64) << 20)),
            };
            // The loss comes back to the host, so the micro-batch has finished here.
            loss += dev.accumulate(&nb.xt, eps, (DistillMode::KlBwd, norm), &opts)?;
            st += t1.elapsed().as_secs_f64();
        }
        let t0 = Instant::now();
        dev.trainer().update(s + 1, loss, 6e-5, 1.0)?;
        dev.gpu().sync()?;
        st += t0.elapsed().as_secs_f64();
        Ok((r, st, loss))
    };
    step(0)?;
    let (mut r, mut st, mut last_loss) = (0.0, 0.0, f64::NAN);
    for s in 1..=steps as u64 {
        let (a, b2, l2) = step(s)?;
        (r, st, last_loss) = (r + a, st + b2, l2);
    }
    let mem1 = device_memory_used()?;
    let n = steps as f64;
    let (ms_rollout, ms_student) = (r / n * 1e3, st / n * 1e3);
    let ms_step = ms_rollout + ms_student;
    let ms_backward = ms_student - ms_forward;
    let ms_reference_equiv = 3.0 * ms_forward + ms_backward;
    Ok(DistillResult {
        preset: c.preset.clone(),
        shape: format!("{shape:?}").to_lowercase(),
        algo: format!("{algo:?}").to_lowercase(),
        batch: b,
        micro_batch: micro,
        len: l,
        vocab: v,
        params: n_params,
        distill_steps: K,
        steps,
        ms_step,
        ms_rollout,
        ms_student,
        ms_forward,
        ms_backward,
        ms_reference_equiv,
        ratio: ms_step / ms_reference_equiv,
        ms_rollout_extra: ms_rollout - K as f64 * ms_forward,
        tok_per_s: (b * l) as f64 / (ms_step * 1e-3),
        memory_gib: mem1.saturating_sub(mem0) as f64 / (1u64 << 30) as f64,
        last_loss,
    })
}

/// Median ms of one eval forward with SUBS of `nb` (a micro-batch) with `teacher`'s weights.
fn forward_ms(gpu: &Gpu, teacher: &DitParams, nb: &NoisedBatch) -> Result<f64> {
    let c = &teacher.config;
    let model = GpuDit::upload_inference(gpu, teacher)?;
    let mut ws = Workspace::new(gpu, c, nb.xt.batch, nb.xt.len, Keep::None)?;
    ws.load_inputs(gpu, &nb.xt.ids, nb.eps.as_ref())?;
    let mut t = Timer::new(gpu)?;
    t.repeats = 5;
    t.time(gpu, || model.forward(gpu, &mut ws, ForwardOpts::eval()))
}

/// Prints the result: the split, and the reference's cost model beside it.
pub fn print(r: &DistillResult) {
    println!(
        "{} {} {} B={} (micro-batch {}) L={} V={}, {} parameters, K = {}, {} timed steps:",
        r.preset,
        r.algo,
        r.shape,
        r.batch,
        r.micro_batch,
        r.len,
        r.vocab,
        r.params,
        r.distill_steps,
        r.steps
    );
    println!("| part | ms per step |");
    println!("|---|---|");
    println!(
        "| teacher rollout on the device (K forwards + fused sampler steps + target) | {:.1} |",
        r.ms_rollout
    );
    println!(
        "| of which beyond the K forwards (sampler and target kernels, uploads, sync) | {:.1} |",
        r.ms_rollout_extra
    );
    println!(
        "| student (forward, fused KL on the device target, backward, AdamW, EMA) | {:.1} |",
        r.ms_student
    );
    println!(
        "| whole step | {:.1} ({:.0} tok/s) |",
        r.ms_step, r.tok_per_s
    );
    println!(
        "reference cost model (3 forwards + 1 backward on the device): 3 x {:.1} ms forward + \
         {:.1} ms backward = {:.1} ms; ours / that = {:.2}x; device memory {:.1} GiB; last loss \
         {:.4}",
        r.ms_forward, r.ms_backward, r.ms_reference_equiv, r.ratio, r.memory_gib, r.last_loss
    );
}
