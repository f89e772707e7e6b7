//! The GPU DiT forward, built from our kernels (`ops::*`) and cuBLASLt GEMMs (`ops::gemm`).
//!
//! Weights: an f32 master copy stays on the host (`DitParams`); the GPU holds bf16 copies of
//! the matrices and f32 LayerNorm weights. Without time conditioning the conditioning is
//! constant (sigma = 0, spec 4.2), so every adaLN modulation vector is computed once per weight
//! upload on the host and stored as one (6D) / (2D) row broadcast over all rows: the per-token
//! adaLN GEMMs of the reference disappear. With time conditioning (`DitConfig::
//! time_conditioning`: SEDD, D3PM) each forward computes (B, 6D) / (B, 2D) modulations from the
//! sequences' sigmas ([`Workspace::load_sigma`], `cuda::time_cond`), read per sequence by the
//! same kernels.
//!
//! Per block, with rows = B·L (buffers in [`BlockActs`], kept per block for the backward):
//! ```text
//! a1   = LN1(h)·(1+scale_msa)+shift_msa          ln_modulate   (rows, D)  bf16
//! qkv  = a1 W_qkv^T                              gemm          (rows, 3D) bf16
//! o    = attention(rotary(q), rotary(k), v)      attention     (rows, D)  bf16, lse (B,H,L)
//! proj = o W_out^T                               gemm          (rows, D)  bf16
//! h   += gate_msa · dropout(proj)                residual      (rows, D)  f32
//! a2   = LN2(h)·(1+scale_mlp)+shift_mlp          ln_modulate
//! m1   = gelu_tanh(a2 W1^T + b1), pre saved      gemm (GELU epilogue)  (rows, 4D) bf16
//! m2   = m1 W2^T + b2                            gemm (bias epilogue)  (rows, D)  bf16
//! h   += gate_mlp · dropout(m2)                  residual
//! ```
//! then `y = LN(h)·(1+scale)+shift`, `logits = y W^T + b` (f32), SUBS log-softmax (f32).
//!
//! Inference ([`GpuDit::upload_inference`]): the gates are constant too, so each gated
//! residual `h += g ∘ (x W^T + b)` becomes one GEMM accumulating into the f32 stream,
//! `h += x (diag(g) W)^T + g ∘ b` (beta = 1, [`FoldedGates`]): no residual kernel and no bf16
//! `proj`/`mlp_out` round trip. The MLP's GELU epilogue skips saving its pre-activation. A
//! time-conditioned model has per-sequence gates, so nothing is folded for it (the residual
//! kernels run).
//!
//! Training ([`GpuDit::forward_recorded`] on a [`Workspace::training`]) records every op on a
//! [`Tape`] for `cuda::dit_bwd`, keeps every block's activations, also saves each LayerNorm's
//! f32 input (the residual stream before it: `ln1_x`, `ln2_x`), and writes no log-probs: the
//! loss is the fused SUBS cross-entropy of `ops::subs`, whose gradient overwrites the logits.
//! Every workspace stores the logits (and log-probs) with a padded row stride (`logits_ld`, V
//! rounded up to 64).

use cudarc::driver::CudaSlice;
use half::bf16;

pub use crate::cuda::folded_gates::{fold_rows, FoldedGates};
use crate::cuda::nvtx;
use crate::cuda::ops::attention::{attention_fwd, AttentionShape};
use crate::cuda::ops::embedding::embedding_fwd;
use crate::cuda::ops::gelu::{gelu_fwd, GeluKind};
use crate::cuda::ops::gemm::{Epilogue, Gemm};
use crate::cuda::ops::ln_modulate::ln_modulate_fwd;
use crate::cuda::ops::modulation::{ModIn, ModRows};
use crate::cuda::ops::residual::residual_fwd;
use crate::cuda::ops::subs::{subs_fwd_f32, SubsShape};
use crate::cuda::tape::{Dropout, LinSite, LnSite, Op, ResSite, Tape};
use crate::cuda::time_cond::{RowCond, TimeCond};
pub use crate::cuda::workspace::{BlockActs, Keep, Workspace};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::dit_ref::{cond_vector, linear};
use crate::model::params::{DitParams, Linear};
use crate::model::DitConfig;

