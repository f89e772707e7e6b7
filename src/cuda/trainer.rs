//! GPU training: [`GpuTrainer`], the DiT on the GPU behind the training loop's
//! [`Objective`], in two modes.
//!
//! - **Resident** ([`Resident`], what `Trainer` uses and `imdm-engine train --device cuda`
//!   runs): the f32 master weights, gradients, AdamW moments and EMA shadow live on the device
//!   from [`Resident::load`] on; a step is: zero the gradients, per micro-batch the recorded
//!   forward (`GpuDit::forward_recorded`), the fused SUBS loss (`ops::subs::subs_bwd_f32`) and
//!   the tape backward (`cuda::dit_bwd`); then the conditioning gradients (`cuda::cond`),
//!   per-tensor sums of squares (non-finite check naming the tensor, global norm), one fused
//!   AdamW launch writing the bf16/f32 working copies (`ops::adamw`), one EMA launch, and the
//!   modulation refresh. The host state is written back only for checkpoints
//!   ([`Resident::store`]).
//! - **Per call** ([`Objective::loss_and_grad`], for `distill::Fitter`, the gradient tests and
//!   anything else written against host `DitParams`): the given weights are uploaded, the loss
//!   and all gradients computed, the gradients downloaded and added into the host buffers. This
//!   discards any resident state.
//!
//! Numerics are those of `cuda::dit` (bf16 GEMM operands, f32 accumulation and residual
//! stream, f32 logits and loss); the optimizer arithmetic is the CPU's bit for bit. With
//! [`GpuTrainOptions::autotune`] off (the default) every cuBLASLt GEMM uses the heuristic's
//! first algorithm, so two runs, or a run and its resumption in another process, are
//! bit-identical.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cpu::TrainOpts;
use crate::cuda::cond::CondDevice;
use crate::cuda::dit::{ForwardOpts, GpuDit, Workspace};
use crate::cuda::dit_bwd::{backward, BwdScratch, ModGrads};
use crate::cuda::ops::adamw::{
    device_addr, AdamwParams, AdamwTable, AdamwTensor, EmaTable, EmaTensor,
};
use crate::cuda::ops::subs::{subs_bwd_f32, SubsShape};
use crate::cuda::param_tree::{LinearOf, ParamTree};
use crate::cuda::tape::Tape;
use crate::cuda::Gpu;
use crate::diffusion::LossBatch;
use crate::error::{Error, Result};
use crate::model::params::{Linear, TIME_FEATURES};
use crate::model::{DitConfig, DitParams};
use crate::tensor::Tensor;
use crate::train::objective::{Objective, Resident};
use crate::train::optim::{clip_coef, AdamW, AdamWCoeffs, AdamWConfig, Moments};
use crate::train::Ema;

/// Options of the GPU trainer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuTrainOptions {
    /// Autotune cuBLASLt GEMMs on first use (faster, but two processes may pick different
    /// algorithms and stop being bit-identical). Off by default.
    pub autotune: bool,
}

/// Adds context to an out-of-memory error: what was being allocated and what to change.
fn oom(e: Error, what: impl FnOnce() -> String) -> Error {
    match e {
        Error::Cuda(msg) if msg.contains("OUT_OF_MEMORY") || msg.contains("out of memory") => {
            Error::Cuda(format!("out of GPU memory for {}: {msg}", what()))
        }
        e => e,
    }
}

/// The buffers of one micro-batch shape: the training workspace, the backward's scratch and
/// the loss inputs.
struct Slot {
    ws: Workspace,
    sc: BwdScratch,
    /// (rows) u32 targets x0
    x0: CudaSlice<u32>,
    /// (rows) f32 NELBO weights
    w: CudaSlice<f32>,
    /// (rows) f32 per-row loss
    loss: CudaSlice<f32>,
}

