//! The GPU DiT backward: replays a [`Tape`] recorded by `GpuDit::forward_recorded` in reverse,
//! launching each op's backward kernel (`ops::*::*_bwd`) and the cuBLASLt GEMMs of the linear
//! layers, and accumulates every parameter gradient into f32 device buffers
//! ([`ParamTree`]`<CudaSlice<f32>>`). The CPU backend (`cpu::dit`) computes the same gradients
//! and is what `tests/gpu_train.rs` compares against.
//!
//! Linear layers (`y = x Wᵀ + b`, W (out, in), rows = B·L), with bf16 operands and f32
//! accumulation in cuBLASLt:
//! ```text
//! dW (out, in) += dYᵀ X       matmul(dW, dY, ta, X, -, (out, in, rows), beta = 1)   f32
//! dX (rows, in) = dY W        matmul(dX, dY, -, W, -, (rows, in, out), beta = 0)    f32 or bf16
//! db (out)     += 1ᵀ dY       matmul(db, ones (1, rows), -, dY, -, (1, out, rows), beta = 1)
//! ```
//! (`db` of fc1 layers comes from the GELU backward's deterministic column sum instead.) The
//! weight-gradient GEMM of a frozen tensor is skipped. Without time conditioning the adaLN
//! modulations are constant over rows (sigma = 0), so the LayerNorm and residual backward
//! kernels reduce their gradients over all rows into one row per layer ([`ModGrads`]);
//! `cuda::cond` turns those into the adaLN and sigma-map gradients once per optimizer step.
//! With time conditioning they reduce per sequence into the (B, 6D) / (B, 2D) buffers of
//! [`BwdScratch`], and the end of each backward turns those into the adaLN and sigma-map
//! gradients (`cuda::time_cond::TimeCond::backward`, `+=`).
//!
//! Accumulation: every parameter gradient is `+=` (micro-batches accumulate; the caller zeroes
//! at the start of a step), `ModGrads` too; the registers of [`BwdScratch`] are scratch.
//! Deterministic: every kernel reduces in a fixed order and cuBLAS(Lt) is deterministic for a
//! fixed algorithm (see `Gemm::set_autotune`).

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::bwd_linear::{bias_grad, bias_of, frozen_bias, input_grad, weight_grad};
pub use crate::cuda::bwd_scratch::{BwdScratch, ModGrads};
use crate::cuda::dit::{ForwardOpts, GpuDit, ModLayer, Workspace};
use crate::cuda::nvtx;
use crate::cuda::ops::attention::{attention_bwd, AttentionShape};
use crate::cuda::ops::embedding::{embedding_bwd, embedding_eps_bwd};
use crate::cuda::ops::gelu::{gelu_bwd, GeluKind};
use crate::cuda::ops::gemm::Epilogue;
use crate::cuda::ops::ln_modulate::ln_modulate_bwd;
use crate::cuda::ops::modulation::{ModOut, ModRows};
use crate::cuda::ops::residual::residual_bwd;
use crate::cuda::param_tree::ParamTree;
use crate::cuda::tape::{Dropout, LinSite, LnSite, Op, ResSite, Tape};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::DitConfig;

pub(crate) fn attention_shape(c: &DitConfig, batch: usize, len: usize) -> AttentionShape {
    AttentionShape {
        batch,
        len,
        heads: c.heads,
        head_dim: c.head_dim(),
        causal: c.causal,
        softcap: c.softcap as f32,
    }
}

