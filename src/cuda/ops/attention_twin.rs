//! CPU twin of the attention kernels: same maths, f64 accumulation, rayon over (batch, head,
//! query) rows. Kept in a file of its own beside the launcher (`attention.rs`) for size.

use crate::cuda::ops::attention::AttentionShape;
use half::bf16;
use rayon::prelude::*;

/// The rotary inverse frequencies as the kernel holds them: 10000^(-2t/hd) =
/// 2^(-(2t/hd) log2 10000) in f64, rounded to f32 (the correctly rounded value for every
/// supported hd; torch's fp32 pow differs from it by an ulp in places).
pub fn inv_freq(head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|t| (-((2 * t) as f64) / head_dim as f64 * 10000f64.log2()).exp2() as f32)
        .collect()
}

fn to_bf16(x: f64) -> f64 {
    bf16::from_f32(x as f32).to_f64()
}

/// Rotated q' and k' ((B, H, L, hd) each) as [`attention_fwd`] computes them (rounded to
/// bf16 with `round_bf16`).
pub fn rotated_qk(qkv: &[f32], shape: &AttentionShape, round_bf16: bool) -> (Vec<f64>, Vec<f64>) {
    (
        rotate(qkv, shape, 0, round_bf16),
        rotate(qkv, shape, 1, round_bf16),
    )
}

/// Rotated q (`part` 0) or k (`part` 1) of every (batch, head, position), (B, H, L, hd).
/// The angle p * f_t is an f32 product (as in the kernel and the reference), the rest f64.
fn rotate<T: Copy + Into<f64> + Sync>(
    qkv: &[T],
    s: &AttentionShape,
    part: usize,
    round: bool,
) -> Vec<f64> {
    let (hd, d) = (s.head_dim, s.width());
    let inv = inv_freq(hd);
    let mut out = vec![0f64; s.batch * s.heads * s.len * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, y)| {
        let (bh, p) = (idx / s.len, idx % s.len);
        let (b, h) = (bh / s.heads, bh % s.heads);
        let x = &qkv[(b * s.len + p) * 3 * d + part * d + h * hd..][..hd];
        for t in 0..hd / 2 {
            let (sin, cos) = ((p as f32 * inv[t]) as f64).sin_cos();
            let (x1, x2) = (x[t].into(), x[t + hd / 2].into());
            y[t] = x1 * cos - x2 * sin;
            y[t + hd / 2] = x2 * cos + x1 * sin;
        }
        if round {
            y.iter_mut().for_each(|v| *v = to_bf16(*v));
        }
    });
    out
}

/// Returns (o (rows, heads*hd), lse (batch, heads, len)). With `round_bf16` the values are
/// rounded to bf16 where the kernel rounds them: rotated q and k, the probabilities fed to
/// the P.V product (exp(s - m) with the row's final max; the kernel uses its running max),
/// and o. The normaliser l and lse always use the unrounded probabilities.
pub fn attention_fwd(
    qkv: &[f32],
    shape: &AttentionShape,
    round_bf16: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (o, lse) = attention_fwd_f64(qkv, shape, round_bf16);
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (f(o), f(lse))
}

