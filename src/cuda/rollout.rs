//! The SDTT teacher rollout (spec 6.1 step 2) resident on the device: [`DeviceTeacher`].
//!
//! x_t and the student's eps are uploaded once into the teacher's inference workspace; then,
//! for each of the K steps, the teacher forward (`GpuDit`, SUBS log-probs in the workspace),
//! one fused sampler launch (`ops::sample`: the IMDM posterior in float64 with write_eps = 0,
//! i.e. fix_eps, updating the tokens in place and writing each masked position's outcome) and
//! one target launch (`ops::rollout_target`: the rule of `distill::rollout`). Nothing comes
//! back to the host: the target stays in a (B·L, ldt) f32 buffer that the student's fused loss
//! (`ops::distill_kl`) reads directly, ldt = V rounded up to 4 so that loss takes its vector
//! path. [`DeviceTeacher::download`] brings a rollout back for tests and reports.
//!
//! The draws are those of `distill::rollout::teacher_rollout` on the same log-probs: the
//! rollout's key is the sampler seed and step k is the sampler step, so the kernel's race
//! counters (pair, flat position, k, 0) under that key are exactly the
//! `SamplerStream::new(key).race_uniforms(k, pos)` the CPU rollout draws, and the kernel's f64
//! posterior is `sample_masked`'s operation for operation (`kernels/sample.cu`). The per-row
//! alphas are (α(ts_k), α(ts_k − dt)) of `teacher_times`, the same host arithmetic as the CPU
//! rollout's, uploaded per step. Both teachers use the IMDM posterior, as the CPU rollout does
//! (for an MDLM teacher its reset category is a stay under fix_eps).
//!
//! The loop ([`drive`]) is shared with [`rollout_twin`], which runs it with the two kernels'
//! CPU twins on any denoiser, so the loop is checked against `teacher_rollout` without a GPU.

use cudarc::driver::CudaSlice;

use crate::cuda::dit::{ForwardOpts, GpuDit, Keep, Workspace};
use crate::cuda::ops::rollout_target::{
    cpu as target_cpu, rollout_target_f32, RolloutTargetParams, NONE,
};
use crate::cuda::ops::sample::{cpu as sample_cpu, sample_fwd_f32, SampleParams};
use crate::cuda::trainer::oom;
use crate::cuda::Gpu;
use crate::diffusion::schedule::alpha;
use crate::diffusion::{Denoiser, SamplerKind};
use crate::distill::rollout::{teacher_times, Rollout, Spacing};
use crate::error::{Error, Result};
use crate::model::{DitConfig, DitParams};
use crate::tensor::{Tensor, Tokens};

/// Row stride of a rollout target: V rounded up to 4 (`ops::distill_kl`'s vector path).
pub fn target_ld(vocab: usize) -> usize {
    vocab.next_multiple_of(4)
}

/// The device buffers of a rollout at one (batch, len).
struct Buffers {
    batch: usize,
    len: usize,
    /// (rows, ldt) f32 teacher log-probs per position; columns V.. are never written
    target: CudaSlice<f32>,
    ldt: usize,
    /// (rows) u32 the step that unmasked each position, `rollout_target::NONE` if none did
    at: CudaSlice<u32>,
    /// (rows) u32 the last sampler step's outcomes
    cat: CudaSlice<u32>,
    /// (2) u32 the sampler's (unmasks, resets), accumulated (wrapping) and never read: the
    /// rollout has no cache rule, every step runs its forward, as the CPU rollout does
    counters: CudaSlice<u32>,
    /// (B, 2) f64 the step's (α_t, α_s) per batch row
    alphas: CudaSlice<f64>,
}

impl Buffers {
    fn new(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize) -> Result<Self> {
        let (rows, s, ldt) = (batch * len, &gpu.stream, target_ld(c.vocab_size));
        let target = s.alloc_zeros(rows * ldt).map_err(|e| {
            oom(e.into(), || {
                format!(
                    "the teacher target of a micro-batch of {batch} sequences x L {len} x V {} \
                     (f32); lower --micro-batch",
                    c.vocab_size
                )
            })
        })?;
        Ok(Buffers {
            batch,
            len,
            target,
            ldt,
            at: s.alloc_zeros(rows)?,
            cat: s.alloc_zeros(rows)?,
            counters: s.alloc_zeros(2)?,
            alphas: s.alloc_zeros(2 * batch)?,
        })
    }
}

