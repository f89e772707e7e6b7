//! Forward and backward of the DiT's pointwise and row-wise ops, as plain functions on row-major
//! slices. Accumulation rule (as in the kernels): parameter gradients `+=`, activation gradients
//! `=`, except where a doc says `+=` (the LayerNorm input gradient lands on the residual stream).
//!
//! Rows are independent, so rayon splits them freely; every sum over rows (bias, norm weight,
//! modulation and gate gradients) runs serially in row order, so results are reproducible.

use rayon::prelude::*;

pub use crate::cpu::fastmath::{dot, sum};
use crate::cpu::gemm::{gemm, Mat};
use crate::cpu::{Buf, Real};
use crate::rng::philox4x32_10;

/// LayerNorm epsilon (spec 2.3).
pub const LN_EPS: f64 = 1e-5;

/// `acc[j] += Σ_r x[r, j]` over rows of width `d`, in row order.
pub fn col_sum_into<T: Real>(x: &[T], d: usize, acc: &mut [T]) {
    for r in x.chunks_exact(d) {
        acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
    }
}

// ---- linear ---------------------------------------------------------------------------------

/// `y (rows, out) = x (rows, inp) · W^T + b` with W (out, inp) and b (out).
pub fn linear_fwd<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (rows, out, inp): (usize, usize, usize),
    y: &mut [T],
) {
    debug_assert!(x.len() == rows * inp && w.len() == out * inp && y.len() == rows * out);
    // The bias goes in first and the product adds onto it (beta = 1): one pass over y.
    let beta = match b {
        Some(b) => {
            y.chunks_exact_mut(out).for_each(|r| r.copy_from_slice(b));
            T::one()
        }
        None => T::zero(),
    };
    gemm(
        (rows, out, inp),
        T::one(),
        Mat::n(x, inp),
        Mat::t(w, inp),
        beta,
        y,
        out,
    );
}

/// Backward of [`linear_fwd`]: `dx = dy·W` (skipped when `dx` is `None`), `dW += dy^T·x`,
/// `db += Σ_rows dy`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    (rows, out, inp): (usize, usize, usize),
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    debug_assert!(dy.len() == rows * out && x.len() == rows * inp && dw.len() == out * inp);
    if let Some(dx) = dx {
        gemm(
            (rows, inp, out),
            T::one(),
            Mat::n(dy, out),
            Mat::n(w, inp),
            T::zero(),
            dx,
            inp,
        );
    }
    gemm(
        (out, inp, rows),
        T::one(),
        Mat::t(dy, out),
        Mat::n(x, inp),
        T::one(),
        dw,
        inp,
    );
    if let Some(db) = db {
        col_sum_into(dy, out, db);
    }
}

// ---- LayerNorm (no bias) x weight, adaLN modulate ---------------------------------------------

/// What the LayerNorm backward needs: the normalised input and the reciprocal std per row.
#[derive(Clone, Debug, Default)]
pub struct LnSaved<T: Real> {
    /// (rows, D) `(x - mean)·rstd`
    pub xhat: Buf<T>,
    /// (rows) `1/sqrt(var + eps)`, biased variance
    pub rstd: Buf<T>,
}

/// Activation rows per modulation vector: a modulation of `len` = G·D values holds G vectors,
/// vector g serving rows `g·per..(g+1)·per` of a (rows, D) activation. G = 1 is the constant
/// conditioning (one vector for every row), G = B the per-sequence one (per = L).
pub fn rows_per_vector(rows: usize, len: usize, d: usize) -> usize {
    let groups = len / d;
    debug_assert!(len == groups * d && groups > 0 && rows % groups == 0);
    rows / groups
}

