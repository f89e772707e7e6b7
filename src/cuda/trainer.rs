//! GPU training: [`GpuTrainer`], the DiT on the GPU behind the training loop's
//! [`Objective`], in two modes.
//!
//! - **Resident** ([`Resident`], what `Trainer` and `distill::Sdtt` use and `imdm-engine train
//!   --device cuda` / `distill sdtt --device cuda` run): the f32 master weights, gradients,
//!   AdamW moments and EMA shadow live on the device from [`Resident::load`] on; a step is:
//!   zero the gradients, per micro-batch the recorded forward (`GpuDit::forward_recorded`),
//!   the fused loss over the logits (the objective's only difference: the SUBS cross-entropy
//!   `ops::subs` for the NELBO, the distillation divergence `ops::distill_kl` against an
//!   uploaded teacher target; [`LossInput`], `trainer_loss.rs`) and the tape backward
//!   (`cuda::dit_bwd`); then the conditioning gradients (`cuda::cond`), per-tensor sums of
//!   squares (non-finite check naming the tensor, global norm), one fused AdamW launch
//!   writing the bf16/f32 working copies (`ops::adamw`), one EMA launch, and the modulation
//!   refresh. The host state is written back only for checkpoints ([`Resident::store`]).
//!   The device state is in `trainer_state.rs`.
//! - **Per call** ([`Objective::loss_and_grad`], [`GpuTrainer::distill_loss_and_grad`], for
//!   `distill::Fitter`, the gradient tests and anything else written against host
//!   `DitParams`): the given weights are uploaded, the loss and all gradients computed, the
//!   gradients downloaded and added into the host buffers. This discards any resident state.
//!
//! Numerics are those of `cuda::dit` (bf16 GEMM operands, f32 accumulation and residual
//! stream, f32 logits and loss); the optimizer arithmetic is the CPU's bit for bit. With
//! [`GpuTrainOptions::autotune`] off (the default) every cuBLASLt GEMM uses the heuristic's
//! first algorithm, so two runs, or a run and its resumption in another process, are
//! bit-identical.

use crate::cpu::TrainOpts;
use crate::cuda::dit::{ForwardOpts, GpuDit};
use crate::cuda::dit_bwd::backward;
use crate::cuda::ops::adamw::AdamwParams;
use crate::cuda::param_tree::ParamTree;
use crate::cuda::tape::Tape;
use crate::cuda::Gpu;
use crate::diffusion::{DistillBatch, LossBatch};
use crate::error::{Error, Result};
use crate::model::params::TIME_FEATURES;
use crate::model::{DitConfig, DitParams};
use crate::tensor::Tensor;
use crate::train::objective::{LossInput, Objective, Resident};
use crate::train::optim::{clip_coef, AdamW, AdamWCoeffs, Moments};
use crate::train::Ema;

#[path = "trainer_loss.rs"]
mod loss;
#[path = "trainer_state.rs"]
mod state;

pub(crate) use loss::oom;
use loss::Slot;
use state::{download_into, download_linear, Core, OptState};

/// Options of the GPU trainer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuTrainOptions {
    /// Autotune cuBLASLt GEMMs on first use (faster, but two processes may pick different
    /// algorithms and stop being bit-identical). Off by default.
    pub autotune: bool,
}

/// The DiT objective on the GPU (see the module doc).
pub struct GpuTrainer {
    gpu: Gpu,
    opts: GpuTrainOptions,
    core: Option<Core>,
    opt: Option<OptState>,
    slot: Option<Slot>,
    tape: Tape,
    /// The evaluation model and whether it holds the current EMA weights.
    eval: Option<(GpuDit, bool)>,
}