/// A rollout's target on the device: (rows, ldt) f32, row r the teacher log-probs of flat
/// position r (columns V.. unused).
#[derive(Clone, Copy, Debug)]
pub struct DeviceTarget<'a> {
    pub data: &'a CudaSlice<f32>,
    pub ldt: usize,
    /// (B, L) of the rollout.
    pub batch: usize,
    pub len: usize,
}

/// The SDTT teacher on the device: its inference weights, and the workspace and rollout
/// buffers of the last (batch, len) it ran at.
pub struct DeviceTeacher {
    model: GpuDit,
    ws: Option<Workspace>,
    bufs: Option<Buffers>,
    /// Per row of the last rollout: its K start times.
    times: Vec<Vec<f64>>,
}

impl DeviceTeacher {
    /// Checks the configuration and uploads the inference weights.
    pub fn new(gpu: &Gpu, params: &DitParams) -> Result<Self> {
        params.config.validate()?;
        Ok(Self::from_model(GpuDit::upload_inference(gpu, params)?))
    }

    /// A teacher over an uploaded inference model (for example a `GpuDenoiser`'s).
    pub fn from_model(model: GpuDit) -> Self {
        DeviceTeacher {
            model,
            ws: None,
            bufs: None,
            times: Vec::new(),
        }
    }

    /// The model back, for a `GpuDenoiser::from_parts`.
    pub fn into_model(self) -> GpuDit {
        self.model
    }

    pub fn config(&self) -> &DitConfig {
        &self.model.config
    }

    /// The rollout of `xt` (rows at times `t`) for `k` steps of size `dt` with `eps` (kept as
    /// given; ignored by a teacher without the eps MLP), race uniforms keyed by `key`: the
    /// contract of `distill::rollout::teacher_rollout`, with the result left on the device
    /// ([`DeviceTeacher::target`], [`DeviceTeacher::download`]).
    pub fn rollout(
        &mut self,
        gpu: &Gpu,
        xt: &Tokens,
        t: &[f64],
        eps: Option<&Tensor>,
        (k, dt, spacing): (usize, f64, Spacing),
        key: u64,
    ) -> Result<DeviceTarget<'_>> {
        let c = self.model.config.clone();
        let times = check_inputs(&c, xt, t, (k, dt, spacing))?;
        let (bsz, len) = (xt.batch, xt.len);
        if !matches!(&self.ws, Some(w) if (w.batch, w.len) == (bsz, len)) {
            self.ws = None;
            self.bufs = None;
            self.ws = Some(Workspace::new(gpu, &c, bsz, len, Keep::None)?);
            self.bufs = Some(Buffers::new(gpu, &c, bsz, len)?);
        }
        let ws = self.ws.as_mut().expect("allocated above");
        let bufs = self.bufs.as_mut().expect("allocated above");
        ws.load_inputs(gpu, &xt.ids, eps.filter(|_| c.has_eps_mlp()))?;
        let mut be = GpuBackend {
            gpu,
            model: &self.model,
            ws,
            bufs,
        };
        drive(&mut be, &c, (bsz, len), &times, (k, dt), key)?;
        self.times = times;
        self.target()
    }

    /// The target of the last rollout, on the device.
    pub fn target(&self) -> Result<DeviceTarget<'_>> {
        let b = self
            .bufs
            .as_ref()
            .ok_or_else(|| Error::Config("device teacher: no rollout has run".into()))?;
        Ok(DeviceTarget {
            data: &b.target,
            ldt: b.ldt,
            batch: b.batch,
            len: b.len,
        })
    }

    /// The last rollout on the host, as `teacher_rollout` returns it: the dense (B·L·V)
    /// target, the teacher's tokens, `unmasked_at` and the times.
    pub fn download(&self, gpu: &Gpu) -> Result<Rollout> {
        let (Some(ws), Some(b)) = (self.ws.as_ref(), self.bufs.as_ref()) else {
            return Err(Error::Config("device teacher: no rollout has run".into()));
        };
        let s = &gpu.stream;
        let v = self.model.config.vocab_size;
        let target = dense(&s.clone_dtoh(&b.target)?, b.ldt, v);
        let unmasked_at = s.clone_dtoh(&b.at)?.iter().map(|&a| step_of(a)).collect();
        Ok(Rollout {
            target,
            x: Tokens {
                batch: b.batch,
                len: b.len,
                ids: s.clone_dtoh(&ws.tokens)?,
            },
            unmasked_at,
            times: self.times.clone(),
        })
    }
}

