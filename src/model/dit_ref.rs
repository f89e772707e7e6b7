//! `dit_ref`: the CPU reference DiT, written straight from spec sections 2-4.3 and sharing no
//! wiring with the GPU path. f32 storage, f64 accumulation in every dot product, LayerNorm
//! statistic and softmax; rayon over rows. It is the trusted twin the GPU model is checked
//! against, and is itself checked against an independent PyTorch implementation
//! (`tools/reference/`, fixtures in `tests/fixtures/`).
//!
//! Deliberate differences from the reference code: everything is f32/f64 where the reference
//! runs the blocks, logits and log-softmax in bf16 (spec 4.3 quirk 1), and the rotary table is
//! computed in f64 rather than fp32-then-bf16.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::params::{inv_freq, DitParams, Linear, TIME_FEATURES};
use crate::tensor::{Tensor, Tokens};

/// Value written to excluded logits (the reference's `neg_infinity`).
pub const NEG_INF: f32 = -1_000_000.0;

/// `y = x W^T + b` over `rows` rows of `x` (rows, in) -> (rows, out), f64 accumulation.
pub fn linear(x: &[f32], l: &Linear) -> Vec<f32> {
    let (out, inp) = (l.out_dim(), l.in_dim());
    let w = &l.weight.data;
    let mut y = vec![0f32; x.len() / inp * out];
    y.par_chunks_mut(out)
        .zip(x.par_chunks(inp))
        .for_each(|(yr, xr)| {
            for (o, yo) in yr.iter_mut().enumerate() {
                let wr = &w[o * inp..(o + 1) * inp];
                let mut acc = l.bias.as_ref().map_or(0.0, |b| b.data[o] as f64);
                for (a, b) in xr.iter().zip(wr) {
                    acc += *a as f64 * *b as f64;
                }
                *yo = acc as f32;
            }
        });
    y
}

/// Tanh-approximated GELU (block MLPs).
pub fn gelu_tanh(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

/// Exact (erf) GELU (the eps MLP).
pub fn gelu_exact(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// LayerNorm without bias (eps 1e-5, biased variance) times `weight`, then
/// `z·(1+scale) + shift` when a modulation is given. Rows of width D.
pub fn layer_norm_modulate(
    x: &[f32],
    weight: &[f32],
    shift_scale: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let d = weight.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            for j in 0..d {
                let mut z = (xr[j] as f64 - mean) * rstd * weight[j] as f64;
                if let Some((shift, scale)) = shift_scale {
                    z = z * (1.0 + scale[j] as f64) + shift[j] as f64;
                }
                yr[j] = z as f32;
            }
        });
    y
}

/// The conditioning vector `c = SiLU(sigma_map(sigma))` (spec 2.2, step 2): the sinusoidal
/// feature `[cos(σf), sin(σf)]`, Linear, SiLU, Linear, and DIT.forward's extra SiLU.
pub fn cond_vector(p: &DitParams, sigma: f64) -> Option<Vec<f32>> {
    let s = p.sigma_map.as_ref()?;
    let half = TIME_FEATURES / 2;
    let mut feat = vec![0f32; TIME_FEATURES];
    for k in 0..half {
        let f = (-(10000f64.ln()) * k as f64 / half as f64).exp();
        feat[k] = (sigma * f).cos() as f32;
        feat[half + k] = (sigma * f).sin() as f32;
    }
    let h: Vec<f32> = linear(&feat, &s.fc1)
        .iter()
        .map(|&v| silu(v as f64) as f32)
        .collect();
    Some(
        linear(&h, &s.fc2)
            .iter()
            .map(|&v| silu(v as f64) as f32)
            .collect(),
    )
}

/// Applies rotate-half rotary in place to the q and k parts of a (B·L, 3D) qkv buffer.
fn rotary(qkv: &mut [f32], len: usize, heads: usize, hd: usize) {
    let inv = inv_freq(hd);
    let d = heads * hd;
    qkv.par_chunks_mut(3 * d).enumerate().for_each(|(row, r)| {
        let pos = (row % len) as f64;
        for part in 0..2 {
            for h in 0..heads {
                let x = &mut r[part * d + h * hd..part * d + (h + 1) * hd];
                for i in 0..hd / 2 {
                    let (sin, cos) = (pos * inv[i]).sin_cos();
                    let (x1, x2) = (x[i] as f64, x[i + hd / 2] as f64);
                    x[i] = (x1 * cos - x2 * sin) as f32;
                    x[i + hd / 2] = (x2 * cos + x1 * sin) as f32;
                }
            }
        }
    });
}

/// Attention over a (B·L, 3D) qkv buffer -> (B·L, D), scale 1/sqrt(hd), optional softcap,
/// bidirectional unless `causal`.
fn attention(
    qkv: &[f32],
    len: usize,
    heads: usize,
    hd: usize,
    softcap: f64,
    causal: bool,
) -> Vec<f32> {
    let d = heads * hd;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; qkv.len() / 3];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (b, i) = (row / len, row % len);
        let q_row = &qkv[row * 3 * d..row * 3 * d + d];
        let n_keys = if causal { i + 1 } else { len };
        let mut p = vec![0f64; n_keys];
        for h in 0..heads {
            let q = &q_row[h * hd..(h + 1) * hd];
            for (j, pj) in p.iter_mut().enumerate() {
                let kr = (b * len + j) * 3 * d + d + h * hd;
                let k = &qkv[kr..kr + hd];
                let mut s = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale;
                if softcap > 0.0 {
                    s = softcap * (s / softcap).tanh();
                }
                *pj = s;
            }
            let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = p
                .iter_mut()
                .map(|s| {
                    *s = (*s - m).exp();
                    *s
                })
                .sum();
            for e in 0..hd {
                let mut acc = 0f64;
                for (j, pj) in p.iter().enumerate() {
                    acc += pj * qkv[(b * len + j) * 3 * d + 2 * d + h * hd + e] as f64;
                }
                o[h * hd + e] = (acc / z) as f32;
            }
        }
    });
    out
}

