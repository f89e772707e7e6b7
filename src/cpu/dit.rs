//! The whole DiT on the CPU: a forward that keeps what the backward needs (per-block
//! [`BlockActs`]), the backward to every parameter, and the two public entry points. The maths
//! is `dit_ref`'s (spec 2.2-2.3, 3.2, 4.3), op by op; rows = B·L throughout.
//!
//! ```text
//! h    = E[xt]  (+ W_b·GELU_exact(W_a eps + b_a) at masked rows)          (rows, D)
//! c    = SiLU(fc2(SiLU(fc1(feat(σ)))))                                    (G, cond)
//!        G = 1, σ = 0: one constant vector for all rows (MDLM, IMDM);
//!        G = B, σ = σ_b: one vector per sequence (time conditioning)
//! per block i, m = adaLN_i(c) = (shift1, scale1, gate1, shift2, scale2, gate2), each (G, D),
//! vector b serving the rows of sequence b:
//!   a1 = LN1(h)·(1+scale1)+shift1;  qkv = rope(a1 W_qkv^T);  o = attn(qkv)
//!   h += gate1 ⊙ dropout(o W_out^T)               dropout stream offset + 2i
//!   a2 = LN2(h)·(1+scale2)+shift2;  pre = a2 W1^T + b1;  act = GELU_tanh(pre)
//!   h += gate2 ⊙ dropout(act W2^T + b2)           dropout stream offset + 2i + 1
//! y = LN_f(h)·(1+scale_f)+shift_f;  logits = y W_f^T + b_f                (rows, V)
//! ```

use crate::cpu::attention::{attention_bwd, attention_fwd, rope_apply, AttnSaved, AttnShape, Rope};
use crate::cpu::checks::{check_inputs, Dims};
use crate::cpu::cond::{component_major, linear_rows, linear_rows_bwd, row_major, CondActs};
use crate::cpu::distill_loss::{distill_loss_in_place, distill_row_losses};
use crate::cpu::layers::*;
use crate::cpu::loss::{subs_ce_in_place, subs_log_probs};
use crate::cpu::weights::{check_shapes, expected_shapes, tensor_as, Weights};
use crate::cpu::{Buf, Real, TrainOpts};
use crate::diffusion::{DistillBatch, LossBatch};
use crate::error::Result;
use crate::model::{DitConfig, DitParams};
use crate::tensor::{Tensor, Tokens};

/// The eps MLP's activations, at masked rows only (the output is added nowhere else).
struct EpsActs<T: Real> {
    /// masked row indices (nm)
    idx: Vec<usize>,
    /// (nm, noise_dim) eps at those rows
    x: Buf<T>,
    /// (nm, 4D) fc1 output before GELU
    pre: Buf<T>,
    /// (nm, 4D) GELU_exact(pre)
    act: Buf<T>,
}

/// What one block's backward needs.
struct BlockActs<T: Real> {
    /// (6, G, D) adaLN output (shift1, scale1, gate1, shift2, scale2, gate2), component-major;
    /// None in the AR baseline
    mods: Option<Vec<T>>,
    /// LN1 x̂ (rows, D), rstd (rows)
    ln1: LnSaved<T>,
    /// (rows, D) modulated LN1 output, the qkv input
    a1: Buf<T>,
    /// (rows, 3D) qkv after rotary
    qkv: Buf<T>,
    /// (B, H, L, L) probabilities (+ softcap derivative)
    attn: AttnSaved<T>,
    /// (rows, D) attention output, the out-projection input
    o: Buf<T>,
    /// (rows, D) dropout(o W_out^T)
    br1: Buf<T>,
    /// (rows, D) dropout factors of branch 1; None without dropout
    keep1: Option<Buf<T>>,
    /// LN2 x̂ (rows, D), rstd (rows)
    ln2: LnSaved<T>,
    /// (rows, D) modulated LN2 output, the MLP input
    a2: Buf<T>,
    /// (rows, 4D) fc1 output before GELU
    pre: Buf<T>,
    /// (rows, 4D) GELU_tanh(pre)
    act: Buf<T>,
    /// (rows, D) dropout(act W2^T + b2)
    br2: Buf<T>,
    /// (rows, D) dropout factors of branch 2
    keep2: Option<Buf<T>>,
}

/// Everything the forward keeps.
pub(super) struct Acts<T: Real> {
    eps: Option<EpsActs<T>>,
    cond: Option<CondActs<T>>,
    blocks: Vec<BlockActs<T>>,
    /// (2, G, D) final (shift, scale), component-major
    final_mods: Option<Vec<T>>,
    /// final LN x̂ (rows, D), rstd (rows)
    lnf: LnSaved<T>,
    /// (rows, D) final modulated LN output
    y: Buf<T>,
    /// (rows, V)
    pub(super) logits: Buf<T>,
}