/// `teacher_rollout`'s checks (same messages) plus the ids against the vocabulary; returns the
/// per-row start times.
fn check_inputs(
    c: &DitConfig,
    xt: &Tokens,
    t: &[f64],
    (k, dt, spacing): (usize, f64, Spacing),
) -> Result<Vec<Vec<f64>>> {
    let bsz = xt.batch;
    if t.len() != bsz || k == 0 || !(dt > 0.0) {
        return Err(Error::Shape(format!(
            "teacher rollout: {} times for {bsz} rows, {k} steps, dt {dt}",
            t.len()
        )));
    }
    if xt.batch * xt.len == 0 || xt.ids.len() != xt.batch * xt.len {
        return Err(Error::Shape(format!(
            "teacher rollout: {} ids for a non-empty ({bsz}, {}) batch",
            xt.ids.len(),
            xt.len
        )));
    }
    let v = c.vocab_size;
    if let Some((i, id)) = xt.ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(Error::Shape(format!(
            "teacher rollout: id {id} at flat index {i} is outside the vocabulary of {v}"
        )));
    }
    Ok(t.iter()
        .map(|&tb| teacher_times(tb, dt, k, spacing))
        .collect())
}

/// `at` as `Rollout::unmasked_at` holds it.
fn step_of(a: u32) -> Option<usize> {
    (a != NONE).then_some(a as usize)
}

/// The first `v` columns of each row of a (rows, ld) host copy.
fn dense(padded: &[f32], ld: usize, v: usize) -> Vec<f32> {
    padded
        .chunks_exact(ld)
        .flat_map(|row| &row[..v])
        .copied()
        .collect()
}

/// Where [`drive`] runs: the GPU, or the kernels' CPU twins.
pub trait RolloutBackend {
    /// The teacher forward on the current tokens (and the eps loaded once); keeps its
    /// log-probs.
    fn forward(&mut self) -> Result<()>;
    /// Row stride of the kept log-probs and of the target.
    fn strides(&self) -> (usize, usize);
    /// One fused sampler step on the kept log-probs with `alphas` (B, 2), then the target rule.
    fn step(&mut self, alphas: &[f64], p: &SampleParams, tp: &RolloutTargetParams) -> Result<()>;
}

/// The rollout loop: per step k the forward, the alphas of the rows' start times, the sampler
/// step k under `key` without eps redraws, and the target rule of step k (see the module doc).
pub fn drive<B: RolloutBackend + ?Sized>(
    be: &mut B,
    c: &DitConfig,
    (bsz, len): (usize, usize),
    times: &[Vec<f64>],
    (k, dt): (usize, f64),
    key: u64,
) -> Result<()> {
    let dims = (bsz, len, c.vocab_size, c.mask_index);
    let (ld, ldt) = be.strides();
    let mut alphas = vec![0f64; 2 * bsz];
    for step in 0..k {
        be.forward()?;
        for (b, ts) in times.iter().enumerate() {
            alphas[2 * b] = alpha(ts[step]);
            alphas[2 * b + 1] = alpha(ts[step] - dt);
        }
        let mut p =
            SampleParams::new(SamplerKind::ImdmPosterior, dims, key, step as u32).with_ld(ld);
        if c.has_eps_mlp() {
            // The eps buffer is passed (it has noise_dim columns) but never written: fix_eps.
            p = p.with_eps(c.noise_dim, c.noise_type, c.noise_scale as f32, false);
        }
        let tp =
            RolloutTargetParams::new((bsz * len, c.vocab_size, c.mask_index), (ld, ldt), step, k);
        be.step(&alphas, &p, &tp)?;
    }
    Ok(())
}