/// The backward of the forward recorded on `tape` (with `opts`, on `ws`), from the fused SUBS
/// loss gradient that `ops::subs::subs_bwd_f32` wrote over `ws.logits`. Every parameter
/// gradient is added (`+=`) into `grads`, the constant modulations' gradients into `dmods`
/// (required iff the model has adaLN without time conditioning; a time-conditioned model's
/// adaLN and sigma-map gradients are added into `grads` by this call); weight-gradient GEMMs of
/// tensors flagged in `frozen` are skipped.
/// `sc.load_tokens` must have been called with the forward's ids.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    model: &GpuDit,
    ws: &Workspace,
    tape: &Tape,
    opts: ForwardOpts,
    sc: &mut BwdScratch,
    grads: &mut ParamTree<CudaSlice<f32>>,
    dmods: Option<&mut ModGrads>,
    frozen: &ParamTree<bool>,
) -> Result<()> {
    let c = &model.config;
    let has_eps = model.eps_mlp.is_some() && ws.eps.is_some();
    tape.check(c, has_eps, (opts.dropout, opts.seed, opts.offset))?;
    if !ws.training || (sc.batch, sc.len) != (ws.batch, ws.len) {
        return Err(Error::Shape(format!(
            "backward: workspace {}x{} (training: {}) and scratch {}x{} must be one training shape",
            ws.batch, ws.len, ws.training, sc.batch, sc.len
        )));
    }
    if !sc.emb_loaded {
        return Err(Error::Shape(
            "backward: the embedding plan was not loaded for this forward (load_tokens)".into(),
        ));
    }
    if (c.has_adaln() && model.time_cond.is_none()) != dmods.is_some() {
        return Err(Error::Shape(
            "backward: constant modulation gradients (ModGrads) are needed exactly when the \
             model has adaLN without time conditioning"
                .into(),
        ));
    }
    if model.time_cond.is_some() != sc.rowmods.is_some() {
        return Err(Error::Shape(
            "backward: the scratch was built for another conditioning (time_conditioning)".into(),
        ));
    }
    let rows = ws.batch * ws.len;
    // The LayerNorm backward adds into dh; nothing has written it yet in this backward.
    gpu.stream.memset_zeros(&mut sc.dh)?;
    if let Some(g) = sc.rowmods.as_mut() {
        g.zero(gpu)?;
    }
    let mut cx = Bwd {
        gpu,
        model,
        ws,
        frozen,
        rows,
        sc,
        grads,
        dmods,
    };
    for op in tape.ops().iter().rev() {
        match *op {
            Op::Linear(LinSite::Final) => bwd_logits(&mut cx)?,
            Op::LnModulate(site) => bwd_layer_norm(&mut cx, site)?,
            Op::Residual(site, drop) => bwd_residual(&mut cx, site, drop)?,
            Op::Linear(LinSite::Mlp2(i)) => bwd_mlp2(&mut cx, i)?,
            Op::Linear(LinSite::Mlp1(i)) => bwd_mlp1(&mut cx, i)?,
            Op::Linear(LinSite::Out(i)) => bwd_attn_out(&mut cx, i)?,
            Op::Attention(i) => bwd_attention(&mut cx, i)?,
            Op::Linear(LinSite::Qkv(i)) => bwd_qkv(&mut cx, i)?,
            Op::Embedding { eps } => bwd_embedding(&mut cx, eps)?,
            Op::Linear(LinSite::EpsFc2) | Op::GeluExact | Op::Linear(LinSite::EpsFc1) => {
                bwd_eps_mlp(&mut cx, op)?
            }
        }
    }
    cx.sc.emb_loaded = false;
    if let (Some(tc), Some(g)) = (model.time_cond.as_ref(), cx.sc.rowmods.as_mut()) {
        let rc = ws.cond.as_ref().ok_or_else(|| {
            Error::Shape("backward: the time-conditioned forward's workspace has no sigma".into())
        })?;
        tc.backward(gpu, rc, g, cx.grads, frozen)?;
    }
    Ok(())
}

/// The gradient target of chunk `k` of `layer`'s modulation: the constant row sums in
/// `dmods`, or (time conditioning) the per-sequence rows in `rowmods`.
fn mod_out<'a>(
    model: &GpuDit,
    dmods: Option<&'a mut ModGrads>,
    rowmods: Option<&'a mut crate::cuda::time_cond::RowModGrads>,
    layer: ModLayer,
    k: usize,
) -> Option<ModOut<'a>> {
    let d = model.config.hidden;
    if let Some(g) = rowmods {
        let (buf, n) = match layer {
            ModLayer::Block(i) => (&mut g.blocks[i], 6),
            ModLayer::Final => (&mut g.final_layer, 2),
        };
        return Some(ModOut {
            buf,
            chunk: k,
            rows: ModRows::PerSequence { stride: n * d },
        });
    }
    let buf = match layer {
        ModLayer::Block(i) => &mut dmods?.blocks[i],
        ModLayer::Final => &mut dmods?.final_layer,
    };
    Some(ModOut {
        buf,
        chunk: k,
        rows: ModRows::Broadcast,
    })
}

/// What every op's backward reads and writes: the forward's model, workspace and frozen flags,
/// and the scratch, parameter and modulation gradients it adds into.
struct Bwd<'a> {
    gpu: &'a Gpu,
    model: &'a GpuDit,
    ws: &'a Workspace,
    frozen: &'a ParamTree<bool>,
    rows: usize,
    sc: &'a mut BwdScratch,
    grads: &'a mut ParamTree<CudaSlice<f32>>,
    dmods: Option<&'a mut ModGrads>,
}