/// (shift, scale) pair `k, k+1` of a component-major modulation with components of `w` = G·D.
fn pair<T>(m: Option<&[T]>, w: usize, k: usize) -> Option<(&[T], &[T])> {
    m.map(|m| (&m[k * w..(k + 1) * w], &m[(k + 1) * w..(k + 2) * w]))
}

fn chunk<T>(m: Option<&[T]>, w: usize, k: usize) -> Option<&[T]> {
    m.map(|m| &m[k * w..(k + 1) * w])
}

/// Mutable components of width `w` of an optional gradient (`None`s when absent).
fn chunks_mut<T>(m: &mut Option<Vec<T>>, w: usize, n: usize) -> Vec<Option<&mut [T]>> {
    match m {
        Some(v) => v.chunks_mut(w).map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    }
}

fn attn_shape(c: &DitConfig, n: Dims) -> AttnShape {
    AttnShape {
        batch: n.batch,
        len: n.len,
        heads: c.heads,
        head_dim: c.head_dim(),
        softcap: c.softcap,
        causal: c.causal,
    }
}

/// Dropout stream offset of block `block`'s branch `branch` (0 attention, 1 MLP): the GPU
/// forward's rule (`cuda::dit`: `opts.offset + 2·i`, `+ 1` for the MLP branch).
pub(crate) fn dropout_offset(base: u64, block: usize, branch: u64) -> u64 {
    base.wrapping_add(2 * block as u64 + branch)
}

/// The forward, keeping activations. `dropout` = (seed, offset, p) with p > 0; `sigma` (B)
/// checked by the caller.
pub(super) fn forward<T: Real>(
    w: &Weights<T>,
    c: &DitConfig,
    xt: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
    n: Dims,
    dropout: Option<(u64, u64, f32)>,
) -> Acts<T> {
    let (rows, d, m) = (n.rows, n.d, n.m);
    let mask = c.mask_index as u32;
    // 1. embedding, plus the eps MLP at masked rows.
    let mut h = Buf::scratch(rows * d);
    embedding_fwd(&w.embedding, &xt.ids, d, &mut h);
    let eps_acts = match (&w.eps_mlp, eps) {
        (Some((fc1, fc2)), Some(e)) => {
            let nd = c.noise_dim;
            let idx: Vec<usize> = (0..rows).filter(|&r| xt.ids[r] == mask).collect();
            let all = tensor_as::<T>(e);
            let mut x = Vec::with_capacity(idx.len() * nd);
            idx.iter()
                .for_each(|&r| x.extend_from_slice(&all[r * nd..(r + 1) * nd]));
            let nm = idx.len();
            let mut pre = Buf::scratch(nm * fc1.out);
            linear_fwd(&x, &fc1.w, fc1.b.as_deref(), (nm, fc1.out, nd), &mut pre);
            let mut act = Buf::scratch(pre.len());
            map_fwd(&pre, &mut act, gelu_exact);
            let mut add = Buf::scratch(nm * d);
            linear_fwd(&act, &fc2.w, None, (nm, d, fc2.inp), &mut add);
            for (k, &r) in idx.iter().enumerate() {
                let hr = &mut h[r * d..(r + 1) * d];
                hr.iter_mut()
                    .zip(&add[k * d..(k + 1) * d])
                    .for_each(|(a, &b)| *a += b);
            }
            Some(EpsActs {
                idx,
                x: Buf::from_vec(x),
                pre,
                act,
            })
        }
        _ => None,
    };
    // 2. conditioning: one vector per sequence, or the constant one (sigma = 0).
    let cond = w
        .sigma_map
        .as_ref()
        .map(|(fc1, fc2)| CondActs::forward(fc1, fc2, sigma));
    let cv = cond.as_ref().map(|k| &k.c[..]);
    // width of one modulation component: G vectors of D
    let mw = sigma.map_or(1, |s| s.len()) * d;
    let shape = attn_shape(c, n);
    let rope = Rope::<T>::new(n.len, c.head_dim());
    // 3-4. blocks.
    let mut blocks = Vec::with_capacity(w.blocks.len());
    for (i, bw) in w.blocks.iter().enumerate() {
        let mods = bw.adaln.as_ref().zip(cv);
        let mods = mods.map(|(l, cv)| component_major(&linear_rows(l, cv), 6, d));
        let md = mods.as_deref();
        let mut a1 = Buf::scratch(rows * d);
        let ln1 = ln_mod_fwd(&h, &bw.norm1, pair(md, mw, 0), &mut a1);
        let mut qkv = Buf::scratch(rows * 3 * d);
        linear_fwd(&a1, &bw.qkv.w, None, (rows, 3 * d, d), &mut qkv);
        rope_apply(&mut qkv, &rope, n.len, c.heads, false);
        let mut o = Buf::scratch(rows * d);
        let attn = attention_fwd(&qkv, &shape, &mut o);
        let mut br1 = Buf::scratch(rows * d);
        linear_fwd(&o, &bw.out.w, None, (rows, d, d), &mut br1);
        let keep = |k: u64| {
            dropout.map(|(s, off, p)| dropout_factors(s, dropout_offset(off, i, k), p, rows * d))
        };
        let keep1 = keep(0);
        residual_fwd(&mut h, &mut br1, chunk(md, mw, 2), keep1.as_deref(), d);
        let mut a2 = Buf::scratch(rows * d);
        let ln2 = ln_mod_fwd(&h, &bw.norm2, pair(md, mw, 3), &mut a2);
        let mut pre = Buf::scratch(rows * m);
        linear_fwd(&a2, &bw.fc1.w, bw.fc1.b.as_deref(), (rows, m, d), &mut pre);
        let mut act = Buf::scratch(rows * m);
        map_fwd(&pre, &mut act, gelu_tanh);
        let mut br2 = Buf::scratch(rows * d);
        linear_fwd(&act, &bw.fc2.w, bw.fc2.b.as_deref(), (rows, d, m), &mut br2);
        let keep2 = keep(1);
        residual_fwd(&mut h, &mut br2, chunk(md, mw, 5), keep2.as_deref(), d);
        blocks.push(BlockActs {
            mods,
            ln1,
            a1,
            qkv,
            attn,
            o,
            br1,
            keep1,
            ln2,
            a2,
            pre,
            act,
            br2,
            keep2,
        });
    }
    // 5. final layer.
    let final_mods = w.final_adaln.as_ref().zip(cv);
    let final_mods = final_mods.map(|(l, cv)| component_major(&linear_rows(l, cv), 2, d));
    let mut y = Buf::scratch(rows * d);
    let lnf = ln_mod_fwd(
        &h,
        &w.final_norm,
        pair(final_mods.as_deref(), mw, 0),
        &mut y,
    );
    let mut logits = Buf::scratch(rows * n.v);
    let fl = &w.final_linear;
    linear_fwd(&y, &fl.w, fl.b.as_deref(), (rows, n.v, d), &mut logits);
    Acts {
        eps: eps_acts,
        cond,
        blocks,
        final_mods,
        lnf,
        y,
        logits,
    }
}