impl GpuTrainer {
    /// A trainer on `gpu`; the model arrives with the first [`Resident::load`] or
    /// [`Objective::loss_and_grad`] call.
    pub fn new(gpu: Gpu, opts: GpuTrainOptions) -> Self {
        GpuTrainer {
            gpu,
            opts,
            core: None,
            opt: None,
            slot: None,
            tape: Tape::new(),
            eval: None,
        }
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The buffers for a (batch, len) micro-batch, reallocated when the shape changes.
    fn slot(&mut self, c: &DitConfig, batch: usize, len: usize) -> Result<()> {
        if self
            .slot
            .as_ref()
            .is_some_and(|s| (s.ws.batch, s.ws.len) == (batch, len))
        {
            return Ok(());
        }
        self.slot = None; // free the old shape first
        let slot = Slot::new(&self.gpu, c, batch, len).map_err(|e| {
            oom(e, || {
                format!(
                    "the training workspace of a micro-batch of {batch} sequences x L {len} \
                     (D {}, {} blocks, V {}); lower --micro-batch (gradients accumulate over \
                     micro-batches)",
                    c.hidden, c.blocks, c.vocab_size
                )
            })
        })?;
        self.slot = Some(slot);
        Ok(())
    }

    fn new_core(&self, p: &DitParams, frozen: ParamTree<bool>) -> Result<Core> {
        Core::new(&self.gpu, p, frozen, self.opts.autotune).map_err(|e| {
            oom(e, || {
                format!(
                    "the weights, gradients and working copies of {} parameters",
                    p.count()
                )
            })
        })
    }

    /// Forward, fused loss and backward of one micro-batch on the current weights; gradients
    /// accumulate into the core's buffers.
    fn run_micro(&mut self, b: LossInput, opts: &TrainOpts) -> Result<f64> {
        let c = self
            .core
            .as_ref()
            .map(|k| k.model.config.clone())
            .ok_or_else(|| Error::Config("GPU trainer: no weights loaded".into()))?;
        let (batch, len) = loss::check(&b, &c)?;
        self.slot(&c, batch, len)?;
        let (gpu, core, slot) = (
            &self.gpu,
            self.core.as_mut().expect("checked"),
            self.slot.as_mut().expect("allocated"),
        );
        slot.load(gpu, &c, &b)?;
        let p = c.dropout as f32;
        let (dropout, seed, offset) = match opts.dropout {
            Some((seed, offset)) if p > 0.0 => (p, seed, offset),
            _ => (0.0, 0, 0),
        };
        let fopts = ForwardOpts {
            dropout,
            seed,
            offset,
            subs: false,
        };
        core.model
            .forward_recorded(gpu, &mut slot.ws, fopts, Some(&mut self.tape))?;
        let loss = slot.loss(gpu, &c, &b)?;
        backward(
            gpu,
            &core.model,
            &slot.ws,
            &self.tape,
            fopts,
            &mut slot.sc,
            &mut core.grads,
            core.dmods.as_mut(),
            &core.frozen,
        )?;
        Ok(loss)
    }

    /// The evaluation loss of `b` with `model` (no dropout, no gradient).
    fn eval_with(&mut self, use_core: bool, b: LossInput) -> Result<f64> {
        let model = if use_core {
            self.core.as_ref().map(|k| &k.model)
        } else {
            self.eval.as_ref().map(|(m, _)| m)
        }
        .ok_or_else(|| Error::Config("GPU trainer: no evaluation weights".into()))?;
        let c = model.config.clone();
        let (batch, len) = loss::check(&b, &c)?;
        self.slot(&c, batch, len)?;
        let model = if use_core {
            &self.core.as_ref().expect("checked").model
        } else {
            &self.eval.as_ref().expect("checked").0
        };
        let (gpu, slot) = (&self.gpu, self.slot.as_mut().expect("allocated"));
        slot.load(gpu, &c, &b)?;
        let fopts = ForwardOpts {
            subs: false,
            ..ForwardOpts::eval()
        };
        model.forward_recorded(gpu, &mut slot.ws, fopts, None)?;
        slot.loss(gpu, &c, &b)
    }

    /// Per-call mode (see the module doc): the loss of `batch` with `params` uploaded, and
    /// every gradient added (`+=`) into `grads`.
    fn per_call(
        &mut self,
        params: &DitParams,
        batch: LossInput,
        opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64> {
        // Per-call mode: any resident state refers to buffers about to change.
        self.opt = None;
        match self.core.as_mut() {
            Some(core) if core.model.config == params.config => {
                core.set_params(&self.gpu, params)?;
                // A core left by a resident run may carry frozen flags; this mode computes
                // every gradient.
                core.frozen = core.frozen.map(|_| false);
            }
            _ => {
                self.core = None;
                let frozen = ParamTree::from_params(params, |_, _| Ok::<_, Error>(false))?;
                self.core = Some(self.new_core(params, frozen)?);
            }
        }
        self.core.as_mut().expect("set").zero_grads(&self.gpu)?;
        let loss = self.run_micro(batch, opts)?;
        let core = self.core.as_mut().expect("set");
        core.finish_grads(&self.gpu)?;
        for (src, (name, dst)) in core.grads.items().into_iter().zip(grads.named_mut()) {
            if src.len() != dst.numel() {
                return Err(Error::Shape(format!(
                    "grads {name}: {} elements",
                    dst.numel()
                )));
            }
            let g = self.gpu.stream.clone_dtoh(src)?;
            dst.data.iter_mut().zip(&g).for_each(|(d, s)| *d += s);
        }
        Ok(loss)
    }

    /// The evaluation loss of `batch` with `params` uploaded into the evaluation model.
    fn per_call_eval(&mut self, params: &DitParams, batch: LossInput) -> Result<f64> {
        let mut model = GpuDit::upload(&self.gpu, params)?;
        model.gemm.set_autotune(self.opts.autotune);
        self.eval = Some((model, false));
        self.eval_with(false, batch)
    }

    /// The distillation loss of `batch` (spec 6.1 step 4, the `ops::distill_kl` kernel) and
    /// every parameter gradient, added (`+=`) into `grads`, in per-call mode: the GPU twin of
    /// `cpu::distill_loss_and_grad`. Discards any resident state.
    pub fn distill_loss_and_grad(
        &mut self,
        params: &DitParams,
        batch: &DistillBatch,
        opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64> {
        self.per_call(params, LossInput::Distill(*batch), opts, grads)
    }

    /// The distillation loss of `batch` in evaluation mode (no dropout, no gradient): the GPU
    /// twin of `cpu::distill_loss_eval`.
    pub fn distill_eval_loss(&mut self, params: &DitParams, batch: &DistillBatch) -> Result<f64> {
        self.per_call_eval(params, LossInput::Distill(*batch))
    }
}

impl Objective for GpuTrainer {
    fn name(&self) -> &'static str {
        "gpu-dit"
    }

    fn loss_and_grad(
        &mut self,
        params: &DitParams,
        batch: &LossBatch,
        opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64> {
        self.per_call(params, LossInput::Nelbo(*batch), opts, grads)
    }

    fn eval_loss(&mut self, params: &DitParams, batch: &LossBatch) -> Result<f64> {
        self.per_call_eval(params, LossInput::Nelbo(*batch))
    }

    fn resident(&mut self) -> Option<&mut dyn Resident> {
        Some(self)
    }
}

impl Resident for GpuTrainer {
    fn is_loaded(&self) -> bool {
        self.opt.is_some()
    }

    fn load(&mut self, params: &DitParams, ema: &Ema, opt: &AdamW) -> Result<()> {
        let names: Vec<String> = params.named().into_iter().map(|(n, _)| n).collect();
        if opt.names != names || opt.state.len() != names.len() {
            return Err(Error::Config(
                "GPU trainer: the optimizer state does not match the model's tensors".into(),
            ));
        }
        self.opt = None;
        self.core = None;
        self.eval = None;
        let mut k = 0usize;
        let frozen = ParamTree::from_params(params, |_, _| {
            k += 1;
            Ok::<_, Error>(opt.state[k - 1].is_none())
        })?;
        let core = self.new_core(params, frozen)?;
        let state = OptState::new(&self.gpu, &core, ema, opt).map_err(|e| {
            oom(e, || {
                format!("the AdamW moments and EMA of {} parameters", params.count())
            })
        })?;
        self.core = Some(core);
        self.opt = Some(state);
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        let core = self
            .core
            .as_mut()
            .ok_or_else(|| Error::Config("GPU trainer: not loaded".into()))?;
        core.zero_grads(&self.gpu)
    }

    fn accumulate(&mut self, batch: LossInput, opts: &TrainOpts) -> Result<f64> {
        self.run_micro(batch, opts)
    }

    fn update(&mut self, step: u64, loss: f64, lr: f64, clip: f64) -> Result<f64> {
        let gpu = &self.gpu;
        let (Some(core), Some(st)) = (self.core.as_mut(), self.opt.as_mut()) else {
            return Err(Error::Config("GPU trainer: not loaded".into()));
        };
        core.finish_grads(gpu)?;
        // Per-tensor sums of squares of every gradient: a non-finite one names the tensor, the
        // trainable ones give the clip norm.
        let sq = core.norms.sumsq(gpu)?;
        let bad_grad = match sq.iter().position(|x| !x.is_finite()) {
            Some(k) => {
                let (n, i, v) = core.first_non_finite(gpu, k, false)?;
                Some(format!("gradient of {n} (element {i} = {v})"))
            }
            None => None,
        };
        crate::train::update::check_finite(step, loss, bad_grad)?;
        let norm = st.trainable.iter().map(|&k| sq[k]).sum::<f64>().sqrt();
        st.step += 1;
        let k = AdamWCoeffs::new(&st.config, st.step, lr);
        st.table
            .step(gpu, AdamwParams::new(&k, clip_coef(norm, clip)))?;
        if let Some(j) = st.table.take_bad(gpu)?.iter().position(|&b| b) {
            let (n, i, v) = core.first_non_finite(gpu, st.trainable[j], true)?;
            return Err(Error::NonFinite {
                step,
                what: format!(
                    "parameter {n} became non-finite after the update (element {i} = {v})"
                ),
            });
        }
        st.ema_updates += 1;
        let n = st.ema_updates as f64;
        let decay = st.ema_decay.min((1.0 + n) / (10.0 + n));
        st.ema_table
            .update(gpu, (1.0 - decay) as f32, st.ema_decay == 0.0)?;
        // The conditioning vector and the modulations follow the new weights.
        if let Some(cond) = core.cond.as_mut() {
            let c = &core.model.config;
            if let Some([f1, f2]) = core.master.sigma_map.as_ref() {
                let fc1 = download_linear(gpu, f1, c.cond_dim, TIME_FEATURES)?;
                let fc2 = download_linear(gpu, f2, c.cond_dim, c.cond_dim)?;
                cond.set_sigma_map(gpu, &fc1, &fc2)?;
            }
            cond.refresh_modulations(gpu, &mut core.model, &core.master)?;
        }
        if let Some(e) = self.eval.as_mut() {
            e.1 = false;
        }
        Ok(norm)
    }

    fn eval_loss_ema(&mut self, batch: LossInput) -> Result<f64> {
        let current = self.eval.as_ref().is_some_and(|e| e.1);
        if !current {
            let (Some(core), Some(st)) = (self.core.as_ref(), self.opt.as_ref()) else {
                return Err(Error::Config("GPU trainer: not loaded".into()));
            };
            let mut shadow = DitParams::zeros(&core.model.config);
            download_into(&self.gpu, &st.ema, &mut shadow)?;
            self.eval = None;
            let mut model = GpuDit::upload(&self.gpu, &shadow)?;
            model.gemm.set_autotune(self.opts.autotune);
            self.eval = Some((model, true));
        }
        self.eval_with(false, batch)
    }

    fn store(&mut self, params: &mut DitParams, ema: &mut Ema, opt: &mut AdamW) -> Result<()> {
        let (Some(core), Some(st)) = (self.core.as_ref(), self.opt.as_ref()) else {
            return Err(Error::Config("GPU trainer: not loaded".into()));
        };
        let gpu = &self.gpu;
        download_into(gpu, &core.master, params)?;
        download_into(gpu, &st.ema, &mut ema.shadow)?;
        ema.num_updates = st.ema_updates;
        opt.step = st.step;
        let shapes: Vec<Vec<usize>> = params
            .named()
            .iter()
            .map(|(_, t)| t.shape.clone())
            .collect();
        for (k, ((m, v), slot)) in
            st.m.items()
                .into_iter()
                .zip(st.v.items())
                .zip(opt.state.iter_mut())
                .enumerate()
        {
            if let (Some(m), Some(v)) = (m, v) {
                *slot = Some(Moments {
                    exp_avg: Tensor::from_vec(&shapes[k], gpu.stream.clone_dtoh(m)?)?,
                    exp_avg_sq: Tensor::from_vec(&shapes[k], gpu.stream.clone_dtoh(v)?)?,
                });
            }
        }
        Ok(())
    }
}

/// Bytes of device memory in use (total minus free), for reports.
pub fn device_memory_used() -> Result<u64> {
    let (free, total) = cudarc::driver::result::mem_get_info()?;
    Ok((total - free) as u64)
}

#[cfg(test)]
#[path = "trainer_tests.rs"]
mod tests;