/// The output layer's GEMM: d W, d b (unless frozen) and d ln_final from the bf16 loss
/// gradient over `ws.logits`.
fn bwd_logits(cx: &mut Bwd) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let (c, g) = (&model.config, &model.gemm);
    let (rows, d, v, ld) = (cx.rows, c.hidden, c.vocab_size, ws.logits_ld);
    let Bwd { sc, grads, .. } = cx;
    // dln and (unless frozen) dW: 2 · rows · V · D FLOPs each.
    let gemms = 1 + usize::from(!frozen.final_linear.w);
    let flops = 2.0 * (rows * v * d * gemms) as f64;
    let _r = nvtx::range_work("bwd logits", flops, 0.0);
    // SAFETY: the fused loss wrote a bf16 gradient into the first half of each f32
    // row; the view covers exactly the buffer's bytes (rows * ld f32).
    let dl = unsafe { ws.logits.transmute::<bf16>(rows * 2 * ld) }
        .ok_or_else(|| Error::Shape("backward: logits view".into()))?;
    let fl = &model.final_linear;
    let gl = &mut grads.final_linear;
    // The bf16 view spans rows · 2 · ld elements, past 2^31 at the reference shapes: each GEMM
    // runs over row chunks whose view stays under it (dW and db accumulate over the chunks).
    for (r0, n) in
        crate::cuda::ops::gemm::row_chunks(rows, 2 * ld, v, crate::cuda::ops::gemm::MAX_VIEW_ELEMS)?
    {
        let dl = dl.slice(r0 * 2 * ld..(r0 + n) * 2 * ld);
        if !frozen.final_linear.w {
            g.matmul_strided(
                gpu,
                &mut gl.w,
                &dl,
                2 * ld,
                true,
                &ws.final_ln.y.slice(r0 * d..(r0 + n) * d),
                d,
                false,
                (v, d, n),
                d,
                1.0,
                Epilogue::None,
            )?;
        }
        if !frozen_bias(&frozen.final_linear) {
            g.matmul_strided(
                gpu,
                bias_of(gl, "output_layer.linear")?,
                &sc.ones.slice(..n),
                n,
                false,
                &dl,
                2 * ld,
                false,
                (1, v, n),
                v,
                1.0,
                Epilogue::None,
            )?;
        }
        g.matmul_strided(
            gpu,
            &mut sc.dln.slice_mut(r0 * d..(r0 + n) * d),
            &dl,
            2 * ld,
            false,
            &fl.w,
            d,
            false,
            (n, d, v),
            d,
            0.0,
            Epilogue::None,
        )?;
    }
    Ok(())
}

/// A (modulated) LayerNorm: adds into dh, d weight and the shift/scale gradients.
fn bwd_layer_norm(cx: &mut Bwd, site: LnSite) -> Result<()> {
    let (gpu, model, ws) = (cx.gpu, cx.model, cx.ws);
    let c = &model.config;
    let (rows, d) = (cx.rows, c.hidden);
    let Bwd {
        sc, grads, dmods, ..
    } = cx;
    let _r = nvtx::range("bwd layernorm");
    let (layer, k) = match site {
        LnSite::Final => (ModLayer::Final, 0),
        LnSite::Block1(i) => (ModLayer::Block(i), 0),
        LnSite::Block2(i) => (ModLayer::Block(i), 3),
    };
    let (lno, x, weight, gw) = match site {
        LnSite::Final => (
            &ws.final_ln,
            &ws.h,
            &model.final_norm,
            &mut grads.final_norm,
        ),
        LnSite::Block1(i) | LnSite::Block2(i) => {
            let first = matches!(site, LnSite::Block1(_));
            let a = &ws.blocks[i];
            let blk = &model.blocks[i];
            let saved = if first { &a.ln1_x } else { &a.ln2_x };
            let x = saved
                .as_ref()
                .ok_or_else(|| Error::Shape("backward: LayerNorm input not saved".into()))?;
            let gb = &mut grads.blocks[i];
            (
                if first { &a.ln1 } else { &a.ln2 },
                x,
                if first { &blk.norm1 } else { &blk.norm2 },
                if first { &mut gb.norm1 } else { &mut gb.norm2 },
            )
        }
    };
    let m = model.mod_in(ws.cond.as_ref(), layer, k);
    let dm = match m {
        Some(_) => mod_out(model, dmods.as_deref_mut(), sc.rowmods.as_mut(), layer, k),
        None => None,
    };
    ln_modulate_bwd(
        gpu,
        &mut sc.dh,
        gw,
        dm,
        &mut sc.red,
        &lno.mean,
        &lno.rstd,
        &sc.dln,
        x,
        weight,
        m,
        rows,
        d,
        ws.len,
    )?;
    Ok(())
}