/// The backward from `dlogits` (rows, V), accumulating every parameter gradient into `g`.
pub(super) fn backward<T: Real>(
    w: &Weights<T>,
    g: &mut Weights<'static, T>,
    a: &Acts<T>,
    c: &DitConfig,
    xt: &Tokens,
    n: Dims,
    dlogits: &[T],
) {
    let (rows, d, m) = (n.rows, n.d, n.m);
    let cv = a.cond.as_ref().map(|k| &k.c[..]);
    let mut dc = a.cond.as_ref().map(|k| vec![T::zero(); k.c.len()]);
    // width of one modulation component: G vectors of D
    let mw = a.final_mods.as_ref().map_or(d, |f| f.len() / 2);
    // Final layer.
    let mut dy = Buf::scratch(rows * d);
    {
        let (gw, gb) = g.final_linear.wb_mut();
        linear_bwd(
            dlogits,
            &a.y,
            &w.final_linear.w,
            (rows, n.v, d),
            Some(&mut dy),
            gw,
            gb,
        );
    }
    let mut dh = Buf::zeros(rows * d);
    let mut dfm = a.final_mods.as_ref().map(|_| vec![T::zero(); 2 * mw]);
    {
        let mut parts = chunks_mut(&mut dfm, mw, 2).into_iter();
        let dmods = parts.next().flatten().zip(parts.next().flatten());
        let fm = pair(a.final_mods.as_deref(), mw, 0);
        ln_mod_bwd(
            &dy,
            &a.lnf,
            &w.final_norm,
            fm,
            &mut dh,
            g.final_norm.to_mut(),
            dmods,
        );
    }
    if let (Some(l), Some(gl), Some(dm), Some(cv)) = (&w.final_adaln, &mut g.final_adaln, &dfm, cv)
    {
        linear_rows_bwd(l, gl, cv, &row_major(dm, 2, d), dc.as_deref_mut());
    }
    // Blocks, last first. Scratch buffers are reused across blocks.
    let shape = attn_shape(c, n);
    let rope = Rope::<T>::new(n.len, c.head_dim());
    let mut dbr = Buf::scratch(rows * d);
    let mut da = Buf::scratch(rows * d);
    let mut dact = Buf::scratch(rows * m);
    let mut dqkv = Buf::scratch(rows * 3 * d);
    for ((bw, bg), ba) in w
        .blocks
        .iter()
        .zip(g.blocks.iter_mut())
        .zip(&a.blocks)
        .rev()
    {
        let md = ba.mods.as_deref();
        let mut dm = ba.mods.as_ref().map(|_| vec![T::zero(); 6 * mw]);
        {
            let mut p = chunks_mut(&mut dm, mw, 6).into_iter();
            let (dsh1, dsc1, dg1, dsh2, dsc2, dg2) = (
                p.next().flatten(),
                p.next().flatten(),
                p.next().flatten(),
                p.next().flatten(),
                p.next().flatten(),
                p.next().flatten(),
            );
            // MLP branch.
            residual_bwd(
                &dh,
                &ba.br2,
                chunk(md, mw, 5),
                ba.keep2.as_deref(),
                d,
                &mut dbr,
                dg2,
            );
            let (gw, gb) = bg.fc2.wb_mut();
            linear_bwd(
                &dbr,
                &ba.act,
                &bw.fc2.w,
                (rows, d, m),
                Some(&mut dact),
                gw,
                gb,
            );
            map_bwd(&ba.pre, &mut dact, gelu_tanh_grad);
            let (gw, gb) = bg.fc1.wb_mut();
            linear_bwd(
                &dact,
                &ba.a2,
                &bw.fc1.w,
                (rows, m, d),
                Some(&mut da),
                gw,
                gb,
            );
            let dmods2 = dsh2.zip(dsc2);
            ln_mod_bwd(
                &da,
                &ba.ln2,
                &bw.norm2,
                pair(md, mw, 3),
                &mut dh,
                bg.norm2.to_mut(),
                dmods2,
            );
            // Attention branch.
            residual_bwd(
                &dh,
                &ba.br1,
                chunk(md, mw, 2),
                ba.keep1.as_deref(),
                d,
                &mut dbr,
                dg1,
            );
            let (gw, _) = bg.out.wb_mut();
            linear_bwd(
                &dbr,
                &ba.o,
                &bw.out.w,
                (rows, d, d),
                Some(&mut da),
                gw,
                None,
            );
            attention_bwd(&da, &ba.qkv, &ba.attn, &shape, &mut dqkv);
            rope_apply(&mut dqkv, &rope, n.len, c.heads, true);
            let (gw, _) = bg.qkv.wb_mut();
            linear_bwd(
                &dqkv,
                &ba.a1,
                &bw.qkv.w,
                (rows, 3 * d, d),
                Some(&mut da),
                gw,
                None,
            );
            let dmods1 = dsh1.zip(dsc1);
            ln_mod_bwd(
                &da,
                &ba.ln1,
                &bw.norm1,
                pair(md, mw, 0),
                &mut dh,
                bg.norm1.to_mut(),
                dmods1,
            );
        }
        if let (Some(l), Some(gl), Some(dm), Some(cv)) = (&bw.adaln, &mut bg.adaln, &dm, cv) {
            linear_rows_bwd(l, gl, cv, &row_major(dm, 6, d), dc.as_deref_mut());
        }
    }
    if let (Some(k), Some(dc), Some((fc1, fc2)), Some((g1, g2))) =
        (&a.cond, dc, &w.sigma_map, &mut g.sigma_map)
    {
        k.backward(fc1, fc2, g1, g2, &dc);
    }
    // eps MLP at masked rows (eps itself needs no gradient).
    if let (Some(e), Some((fc1, fc2)), Some((g1, g2))) = (&a.eps, &w.eps_mlp, &mut g.eps_mlp) {
        let nm = e.idx.len();
        let mut dout = Vec::with_capacity(nm * d);
        e.idx
            .iter()
            .for_each(|&r| dout.extend_from_slice(&dh[r * d..(r + 1) * d]));
        let mut dpre = Buf::scratch(nm * fc2.inp);
        let (gw, _) = g2.wb_mut();
        linear_bwd(
            &dout,
            &e.act,
            &fc2.w,
            (nm, d, fc2.inp),
            Some(&mut dpre),
            gw,
            None,
        );
        map_bwd(&e.pre, &mut dpre, gelu_exact_grad);
        let (gw, gb) = g1.wb_mut();
        linear_bwd(&dpre, &e.x, &fc1.w, (nm, fc1.out, fc1.inp), None, gw, gb);
    }
    embedding_bwd(&dh, &xt.ids, d, g.embedding.to_mut());
}