/// `y = (x̂ ⊙ w)·(1 + scale) + shift` per row of width D = `w.len()`, with `x̂` the LayerNorm of
/// the row (eps 1e-5, biased variance). `mods` = (shift, scale), each G vectors of width D, G
/// dividing the rows ([`rows_per_vector`]); `None` is the AR baseline's plain `x̂ ⊙ w`.
pub fn ln_mod_fwd<T: Real>(
    x: &[T],
    w: &[T],
    mods: Option<(&[T], &[T])>,
    y: &mut [T],
) -> LnSaved<T> {
    let d = w.len();
    let rows = x.len() / d;
    // y = x̂·a + b with per-column a = w(1+scale), b = shift, one (a, b) per vector.
    let (a, b) = ln_coefficients(w, mods);
    let per = rows_per_vector(rows, a.len(), d);
    let mut s = LnSaved {
        xhat: Buf::scratch(rows * d),
        rstd: Buf::scratch(rows),
    };
    let (inv_d, eps) = (T::one() / T::lit(d as f64), T::lit(LN_EPS));
    x.par_chunks(d)
        .zip(y.par_chunks_mut(d))
        .zip(s.xhat.par_chunks_mut(d))
        .zip(s.rstd.par_iter_mut())
        .enumerate()
        .for_each(|(row, (((xr, yr), xh), rs))| {
            let g = row / per * d;
            let (a, b) = (&a[g..g + d], &b[g..g + d]);
            let mean = sum(xr) * inv_d;
            xh.iter_mut().zip(xr).for_each(|(h, &v)| *h = v - mean);
            let r = T::one() / (dot(xh, xh) * inv_d + eps).sqrt();
            *rs = r;
            for ((y, h), (&a, &b)) in yr.iter_mut().zip(xh.iter_mut()).zip(a.iter().zip(b)) {
                *h *= r;
                *y = *h * a + b;
            }
        });
    s
}

/// Per-vector coefficients (a, b) = (w(1+scale), shift), each G·D long (G = 1 unmodulated).
fn ln_coefficients<T: Real>(w: &[T], mods: Option<(&[T], &[T])>) -> (Vec<T>, Vec<T>) {
    match mods {
        Some((shift, scale)) => (
            w.iter()
                .cycle()
                .zip(scale)
                .map(|(&w, &s)| w * (T::one() + s))
                .collect(),
            shift.to_vec(),
        ),
        None => (w.to_vec(), vec![T::zero(); w.len()]),
    }
}

/// Backward of [`ln_mod_fwd`]: `dx += rstd·(g − mean(g) − x̂·mean(g ⊙ x̂))` with
/// `g = dy ⊙ w(1+scale)` (**accumulates**: x is the residual stream); `dw += Σ dy(1+scale) ⊙ x̂`;
/// when modulated, `dshift += Σ dy` and `dscale += Σ dy ⊙ x̂ ⊙ w`, each sum over the rows its
/// vector serves (`dmods` as long as `mods`).
pub fn ln_mod_bwd<T: Real>(
    dy: &[T],
    saved: &LnSaved<T>,
    w: &[T],
    mods: Option<(&[T], &[T])>,
    dx: &mut [T],
    dw: &mut [T],
    dmods: Option<(&mut [T], &mut [T])>,
) {
    let d = w.len();
    let rows = dy.len() / d;
    let (a, _) = ln_coefficients(w, mods);
    let per = rows_per_vector(rows, a.len(), d);
    let inv_d = T::one() / T::lit(d as f64);
    // Rows in chunks, so that each task reuses one scratch row for g = dy ⊙ a.
    const ROWS: usize = 64;
    dy.par_chunks(d * ROWS)
        .zip(saved.xhat.par_chunks(d * ROWS))
        .zip(saved.rstd.par_chunks(ROWS))
        .zip(dx.par_chunks_mut(d * ROWS))
        .enumerate()
        .for_each(|(ci, (((gs, xhs), rs), dxs))| {
            let mut ga = vec![T::zero(); d];
            for (i, (((g, xh), &r), dxr)) in gs
                .chunks_exact(d)
                .zip(xhs.chunks_exact(d))
                .zip(rs)
                .zip(dxs.chunks_exact_mut(d))
                .enumerate()
            {
                let v = (ci * ROWS + i) / per * d;
                ga.iter_mut()
                    .zip(g.iter().zip(&a[v..v + d]))
                    .for_each(|(o, (&g, &a))| *o = g * a);
                let (m1, m2) = (sum(&ga) * inv_d, dot(&ga, xh) * inv_d);
                for ((dx, &g), &h) in dxr.iter_mut().zip(&ga).zip(xh) {
                    *dx += r * (g - m1 - h * m2);
                }
            }
        });
    // Σ dy ⊙ x̂ over the rows of each vector, then the chain rule per column.
    let mut s1 = vec![T::zero(); a.len()];
    for (row, (g, xh)) in dy
        .chunks_exact(d)
        .zip(saved.xhat.chunks_exact(d))
        .enumerate()
    {
        let v = row / per * d;
        s1[v..v + d]
            .iter_mut()
            .zip(g.iter().zip(xh))
            .for_each(|(s, (&g, &h))| *s += g * h);
    }
    match (mods, dmods) {
        (Some((_, scale)), Some((dshift, dscale))) => {
            for ((dsh, dyv), (sv, (scv, dscv))) in
                dshift.chunks_exact_mut(d).zip(dy.chunks(per * d)).zip(
                    s1.chunks_exact(d)
                        .zip(scale.chunks_exact(d).zip(dscale.chunks_exact_mut(d))),
                )
            {
                col_sum_into(dyv, d, dsh);
                for j in 0..d {
                    dw[j] += sv[j] * (T::one() + scv[j]);
                    dscv[j] += sv[j] * w[j];
                }
            }
        }
        _ => dw.iter_mut().zip(&s1).for_each(|(g, &s)| *g += s),
    }
}

