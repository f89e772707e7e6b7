//! The loss half of a GPU training micro-batch (`cuda::trainer`): [`Slot`], the buffers of one
//! micro-batch shape, the upload of a [`LossInput`] into it, and the fused loss over the
//! logits the recorded forward left there. Both objectives end the same way: the logits are
//! overwritten in place by `d loss / d logits` as bf16 in the first half of each f32 row (the
//! layout the tape backward reads), so the backward, clip, AdamW and EMA after it do not know
//! which loss ran.
//!
//! - NELBO ([`LossInput::Nelbo`]): `ops::subs::subs_bwd_f32`, the weighted SUBS cross-entropy.
//! - Distillation ([`LossInput::Distill`], spec 6.1 step 4): `ops::distill_kl`, the SUBS
//!   log-softmax of the student and the divergence from the teacher's log-probs at masked
//!   positions, scaled by 1/norm (norm = the masked positions of the global batch). A host
//!   target ([`LossInput::Distill`], (rows, V) f32) is uploaded into a buffer allocated on the
//!   first such batch of a shape, so a NELBO run never holds it; a device target
//!   ([`LossInput::DistillDevice`], the device teacher rollout's (rows, ldt) buffer,
//!   `cuda::rollout`) is read where it is, with no copy and no buffer here.

use cudarc::driver::CudaSlice;

use crate::cuda::dit::Workspace;
use crate::cuda::dit_bwd::BwdScratch;
use crate::cuda::ops::distill_kl::{distill_kl_fwd_bwd_f32, DistillKlShape};
use crate::cuda::ops::subs::{subs_bwd_f32, SubsShape};
use crate::cuda::Gpu;
use crate::diffusion::{DistillBatch, DistillMode, LossBatch};
use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::train::objective::LossInput;

/// Adds context to an out-of-memory error: what was being allocated and what to change.
pub(crate) fn oom(e: Error, what: impl FnOnce() -> String) -> Error {
    match e {
        Error::Cuda(msg) if msg.contains("OUT_OF_MEMORY") || msg.contains("out of memory") => {
            Error::Cuda(format!("out of GPU memory for {}: {msg}", what()))
        }
        e => e,
    }
}

/// (B, L) of a loss input after its checks against the model.
pub(super) fn check(b: &LossInput, c: &DitConfig) -> Result<(usize, usize)> {
    match b {
        LossInput::Nelbo(b) => b.check(c),
        LossInput::Distill(b) => b.check(c),
        LossInput::DistillDevice(b) => b.check(c),
    }
}

/// The buffers of one micro-batch shape: the training workspace, the backward's scratch and
/// the loss inputs.
pub(super) struct Slot {
    pub(super) ws: Workspace,
    pub(super) sc: BwdScratch,
    /// (rows) u32 targets x0
    x0: CudaSlice<u32>,
    /// (rows) f32 NELBO weights
    w: CudaSlice<f32>,
    /// (rows) f32 per-row loss
    loss: CudaSlice<f32>,
    /// (rows, V) f32 teacher log-probs of a distillation batch (allocated on first use)
    target: Option<CudaSlice<f32>>,
}

impl Slot {
    pub(super) fn new(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize) -> Result<Self> {
        let rows = batch * len;
        let s = &gpu.stream;
        Ok(Slot {
            ws: Workspace::training(gpu, c, batch, len)?,
            sc: BwdScratch::new(gpu, c, batch, len)?,
            x0: s.alloc_zeros(rows)?,
            w: s.alloc_zeros(rows)?,
            loss: s.alloc_zeros(rows)?,
            target: None,
        })
    }

    /// Uploads the inputs of `b` (checked, of this slot's shape).
    pub(super) fn load(&mut self, gpu: &Gpu, c: &DitConfig, b: &LossInput) -> Result<()> {
        match b {
            LossInput::Nelbo(b) => self.load_nelbo(gpu, c, b),
            LossInput::Distill(b) => self.load_distill(gpu, c, b),
            LossInput::DistillDevice(b) => {
                // The target is read in place by the loss; only the student's inputs go up.
                self.ws.load_inputs(gpu, &b.xt.ids, b.eps)?;
                self.sc.load_tokens(gpu, &b.xt.ids, c.vocab_size)
            }
        }
    }

