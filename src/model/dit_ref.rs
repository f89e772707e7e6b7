//! `dit_ref`: the CPU reference DiT, written straight from spec sections 2-4.3 and sharing no
//! wiring with the GPU path. f32 storage, f64 accumulation in every dot product, LayerNorm
//! statistic and softmax; rayon over rows. It is the trusted twin the GPU model is checked
//! against, and is itself checked against an independent PyTorch implementation
//! (`tools/reference/`, fixtures in `tests/fixtures/`).
//!
//! Deliberate differences from the reference code: everything is f32/f64 where the reference
//! runs the blocks, logits and log-softmax in bf16 (spec 4.3 quirk 1), the rotary table is
//! computed in f64 rather than fp32-then-bf16, and so is the time feature's frequency ladder
//! (bf16 in the reference; deviation 14.42).
//!
//! Conditioning: one constant vector (sigma = 0, MDLM and IMDM) or, for a time-conditioned
//! model, one per sequence from its sigma (spec 2.2), each modulating its own sequence's rows.

use rayon::prelude::*;

use crate::diffusion::check_sigma;
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

/// One layer's adaLN modulation: `rows` vectors of `n` chunks of width D each (n = 6 in a block:
/// shift, scale, gate for msa then mlp; n = 2 in the final layer: shift, scale). Activation row
/// r uses vector `r / per`: a single vector serves every row under the constant conditioning,
/// one per sequence (`per` = L) under time conditioning.
pub struct Mods {
    /// (rows, n·D)
    m: Vec<f32>,
    /// chunk width D
    d: usize,
    /// n·D
    width: usize,
    per: usize,
}

impl Mods {
    /// `adaLN(c)` for every conditioning vector of `cond`.
    fn new(cond: &Cond, adaln: &Linear, n: usize) -> Self {
        let width = adaln.out_dim();
        Mods {
            m: linear(&cond.c, adaln),
            d: width / n,
            width,
            per: cond.per,
        }
    }

    /// Chunk `k` of the vector serving activation row `row`.
    pub fn chunk(&self, row: usize, k: usize) -> &[f32] {
        let at = row / self.per * self.width + k * self.d;
        &self.m[at..at + self.d]
    }
}

/// LayerNorm without bias (eps 1e-5, biased variance) times `weight`, then
/// `z·(1+scale) + shift` with (shift, scale) = chunks (k, k+1) of `mods` when given. Rows of
/// width D.
pub fn layer_norm_modulate(x: &[f32], weight: &[f32], mods: Option<(&Mods, usize)>) -> Vec<f32> {
    let d = weight.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(r, (yr, xr))| {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            let shift_scale = mods.map(|(m, k)| (m.chunk(r, k), m.chunk(r, k + 1)));
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

/// The sinusoidal time feature `[cos(σf), sin(σf)]`, f_k = exp(−ln(10000)·k/128), in f64
/// (spec 2.2 step 2; deviation 14.42), rounded to f32.
fn time_feature(sigma: f64) -> Vec<f32> {
    let half = TIME_FEATURES / 2;
    let mut feat = vec![0f32; TIME_FEATURES];
    for k in 0..half {
        let f = (-(10000f64.ln()) * k as f64 / half as f64).exp();
        feat[k] = (sigma * f).cos() as f32;
        feat[half + k] = (sigma * f).sin() as f32;
    }
    feat
}

/// The conditioning vectors of one forward: (rows, cond), vector `r / per` serving activation
/// row r.
struct Cond {
    c: Vec<f32>,
    per: usize,
}

/// The conditioning vector `c = SiLU(sigma_map(sigma))` (spec 2.2, step 2): the sinusoidal
/// feature `[cos(σf), sin(σf)]`, Linear, SiLU, Linear, and DIT.forward's extra SiLU.
pub fn cond_vector(p: &DitParams, sigma: f64) -> Option<Vec<f32>> {
    let s = p.sigma_map.as_ref()?;
    let h: Vec<f32> = linear(&time_feature(sigma), &s.fc1)
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

/// `h += gate ⊙ branch` over rows of width `d`, the gate being chunk k of `mods` (absent = 1).
fn gated_add(h: &mut [f32], branch: &[f32], gate: Option<(&Mods, usize)>, d: usize) {
    h.par_chunks_mut(d)
        .zip(branch.par_chunks(d))
        .enumerate()
        .for_each(|(r, (hr, br))| {
            let gate = gate.map(|(m, k)| m.chunk(r, k));
            for j in 0..d {
                let g = gate.map_or(1.0, |g| g[j] as f64);
                hr[j] = (hr[j] as f64 + g * br[j] as f64) as f32;
            }
        });
}

/// Raw logits (B, L, V) of the DiT for `tokens` and, for IMDM, `eps` (B, L, noise_dim) used
/// as given (no reset redraw). Eval mode: no dropout. `sigma` (B) is each sequence's sigma(t)
/// for a time-conditioned model (SEDD, D3PM; spec 2.2) and `None` for the others, which are
/// conditioned on the constant sigma = 0 (spec 4.2).
pub fn forward(
    p: &DitParams,
    tokens: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
) -> Result<Tensor> {
    let c = &p.config;
    let (bsz, len, d, v) = (tokens.batch, tokens.len, c.hidden, c.vocab_size);
    let rows = bsz * len;
    check_sigma(c, sigma, bsz)?;
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
    // 2. conditioning: one vector per sequence, or the constant one (sigma = 0) for all rows.
    let cond = match sigma {
        Some(s) => s
            .iter()
            .map(|&sg| cond_vector(p, sg))
            .collect::<Option<Vec<_>>>()
            .map(|cs| Cond {
                c: cs.concat(),
                per: len,
            }),
        None => cond_vector(p, 0.0).map(|c| Cond { c, per: rows }),
    };
    let hd = c.head_dim();
    // 3-4. blocks.
    for b in &p.blocks {
        // (shift, scale, gate) for msa then mlp; all absent in the AR baseline.
        let m = b
            .adaln
            .as_ref()
            .zip(cond.as_ref())
            .map(|(a, cv)| Mods::new(cv, a, 6));
        let at = |k: usize| m.as_ref().map(|m| (m, k));
        let a = layer_norm_modulate(&h, &b.norm1.data, at(0));
        let mut qkv = linear(&a, &b.attn_qkv);
        rotary(&mut qkv, len, c.heads, hd);
        let att = attention(&qkv, len, c.heads, hd, c.softcap, c.causal);
        gated_add(&mut h, &linear(&att, &b.attn_out), at(2), d);
        let a = layer_norm_modulate(&h, &b.norm2.data, at(3));
        let hid: Vec<f32> = linear(&a, &b.mlp_fc1)
            .iter()
            .map(|&x| gelu_tanh(x as f64) as f32)
            .collect();
        gated_add(&mut h, &linear(&hid, &b.mlp_fc2), at(5), d);
    }
    // 5. final layer: (shift, scale).
    let f = &p.final_layer;
    let m = f
        .adaln
        .as_ref()
        .zip(cond.as_ref())
        .map(|(a, cv)| Mods::new(cv, a, 2));
    let y = layer_norm_modulate(&h, &f.norm.data, m.as_ref().map(|m| (m, 0)));
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