// ---- activations ----------------------------------------------------------------------------

/// sqrt(2/pi), the tanh-GELU constant.
const GELU_K: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

/// Tanh-approximated GELU (block MLPs): `0.5·x·(1 + tanh(k(x + 0.044715x³)))`.
pub fn gelu_tanh<T: Real>(x: T) -> T {
    let half = T::lit(0.5);
    half * x * (T::one() + (T::lit(GELU_K) * (x + T::lit(GELU_C) * x * x * x)).tanh_fast())
}

/// d/dx of [`gelu_tanh`].
pub fn gelu_tanh_grad<T: Real>(x: T) -> T {
    let (half, k, c) = (T::lit(0.5), T::lit(GELU_K), T::lit(GELU_C));
    let t = (k * (x + c * x * x * x)).tanh_fast();
    half * (T::one() + t) + half * x * (T::one() - t * t) * k * (T::one() + T::lit(3.0) * c * x * x)
}

/// Exact GELU (the eps MLP): `0.5·x·(1 + erf(x/√2))`.
pub fn gelu_exact<T: Real>(x: T) -> T {
    T::lit(0.5) * x * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// d/dx of [`gelu_exact`]: `Φ(x) + x·φ(x)`.
pub fn gelu_exact_grad<T: Real>(x: T) -> T {
    let cdf = T::lit(0.5) * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (-T::lit(0.5) * x * x).exp_fast() * T::lit(0.398_942_280_401_432_7);
    cdf + x * pdf
}

/// SiLU `x·sigmoid(x)`.
pub fn silu<T: Real>(x: T) -> T {
    x / (T::one() + (-x).exp_fast())
}

/// d/dx of [`silu`]: `σ(x)·(1 + x(1 − σ(x)))`.
pub fn silu_grad<T: Real>(x: T) -> T {
    let s = T::one() / (T::one() + (-x).exp_fast());
    s * (T::one() + x * (T::one() - s))
}

/// Elements per rayon task of the elementwise maps: plain inner loops that LLVM vectorises.
const MAP_CHUNK: usize = 8192;

/// `y = f(x)` elementwise, in parallel.
pub fn map_fwd<T: Real>(x: &[T], y: &mut [T], f: impl Fn(T) -> T + Sync) {
    y.par_chunks_mut(MAP_CHUNK)
        .zip(x.par_chunks(MAP_CHUNK))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = f(x)));
}

/// `d ← d ⊙ f'(x)` elementwise (activation backward in place), in parallel.
pub fn map_bwd<T: Real>(x: &[T], d: &mut [T], grad: impl Fn(T) -> T + Sync) {
    d.par_chunks_mut(MAP_CHUNK)
        .zip(x.par_chunks(MAP_CHUNK))
        .for_each(|(d, x)| d.iter_mut().zip(x).for_each(|(d, &x)| *d *= grad(x)));
}

// ---- gated residual with dropout --------------------------------------------------------------