/// [`DeviceTeacher::rollout`]'s state during [`drive`].
struct GpuBackend<'a> {
    gpu: &'a Gpu,
    model: &'a GpuDit,
    ws: &'a mut Workspace,
    bufs: &'a mut Buffers,
}

impl RolloutBackend for GpuBackend<'_> {
    fn forward(&mut self) -> Result<()> {
        self.model.forward(self.gpu, self.ws, ForwardOpts::eval())
    }

    fn strides(&self) -> (usize, usize) {
        (self.ws.logits_ld, self.bufs.ldt)
    }

    fn step(&mut self, alphas: &[f64], p: &SampleParams, tp: &RolloutTargetParams) -> Result<()> {
        let (ws, b) = (&mut *self.ws, &mut *self.bufs);
        self.gpu.stream.memcpy_htod(alphas, &mut b.alphas)?;
        sample_fwd_f32(
            self.gpu,
            &mut ws.tokens,
            &mut b.cat,
            ws.eps.as_mut(),
            &mut b.counters,
            &ws.log_probs,
            &b.alphas,
            p,
        )?;
        rollout_target_f32(
            self.gpu,
            &mut b.target,
            &mut b.at,
            &b.cat,
            &ws.log_probs,
            tp,
        )
    }
}

/// [`drive`]'s state on the host, with the kernels' twins and any denoiser.
struct TwinBackend<'d, D: ?Sized> {
    den: &'d mut D,
    x: Tokens,
    eps: Option<&'d Tensor>,
    /// (rows, V) the last forward's log-probs
    log_probs: Vec<f32>,
    cat: Vec<u32>,
    at: Vec<u32>,
    /// (rows, ldt)
    target: Vec<f32>,
    ldt: usize,
}

impl<D: Denoiser + ?Sized> RolloutBackend for TwinBackend<'_, D> {
    fn forward(&mut self) -> Result<()> {
        let v = self.den.config().vocab_size;
        let lp = self.den.log_probs(&self.x, self.eps)?;
        lp.expect_shape("teacher log-probs", &[self.x.batch, self.x.len, v])?;
        self.log_probs = lp.data;
        Ok(())
    }

    fn strides(&self) -> (usize, usize) {
        (self.den.config().vocab_size, self.ldt)
    }

    fn step(&mut self, alphas: &[f64], p: &SampleParams, tp: &RolloutTargetParams) -> Result<()> {
        let mut counters = [0u32; 2];
        // No eps buffer: write_eps is 0, so the kernel never writes its own.
        sample_cpu::sample_fwd(
            &mut self.x.ids,
            &mut self.cat,
            None,
            &mut counters,
            &self.log_probs,
            alphas,
            p,
        )?;
        target_cpu::rollout_target(
            &mut self.target,
            &mut self.at,
            &self.cat,
            &self.log_probs,
            tp,
        )
    }
}

/// [`DeviceTeacher::rollout`]'s loop with the kernels' CPU twins on any denoiser, returned as
/// `teacher_rollout` returns it: the same result (tested), so the device loop is checked
/// without a GPU.
pub fn rollout_twin<D: Denoiser + ?Sized>(
    den: &mut D,
    xt: &Tokens,
    t: &[f64],
    eps: Option<&Tensor>,
    spec: (usize, f64, Spacing),
    key: u64,
) -> Result<Rollout> {
    let c = den.config().clone();
    let times = check_inputs(&c, xt, t, spec)?;
    let (rows, v, ldt) = (xt.batch * xt.len, c.vocab_size, target_ld(c.vocab_size));
    let mut be = TwinBackend {
        den,
        x: xt.clone(),
        eps: eps.filter(|_| c.has_eps_mlp()),
        log_probs: Vec::new(),
        cat: vec![0; rows],
        at: vec![0; rows],
        target: vec![0.0; rows * ldt],
        ldt,
    };
    drive(
        &mut be,
        &c,
        (xt.batch, xt.len),
        &times,
        (spec.0, spec.1),
        key,
    )?;
    Ok(Rollout {
        target: dense(&be.target, ldt, v),
        unmasked_at: be.at.iter().map(|&a| step_of(a)).collect(),
        x: be.x,
        times,
    })
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