/// `h += gate ⊙ branch` over rows of width `d` (gate absent = 1).
fn gated_add(h: &mut [f32], branch: &[f32], gate: Option<&[f32]>, d: usize) {
    h.par_chunks_mut(d)
        .zip(branch.par_chunks(d))
        .for_each(|(hr, br)| {
            for j in 0..d {
                let g = gate.map_or(1.0, |g| g[j] as f64);
                hr[j] = (hr[j] as f64 + g * br[j] as f64) as f32;
            }
        });
}

/// Slices `k` of a modulation vector split into `n` equal chunks.
fn chunk(v: &[f32], n: usize, k: usize) -> &[f32] {
    let w = v.len() / n;
    &v[k * w..(k + 1) * w]
}

/// Raw logits (B, L, V) of the DiT for `tokens` and, for IMDM, `eps` (B, L, noise_dim) used
/// as given (no reset redraw). Eval mode: no dropout. sigma = 0 (no time conditioning).
pub fn forward(p: &DitParams, tokens: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
    let c = &p.config;
    let (bsz, len, d, v) = (tokens.batch, tokens.len, c.hidden, c.vocab_size);
    let rows = bsz * len;
    // 1. embedding (+ IMDM eps MLP at masked positions).
    let mut h = vec![0f32; rows * d];
    for (r, &t) in tokens.ids.iter().enumerate() {
        h[r * d..(r + 1) * d].copy_from_slice(&p.embedding.data[t as usize * d..][..d]);
    }
    if let Some(mlp) = &p.eps_mlp {
        let eps = eps.ok_or_else(|| Error::Shape("IMDM forward needs eps".into()))?;
        eps.expect_shape("eps", &[bsz, len, c.noise_dim])?;
        let hid: Vec<f32> = linear(&eps.data, &mlp.fc1)
            .iter()
            .map(|&x| gelu_exact(x as f64) as f32)
            .collect();
        let add = linear(&hid, &mlp.fc2);
        for (r, &t) in tokens.ids.iter().enumerate() {
            if t as usize == c.mask_index {
                for j in 0..d {
                    h[r * d + j] += add[r * d + j];
                }
            }
        }
    }
    // 2. conditioning (constant: sigma is always 0).
    let cond = cond_vector(p, 0.0);
    let hd = c.head_dim();
    // 3-4. blocks.
    for b in &p.blocks {
        let m = match (&b.adaln, &cond) {
            (Some(a), Some(cv)) => Some(linear(cv, a)),
            _ => None,
        };
        // (shift, scale, gate) for msa then mlp; all absent in the AR baseline.
        let ms = |k: usize| m.as_ref().map(|m| chunk(m, 6, k));
        let pair = |k: usize| ms(k).zip(ms(k + 1));
        let a = layer_norm_modulate(&h, &b.norm1.data, pair(0));
        let mut qkv = linear(&a, &b.attn_qkv);
        rotary(&mut qkv, len, c.heads, hd);
        let att = attention(&qkv, len, c.heads, hd, c.softcap, c.causal);
        gated_add(&mut h, &linear(&att, &b.attn_out), ms(2), d);
        let a = layer_norm_modulate(&h, &b.norm2.data, pair(3));
        let hid: Vec<f32> = linear(&a, &b.mlp_fc1)
            .iter()
            .map(|&x| gelu_tanh(x as f64) as f32)
            .collect();
        gated_add(&mut h, &linear(&hid, &b.mlp_fc2), ms(5), d);
    }
    // 5. final layer.
    let f = &p.final_layer;
    let m = match (&f.adaln, &cond) {
        (Some(a), Some(cv)) => Some(linear(cv, a)),
        _ => None,
    };
    let y = layer_norm_modulate(
        &h,
        &f.norm.data,
        m.as_ref().map(|m| (chunk(m, 2, 0), chunk(m, 2, 1))),
    );
    Tensor::from_vec(&[bsz, len, v], linear(&y, &f.linear))
}

/// SUBS parameterisation (spec 4.3) in f32 with f64 sums: the mask logit is excluded,
/// log-softmax over V, and unmasked input positions carry their token (0 there, -1e6 elsewhere).
pub fn subs_log_probs(logits: &Tensor, tokens: &Tokens, mask_index: usize) -> Tensor {
    let v = *logits.shape.last().expect("logits have a vocabulary axis");
    let mut out = logits.clone();
    out.data
        .par_chunks_mut(v)
        .zip(tokens.ids.par_iter())
        .for_each(|(row, &tok)| {
            if tok as usize != mask_index {
                row.fill(NEG_INF);
                row[tok as usize] = 0.0;
                return;
            }
            row[mask_index] = NEG_INF;
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            row.iter_mut().for_each(|x| *x = (*x as f64 - lse) as f32);
        });
    out
}