/// Per-element dropout factors of one branch call: `1/(1-p)` (an f32 division, as in the kernel)
/// where `rng::dropout_keep(seed, offset, i, p)` keeps element i, else 0; i = 0..n is the flat
/// index `r·D + j` of the (rows, D) branch. One Philox call serves four elements, as on the GPU.
pub fn dropout_factors<T: Real>(seed: u64, offset: u64, p: f32, n: usize) -> Buf<T> {
    let scale = T::of_f32(1.0f32 / (1.0 - p));
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = Buf::scratch(n);
    // Chunks of a multiple of 4 elements start on a Philox group boundary.
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ch)| {
        for (g, quad) in ch.chunks_mut(4).enumerate() {
            let q = (c * CHUNK / 4 + g) as u64;
            let words = philox4x32_10(
                [
                    q as u32,
                    (q >> 32) as u32,
                    offset as u32,
                    (offset >> 32) as u32,
                ],
                key,
            );
            for (x, w) in quad.iter_mut().zip(words) {
                // Same test as `rng::dropout_keep`: a 24-bit uniform, exact in f32.
                let u = (w >> 8) as f32 * (1.0 / 16_777_216.0);
                *x = if u >= p { scale } else { T::zero() };
            }
        }
    });
    out
}

/// `h += gate ⊙ dropout(branch)` per row of width `d` (gate: G vectors of width d, G dividing
/// the rows, [`rows_per_vector`]; `None` = 1). `keep` holds [`dropout_factors`] (`None`: no
/// dropout). On return `branch` holds `dropout(branch)`, which the backward needs for the gate
/// gradient.
pub fn residual_fwd<T: Real>(
    h: &mut [T],
    branch: &mut [T],
    gate: Option<&[T]>,
    keep: Option<&[T]>,
    d: usize,
) {
    if let Some(k) = keep {
        branch
            .par_iter_mut()
            .zip(k.par_iter())
            .for_each(|(b, &k)| *b *= k);
    }
    let per = gate.map_or(1, |g| rows_per_vector(h.len() / d, g.len(), d));
    h.par_chunks_mut(d)
        .zip(branch.par_chunks(d))
        .enumerate()
        .for_each(|(row, (hr, br))| match gate {
            Some(g) => hr
                .iter_mut()
                .zip(br.iter().zip(&g[row / per * d..][..d]))
                .for_each(|(h, (&b, &g))| *h += g * b),
            None => hr.iter_mut().zip(br).for_each(|(h, &b)| *h += b),
        });
}

/// Backward of [`residual_fwd`]: `dbranch = dh ⊙ gate ⊙ keep` (=), `dgate += Σ dh ⊙ dropped`
/// over the rows each gate vector serves, with `dropped` the branch after dropout. `dh` itself
/// passes through unchanged.
pub fn residual_bwd<T: Real>(
    dh: &[T],
    dropped: &[T],
    gate: Option<&[T]>,
    keep: Option<&[T]>,
    d: usize,
    dbranch: &mut [T],
    dgate: Option<&mut [T]>,
) {
    let per = gate.map_or(1, |g| rows_per_vector(dh.len() / d, g.len(), d));
    dbranch
        .par_chunks_mut(d)
        .zip(dh.par_chunks(d))
        .enumerate()
        .for_each(|(row, (db, g))| match gate {
            Some(gt) => db
                .iter_mut()
                .zip(g.iter().zip(&gt[row / per * d..][..d]))
                .for_each(|(o, (&g, &gt))| *o = g * gt),
            None => db.copy_from_slice(g),
        });
    if let Some(k) = keep {
        dbranch
            .par_iter_mut()
            .zip(k.par_iter())
            .for_each(|(b, &k)| *b *= k);
    }
    if let Some(dg) = dgate {
        for (row, (g, br)) in dh.chunks_exact(d).zip(dropped.chunks_exact(d)).enumerate() {
            dg[row / per * d..][..d]
                .iter_mut()
                .zip(g.iter().zip(br))
                .for_each(|(o, (&g, &b))| *o += g * b);
        }
    }
}

// ---- embedding ------------------------------------------------------------------------------

/// `h[r] = table[ids[r]]`, rows of width `d`.
pub fn embedding_fwd<T: Real>(table: &[T], ids: &[u32], d: usize, h: &mut [T]) {
    h.par_chunks_mut(d)
        .zip(ids.par_iter())
        .for_each(|(hr, &t)| hr.copy_from_slice(&table[t as usize * d..][..d]));
}

/// `dtable[ids[r]] += dh[r]`, serially in row order (a token may repeat).
pub fn embedding_bwd<T: Real>(dh: &[T], ids: &[u32], d: usize, dtable: &mut [T]) {
    for (g, &t) in dh.chunks_exact(d).zip(ids) {
        let row = &mut dtable[t as usize * d..][..d];
        row.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
    }
}

#[cfg(test)]
#[path = "layers_tests.rs"]
mod tests;