/// A gated residual branch: d branch, and d gate when modulated.
fn bwd_residual(cx: &mut Bwd, site: ResSite, drop: Dropout) -> Result<()> {
    let (gpu, model, ws) = (cx.gpu, cx.model, cx.ws);
    let c = &model.config;
    let (rows, d) = (cx.rows, c.hidden);
    let Bwd { sc, dmods, .. } = cx;
    let _r = nvtx::range("bwd residual");
    let (i, branch, k) = match site {
        ResSite::Attn(i) => (i, &ws.blocks[i].proj, 2),
        ResSite::Mlp(i) => (i, &ws.blocks[i].mlp_out, 5),
    };
    let layer = ModLayer::Block(i);
    let gate = model.mod_in(ws.cond.as_ref(), layer, k);
    let dgate = match gate {
        Some(_) => mod_out(model, dmods.as_deref_mut(), sc.rowmods.as_mut(), layer, k)
            .map(|g| (g, &mut sc.red)),
        None => None,
    };
    residual_bwd(
        gpu,
        &mut sc.dbranch,
        dgate,
        &sc.dh,
        branch,
        gate,
        rows,
        d,
        ws.len,
        drop.p,
        drop.seed,
        drop.offset,
    )?;
    Ok(())
}

/// The second MLP linear of block `i`.
fn bwd_mlp2(cx: &mut Bwd, i: usize) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let (c, g) = (&model.config, &model.gemm);
    let (rows, d, h) = (cx.rows, c.hidden, c.mlp_hidden());
    let Bwd { sc, grads, .. } = cx;
    let _r = nvtx::range("bwd mlp2");
    let (a, gb, fz) = (&ws.blocks[i], &mut grads.blocks[i], &frozen.blocks[i]);
    weight_grad(
        gpu,
        g,
        &mut gb.mlp2.w,
        fz.mlp2.w,
        &sc.dbranch,
        &a.mlp_act,
        (rows, d, h),
    )?;
    bias_grad(
        gpu,
        g,
        bias_of(&mut gb.mlp2, "mlp.2")?,
        frozen_bias(&fz.mlp2),
        &sc.ones,
        &sc.dbranch,
        (rows, d),
    )?;
    input_grad(
        gpu,
        g,
        &mut sc.dact,
        &sc.dbranch,
        &model.blocks[i].mlp2.w,
        (rows, d, h),
    )?;
    Ok(())
}

/// The first MLP linear of block `i` with its GELU-tanh epilogue.
fn bwd_mlp1(cx: &mut Bwd, i: usize) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let (c, g) = (&model.config, &model.gemm);
    let (rows, d, h) = (cx.rows, c.hidden, c.mlp_hidden());
    let Bwd { sc, grads, .. } = cx;
    let _r = nvtx::range("bwd mlp1");
    let (a, gb, fz) = (&ws.blocks[i], &mut grads.blocks[i], &frozen.blocks[i]);
    // The GELU-tanh epilogue first: dpre = dact ⊙ GELU'(pre), d b1 += Σ dpre.
    gelu_bwd(
        gpu,
        GeluKind::Tanh,
        &mut sc.dpre,
        Some((bias_of(&mut gb.mlp1, "mlp.0")?, &mut sc.red)),
        &sc.dact,
        &a.mlp_pre,
        None,
        rows,
        h,
    )?;
    weight_grad(
        gpu,
        g,
        &mut gb.mlp1.w,
        fz.mlp1.w,
        &sc.dpre,
        &a.ln2.y,
        (rows, h, d),
    )?;
    input_grad(
        gpu,
        g,
        &mut sc.dln,
        &sc.dpre,
        &model.blocks[i].mlp1.w,
        (rows, h, d),
    )?;
    Ok(())
}

/// The attention output projection of block `i`.
fn bwd_attn_out(cx: &mut Bwd, i: usize) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let (c, g) = (&model.config, &model.gemm);
    let (rows, d) = (cx.rows, c.hidden);
    let Bwd { sc, grads, .. } = cx;
    let _r = nvtx::range("bwd attn out");
    let (a, gb, fz) = (&ws.blocks[i], &mut grads.blocks[i], &frozen.blocks[i]);
    weight_grad(
        gpu,
        g,
        &mut gb.out.w,
        fz.out.w,
        &sc.dbranch,
        &a.attn,
        (rows, d, d),
    )?;
    input_grad(
        gpu,
        g,
        &mut sc.dattn,
        &sc.dbranch,
        &model.blocks[i].attn_out.w,
        (rows, d, d),
    )?;
    Ok(())
}