    fn load_nelbo(&mut self, gpu: &Gpu, c: &DitConfig, b: &LossBatch) -> Result<()> {
        // A time-conditioned model's forward reads each sequence's sigma (spec 2.2).
        if let Some(sigma) = b.sigma {
            self.ws.load_sigma(sigma)?;
        }
        self.ws.load_inputs(gpu, &b.xt.ids, b.eps)?;
        gpu.stream.memcpy_htod(&b.x0.ids, &mut self.x0)?;
        gpu.stream.memcpy_htod(b.weight, &mut self.w)?;
        self.sc.load_tokens(gpu, &b.xt.ids, c.vocab_size)?;
        Ok(())
    }

    fn load_distill(&mut self, gpu: &Gpu, c: &DitConfig, b: &DistillBatch) -> Result<()> {
        if let Some(sigma) = b.sigma {
            self.ws.load_sigma(sigma)?;
        }
        self.ws.load_inputs(gpu, &b.xt.ids, b.eps)?;
        self.sc.load_tokens(gpu, &b.xt.ids, c.vocab_size)?;
        let n = b.target.len();
        if self.target.as_ref().is_none_or(|t| t.len() != n) {
            self.target = None;
            let (bsz, len) = (self.ws.batch, self.ws.len);
            let buf = gpu.stream.alloc_zeros::<f32>(n).map_err(|e| {
                oom(e.into(), || {
                    format!(
                        "the teacher target of a micro-batch of {bsz} sequences x L {len} x V {} \
                         (f32); lower --micro-batch",
                        c.vocab_size
                    )
                })
            })?;
            self.target = Some(buf);
        }
        let t = self.target.as_mut().expect("allocated above");
        gpu.stream.memcpy_htod(b.target, t)?;
        Ok(())
    }

    /// The fused loss of `b` (loaded) over the logits in the workspace, which it overwrites
    /// with the gradient; returns the micro-batch loss: per-row losses added in row order in
    /// f64 on the host (the distillation's divided by its norm there, as the CPU does).
    pub(super) fn loss(&mut self, gpu: &Gpu, c: &DitConfig, b: &LossInput) -> Result<f64> {
        let rows = self.ws.batch * self.ws.len;
        let norm = match b {
            LossInput::Nelbo(b) => {
                subs_bwd_f32(
                    gpu,
                    &mut self.ws.logits,
                    &mut self.loss,
                    &self.ws.tokens,
                    &self.x0,
                    &self.w,
                    SubsShape {
                        rows,
                        vocab: c.vocab_size,
                        ld: self.ws.logits_ld,
                        mask_index: c.mask_index,
                    },
                    b.norm as f32,
                )?;
                1.0
            }
            LossInput::Distill(b) => {
                let target = self.target.as_ref().ok_or_else(|| {
                    Error::Config("GPU trainer: distillation target not loaded".into())
                })?;
                let ws = &mut self.ws;
                let t = (target, c.vocab_size);
                distill(gpu, c, ws, &mut self.loss, t, b.mode, b.norm)?;
                b.norm
            }
            LossInput::DistillDevice(b) => {
                let t = (b.target.data, b.target.ldt);
                distill(gpu, c, &mut self.ws, &mut self.loss, t, b.mode, b.norm)?;
                b.norm
            }
        };
        let sum: f64 = gpu
            .stream
            .clone_dtoh(&self.loss)?
            .iter()
            .map(|&x| x as f64)
            .sum();
        Ok(sum / norm)
    }
}

/// The fused distillation loss over the workspace's logits against `target` (rows, ldt),
/// scaled by 1/norm, per-row losses into `loss`.
fn distill(
    gpu: &Gpu,
    c: &DitConfig,
    ws: &mut Workspace,
    loss: &mut CudaSlice<f32>,
    (target, ldt): (&CudaSlice<f32>, usize),
    mode: DistillMode,
    norm: f64,
) -> Result<()> {
    distill_kl_fwd_bwd_f32(
        gpu,
        &mut ws.logits,
        loss,
        target,
        &ws.tokens,
        DistillKlShape {
            rows: ws.batch * ws.len,
            vocab: c.vocab_size,
            ld: ws.logits_ld,
            ldt,
            mask_index: c.mask_index,
        },
        mode,
        (1.0 / norm) as f32,
    )
}
