//! Rotate-half rotary embedding and softmax attention over the packed (B·L, 3D) qkv buffer,
//! forward and backward (spec 2.3, steps 2-4).
//!
//! qkv rows are laid out (q|k|v, head, dim): q of head h at columns `h·hd..`, k at `D + h·hd..`,
//! v at `2D + h·hd..`. Per (batch b, head h), with Q, K, V the (L, hd) slices:
//! ```text
//! S  = Q K^T / sqrt(hd)                 (L, L)
//! Sc = c·tanh(S/c)  (softcap c > 0)     saved: 1 − tanh²  (B, H, L, L)
//! P  = softmax_rows(Sc), j > i masked when causal      saved (B, H, L, L)
//! O  = P V                              (L, hd) -> columns h·hd.. of the (B·L, D) output
//! ```
//! Backward: dV = P^T dO, dP = dO V^T, dSc = P ⊙ (dP − rowsum(P ⊙ dP)), dS = dSc ⊙ (1 − tanh²),
//! dQ = dS K / sqrt(hd), dK = dS^T Q / sqrt(hd). Each batch's rows are contiguous, so rayon
//! splits over batches and every product is a [`gemm`] on strided slices.

use rayon::prelude::*;

use crate::cpu::gemm::{gemm, Mat};
use crate::cpu::layers::{dot, sum};
use crate::cpu::{Buf, Real};
use crate::model::params::inv_freq;

/// Rotary table for positions 0..L: cos and sin of `pos·inv_freq_i`, (L, hd/2) each, computed
/// in f64 and rounded once (as `dit_ref` does).
#[derive(Clone, Debug)]
pub struct Rope<T> {
    pub cos: Vec<T>,
    pub sin: Vec<T>,
    pub half: usize,
}

impl<T: Real> Rope<T> {
    pub fn new(len: usize, head_dim: usize) -> Self {
        let inv = inv_freq(head_dim);
        let half = head_dim / 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for pos in 0..len {
            for &f in &inv {
                let (s, c) = (pos as f64 * f).sin_cos();
                cos.push(T::lit(c));
                sin.push(T::lit(s));
            }
        }
        Rope { cos, sin, half }
    }
}

/// Rotates q and k of every head in place (rows of width 3D, position = row % `len`):
/// `out1 = x1·cos − x2·sin`, `out2 = x2·cos + x1·sin` with x1, x2 the two halves of a head.
/// With `inverse` it applies the transposed rotation, which is the backward (rotations are
/// orthogonal).
pub fn rope_apply<T: Real>(qkv: &mut [T], rope: &Rope<T>, len: usize, heads: usize, inverse: bool) {
    let half = rope.half;
    let (hd, d) = (2 * half, heads * 2 * half);
    qkv.par_chunks_mut(3 * d).enumerate().for_each(|(row, r)| {
        let pos = row % len;
        let (cos, sin) = (
            &rope.cos[pos * half..(pos + 1) * half],
            &rope.sin[pos * half..(pos + 1) * half],
        );
        // The inverse rotation is the same one with sin negated.
        let sign = if inverse { -T::one() } else { T::one() };
        for x in r[..2 * d].chunks_exact_mut(hd) {
            let (x1, x2) = x.split_at_mut(half);
            for ((a, b), (&c, &s)) in x1.iter_mut().zip(x2.iter_mut()).zip(cos.iter().zip(sin)) {
                let (u, v, s) = (*a, *b, s * sign);
                *a = u * c - v * s;
                *b = v * c + u * s;
            }
        }
    });
}

/// Attention geometry.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Softcap c; <= 0 means off.
    pub softcap: f64,
    pub causal: bool,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// What the attention backward needs besides qkv.
#[derive(Clone, Debug, Default)]
pub struct AttnSaved<T: Real> {
    /// (B, H, L, L) softmax probabilities (exact zeros above the diagonal when causal)
    pub probs: Buf<T>,
    /// (B, H, L, L) `1 − tanh²(S/c)`, the softcap's derivative; softcap on only
    pub cap_grad: Option<Buf<T>>,
}