impl Slot {
    fn new(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize) -> Result<Self> {
        let rows = batch * len;
        let s = &gpu.stream;
        Ok(Slot {
            ws: Workspace::training(gpu, c, batch, len)?,
            sc: BwdScratch::new(gpu, c, batch, len)?,
            x0: s.alloc_zeros(rows)?,
            w: s.alloc_zeros(rows)?,
            loss: s.alloc_zeros(rows)?,
        })
    }
}

/// The weights on the device and what computing gradients needs.
struct Core {
    /// The forward model: bf16 working copies, f32 embedding / norms / final bias, modulations.
    model: GpuDit,
    /// f32 master weights and f32 gradients, one buffer per tensor.
    master: ParamTree<CudaSlice<f32>>,
    grads: ParamTree<CudaSlice<f32>>,
    frozen: ParamTree<bool>,
    /// Reference names, `DitParams::named` order.
    names: Vec<String>,
    dmods: Option<ModGrads>,
    cond: Option<CondDevice>,
    /// Sums of squares of every gradient (named order).
    norms: AdamwTable,
}

fn upload_tree(gpu: &Gpu, p: &DitParams) -> Result<ParamTree<CudaSlice<f32>>> {
    ParamTree::from_params(p, |_, t| Ok(gpu.stream.clone_htod(&t.data)?))
}

fn sigma_map_of(p: &DitParams) -> Option<(&Linear, &Linear)> {
    p.sigma_map.as_ref().map(|s| (&s.fc1, &s.fc2))
}

impl Core {
    fn new(gpu: &Gpu, p: &DitParams, frozen: ParamTree<bool>, autotune: bool) -> Result<Self> {
        let c = &p.config;
        c.validate()?;
        let master = upload_tree(gpu, p)?;
        let grads = master.try_map(|m| Ok::<_, Error>(gpu.stream.alloc_zeros::<f32>(m.len())?))?;
        let mut model = GpuDit::upload(gpu, p)?;
        model.gemm.set_autotune(autotune);
        let mut cond = match sigma_map_of(p) {
            Some((fc1, fc2)) => CondDevice::new(gpu, c, fc1, fc2)?,
            None => None,
        };
        // The modulations always come from the device path (`CondDevice`), never from the
        // upload's host computation, so a loaded checkpoint reproduces the running state bit
        // for bit.
        if let Some(cond) = cond.as_mut() {
            cond.refresh_modulations(gpu, &mut model, &master)?;
        }
        let addrs: Vec<(u64, usize)> = grads
            .items()
            .into_iter()
            .map(|g| (device_addr(gpu, g), g.len()))
            .collect();
        // SAFETY: the gradient buffers belong to this Core, which owns the table too; they are
        // never reallocated while it lives.
        let norms = unsafe { AdamwTable::norms_only(gpu, &addrs) }?;
        Ok(Core {
            model,
            master,
            grads,
            frozen,
            names: p.named().into_iter().map(|(n, _)| n).collect(),
            dmods: ModGrads::new(gpu, c)?,
            cond,
            norms,
        })
    }

    /// Per-call mode: new weights into the existing buffers (the working copies are rebuilt,
    /// keeping the GEMM plans).
    fn set_params(&mut self, gpu: &Gpu, p: &DitParams) -> Result<()> {
        if p.config != self.model.config {
            return Err(Error::Config(
                "GPU trainer: the weights' configuration changed; build a new trainer".into(),
            ));
        }
        for (dst, (name, t)) in self.master.items_mut().into_iter().zip(p.named()) {
            if dst.len() != t.numel() {
                return Err(Error::Shape(format!("{name}: {} elements", t.numel())));
            }
            gpu.stream.memcpy_htod(&t.data, dst)?;
        }
        let mut model = GpuDit::upload(gpu, p)?;
        std::mem::swap(&mut model.gemm, &mut self.model.gemm);
        self.model = model;
        if let (Some(cond), Some((fc1, fc2))) = (self.cond.as_mut(), sigma_map_of(p)) {
            cond.set_sigma_map(gpu, fc1, fc2)?;
            cond.refresh_modulations(gpu, &mut self.model, &self.master)?;
        }
        Ok(())
    }