pub(super) fn loss_and_grad<T: Real>(
    p: &DitParams,
    batch: &LossBatch,
    opts: &TrainOpts,
    grads: &mut DitParams,
) -> Result<f64> {
    let c = &p.config;
    c.validate()?;
    let w = Weights::<T>::view(p)?;
    check_shapes(grads, &expected_shapes(c), "grads")?;
    let n = check_inputs(c, batch.xt, batch.eps, batch.sigma)?;
    batch.check(c)?;
    let p_drop = c.dropout as f32;
    let dropout = opts
        .dropout
        .filter(|_| p_drop > 0.0)
        .map(|(seed, offset)| (seed, offset, p_drop));
    let mut acts = forward(&w, c, batch.xt, batch.eps, batch.sigma, n, dropout);
    let mut dlogits = std::mem::take(&mut acts.logits);
    let (xt, x0) = (&batch.xt.ids, &batch.x0.ids);
    let loss = subs_ce_in_place(
        &mut dlogits,
        xt,
        x0,
        batch.weight,
        batch.norm,
        c.mask_index,
        n.v,
    );
    let mut g = w.zeros_like();
    backward(&w, &mut g, &acts, c, batch.xt, n, &dlogits);
    g.add_into(grads);
    g.recycle();
    w.recycle();
    Ok(loss)
}

