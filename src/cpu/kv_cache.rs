//! Incremental decoding of the causal (AR) DiT with a key/value cache: one new position per
//! call for every sequence of a batch, attending to the cached rotated keys and values of the
//! earlier positions. The reference has no cache (it reruns the whole prefix every step); this
//! is the fast path of `diffusion::ar`, tested to give the tokens of the uncached sampler.
//!
//! Per block, for the B new rows at position i (no adaLN, gates 1, no dropout: spec 2.4):
//! ```text
//! a1 = LN1(h);  qkv = rope_i(a1 W_qkv^T)          (B, 3D); k, v appended at row i of the cache
//! o_h = softmax(q_h K_h[0..=i]^T / sqrt(hd)) V_h[0..=i]   per head, softcap as the forward
//! h += o W_out^T;  h += W2·GELU_tanh(W1·LN2(h) + b1) + b2
//! logits = LN_f(h) W_f^T + b_f                    (B, V)
//! ```
//! Every product goes through the same [`gemm`] and layer functions as the full forward, so a
//! row's arithmetic matches the full forward's row up to the order of the attention sums.

use crate::cpu::attention::Rope;
use crate::cpu::gemm::{gemm, Mat};
use crate::cpu::layers::*;
use crate::cpu::weights::Weights;
use crate::cpu::Real;
use crate::error::{Error, Result};
use crate::model::{DitConfig, DitParams};

/// The cache of one batch of sequences being decoded.
pub struct KvCache<'a, T: Real> {
    w: Weights<'a, T>,
    config: DitConfig,
    batch: usize,
    max_len: usize,
    /// Per block: (B, max_len, D) rotated keys, then values.
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    /// Positions already in the cache.
    pos: usize,
    rope: Rope<T>,
}

impl<'a, T: Real> KvCache<'a, T> {
    /// An empty cache for `batch` sequences of at most `max_len` positions of the causal model
    /// `p` (refused otherwise).
    pub fn new(p: &'a DitParams, batch: usize, max_len: usize) -> Result<Self> {
        let c = p.config.clone();
        c.validate()?;
        if !c.causal || c.has_adaln() {
            return Err(Error::Config(format!(
                "the KV cache decodes the causal AR model; this {} model is bidirectional",
                c.algo.name()
            )));
        }
        if batch == 0 || max_len == 0 {
            return Err(Error::Shape(format!(
                "KV cache: batch {batch} and length {max_len} must be positive"
            )));
        }
        let w = Weights::<T>::view(p)?;
        let n = batch * max_len * c.hidden;
        let blocks = c.blocks;
        Ok(KvCache {
            w,
            rope: Rope::new(max_len, c.head_dim()),
            config: c,
            batch,
            max_len,
            k: (0..blocks).map(|_| vec![T::zero(); n]).collect(),
            v: (0..blocks).map(|_| vec![T::zero(); n]).collect(),
            pos: 0,
        })
    }