    fn zero_grads(&mut self, gpu: &Gpu) -> Result<()> {
        for g in self.grads.items_mut() {
            gpu.stream.memset_zeros(g)?;
        }
        if let Some(m) = self.dmods.as_mut() {
            m.zero(gpu)?;
        }
        Ok(())
    }

    /// The adaLN and sigma-map gradients from the step's modulation sums (once per step).
    fn finish_grads(&mut self, gpu: &Gpu) -> Result<()> {
        if let (Some(cond), Some(dm)) = (self.cond.as_mut(), self.dmods.as_ref()) {
            cond.finish_grads(gpu, &self.master, dm, &mut self.grads, &self.frozen)?;
        }
        Ok(())
    }

    /// (name, index, value) of the first non-finite element of tensor `k` (named order): of
    /// its gradient, or of its master weights with `master`.
    fn first_non_finite(&self, gpu: &Gpu, k: usize, master: bool) -> Result<(String, usize, f32)> {
        let buf = if master {
            self.master.items()[k]
        } else {
            self.grads.items()[k]
        };
        let v = gpu.stream.clone_dtoh(buf)?;
        let (i, x) = v
            .iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite())
            .map_or((0, f32::NAN), |(i, &x)| (i, x));
        Ok((self.names[k].clone(), i, x))
    }
}

/// The optimizer half of the resident state.
struct OptState {
    config: AdamWConfig,
    /// AdamW steps taken (torch's `state['step']`).
    step: u64,
    /// Moments of trainable tensors (`None` for frozen ones).
    m: ParamTree<Option<CudaSlice<f32>>>,
    v: ParamTree<Option<CudaSlice<f32>>>,
    /// Named index of each AdamW descriptor.
    trainable: Vec<usize>,
    table: AdamwTable,
    ema: ParamTree<CudaSlice<f32>>,
    ema_decay: f64,
    ema_updates: u64,
    ema_table: EmaTable,
}

/// (bf16 address, f32 address, elements) of each tensor's working copy in `m` (0 when none):
/// bf16 for GEMM weights and their bf16 epilogue biases, f32 for the embedding, the norms and
/// the final bias; none for the adaLN and sigma-map tensors (their modulations are refreshed
/// from the masters instead). Built structurally, field by field, on `shape`'s tree.
fn working_copies(
    gpu: &Gpu,
    m: &GpuDit,
    shape: &ParamTree<CudaSlice<f32>>,
) -> ParamTree<(u64, u64, usize)> {
    let mut w = shape.map(|_| (0u64, 0u64, 0usize));
    let a16 = |s: &CudaSlice<bf16>| (device_addr(gpu, s), 0, s.len());
    let a32 = |s: &CudaSlice<f32>| (0, device_addr(gpu, s), s.len());
    w.embedding = a32(&m.embedding);
    if let (Some([f1, f2]), Some((g1, g2))) = (w.eps_mlp.as_mut(), m.eps_mlp.as_ref()) {
        f1.w = a16(&g1.w);
        if let (Some(b), Some(gb)) = (f1.b.as_mut(), g1.b.as_ref()) {
            *b = a16(gb);
        }
        f2.w = a16(&g2.w);
    }
    for (wb, mb) in w.blocks.iter_mut().zip(&m.blocks) {
        wb.norm1 = a32(&mb.norm1);
        wb.norm2 = a32(&mb.norm2);
        wb.qkv.w = a16(&mb.qkv.w);
        wb.out.w = a16(&mb.attn_out.w);
        wb.mlp1.w = a16(&mb.mlp1.w);
        wb.mlp2.w = a16(&mb.mlp2.w);
        for (b, gb) in [
            (wb.mlp1.b.as_mut(), &mb.mlp1.b),
            (wb.mlp2.b.as_mut(), &mb.mlp2.b),
        ] {
            if let (Some(b), Some(gb)) = (b, gb.as_ref()) {
                *b = a16(gb);
            }
        }
    }
    w.final_norm = a32(&m.final_norm);
    w.final_linear.w = a16(&m.final_linear.w);
    if let (Some(b), Some(gb)) = (w.final_linear.b.as_mut(), m.final_linear.b.as_ref()) {
        *b = a32(gb);
    }
    w
}