/// [`attention_fwd`] on any float input, returning f64 (o and lse unrounded to f32; with
/// `round_bf16` o is still rounded to bf16 values). The finite-difference tests of the
/// backward run this on f64 inputs.
pub fn attention_fwd_f64<T: Copy + Into<f64> + Sync>(
    qkv: &[T],
    shape: &AttentionShape,
    round_bf16: bool,
) -> (Vec<f64>, Vec<f64>) {
    let s = *shape;
    let (hd, d) = (s.head_dim, s.width());
    assert_eq!(qkv.len(), s.rows() * 3 * d, "qkv length");
    let q = rotate(qkv, &s, 0, round_bf16);
    let k = rotate(qkv, &s, 1, round_bf16);
    let scale = 1.0 / (hd as f64).sqrt();
    let cap = s.softcap as f64;
    let round = |x: f64| if round_bf16 { to_bf16(x) } else { x };
    let mut o_bhl = vec![0f64; s.batch * s.heads * s.len * hd];
    let mut lse = vec![0f64; s.batch * s.heads * s.len];
    o_bhl
        .par_chunks_mut(hd)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(row, (orow, lrow))| {
            let (bh, i) = (row / s.len, row % s.len);
            let b = bh / s.heads;
            let qi = &q[row * hd..][..hd];
            let n_keys = if s.causal { i + 1 } else { s.len };
            let scores: Vec<f64> = (0..n_keys)
                .map(|j| {
                    let kj = &k[(bh * s.len + j) * hd..][..hd];
                    let x = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                    if cap > 0.0 {
                        cap * (x / cap).tanh()
                    } else {
                        x
                    }
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut l = 0f64;
            let mut acc = vec![0f64; hd];
            let v_off = 2 * d + (bh % s.heads) * hd;
            for (j, &x) in scores.iter().enumerate() {
                let p = (x - m).exp();
                l += p;
                let pr = round(p);
                let v = &qkv[(b * s.len + j) * 3 * d + v_off..][..hd];
                acc.iter_mut()
                    .zip(v)
                    .for_each(|(a, &vv)| *a += pr * vv.into());
            }
            for (y, a) in orow.iter_mut().zip(&acc) {
                *y = round(a / l);
            }
            *lrow = m + l.ln();
        });
    // (B, H, L, hd) -> (B*L, H*hd)
    let mut o = vec![0f64; s.rows() * d];
    for (row, orow) in o_bhl.chunks(hd).enumerate() {
        let (bh, i) = (row / s.len, row % s.len);
        let (b, h) = (bh / s.heads, bh % s.heads);
        o[(b * s.len + i) * d + h * hd..][..hd].copy_from_slice(orow);
    }
    (o, lse)
}

/// The backward in f64 (twin of the `attention_bwd_*` kernels): returns dqkv (rows, 3*H*hd)
/// for the forward's `o` (rows, H*hd) and `lse` (B, H, L) (given, as the kernel takes them)
/// and `dout` = d o. With `round_bf16` the rotated q and k are rounded to bf16 first, as the
/// forward kernel (and the backward's recomputation) does; otherwise everything is exact.
/// P = exp(s - lse), D_i = dO_i.o_i, dS = P (dP - D), softcap and rotary backward as in the
/// kernel header.
pub fn attention_bwd(
    qkv: &[f32],
    o: &[f64],
    lse: &[f64],
    dout: &[f32],
    shape: &AttentionShape,
    round_bf16: bool,
) -> Vec<f64> {
    let q = rotate(qkv, shape, 0, round_bf16);
    let k = rotate(qkv, shape, 1, round_bf16);
    attention_bwd_rotated(&q, &k, qkv, o, lse, dout, shape)
}

/// [`attention_bwd`] from given rotated q' and k' ((B, H, L, hd), e.g. the GPU's own, so a
/// comparison is free of bf16 rounding flips between two rotation implementations); v is
/// read from `qkv`.
pub fn attention_bwd_rotated(
    q: &[f64],
    k: &[f64],
    qkv: &[f32],
    o: &[f64],
    lse: &[f64],
    dout: &[f32],
    shape: &AttentionShape,
) -> Vec<f64> {
    attention_bwd_rotated_ext(q, k, qkv, o, lse, dout, shape, false).grad
}

/// What [`attention_bwd_rotated_ext`] returns, each (rows, 3*H*hd) like dqkv.
pub struct BwdTwin {
    /// The gradient dqkv.
    pub grad: Vec<f64>,
    /// Per element, the cancellation-free size of the terms whose operand the fast kernel
    /// rounds to bf16: sum_i P_ij |dO_i| (v part); scale sum |dS_ij dcap| |k'_j| (q part) or
    /// |q'_i| (k part), carried through the rotary backward as |y_t| + |y_(t+hd/2)|. Rounding
    /// P (dv) or dS (dq, dk) to bf16 moves the element by at most 2^-8 times this.
    pub round_mag: Vec<f64>,
    /// Per element, the size of the fp32 dot products behind dS: sum P_ij (A_ij + B_i) scale
    /// |k'_j| (q) or |q'_i| (k), A_ij = sum_e |dO_ie v_je| (dP), B_i = sum_e |dO_ie o_ie| (D);
    /// 0 for the v part. fp32 errors in dP - D (and the approximate softcap's derivative)
    /// move the element by a small multiple (<= hd 2^-24) of this, however small dS is.
    pub fp32_mag: Vec<f64>,
}

/// The backward twin with the error scales of the fast kernel: with `round_ps`, P is rounded
/// to bf16 before dV += P^T dO and dS = P (dP - D) dcap before dK' += dS^T Q' and dQ' += dS K'
/// (the fast kernel's rounding points; P inside dS stays unrounded), otherwise everything is
/// f64. Same inputs as [`attention_bwd_rotated`].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_rotated_ext(
    q: &[f64],
    k: &[f64],
    qkv: &[f32],
    o: &[f64],
    lse: &[f64],
    dout: &[f32],
    shape: &AttentionShape,
    round_ps: bool,
) -> BwdTwin {
    let s = *shape;
    let (hd, d, l) = (s.head_dim, s.width(), s.len);
    let scale = 1.0 / (hd as f64).sqrt();
    let cap = s.softcap as f64;
    let nbh = s.batch * s.heads;
    let round = |x: f64| if round_ps { to_bf16(x) } else { x };
    let v = |b: usize, h: usize, j: usize, e: usize| {
        qkv[(b * l + j) * 3 * d + 2 * d + h * hd + e] as f64
    };
    let g = |b: usize, h: usize, i: usize, e: usize| dout[(b * l + i) * d + h * hd + e] as f64;
    // Per (b, h), each (L, hd): dq', dk', dv and the error scales (round: q, k, v; fp32: q, k).
    type Head = [Vec<f64>; 8];
    let per_head: Vec<Head> = (0..nbh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let mut t: Head = std::array::from_fn(|_| vec![0f64; l * hd]);
            let [dq, dk, dv, mq, mk, mv, fq, fk] = &mut t;
            for i in 0..l {
                let qi = &q[(bh * l + i) * hd..][..hd];
                let oi = |e: usize| o[(b * l + i) * d + h * hd + e];
                let di: f64 = (0..hd).map(|e| oi(e) * g(b, h, i, e)).sum();
                let bi: f64 = (0..hd).map(|e| (oi(e) * g(b, h, i, e)).abs()).sum();
                let n_keys = if s.causal { i + 1 } else { l };
                for j in 0..n_keys {
                    let kj = &k[(bh * l + j) * hd..][..hd];
                    let r = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                    let (sc, dcap) = if cap > 0.0 {
                        let t = (r / cap).tanh();
                        (cap * t, 1.0 - t * t)
                    } else {
                        (r, 1.0)
                    };
                    let p = (sc - lse[bh * l + i]).exp();
                    let dp: f64 = (0..hd).map(|e| g(b, h, i, e) * v(b, h, j, e)).sum();
                    let aij: f64 = (0..hd).map(|e| (g(b, h, i, e) * v(b, h, j, e)).abs()).sum();
                    let ds = p * (dp - di) * dcap;
                    let (pr, dr) = (round(p), round(ds) * scale);
                    let (m_ds, f_ds) = (ds.abs() * scale, p * (aij + bi) * scale);
                    for e in 0..hd {
                        let ge = g(b, h, i, e);
                        dv[j * hd + e] += pr * ge;
                        dq[i * hd + e] += dr * kj[e];
                        dk[j * hd + e] += dr * qi[e];
                        mv[j * hd + e] += p * ge.abs();
                        mq[i * hd + e] += m_ds * kj[e].abs();
                        mk[j * hd + e] += m_ds * qi[e].abs();
                        fq[i * hd + e] += f_ds * kj[e].abs();
                        fk[j * hd + e] += f_ds * qi[e].abs();
                    }
                }
            }
            t
        })
        .collect();
    // Rotary backward and the (rows, 3*H*hd) layout; the scales add through the rotation.
    let inv = inv_freq(hd);
    let n = s.rows() * 3 * d;
    let (mut grad, mut round_mag, mut fp32_mag) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    for (bh, [dq, dk, dv, mq, mk, mv, fq, fk]) in per_head.iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for p in 0..l {
            let at = |part: usize, e: usize| (b * l + p) * 3 * d + part * d + h * hd + e;
            for t in 0..hd / 2 {
                let (sin, cos) = ((p as f32 * inv[t]) as f64).sin_cos();
                for (part, src, m, f) in [(0, dq, mq, fq), (1, dk, mk, fk)] {
                    let (y1, y2) = (src[p * hd + t], src[p * hd + t + hd / 2]);
                    grad[at(part, t)] = y1 * cos + y2 * sin;
                    grad[at(part, t + hd / 2)] = y2 * cos - y1 * sin;
                    let mm = m[p * hd + t] + m[p * hd + t + hd / 2];
                    let ff = f[p * hd + t] + f[p * hd + t + hd / 2];
                    round_mag[at(part, t)] = mm;
                    round_mag[at(part, t + hd / 2)] = mm;
                    fp32_mag[at(part, t)] = ff;
                    fp32_mag[at(part, t + hd / 2)] = ff;
                }
            }
            for e in 0..hd {
                grad[at(2, e)] = dv[p * hd + e];
                round_mag[at(2, e)] = mv[p * hd + e];
            }
        }
    }
    BwdTwin {
        grad,
        round_mag,
        fp32_mag,
    }
}