/// A linear layer on the GPU: bf16 weight (out, in) and bias in the epilogue's dtype.
pub struct GpuLinear<B> {
    pub w: CudaSlice<bf16>,
    pub b: Option<CudaSlice<B>>,
    pub out: usize,
    pub inp: usize,
}

pub(crate) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn upload_bf16(gpu: &Gpu, l: &Linear) -> Result<GpuLinear<bf16>> {
    Ok(GpuLinear {
        w: gpu.stream.clone_htod(&to_bf16(&l.weight.data))?,
        b: match &l.bias {
            Some(b) => Some(gpu.stream.clone_htod(&to_bf16(&b.data))?),
            None => None,
        },
        out: l.out_dim(),
        inp: l.in_dim(),
    })
}

/// One block's weights and its precomputed constant modulation row.
pub struct GpuBlock {
    pub norm1: CudaSlice<f32>,
    pub norm2: CudaSlice<f32>,
    pub qkv: GpuLinear<bf16>,
    pub attn_out: GpuLinear<bf16>,
    pub mlp1: GpuLinear<bf16>,
    pub mlp2: GpuLinear<bf16>,
    /// (6D) f32: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; None for the
    /// AR baseline and for time conditioning (per-sequence modulations, `GpuDit::time_cond`).
    pub modulation: Option<CudaSlice<f32>>,
    /// The gated output layers with the gates folded in ([`GpuDit::upload_inference`] only).
    pub folded: Option<FoldedGates>,
}

/// The whole model on the GPU.
pub struct GpuDit {
    pub config: DitConfig,
    /// (V, D) f32
    pub embedding: CudaSlice<f32>,
    /// IMDM eps MLP: nd -> 4D (bias) -> D.
    pub eps_mlp: Option<(GpuLinear<bf16>, GpuLinear<bf16>)>,
    pub blocks: Vec<GpuBlock>,
    pub final_norm: CudaSlice<f32>,
    /// Final (shift, scale): (2D) f32; None as for the blocks.
    pub final_modulation: Option<CudaSlice<f32>>,
    /// D -> V with an f32 bias (the logits are f32).
    pub final_linear: GpuLinear<f32>,
    pub gemm: Gemm,
    /// Time conditioning: the f32 adaLN layers and the sigma map the forward computes its
    /// per-sequence modulations from.
    pub time_cond: Option<TimeCond>,
}

/// The adaLN layer a modulation operand belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModLayer {
    Block(usize),
    Final,
}

/// The host modulation vector `adaLN(c)` of one adaLN layer (N chunks of D), or None without
/// adaLN or conditioning (the AR baseline).
fn host_modulation(adaln: Option<&Linear>, cond: Option<&[f32]>) -> Option<Vec<f32>> {
    Some(linear(cond?, adaln?))
}

/// Uploads a host modulation vector (one row of its chunks).
fn modulation(gpu: &Gpu, host: Option<&[f32]>) -> Result<Option<CudaSlice<f32>>> {
    Ok(match host {
        Some(m) => Some(gpu.stream.clone_htod(m)?),
        None => None,
    })
}

impl GpuDit {
    /// Uploads `p` (bf16 matrices, f32 norms, precomputed modulations), for training or any
    /// forward.
    pub fn upload(gpu: &Gpu, p: &DitParams) -> Result<Self> {
        Self::upload_with(gpu, p, false)
    }