/// The attention of block `i`.
fn bwd_attention(cx: &mut Bwd, i: usize) -> Result<()> {
    let (gpu, model, ws) = (cx.gpu, cx.model, cx.ws);
    let c = &model.config;
    let Bwd { sc, .. } = cx;
    let shape = attention_shape(c, ws.batch, ws.len);
    let _r = nvtx::range("bwd attention");
    let a = &ws.blocks[i];
    attention_bwd(
        gpu,
        &mut sc.dqkv,
        &mut sc.attn,
        &a.lse,
        &a.attn,
        &a.qkv,
        &sc.dattn,
        &shape,
    )?;
    Ok(())
}

/// The qkv projection of block `i`.
fn bwd_qkv(cx: &mut Bwd, i: usize) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let (c, g) = (&model.config, &model.gemm);
    let (rows, d) = (cx.rows, c.hidden);
    let Bwd { sc, grads, .. } = cx;
    let _r = nvtx::range("bwd qkv");
    let (a, gb, fz) = (&ws.blocks[i], &mut grads.blocks[i], &frozen.blocks[i]);
    weight_grad(
        gpu,
        g,
        &mut gb.qkv.w,
        fz.qkv.w,
        &sc.dqkv,
        &a.ln1.y,
        (rows, 3 * d, d),
    )?;
    input_grad(
        gpu,
        g,
        &mut sc.dln,
        &sc.dqkv,
        &model.blocks[i].qkv.w,
        (rows, 3 * d, d),
    )?;
    Ok(())
}

/// The embedding (and the eps input gradient at masked positions).
fn bwd_embedding(cx: &mut Bwd, eps: bool) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let c = &model.config;
    let (rows, d) = (cx.rows, c.hidden);
    let Bwd { sc, grads, .. } = cx;
    let _r = nvtx::range("bwd embedding");
    if !frozen.embedding {
        embedding_bwd(gpu, &mut grads.embedding, &mut sc.emb, &sc.dh, rows, d)?;
    }
    if eps && eps_trainable(frozen) {
        let e = sc
            .eps
            .as_mut()
            .ok_or_else(|| Error::Shape("backward: IMDM forward without eps registers".into()))?;
        embedding_eps_bwd(gpu, &mut e.deps, &sc.dh, &ws.tokens, c.mask_index, rows, d)?;
    }
    Ok(())
}

/// One op of the eps MLP (IMDM); skipped when none of its tensors trains.
fn bwd_eps_mlp(cx: &mut Bwd, op: &Op) -> Result<()> {
    let (gpu, model, ws, frozen) = (cx.gpu, cx.model, cx.ws, cx.frozen);
    let (c, g) = (&model.config, &model.gemm);
    let (rows, d) = (cx.rows, c.hidden);
    let Bwd { sc, grads, .. } = cx;
    if !eps_trainable(frozen) {
        return Ok(());
    }
    let _r = nvtx::range("bwd eps mlp");
    let (Some((fc1, fc2)), Some(e), Some([g1, g2]), Some(x), Some(hid), Some(act)) = (
        model.eps_mlp.as_ref(),
        sc.eps.as_mut(),
        grads.eps_mlp.as_mut(),
        ws.eps.as_ref(),
        ws.eps_hidden.as_ref(),
        ws.eps_act.as_ref(),
    ) else {
        return Err(Error::Shape("backward: eps MLP buffers missing".into()));
    };
    let [f1, f2] = frozen.eps_mlp.as_ref().expect("eps_trainable checked");
    let n4 = fc1.out;
    match op {
        Op::Linear(LinSite::EpsFc2) => {
            weight_grad(gpu, g, &mut g2.w, f2.w, &e.deps, act, (rows, d, n4))?;
            input_grad(gpu, g, &mut e.dact, &e.deps, &fc2.w, (rows, d, n4))?;
        }
        Op::GeluExact => {
            gelu_bwd(
                gpu,
                GeluKind::Exact,
                &mut e.dpre,
                Some((bias_of(g1, "imdm_mlp.0")?, &mut sc.red)),
                &e.dact,
                hid,
                None,
                rows,
                n4,
            )?;
        }
        _ => {
            weight_grad(gpu, g, &mut g1.w, f1.w, &e.dpre, x, (rows, n4, fc1.inp))?;
        }
    }
    Ok(())
}

/// Whether any eps-MLP tensor trains (otherwise its backward is skipped entirely).
fn eps_trainable(frozen: &ParamTree<bool>) -> bool {
    frozen
        .eps_mlp
        .as_ref()
        .is_some_and(|[a, b]| !(a.w && frozen_bias(a) && b.w && frozen_bias(b)))
}