    /// Positions decoded so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Feeds token `tokens[b]` of every sequence b at the next position and returns the
    /// logits (B, V) predicting the position after it.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<T>> {
        let c = &self.config;
        let (b, d, m, v) = (self.batch, c.hidden, c.mlp_hidden(), c.vocab_size);
        if tokens.len() != b {
            return Err(Error::Shape(format!(
                "KV cache step: {} tokens for a batch of {b}",
                tokens.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Shape(format!(
                "KV cache step: id {t} is outside the vocabulary of {v}"
            )));
        }
        if self.pos >= self.max_len {
            return Err(Error::Shape(format!(
                "KV cache step: all {} positions are used",
                self.max_len
            )));
        }
        let (i, heads, hd) = (self.pos, c.heads, c.head_dim());
        let mut h = vec![T::zero(); b * d];
        embedding_fwd(&self.w.embedding, tokens, d, &mut h);
        let mut a = vec![T::zero(); b * d];
        let mut qkv = vec![T::zero(); b * 3 * d];
        let mut o = vec![T::zero(); b * d];
        let mut br = vec![T::zero(); b * d];
        let mut pre = vec![T::zero(); b * m];
        let mut act = vec![T::zero(); b * m];
        let mut p = vec![T::zero(); i + 1];
        let scale = T::lit(1.0 / (hd as f64).sqrt());
        let cap = T::lit(c.softcap);
        for (blk, bw) in self.w.blocks.iter().enumerate() {
            ln_mod_fwd(&h, &bw.norm1, None, &mut a);
            linear_fwd(&a, &bw.qkv.w, None, (b, 3 * d, d), &mut qkv);
            for row in qkv.chunks_exact_mut(3 * d) {
                rotate(&mut row[..2 * d], &self.rope, i, hd);
            }
            let (kc, vc) = (&mut self.k[blk], &mut self.v[blk]);
            for (s, row) in qkv.chunks_exact(3 * d).enumerate() {
                let at = (s * self.max_len + i) * d;
                kc[at..at + d].copy_from_slice(&row[d..2 * d]);
                vc[at..at + d].copy_from_slice(&row[2 * d..]);
            }
            for s in 0..b {
                let base = s * self.max_len * d;
                let q = &qkv[s * 3 * d..(s + 1) * 3 * d];
                for hh in 0..heads {
                    gemm(
                        (1, i + 1, hd),
                        scale,
                        Mat::n(&q[hh * hd..hh * hd + hd], hd),
                        Mat::t(&kc[base + hh * hd..], d),
                        T::zero(),
                        &mut p,
                        i + 1,
                    );
                    if c.softcap_on() {
                        p.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh_fast());
                    }
                    let mx = p.iter().copied().fold(T::neg_infinity(), T::max);
                    p.iter_mut().for_each(|x| *x = (*x - mx).exp_fast());
                    let inv = T::one() / sum(&p);
                    p.iter_mut().for_each(|x| *x *= inv);
                    gemm(
                        (1, hd, i + 1),
                        T::one(),
                        Mat::n(&p, i + 1),
                        Mat::n(&vc[base + hh * hd..], d),
                        T::zero(),
                        &mut o[s * d + hh * hd..],
                        d,
                    );
                }
            }
            linear_fwd(&o, &bw.out.w, None, (b, d, d), &mut br);
            residual_fwd(&mut h, &mut br, None, None, d);
            ln_mod_fwd(&h, &bw.norm2, None, &mut a);
            linear_fwd(&a, &bw.fc1.w, bw.fc1.b.as_deref(), (b, m, d), &mut pre);
            map_fwd(&pre, &mut act, gelu_tanh);
            linear_fwd(&act, &bw.fc2.w, bw.fc2.b.as_deref(), (b, d, m), &mut br);
            residual_fwd(&mut h, &mut br, None, None, d);
        }
        ln_mod_fwd(&h, &self.w.final_norm, None, &mut a);
        let mut logits = vec![T::zero(); b * v];
        let fl = &self.w.final_linear;
        linear_fwd(&a, &fl.w, fl.b.as_deref(), (b, v, d), &mut logits);
        self.pos += 1;
        Ok(logits)
    }
}

/// The rotary rotation of position `pos` on the q and k heads of one row (`x` = its first 2D
/// columns), the arithmetic of `attention::rope_apply`.
fn rotate<T: Real>(x: &mut [T], rope: &Rope<T>, pos: usize, hd: usize) {
    let half = rope.half;
    let (cos, sin) = (
        &rope.cos[pos * half..(pos + 1) * half],
        &rope.sin[pos * half..(pos + 1) * half],
    );
    for head in x.chunks_exact_mut(hd) {
        let (x1, x2) = head.split_at_mut(half);
        for ((a, b), (&c, &s)) in x1.iter_mut().zip(x2.iter_mut()).zip(cos.iter().zip(sin)) {
            let (u, v) = (*a, *b);
            *a = u * c - v * s;
            *b = v * c + u * s;
        }
    }
}
