//! The resident state of the GPU trainer (`cuda::trainer`): [`Core`], the weights on the device
//! with their f32 masters and gradients, and [`OptState`], the AdamW moments, the EMA shadow
//! and the fused launch tables over them; with the host <-> device copies of parameter trees.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::cond::CondDevice;
use crate::cuda::dit::GpuDit;
use crate::cuda::dit_bwd::ModGrads;
use crate::cuda::ops::adamw::{device_addr, AdamwTable, AdamwTensor, EmaTable, EmaTensor};
use crate::cuda::param_tree::{LinearOf, ParamTree};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::params::Linear;
use crate::model::DitParams;
use crate::tensor::Tensor;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::Ema;

/// The weights on the device and what computing gradients needs.
pub(super) struct Core {
    /// The forward model: bf16 working copies, f32 embedding / norms / final bias, modulations.
    pub(super) model: GpuDit,
    /// f32 master weights and f32 gradients, one buffer per tensor.
    pub(super) master: ParamTree<CudaSlice<f32>>,
    pub(super) grads: ParamTree<CudaSlice<f32>>,
    pub(super) frozen: ParamTree<bool>,
    /// Reference names, `DitParams::named` order.
    pub(super) names: Vec<String>,
    pub(super) dmods: Option<ModGrads>,
    pub(super) cond: Option<CondDevice>,
    /// Sums of squares of every gradient (named order).
    pub(super) norms: AdamwTable,
}

pub(super) fn upload_tree(gpu: &Gpu, p: &DitParams) -> Result<ParamTree<CudaSlice<f32>>> {
    ParamTree::from_params(p, |_, t| Ok(gpu.stream.clone_htod(&t.data)?))
}

pub(super) fn sigma_map_of(p: &DitParams) -> Option<(&Linear, &Linear)> {
    p.sigma_map.as_ref().map(|s| (&s.fc1, &s.fc2))
}

impl Core {
    pub(super) fn new(
        gpu: &Gpu,
        p: &DitParams,
        frozen: ParamTree<bool>,
        autotune: bool,
    ) -> Result<Self> {
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
    pub(super) fn set_params(&mut self, gpu: &Gpu, p: &DitParams) -> Result<()> {
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

    pub(super) fn zero_grads(&mut self, gpu: &Gpu) -> Result<()> {
        for g in self.grads.items_mut() {
            gpu.stream.memset_zeros(g)?;
        }
        if let Some(m) = self.dmods.as_mut() {
            m.zero(gpu)?;
        }
        Ok(())
    }

    /// The adaLN and sigma-map gradients from the step's modulation sums (once per step).
    pub(super) fn finish_grads(&mut self, gpu: &Gpu) -> Result<()> {
        if let (Some(cond), Some(dm)) = (self.cond.as_mut(), self.dmods.as_ref()) {
            cond.finish_grads(gpu, &self.master, dm, &mut self.grads, &self.frozen)?;
        }
        Ok(())
    }

    /// (name, index, value) of the first non-finite element of tensor `k` (named order): of
    /// its gradient, or of its master weights with `master`.
    pub(super) fn first_non_finite(
        &self,
        gpu: &Gpu,
        k: usize,
        master: bool,
    ) -> Result<(String, usize, f32)> {
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
pub(super) struct OptState {
    pub(super) config: AdamWConfig,
    /// AdamW steps taken (torch's `state['step']`).
    pub(super) step: u64,
    /// Moments of trainable tensors (`None` for frozen ones).
    pub(super) m: ParamTree<Option<CudaSlice<f32>>>,
    pub(super) v: ParamTree<Option<CudaSlice<f32>>>,
    /// Named index of each AdamW descriptor.
    pub(super) trainable: Vec<usize>,
    pub(super) table: AdamwTable,
    pub(super) ema: ParamTree<CudaSlice<f32>>,
    pub(super) ema_decay: f64,
    pub(super) ema_updates: u64,
    pub(super) ema_table: EmaTable,
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
    pub(super) fn new(gpu: &Gpu, core: &Core, ema: &Ema, opt: &AdamW) -> Result<Self> {
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

/// Downloads a device tree into host tensors shaped like `like`.
pub(super) fn download_into(
    gpu: &Gpu,
    tree: &ParamTree<CudaSlice<f32>>,
    dst: &mut DitParams,
) -> Result<()> {
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

pub(super) fn download_linear(
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
