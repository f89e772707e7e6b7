//! LayerNorm (no bias) + adaLN modulate: the only launcher of `kernels/ln_modulate.cu`, its CPU
//! twin and the comparison tests. Maths, shapes and thread mapping: see the kernel's header.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::ops::modulation::{ModIn, ModOut, ModRows};
use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "ln_modulate";
/// Must equal ROWS_PER_BLOCK in the kernel.
const ROWS_PER_BLOCK: usize = 8;

/// Forward outputs, written by the kernel: the normalised, modulated rows and the statistics
/// saved for the backward. Allocate once with [`LnModulateOut::new`] and reuse.
pub struct LnModulateOut {
    /// (rows, D) bf16
    pub y: CudaSlice<bf16>,
    /// (rows) f32
    pub mean: CudaSlice<f32>,
    /// (rows) f32
    pub rstd: CudaSlice<f32>,
}

impl LnModulateOut {
    pub fn new(gpu: &Gpu, rows: usize, d: usize) -> Result<Self> {
        let s = &gpu.stream;
        Ok(LnModulateOut {
            y: s.alloc_zeros::<bf16>(rows * d)?,
            mean: s.alloc_zeros::<f32>(rows)?,
            rstd: s.alloc_zeros::<f32>(rows)?,
        })
    }
}

/// Launches `ln_modulate_fwd_bf16` into `out`. `x`: (rows, d) f32; `weight`: (d);
/// `modulation`: shift at its chunk and scale at the next one, rows as its [`ModRows`]
/// (sequence b = r / `rows_per_batch`), or `None` for plain LayerNorm. Every buffer length is
/// checked before the launch.
#[allow(clippy::too_many_arguments)]
pub fn ln_modulate_fwd(
    gpu: &Gpu,
    out: &mut LnModulateOut,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    modulation: Option<ModIn<'_>>,
    rows: usize,
    d: usize,
    rows_per_batch: usize,
) -> Result<()> {
    if x.len() != rows * d || weight.len() != d {
        return Err(Error::Shape(format!(
            "ln_modulate: x has {} elements for rows {rows} x d {d}, weight {} for d {d}",
            x.len(),
            weight.len()
        )));
    }
    if out.y.len() != rows * d || out.mean.len() != rows || out.rstd.len() != rows {
        return Err(Error::Shape(format!(
            "ln_modulate: outputs hold {}/{}/{} elements, expected {}/{rows}/{rows}",
            out.y.len(),
            out.mean.len(),
            out.rstd.len(),
            rows * d
        )));
    }
    if rows_per_batch == 0 || rows % rows_per_batch != 0 {
        return Err(Error::Shape(format!(
            "ln_modulate: rows {rows} is not a multiple of rows_per_batch {rows_per_batch}"
        )));
    }
    if let Some(m) = &modulation {
        m.rows.check(
            "ln_modulate",
            m.buf.len(),
            m.chunk,
            2,
            rows / rows_per_batch,
            d,
        )?;
    }
    let f = gpu.function(MODULE, "ln_modulate_fwd_bf16")?;
    let (rows_i, d_i, rpb_i) = (rows as i32, d as i32, rows_per_batch as i32);
    let stride_i = modulation.map_or(0, |m| m.rows.stride()) as i32;
    let views = modulation.map(|m| (m.view(0, d), m.view(1, d)));
    let null: u64 = 0;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut out.y)
        .arg(&mut out.mean)
        .arg(&mut out.rstd)
        .arg(x)
        .arg(weight);
    match &views {
        Some((shift, scale)) => b.arg(shift).arg(scale),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&rows_i).arg(&d_i).arg(&rpb_i).arg(&stride_i);
    // SAFETY: argument order and types match the kernel signature; every buffer was checked
    // above to hold rows*d (x, y), d (weight), rows (mean, rstd) elements, and the modulation
    // views d values at every row offset b * mod_stride the kernel reads (b < rows /
    // rows_per_batch); the grid covers exactly ceil(rows / ROWS_PER_BLOCK) blocks with a bounds
    // check inside.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Must equal LN_BWD_ROWS in the kernel: rows per stage-1 block (one partial row each).