impl OptState {
    fn new(gpu: &Gpu, core: &Core, ema: &Ema, opt: &AdamW) -> Result<Self> {
        let s = &gpu.stream;
        let mut k = 0usize;
        let mut moments = |exp_avg: bool| -> Result<ParamTree<Option<CudaSlice<f32>>>> {
            k = 0;
            core.master.try_map(|_| {
                let st = &opt.state[k];
                k += 1;
                Ok::<_, Error>(match st {
                    Some(m) if exp_avg => Some(s.clone_htod(&m.exp_avg.data)?),
                    Some(m) => Some(s.clone_htod(&m.exp_avg_sq.data)?),
                    None => None,
                })
            })
        };
        let m = moments(true)?;
        let v = moments(false)?;
        let ema_tree = upload_tree(gpu, &ema.shadow)?;
        let work = working_copies(gpu, &core.model, &core.master);
        let mut descs = Vec::new();
        let mut trainable = Vec::new();
        let items = core.master.items();
        let grads = core.grads.items();
        let (mi, vi, wi) = (m.items(), v.items(), work.items());
        for (i, name) in core.names.iter().enumerate() {
            let (Some(mm), Some(vv)) = (mi[i], vi[i]) else {
                continue;
            };
            let n = items[i].len();
            let (w16, w32, wn) = *wi[i];
            if grads[i].len() != n || mm.len() != n || vv.len() != n || (wn != 0 && wn != n) {
                return Err(Error::Shape(format!(
                    "GPU optimizer: buffers of {name} disagree in length ({n} weights)"
                )));
            }
            descs.push(AdamwTensor {
                p: device_addr(gpu, items[i]),
                g: device_addr(gpu, grads[i]),
                m: device_addr(gpu, mm),
                v: device_addr(gpu, vv),
                w16,
                w32,
                n: n as i64,
            });
            trainable.push(i);
        }
        let edescs: Vec<EmaTensor> = ema_tree
            .items()
            .into_iter()
            .zip(&items)
            .map(|(e, p)| EmaTensor {
                s: device_addr(gpu, e),
                p: device_addr(gpu, p),
                n: p.len().min(e.len()) as i64,
            })
            .collect();
        // SAFETY: every address belongs to a buffer of `core` (master, grads, model working
        // copies) or of the returned state (moments, EMA), all allocated once and kept for as
        // long as the tables: the trainer drops this state whenever it replaces `core`. Lengths
        // were checked above; each tensor's writable buffers are distinct allocations.
        let table = unsafe { AdamwTable::new(gpu, &descs) }?;
        // SAFETY: as above (shadow and master buffers of the same tensor, equal lengths).
        let ema_table = unsafe { EmaTable::new(gpu, &edescs) }?;
        Ok(OptState {
            config: opt.config,
            step: opt.step,
            m,
            v,
            trainable,
            table,
            ema: ema_tree,
            ema_decay: ema.decay,
            ema_updates: ema.num_updates,
            ema_table,
        })
    }
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

/// Downloads a device tree into host tensors shaped like `like`.
fn download_into(gpu: &Gpu, tree: &ParamTree<CudaSlice<f32>>, dst: &mut DitParams) -> Result<()> {
    for (src, (name, t)) in tree.items().into_iter().zip(dst.named_mut()) {
        if src.len() != t.numel() {
            return Err(Error::Shape(format!(
                "{name}: device {} elements, host {}",
                src.len(),
                t.numel()
            )));
        }
        t.data = gpu.stream.clone_dtoh(src)?;
    }
    Ok(())
}

fn download_linear(
    gpu: &Gpu,
    l: &LinearOf<CudaSlice<f32>>,
    out: usize,
    inp: usize,
) -> Result<Linear> {
    Ok(Linear {
        weight: Tensor::from_vec(&[out, inp], gpu.stream.clone_dtoh(&l.w)?)?,
        bias: match &l.b {
            Some(b) => Some(Tensor::from_vec(&[out], gpu.stream.clone_dtoh(b)?)?),
            None => None,
        },
    })
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

    /// Uploads the inputs of `b` into the slot (which must fit it).
    fn load_batch(gpu: &Gpu, c: &DitConfig, slot: &mut Slot, b: &LossBatch) -> Result<()> {
        slot.ws.load_inputs(gpu, &b.xt.ids, b.eps)?;
        gpu.stream.memcpy_htod(&b.x0.ids, &mut slot.x0)?;
        gpu.stream.memcpy_htod(b.weight, &mut slot.w)?;
        slot.sc.load_tokens(gpu, &b.xt.ids, c.vocab_size)?;
        Ok(())
    }

    /// The fused loss over the logits in the slot (writes the gradient in place); returns the
    /// sum of the per-row losses, added in row order in f64 on the host.
    fn loss(gpu: &Gpu, c: &DitConfig, slot: &mut Slot, norm: f64) -> Result<f64> {
        let rows = slot.ws.batch * slot.ws.len;
        subs_bwd_f32(
            gpu,
            &mut slot.ws.logits,
            &mut slot.loss,
            &slot.ws.tokens,
            &slot.x0,
            &slot.w,
            SubsShape {
                rows,
                vocab: c.vocab_size,
                ld: slot.ws.logits_ld,
                mask_index: c.mask_index,
            },
            norm as f32,
        )?;
        Ok(gpu
            .stream
            .clone_dtoh(&slot.loss)?
            .iter()
            .map(|&x| x as f64)
            .sum())
    }

    /// Forward, fused loss and backward of one micro-batch on the current weights; gradients
    /// accumulate into the core's buffers.
    fn run_micro(&mut self, b: &LossBatch, opts: &TrainOpts) -> Result<f64> {
        let c = self
            .core
            .as_ref()
            .map(|k| k.model.config.clone())
            .ok_or_else(|| Error::Config("GPU trainer: no weights loaded".into()))?;
        let (batch, len) = b.check(&c)?;
        self.slot(&c, batch, len)?;
        let (gpu, core, slot) = (
            &self.gpu,
            self.core.as_mut().expect("checked"),
            self.slot.as_mut().expect("allocated"),
        );
        Self::load_batch(gpu, &c, slot, b)?;
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
        let loss = Self::loss(gpu, &c, slot, b.norm)?;
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
    fn eval_with(&mut self, use_core: bool, b: &LossBatch) -> Result<f64> {
        let model = if use_core {
            self.core.as_ref().map(|k| &k.model)
        } else {
            self.eval.as_ref().map(|(m, _)| m)
        }
        .ok_or_else(|| Error::Config("GPU trainer: no evaluation weights".into()))?;
        let c = model.config.clone();
        let (batch, len) = b.check(&c)?;
        self.slot(&c, batch, len)?;
        let model = if use_core {
            &self.core.as_ref().expect("checked").model
        } else {
            &self.eval.as_ref().expect("checked").0
        };
        let (gpu, slot) = (&self.gpu, self.slot.as_mut().expect("allocated"));
        Self::load_batch(gpu, &c, slot, b)?;
        let fopts = ForwardOpts {
            subs: false,
            ..ForwardOpts::eval()
        };
        model.forward_recorded(gpu, &mut slot.ws, fopts, None)?;
        Self::loss(gpu, &c, slot, b.norm)
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

    fn eval_loss(&mut self, params: &DitParams, batch: &LossBatch) -> Result<f64> {
        let mut model = GpuDit::upload(&self.gpu, params)?;
        model.gemm.set_autotune(self.opts.autotune);
        self.eval = Some((model, false));
        self.eval_with(false, batch)
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

    fn accumulate(&mut self, batch: &LossBatch, opts: &TrainOpts) -> Result<f64> {
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

    fn eval_loss_ema(&mut self, batch: &LossBatch) -> Result<f64> {
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