/// Attention over rotated `qkv` (B·L, 3D) into `out` (B·L, D).
pub fn attention_fwd<T: Real>(qkv: &[T], s: &AttnShape, out: &mut [T]) -> AttnSaved<T> {
    let (l, hd, d) = (s.len, s.head_dim, s.d());
    let ll = l * l;
    let cap_on = s.softcap > 0.0;
    let mut saved = AttnSaved {
        probs: Buf::scratch(s.batch * s.heads * ll),
        cap_grad: cap_on.then(|| Buf::scratch(s.batch * s.heads * ll)),
    };
    let scale = T::lit(1.0 / (hd as f64).sqrt());
    let cap = T::lit(s.softcap);
    // An empty slice per batch when the softcap is off keeps one zipped iterator.
    let cap_chunks: Vec<&mut [T]> = match saved.cap_grad.as_mut() {
        Some(c) => c.chunks_mut(s.heads * ll).collect(),
        None => (0..s.batch).map(|_| &mut [][..]).collect(),
    };
    qkv.par_chunks(l * 3 * d)
        .zip(out.par_chunks_mut(l * d))
        .zip(saved.probs.par_chunks_mut(s.heads * ll))
        .zip(cap_chunks)
        .for_each(|(((x, o), pb), cb)| {
            for h in 0..s.heads {
                let p = &mut pb[h * ll..(h + 1) * ll];
                gemm(
                    (l, l, hd),
                    scale,
                    Mat::n(&x[h * hd..], 3 * d),
                    Mat::t(&x[d + h * hd..], 3 * d),
                    T::zero(),
                    p,
                    l,
                );
                if cap_on {
                    let cg = &mut cb[h * ll..(h + 1) * ll];
                    for (v, g) in p.iter_mut().zip(cg) {
                        let t = (*v / cap).tanh_fast();
                        *v = cap * t;
                        *g = T::one() - t * t;
                    }
                }
                for (i, row) in p.chunks_exact_mut(l).enumerate() {
                    let n = if s.causal { i + 1 } else { l };
                    let m = row[..n].iter().copied().fold(T::neg_infinity(), T::max);
                    row[..n].iter_mut().for_each(|v| *v = (*v - m).exp_fast());
                    let inv = T::one() / sum(&row[..n]);
                    row[..n].iter_mut().for_each(|v| *v *= inv);
                    row[n..].iter_mut().for_each(|v| *v = T::zero());
                }
                gemm(
                    (l, hd, l),
                    T::one(),
                    Mat::n(p, l),
                    Mat::n(&x[2 * d + h * hd..], 3 * d),
                    T::zero(),
                    &mut o[h * hd..],
                    d,
                );
            }
        });
    saved
}

/// Backward of [`attention_fwd`]: `dqkv` (B·L, 3D) (=) from `dout` (B·L, D); the q and k parts
/// are gradients with respect to the *rotated* q and k (undo with [`rope_apply`] inverse).
pub fn attention_bwd<T: Real>(
    dout: &[T],
    qkv: &[T],
    saved: &AttnSaved<T>,
    s: &AttnShape,
    dqkv: &mut [T],
) {
    let (l, hd, d) = (s.len, s.head_dim, s.d());
    let ll = l * l;
    let scale = T::lit(1.0 / (hd as f64).sqrt());
    let hll = s.heads * ll;
    dqkv.par_chunks_mut(l * 3 * d)
        .zip(qkv.par_chunks(l * 3 * d))
        .zip(dout.par_chunks(l * d))
        .enumerate()
        .for_each(|(b, ((dx, x), dob))| {
            let mut ds = vec![T::zero(); ll];
            for h in 0..s.heads {
                let p = &saved.probs[b * hll + h * ll..][..ll];
                let dov = &dob[h * hd..];
                // dV = P^T dO
                gemm(
                    (l, hd, l),
                    T::one(),
                    Mat::t(p, l),
                    Mat::n(dov, d),
                    T::zero(),
                    &mut dx[2 * d + h * hd..],
                    3 * d,
                );
                // dP = dO V^T, then the softmax (and softcap) backward in place.
                gemm(
                    (l, l, hd),
                    T::one(),
                    Mat::n(dov, d),
                    Mat::t(&x[2 * d + h * hd..], 3 * d),
                    T::zero(),
                    &mut ds,
                    l,
                );
                for (pr, dr) in p.chunks_exact(l).zip(ds.chunks_exact_mut(l)) {
                    let pd = dot(pr, dr);
                    dr.iter_mut()
                        .zip(pr)
                        .for_each(|(g, &pv)| *g = pv * (*g - pd));
                }
                if let Some(cg) = &saved.cap_grad {
                    let cg = &cg[b * hll + h * ll..][..ll];
                    ds.iter_mut().zip(cg).for_each(|(g, &c)| *g *= c);
                }
                // dQ = dS K·scale, dK = dS^T Q·scale
                gemm(
                    (l, hd, l),
                    scale,
                    Mat::n(&ds, l),
                    Mat::n(&x[d + h * hd..], 3 * d),
                    T::zero(),
                    &mut dx[h * hd..],
                    3 * d,
                );
                gemm(
                    (l, hd, l),
                    scale,
                    Mat::t(&ds, l),
                    Mat::n(&x[h * hd..], 3 * d),
                    T::zero(),
                    &mut dx[d + h * hd..],
                    3 * d,
                );
            }
        });
}