const BWD_ROWS: usize = 32;
/// Must equal LN_BWD_THREADS in the kernel.
const BWD_THREADS: usize = 256;
/// Stage-2 block: IMDM_RED_WARPS (8) warps of 32 columns.
const RED_THREADS: usize = 256;
/// Largest D whose 3*D f32 column partials fit the default 48 KiB of dynamic shared memory
/// (with room for the kernel's static reduction array).
const BWD_MAX_D: usize = 4000;
/// CUDA's limit on gridDim.y.
const MAX_GRID_Y: usize = 65535;

/// Elements of the scratch buffer [`ln_modulate_bwd`] needs: (B * chunks, 3, d) f32 partial
/// sums, chunks = ceil(rows_per_batch / 32), B = rows / rows_per_batch.
pub fn ln_modulate_bwd_scratch_len(rows: usize, d: usize, rows_per_batch: usize) -> usize {
    if rows_per_batch == 0 {
        return 0;
    }
    rows / rows_per_batch * rows_per_batch.div_ceil(BWD_ROWS) * 3 * d
}

/// Launches the LayerNorm + modulate backward (`ln_modulate_bwd_f32`, then
/// `ln_modulate_bwd_reduce_f32`; maths in the kernel header):
/// - `dx` (rows, d) f32 **+=** the input gradient (the residual-stream gradient buffer, which
///   already holds the skip path's gradient);
/// - `dweight` (d) **+=**; `dmodulation`: d shift at its chunk and d scale at the next **+=**,
///   per modulation row of its [`ModRows`] (broadcast: summed over all rows; per sequence:
///   over each sequence's rows), present exactly when `modulation` is and with its layout;
/// - `scratch`: at least [`ln_modulate_bwd_scratch_len`] f32 (contents are overwritten);
/// - saved `mean`, `rstd` (rows) from [`ln_modulate_fwd`]; `dy` (rows, d) f32 (the consumer
///   GEMM's input gradient); `x` (rows, d), `weight` (d), `modulation` as in the forward.
///
/// A broadcast modulation runs as one batch of all rows (one fixed-order sum, the constant
/// path's). Deterministic: no atomics, fixed summation order. Every length is checked before
/// launching.
#[allow(clippy::too_many_arguments)]
pub fn ln_modulate_bwd(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    dweight: &mut CudaSlice<f32>,
    dmodulation: Option<ModOut<'_>>,
    scratch: &mut CudaSlice<f32>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    modulation: Option<ModIn<'_>>,
    rows: usize,
    d: usize,
    rows_per_batch: usize,
) -> Result<()> {
    if d == 0 || d > BWD_MAX_D || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "ln_modulate backward: d {d} must be in 1..={BWD_MAX_D} and rows {rows} at most \
             2^31-1"
        )));
    }
    if rows_per_batch == 0 || rows % rows_per_batch != 0 {
        return Err(Error::Shape(format!(
            "ln_modulate backward: rows {rows} is not a multiple of rows_per_batch \
             {rows_per_batch}"
        )));
    }
    let n = rows * d;
    if dx.len() != n || dy.len() != n || x.len() != n {
        return Err(Error::Shape(format!(
            "ln_modulate backward: dx/dy/x hold {}/{}/{} elements, expected rows {rows} x d {d}",
            dx.len(),
            dy.len(),
            x.len()
        )));
    }
    if mean.len() != rows || rstd.len() != rows || weight.len() != d || dweight.len() != d {
        return Err(Error::Shape(format!(
            "ln_modulate backward: mean/rstd hold {}/{} (expected {rows}), weight/dweight {}/{} \
             (expected {d})",
            mean.len(),
            rstd.len(),
            weight.len(),
            dweight.len()
        )));
    }
    let need = ln_modulate_bwd_scratch_len(rows, d, rows_per_batch);
    if scratch.len() < need {
        return Err(Error::Shape(format!(
            "ln_modulate backward: scratch holds {} f32, needs {need}",
            scratch.len()
        )));
    }
    match (&dmodulation, &modulation) {
        (Some(dm), Some(m)) => {
            if dm.rows != m.rows {
                return Err(Error::Shape(format!(
                    "ln_modulate backward: the modulation is {:?} but its gradient {:?}",
                    m.rows, dm.rows
                )));
            }
            let batches = rows / rows_per_batch;
            let what = "ln_modulate backward";
            m.rows.check(what, m.buf.len(), m.chunk, 2, batches, d)?;
            dm.rows.check(what, dm.buf.len(), dm.chunk, 2, batches, d)?;
        }
        (None, None) => {}
        _ => {
            return Err(Error::Shape(
                "ln_modulate backward: dmodulation and modulation must be both given or both \
                 absent"
                    .into(),
            ))
        }
    }
    // Broadcast: one batch of all rows (one row of gradients, the constant path's order).
    let rows_per_batch = match modulation.map(|m| m.rows) {
        Some(ModRows::Broadcast) => rows,
        _ => rows_per_batch,
    };
    let batches = rows / rows_per_batch.max(1);
    if batches + 1 > MAX_GRID_Y {
        return Err(Error::Shape(format!(
            "ln_modulate backward: {batches} modulation rows exceed the grid limit"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let chunks = rows_per_batch.div_ceil(BWD_ROWS);
    let (rows_i, d_i, rpb_i) = (rows as i32, d as i32, rows_per_batch as i32);
    let (batches_i, chunks_i) = (batches as i32, chunks as i32);
    let stride_i = modulation.map_or(0, |m| m.rows.stride()) as i32;
    let null: u64 = 0;

    let f = gpu.function(MODULE, "ln_modulate_bwd_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, batches as u32, 1),
        block_dim: (BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: (3 * d * 4) as u32,
    };
    let scale = modulation.map(|m| m.view(1, d));
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut *dx)
        .arg(&mut *scratch)
        .arg(mean)
        .arg(rstd)
        .arg(dy)
        .arg(x)
        .arg(weight);
    match &scale {
        Some(sc) => b.arg(sc),
        None => b.arg(&null),
    };
    b.arg(&rows_i).arg(&d_i).arg(&rpb_i).arg(&stride_i);
    // SAFETY: argument order and types match the kernel signature; dx, dy, x hold rows*d
    // elements, mean/rstd rows, weight d, the scale view d values at every row offset b *
    // mod_stride (b < batches), scratch at least batches*chunks*3*d (the caller's rows_per_batch
    // needs at least as many as one batch of all rows), as checked above; the grid is (chunks,
    // batches) exactly, each block stays inside its batch's rows, and the dynamic shared memory
    // holds the kernel's 3*d floats (at most 48 000 bytes).
    unsafe { b.launch(cfg) }?;

    let f = gpu.function(MODULE, "ln_modulate_bwd_reduce_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(32) as u32, (batches + 1) as u32, 1),
        block_dim: (RED_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut dmodulation = dmodulation;
    let mut dview = dmodulation.as_mut().map(|dm| dm.view(d));
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dweight);
    match dview.as_mut() {
        Some(dm) => b.arg(dm),
        None => b.arg(&null),
    };
    b.arg(&*scratch)
        .arg(&batches_i)
        .arg(&chunks_i)
        .arg(&d_i)
        .arg(&stride_i);
    // SAFETY: argument order and types match the kernel signature; dweight holds d elements,
    // the dmod view 2d values (d shift, d scale) at every row offset b * mod_stride (or is null,
    // which the kernel checks before use), scratch the batches*chunks*3*d partials the first
    // kernel wrote (same stream, so ordered); columns >= d are skipped inside the kernel.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernels: same maths, f64 statistics and accumulation.
pub mod cpu {
    use rayon::prelude::*;

    use crate::cuda::ops::modulation::{HostMod, HostModMut, ModRows};

    /// The forward in f64 on any float inputs: returns (y, mean, rstd) unrounded. The f32 twin
    /// below and the finite-difference tests both call this one implementation. `modulation`:
    /// shift at its chunk, scale at the next, rows as its layout (sequence b = r /
    /// `rows_per_batch`).
    pub fn ln_modulate_fwd_f64<T: Copy + Into<f64> + Sync>(
        x: &[T],
        weight: &[T],
        modulation: Option<HostMod<'_, T>>,
        d: usize,
        rows_per_batch: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let rows = x.len() / d;
        let mut y = vec![0f64; x.len()];
        let mut stats = vec![(0f64, 0f64); rows];
        y.par_chunks_mut(d)
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(r, (yr, st))| {
                let xr = &x[r * d..(r + 1) * d];
                let mean = xr.iter().map(|&v| v.into()).sum::<f64>() / d as f64;
                let var = xr.iter().map(|&v| (v.into() - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                let b = r / rows_per_batch;
                for j in 0..d {
                    let mut z = (xr[j].into() - mean) * rstd * weight[j].into();
                    if let Some(m) = &modulation {
                        z = z * (1.0 + m.at(b, 1, j, d).into()) + m.at(b, 0, j, d).into();
                    }
                    yr[j] = z;
                }
                *st = (mean, rstd);
            });
        let (mean, rstd) = stats.into_iter().unzip();
        (y, mean, rstd)
    }

    /// Returns (y (rows, d) f32, mean (rows), rstd (rows)).
    pub fn ln_modulate_fwd(
        x: &[f32],
        weight: &[f32],
        modulation: Option<HostMod<'_, f32>>,
        d: usize,
        rows_per_batch: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (y, mean, rstd) = ln_modulate_fwd_f64(x, weight, modulation, d, rows_per_batch);
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        (f(y), f(mean), f(rstd))
    }

    /// The backward with the kernels' accumulation rules: `dx +=`, `dweight +=`,
    /// `dmodulation` (d shift at its chunk, d scale at the next) `+=` per modulation row of
    /// its layout (broadcast: the sum over all rows), present exactly when `modulation` is.
    /// Uses the saved f32 `mean`/`rstd` as the kernel does; every sum is f64, rounded once when
    /// added.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_modulate_bwd(
        dx: &mut [f32],
        dweight: &mut [f32],
        dmodulation: Option<HostModMut<'_>>,
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        x: &[f32],
        weight: &[f32],
        modulation: Option<HostMod<'_, f32>>,
        d: usize,
        rows_per_batch: usize,
    ) {
        let rows = x.len() / d;
        let xh = |r: usize, j: usize| (x[r * d + j] as f64 - mean[r] as f64) * rstd[r] as f64;
        let one_plus_s = |r: usize, j: usize| {
            1.0 + modulation.map_or(0.0, |m| m.at(r / rows_per_batch, 1, j, d) as f64)
        };
        let dz = |r: usize, j: usize| dy[r * d + j] as f64 * one_plus_s(r, j);
        dx.par_chunks_mut(d).enumerate().for_each(|(r, dxr)| {
            let dxh: Vec<f64> = (0..d).map(|j| dz(r, j) * weight[j] as f64).collect();
            let m1 = dxh.iter().sum::<f64>() / d as f64;
            let m2 = (0..d).map(|j| dxh[j] * xh(r, j)).sum::<f64>() / d as f64;
            for j in 0..d {
                let g = rstd[r] as f64 * (dxh[j] - m1 - xh(r, j) * m2);
                dxr[j] = (dxr[j] as f64 + g) as f32;
            }
        });
        dweight.par_iter_mut().enumerate().for_each(|(j, dw)| {
            let s: f64 = (0..rows).map(|r| dz(r, j) * xh(r, j)).sum();
            *dw = (*dw as f64 + s) as f32;
        });
        if let Some(dm) = dmodulation {
            let groups = dm.rows.rows(rows / rows_per_batch);
            let group_rows = |g: usize| match dm.rows {
                ModRows::Broadcast => 0..rows,
                ModRows::PerSequence { .. } => g * rows_per_batch..(g + 1) * rows_per_batch,
            };
            let sums: Vec<(f64, f64)> = (0..groups * d)
                .into_par_iter()
                .map(|gj| {
                    let (g, j) = (gj / d, gj % d);
                    let (mut a, mut c) = (0f64, 0f64);
                    for r in group_rows(g) {
                        let gy = dy[r * d + j] as f64;
                        a += gy;
                        c += gy * xh(r, j) * weight[j] as f64;
                    }
                    (a, c)
                })
                .collect();
            for (gj, (a, c)) in sums.into_iter().enumerate() {
                let (g, j) = (gj / d, gj % d);
                for (k, v) in [(0, a), (1, c)] {
                    let i = dm.index(g, k, j, d);
                    dm.buf[i] = (dm.buf[i] as f64 + v) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "ln_modulate_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "ln_modulate_bwd_tests.rs"]
mod bwd_tests;