    /// [`GpuDit::upload`] plus the gate-folded output layers ([`FoldedGates`]) that forwards
    /// without dropout or tape use. For fixed weights (sampling, evaluation, benchmarks): the
    /// folded copies do not follow later in-place weight updates. Valid for constant gates
    /// only: a time-conditioned model gets no folded layers (its forwards run the residual
    /// kernels with per-sequence gates).
    pub fn upload_inference(gpu: &Gpu, p: &DitParams) -> Result<Self> {
        Self::upload_with(gpu, p, true)
    }

    fn upload_with(gpu: &Gpu, p: &DitParams, fold: bool) -> Result<Self> {
        let s = &gpu.stream;
        let time_cond = TimeCond::new(gpu, p)?;
        // Constant conditioning only: a time-conditioned model has no sigma = 0 modulation.
        let cond = match time_cond {
            Some(_) => None,
            None => cond_vector(p, 0.0),
        };
        let fold = fold && time_cond.is_none();
        let blocks = p
            .blocks
            .iter()
            .map(|b| {
                let host_mod = host_modulation(b.adaln.as_ref(), cond.as_deref());
                let folded = match fold {
                    true => Some(FoldedGates::new(gpu, b, host_mod.as_deref())?),
                    false => None,
                };
                Ok(GpuBlock {
                    norm1: s.clone_htod(&b.norm1.data)?,
                    norm2: s.clone_htod(&b.norm2.data)?,
                    qkv: upload_bf16(gpu, &b.attn_qkv)?,
                    attn_out: upload_bf16(gpu, &b.attn_out)?,
                    mlp1: upload_bf16(gpu, &b.mlp_fc1)?,
                    mlp2: upload_bf16(gpu, &b.mlp_fc2)?,
                    modulation: modulation(gpu, host_mod.as_deref())?,
                    folded,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let f = &p.final_layer;
        Ok(GpuDit {
            config: p.config.clone(),
            embedding: s.clone_htod(&p.embedding.data)?,
            eps_mlp: match &p.eps_mlp {
                Some(e) => Some((upload_bf16(gpu, &e.fc1)?, upload_bf16(gpu, &e.fc2)?)),
                None => None,
            },
            blocks,
            final_norm: s.clone_htod(&f.norm.data)?,
            final_modulation: modulation(
                gpu,
                host_modulation(f.adaln.as_ref(), cond.as_deref()).as_deref(),
            )?,
            final_linear: GpuLinear {
                w: s.clone_htod(&to_bf16(&f.linear.weight.data))?,
                b: Some(s.clone_htod(&f.linear.bias.as_ref().expect("final bias").data)?),
                out: f.linear.out_dim(),
                inp: f.linear.in_dim(),
            },
            gemm: Gemm::new(gpu)?,
            time_cond,
        })
    }

    /// Chunk `k` of `layer`'s modulation as the kernels read it: the constant row broadcast
    /// over all rows, or (time conditioning) sequence b's row of the workspace's per-sequence
    /// modulations `cond`. `None` without adaLN (AR baseline) or without `cond`.
    pub(crate) fn mod_in<'a>(
        &'a self,
        cond: Option<&'a RowCond>,
        layer: ModLayer,
        k: usize,
    ) -> Option<ModIn<'a>> {
        let d = self.config.hidden;
        if self.time_cond.is_some() {
            let (buf, n) = match layer {
                ModLayer::Block(i) => (&cond?.blocks[i], 6),
                ModLayer::Final => (&cond?.final_layer, 2),
            };
            return Some(ModIn {
                buf,
                chunk: k,
                rows: ModRows::PerSequence { stride: n * d },
            });
        }
        let buf = match layer {
            ModLayer::Block(i) => self.blocks[i].modulation.as_ref()?,
            ModLayer::Final => self.final_modulation.as_ref()?,
        };
        Some(ModIn::broadcast(buf, k))
    }
}

/// Forward options.
#[derive(Clone, Copy, Debug)]
pub struct ForwardOpts {
    /// Dropout probability on both branches (0 in eval).
    pub dropout: f32,
    /// Philox seed and per-call offset base for dropout.
    pub seed: u64,
    pub offset: u64,
    /// Also compute SUBS log-probs (else stop at the logits).
    pub subs: bool,
}

impl ForwardOpts {
    pub fn eval() -> Self {
        ForwardOpts {
            dropout: 0.0,
            seed: 0,
            offset: 0,
            subs: true,
        }
    }
}

impl GpuDit {
    /// The forward on the inputs already in `ws` (see [`Workspace::load_inputs`], and
    /// [`Workspace::load_sigma`] for a time-conditioned model). Results stay on the GPU in
    /// `ws.logits` (and `ws.log_probs`, `ws.lse` when `opts.subs`).
    pub fn forward(&self, gpu: &Gpu, ws: &mut Workspace, opts: ForwardOpts) -> Result<()> {
        self.forward_recorded(gpu, ws, opts, None)
    }

    /// [`GpuDit::forward`], recording every op on `tape` (cleared first) when one is given; a
    /// recording forward needs a [`Workspace::training`] (it saves the LayerNorm inputs).
    pub fn forward_recorded(
        &self,
        gpu: &Gpu,
        ws: &mut Workspace,
        opts: ForwardOpts,
        mut tape: Option<&mut Tape>,
    ) -> Result<()> {
        let c = &self.config;
        let (batch, len) = (ws.batch, ws.len);
        if tape.is_some() && !ws.training {
            return Err(Error::Shape(
                "a recording (training) forward needs a Workspace::training".into(),
            ));
        }
        if opts.subs && ws.training {
            return Err(Error::Shape(
                "SUBS log-probs are not kept by a training workspace (the loss is fused)".into(),
            ));
        }
        if let Some(tc) = &self.time_cond {
            let rc = ws.cond.as_mut().ok_or_else(|| {
                Error::Shape(
                    "a time-conditioned forward needs a workspace built for that configuration"
                        .into(),
                )
            })?;
            tc.modulations(gpu, rc)?;
        }
        if let Some(t) = tape.as_deref_mut() {
            t.clear();
        }
        // Folded gates and no saved GELU pre-activation: only without tape and dropout.
        let inference = tape.is_none() && opts.dropout == 0.0;
        let mut rec = |op: Op| {
            if let Some(t) = tape.as_deref_mut() {
                t.push(op);
            }
        };
        self.embed(gpu, ws, &mut rec)?;
        let shape = AttentionShape {
            batch,
            len,
            heads: c.heads,
            head_dim: c.head_dim(),
            causal: c.causal,
            softcap: c.softcap as f32,
        };
        for (i, blk) in self.blocks.iter().enumerate() {
            self.block(gpu, ws, i, blk, &shape, opts, inference, &mut rec)?;
        }
        self.final_layer(gpu, ws, &mut rec)?;
        if opts.subs {
            self.subs(gpu, ws)?;
        }
        Ok(())
    }

    /// The input layer: the eps MLP (IMDM, when eps is loaded) and the embedding into `ws.h`.
    fn embed(&self, gpu: &Gpu, ws: &mut Workspace, rec: &mut dyn FnMut(Op)) -> Result<()> {
        let c = &self.config;
        let (rows, d) = (ws.batch * ws.len, c.hidden);
        let g = &self.gemm;
        let _r = nvtx::range("embedding");
        if let (Some((fc1, fc2)), Some(eps)) = (&self.eps_mlp, &ws.eps) {
            let (hid, act, out) = (
                ws.eps_hidden.as_mut().expect("IMDM workspace"),
                ws.eps_act.as_mut().expect("IMDM workspace"),
                ws.eps_out.as_mut().expect("IMDM workspace"),
            );
            let bias = fc1.b.as_ref().expect("eps MLP bias");
            g.matmul(
                gpu,
                hid,
                eps,
                false,
                &fc1.w,
                true,
                (rows, fc1.out, fc1.inp),
                0.0,
                Epilogue::Bias(bias),
            )?;
            rec(Op::Linear(LinSite::EpsFc1));
            gelu_fwd(gpu, GeluKind::Exact, act, None, hid, None, rows, fc1.out)?;
            rec(Op::GeluExact);
            g.matmul(
                gpu,
                out,
                act,
                false,
                &fc2.w,
                true,
                (rows, fc2.out, fc2.inp),
                0.0,
                Epilogue::None,
            )?;
            rec(Op::Linear(LinSite::EpsFc2));
        }
        embedding_fwd(
            gpu,
            &mut ws.h,
            &self.embedding,
            &ws.tokens,
            ws.eps_out.as_ref(),
            c.mask_index,
            rows,
            d,
        )?;
        rec(Op::Embedding {
            eps: self.eps_mlp.is_some() && ws.eps.is_some(),
        });
        Ok(())
    }

    /// Block `i`: LayerNorm, attention and its residual, LayerNorm, MLP and its residual, on
    /// `ws.h` in place. `inference` selects the folded gates (no tape, no dropout).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        gpu: &Gpu,
        ws: &mut Workspace,
        i: usize,
        blk: &GpuBlock,
        shape: &AttentionShape,
        opts: ForwardOpts,
        inference: bool,
        rec: &mut dyn FnMut(Op),
    ) -> Result<()> {
        let d = self.config.hidden;
        let rows = ws.batch * ws.len;
        let g = &self.gemm;
        let _r = nvtx::range(&format!("block {i}"));
        let n_acts = ws.blocks.len();
        let a = &mut ws.blocks[i % n_acts];
        let cond = ws.cond.as_ref();
        let m = |k: usize| self.mod_in(cond, ModLayer::Block(i), k);
        let off = opts.offset + 2 * i as u64;
        let dropout_at = |offset: u64| Dropout {
            p: opts.dropout,
            seed: opts.seed,
            offset,
        };
        if let Some(x) = a.ln1_x.as_mut() {
            gpu.stream.memcpy_dtod(&ws.h, x)?;
        }
        ln_modulate_fwd(gpu, &mut a.ln1, &ws.h, &blk.norm1, m(0), rows, d, ws.len)?;
        rec(Op::LnModulate(LnSite::Block1(i)));
        g.matmul(
            gpu,
            &mut a.qkv,
            &a.ln1.y,
            false,
            &blk.qkv.w,
            true,
            (rows, 3 * d, d),
            0.0,
            Epilogue::None,
        )?;
        rec(Op::Linear(LinSite::Qkv(i)));
        attention_fwd(gpu, &mut a.attn, &mut a.lse, &a.qkv, &shape)?;
        rec(Op::Attention(i));
        let folded = blk.folded.as_ref().filter(|_| inference);
        if let Some(f) = folded {
            // h += o (diag(gate_msa) W_out)^T
            g.matmul(
                gpu,
                &mut ws.h,
                &a.attn,
                false,
                &f.attn_out,
                true,
                (rows, d, d),
                1.0,
                Epilogue::None,
            )?;
        } else {
            g.matmul(
                gpu,
                &mut a.proj,
                &a.attn,
                false,
                &blk.attn_out.w,
                true,
                (rows, d, d),
                0.0,
                Epilogue::None,
            )?;
            rec(Op::Linear(LinSite::Out(i)));
            residual_fwd(
                gpu,
                &mut ws.h,
                &a.proj,
                m(2),
                rows,
                d,
                ws.len,
                opts.dropout,
                opts.seed,
                off,
            )?;
            rec(Op::Residual(ResSite::Attn(i), dropout_at(off)));
        }
        if let Some(x) = a.ln2_x.as_mut() {
            gpu.stream.memcpy_dtod(&ws.h, x)?;
        }
        ln_modulate_fwd(gpu, &mut a.ln2, &ws.h, &blk.norm2, m(3), rows, d, ws.len)?;
        rec(Op::LnModulate(LnSite::Block2(i)));
        let (b1, b2) = (
            blk.mlp1.b.as_ref().expect("mlp bias"),
            blk.mlp2.b.as_ref().expect("mlp bias"),
        );
        let hdim = blk.mlp1.out;
        g.matmul(
            gpu,
            &mut a.mlp_act,
            &a.ln2.y,
            false,
            &blk.mlp1.w,
            true,
            (rows, hdim, d),
            0.0,
            Epilogue::GeluBias {
                bias: b1,
                aux: (!inference).then_some(&mut a.mlp_pre),
            },
        )?;
        rec(Op::Linear(LinSite::Mlp1(i)));
        if let Some(f) = folded {
            // h += gelu(.) (diag(gate_mlp) W_2)^T + gate_mlp ∘ b_2
            g.matmul(
                gpu,
                &mut ws.h,
                &a.mlp_act,
                false,
                &f.mlp2,
                true,
                (rows, d, hdim),
                1.0,
                Epilogue::Bias(&f.mlp2_bias),
            )?;
        } else {
            g.matmul(
                gpu,
                &mut a.mlp_out,
                &a.mlp_act,
                false,
                &blk.mlp2.w,
                true,
                (rows, d, hdim),
                0.0,
                Epilogue::Bias(b2),
            )?;
            rec(Op::Linear(LinSite::Mlp2(i)));
            residual_fwd(
                gpu,
                &mut ws.h,
                &a.mlp_out,
                m(5),
                rows,
                d,
                ws.len,
                opts.dropout,
                opts.seed,
                off + 1,
            )?;
            rec(Op::Residual(ResSite::Mlp(i), dropout_at(off + 1)));
        }
        Ok(())
    }

    /// The output layer: the final (modulated) LayerNorm and the logits GEMM into `ws.logits`.
    fn final_layer(&self, gpu: &Gpu, ws: &mut Workspace, rec: &mut dyn FnMut(Op)) -> Result<()> {
        let d = self.config.hidden;
        let rows = ws.batch * ws.len;
        let g = &self.gemm;
        // The logits GEMM dominates: 2 · rows · D · V FLOPs.
        let flops = 2.0 * (rows * d) as f64 * self.config.vocab_size as f64;
        let _r = nvtx::range_work("final layer", flops, 0.0);
        let fm = self.mod_in(ws.cond.as_ref(), ModLayer::Final, 0);
        ln_modulate_fwd(
            gpu,
            &mut ws.final_ln,
            &ws.h,
            &self.final_norm,
            fm,
            rows,
            d,
            ws.len,
        )?;
        rec(Op::LnModulate(LnSite::Final));
        let fl = &self.final_linear;
        let bias = fl.b.as_ref().expect("final bias");
        g.matmul_ld(
            gpu,
            &mut ws.logits,
            &ws.final_ln.y,
            false,
            &fl.w,
            true,
            (rows, fl.out, d),
            ws.logits_ld,
            0.0,
            Epilogue::Bias(bias),
        )?;
        rec(Op::Linear(LinSite::Final));
        Ok(())
    }

    /// SUBS log-probabilities (and their lse) from `ws.logits` (inference only).
    fn subs(&self, gpu: &Gpu, ws: &mut Workspace) -> Result<()> {
        let c = &self.config;
        let rows = ws.batch * ws.len;
        // Reads the f32 logits, writes the f32 log-probs.
        let _r = nvtx::range_work("subs", 0.0, 8.0 * (rows * c.vocab_size) as f64);
        let shape = SubsShape {
            rows,
            vocab: c.vocab_size,
            ld: ws.logits_ld,
            mask_index: c.mask_index,
        };
        subs_fwd_f32(
            gpu,
            &mut ws.log_probs,
            &mut ws.lse,
            &ws.logits,
            &ws.tokens,
            shape,
        )?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "dit_tests.rs"]
mod tests;
