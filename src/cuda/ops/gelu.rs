//! Bias + GELU over a bf16 matrix: the only launcher of `kernels/gelu.cu`, its CPU twin and
//! the comparison tests. Maths, shapes and thread mapping: see the kernel's header.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "gelu";
/// Must equal GELU_THREADS in the kernel.
const THREADS: usize = 256;
/// Grid cap; the kernel's grid-stride loop covers any remainder.
const MAX_BLOCKS: usize = 1 << 20;

/// Which GELU: the tanh approximation (block MLPs, spec 2.3) or the exact erf form (the IMDM
/// eps MLP, spec 3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    Tanh,
    Exact,
}

impl GeluKind {
    /// The kernel symbol of this variant.
    pub fn symbol(self) -> &'static str {
        match self {
            GeluKind::Tanh => "gelu_tanh_fwd_bf16",
            GeluKind::Exact => "gelu_exact_fwd_bf16",
        }
    }

    /// The backward kernel symbol of this variant.
    pub fn bwd_symbol(self) -> &'static str {
        match self {
            GeluKind::Tanh => "gelu_tanh_bwd_bf16",
            GeluKind::Exact => "gelu_exact_bwd_bf16",
        }
    }
}

/// Launches the `kind` kernel: `pre = x + bias` (bias (n) f32, or none), `y = GELU(pre)`, and
/// `pre` stored as bf16 into `pre_out` when given (saved for the backward). `x`, `y`,
/// `pre_out`: (rows, n) bf16. Every length is checked before the launch.
#[allow(clippy::too_many_arguments)]
pub fn gelu_fwd(
    gpu: &Gpu,
    kind: GeluKind,
    y: &mut CudaSlice<bf16>,
    pre_out: Option<&mut CudaSlice<bf16>>,
    x: &CudaSlice<bf16>,
    bias: Option<&CudaSlice<f32>>,
    rows: usize,
    n: usize,
) -> Result<()> {
    if n == 0 || n > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "gelu: n {n} must be in 1..=2^31-1 and rows {rows} at most 2^31-1"
        )));
    }
    let total = rows * n;
    if x.len() != total || y.len() != total {
        return Err(Error::Shape(format!(
            "gelu: x has {} and y {} elements, expected rows {rows} x n {n}",
            x.len(),
            y.len()
        )));
    }
    if let Some(p) = pre_out.as_ref() {
        if p.len() != total {
            return Err(Error::Shape(format!(
                "gelu: pre_out has {} elements, expected rows {rows} x n {n}",
                p.len()
            )));
        }
    }
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::Shape(format!(
                "gelu: bias has {} elements, expected n {n}",
                b.len()
            )));
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, kind.symbol())?;
    let (rows_i, n_i) = (rows as i32, n as i32);
    let null: u64 = 0;
    let units = total / if n % 8 == 0 { 8 } else { 1 };
    let cfg = LaunchConfig {
        grid_dim: (units.div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(y);
    match pre_out {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    b.arg(x);
    match bias {
        Some(bi) => b.arg(bi),
        None => b.arg(&null),
    };
    b.arg(&rows_i).arg(&n_i);
    // SAFETY: argument order and types match both kernels' signature; x, y and pre_out hold
    // rows*n elements and bias n, as checked above, and the kernel's grid-stride loop stays
    // below rows*n.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Must equal GELU_BWD_THREADS in the kernel.
const BWD_THREADS: usize = 128;
/// Must equal GELU_BWD_ROWS in the kernel: rows per stage-1 block (one partial row each).
const BWD_ROWS: usize = 64;
/// Stage-2 block of the bias reduction: IMDM_RED_WARPS warps of 32 columns.
const RED_THREADS: usize = 256;
/// CUDA's limit on gridDim.y.
const MAX_GRID_Y: usize = 65535;

/// Elements of the scratch buffer [`gelu_bwd`] needs for the bias gradient: (ceil(rows / 64),
/// n) f32 partial sums.
pub fn gelu_bwd_scratch_len(rows: usize, n: usize) -> usize {
    rows.div_ceil(BWD_ROWS) * n
}

/// Launches the `kind` backward (`gelu_{tanh,exact}_bwd_bf16`, then `gelu_bwd_reduce_f32` when
/// a bias gradient is requested; maths in the kernel header):
/// - `dx` (rows, n) bf16 **=** `dy ⊙ GELU'(x + bias)`;
/// - `dbias`: `(d bias (n) f32 **+=** Σ_rows dx (from fp32), scratch of at least
///   [`gelu_bwd_scratch_len`] f32)`, or `None`;
/// - `dy` (rows, n) bf16; `x` (rows, n) bf16: the saved pre-activation (then `bias` = `None`)
///   or the forward's input (then `bias` = the forward's bias (n) f32).
///
/// Deterministic: no atomics, fixed summation order. Every length is checked before launching.
#[allow(clippy::too_many_arguments)]
pub fn gelu_bwd(
    gpu: &Gpu,
    kind: GeluKind,
    dx: &mut CudaSlice<bf16>,
    dbias: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    dy: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    bias: Option<&CudaSlice<f32>>,
    rows: usize,
    n: usize,
) -> Result<()> {
    if n == 0 || n > i32::MAX as usize || rows.div_ceil(BWD_ROWS) > MAX_GRID_Y {
        return Err(Error::Shape(format!(
            "gelu backward: n {n} must be in 1..=2^31-1 and rows {rows} at most {}",
            MAX_GRID_Y * BWD_ROWS
        )));
    }
    let total = rows * n;
    if dx.len() != total || dy.len() != total || x.len() != total {
        return Err(Error::Shape(format!(
            "gelu backward: dx/dy/x hold {}/{}/{} elements, expected rows {rows} x n {n}",
            dx.len(),
            dy.len(),
            x.len()
        )));
    }
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::Shape(format!(
                "gelu backward: bias has {} elements, expected n {n}",
                b.len()
            )));
        }
    }
    if let Some((db, scratch)) = dbias.as_ref() {
        if db.len() != n || scratch.len() < gelu_bwd_scratch_len(rows, n) {
            return Err(Error::Shape(format!(
                "gelu backward: dbias has {} elements (expected n {n}), scratch {} (needs {})",
                db.len(),
                scratch.len(),
                gelu_bwd_scratch_len(rows, n)
            )));
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, kind.bwd_symbol())?;
    let (rows_i, n_i) = (rows as i32, n as i32);
    let null: u64 = 0;
    let units = if n % 8 == 0 { n / 8 } else { n };
    let chunks = rows.div_ceil(BWD_ROWS);
    let cfg = LaunchConfig {
        grid_dim: (units.div_ceil(BWD_THREADS) as u32, chunks as u32, 1),
        block_dim: (BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut dbias = dbias;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut *dx);
    match dbias.as_mut() {
        Some((_, scratch)) => b.arg(&mut **scratch),
        None => b.arg(&null),
    };
    b.arg(dy).arg(x);
    match bias {
        Some(bi) => b.arg(bi),
        None => b.arg(&null),
    };
    b.arg(&rows_i).arg(&n_i);
    // SAFETY: argument order and types match both kernels' signature; dx, dy, x hold rows*n
    // elements, bias n, scratch at least ceil(rows/64)*n, as checked above; blockIdx.y <
    // ceil(rows/64) indexes the row chunk and the partial row, and the unit loop stays below n.
    unsafe { b.launch(cfg) }?;

    if let Some((db, scratch)) = dbias {
        let f = gpu.function(MODULE, "gelu_bwd_reduce_f32")?;
        let nparts = chunks as i32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(32) as u32, 1, 1),
            block_dim: (RED_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(db).arg(&*scratch).arg(&nparts).arg(&n_i);
        // SAFETY: dbias holds n elements and scratch the ceil(rows/64)*n partials written by the
        // first kernel on the same stream; columns >= n are skipped inside the kernel.
        unsafe { b.launch(cfg) }?;
    }
    Ok(())
}

/// CPU twin of the kernels: the textbook GELU formulas in f64.
pub mod cpu {
    use super::GeluKind;
    use rayon::prelude::*;

    /// GELU of one value: `0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))` or
    /// `0.5x(1 + erf(x/sqrt 2))`.
    pub fn gelu(kind: GeluKind, x: f64) -> f64 {
        match kind {
            GeluKind::Tanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
            GeluKind::Exact => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        }
    }

    /// Returns (y, pre), both (rows, n) f32: `pre = x + bias`, `y = GELU(pre)` from the
    /// unrounded pre, as in the kernel.
    pub fn gelu_fwd(
        kind: GeluKind,
        x: &[f32],
        bias: Option<&[f32]>,
        n: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0f32; x.len()];
        let mut pre = vec![0f32; x.len()];
        y.par_chunks_mut(n)
            .zip(pre.par_chunks_mut(n))
            .zip(x.par_chunks(n))
            .for_each(|((yr, pr), xr)| {
                for j in 0..n {
                    let p = xr[j] as f64 + bias.map_or(0.0, |b| b[j] as f64);
                    pr[j] = p as f32;
                    yr[j] = gelu(kind, p) as f32;
                }
            });
        (y, pre)
    }

    /// d GELU / dx of one value, the textbook derivatives:
    /// tanh form `0.5(1 + tanh u) + 0.5x(1 - tanh^2 u) k(1 + 3·0.044715x^2)`,
    /// exact form `Phi(x) + x phi(x)`.
    pub fn gelu_grad(kind: GeluKind, x: f64) -> f64 {
        match kind {
            GeluKind::Tanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let t = (k * (x + 0.044715 * x * x * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
            }
            GeluKind::Exact => {
                let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                cdf + x * pdf
            }
        }
    }

    /// The backward with the kernels' rules: `dx = dy · GELU'(x + bias)` (written), and
    /// `dbias += Σ_rows dx` in f64 when given. `dy`, `x` hold the bf16 values as f32.
    pub fn gelu_bwd(
        kind: GeluKind,
        dx: &mut [f32],
        dbias: Option<&mut [f32]>,
        dy: &[f32],
        x: &[f32],
        bias: Option<&[f32]>,
        n: usize,
    ) {
        let b = |j: usize| bias.map_or(0.0, |b| b[j] as f64);
        let g = |i: usize| dy[i] as f64 * gelu_grad(kind, x[i] as f64 + b(i % n));
        dx.par_chunks_mut(n).enumerate().for_each(|(r, dxr)| {
            for (j, v) in dxr.iter_mut().enumerate() {
                *v = g(r * n + j) as f32;
            }
        });
        if let Some(db) = dbias {
            let rows = x.len() / n;
            db.par_iter_mut().enumerate().for_each(|(j, v)| {
                let s: f64 = (0..rows).map(|r| g(r * n + j)).sum();
                *v = (*v as f64 + s) as f32;
            });
        }
    }
}

#[cfg(test)]
#[path = "gelu_tests.rs"]
mod tests;