pub(super) fn log_probs<T: Real>(
    p: &DitParams,
    xt: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
) -> Result<Tensor> {
    let c = &p.config;
    c.validate()?;
    let w = Weights::<T>::view(p)?;
    let n = check_inputs(c, xt, eps, sigma)?;
    let acts = forward(&w, c, xt, eps, sigma, n, None);
    let lp = subs_log_probs(&acts.logits, &xt.ids, c.mask_index, n.v);
    w.recycle();
    Tensor::from_vec(&[n.batch, n.len, n.v], lp)
}

/// Checks a distillation batch's target size and its masked-position count.
fn check_distill(b: &DistillBatch, n: Dims) -> Result<()> {
    if b.target.len() != n.rows * n.v {
        return Err(crate::error::Error::Shape(format!(
            "distillation target: expected B·L·V = {} values, got {}",
            n.rows * n.v,
            b.target.len()
        )));
    }
    if !(b.norm > 0.0 && b.norm.is_finite()) {
        return Err(crate::error::Error::Shape(format!(
            "distillation norm {} must be a positive count of masked positions",
            b.norm
        )));
    }
    Ok(())
}

pub(super) fn distill_loss_and_grad<T: Real>(
    p: &DitParams,
    batch: &DistillBatch,
    opts: &TrainOpts,
    grads: &mut DitParams,
) -> Result<f64> {
    let c = &p.config;
    c.validate()?;
    let w = Weights::<T>::view(p)?;
    check_shapes(grads, &expected_shapes(c), "grads")?;
    let n = check_inputs(c, batch.xt, batch.eps, batch.sigma)?;
    check_distill(batch, n)?;
    let p_drop = c.dropout as f32;
    let dropout = opts
        .dropout
        .filter(|_| p_drop > 0.0)
        .map(|(seed, offset)| (seed, offset, p_drop));
    let mut acts = forward(&w, c, batch.xt, batch.eps, batch.sigma, n, dropout);
    let mut dlogits = std::mem::take(&mut acts.logits);
    let loss = distill_loss_in_place(
        &mut dlogits,
        batch.target,
        &batch.xt.ids,
        batch.mode,
        batch.norm,
        c.mask_index,
        n.v,
    );
    let mut g = w.zeros_like();
    backward(&w, &mut g, &acts, c, batch.xt, n, &dlogits);
    g.add_into(grads);
    g.recycle();
    w.recycle();
    Ok(loss)
}

pub(super) fn distill_loss<T: Real>(p: &DitParams, batch: &DistillBatch) -> Result<f64> {
    let c = &p.config;
    c.validate()?;
    let w = Weights::<T>::view(p)?;
    let n = check_inputs(c, batch.xt, batch.eps, batch.sigma)?;
    check_distill(batch, n)?;
    let acts = forward(&w, c, batch.xt, batch.eps, batch.sigma, n, None);
    let rows = distill_row_losses(
        &acts.logits,
        batch.target,
        &batch.xt.ids,
        batch.mode,
        c.mask_index,
        n.v,
    );
    w.recycle();
    Ok(rows.iter().sum::<f64>() / batch.norm)
}

#[cfg(test)]
#[path = "dit_tests.rs"]
mod tests;
