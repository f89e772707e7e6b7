//! LayerNorm (no bias) + adaLN modulate: the only launcher of `kernels/ln_modulate.cu`, its CPU
//! twin and the comparison tests. Maths, shapes and thread mapping: see the kernel's header.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

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
/// `modulation`: `(shift, scale)`, each (rows / rows_per_batch, d), or `None` for plain
/// LayerNorm. Every buffer length is checked before the launch.
#[allow(clippy::too_many_arguments)]
pub fn ln_modulate_fwd(
    gpu: &Gpu,
    out: &mut LnModulateOut,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    modulation: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
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
    if let Some((shift, scale)) = modulation {
        let want = rows / rows_per_batch * d;
        if shift.len() != want || scale.len() != want {
            return Err(Error::Shape(format!(
                "ln_modulate: shift/scale have {}/{} elements, expected {want}",
                shift.len(),
                scale.len()
            )));
        }
    }
    let f = gpu.function(MODULE, "ln_modulate_fwd_bf16")?;
    let (rows_i, d_i, rpb_i) = (rows as i32, d as i32, rows_per_batch as i32);
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
    match modulation {
        Some((shift, scale)) => b.arg(shift).arg(scale),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&rows_i).arg(&d_i).arg(&rpb_i);
    // SAFETY: argument order and types match the kernel signature; every buffer was checked
    // above to hold rows*d (x, y), d (weight), rows (mean, rstd) or B*d (shift, scale) elements,
    // and the grid covers exactly ceil(rows / ROWS_PER_BLOCK) blocks with a bounds check inside.
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
/// - `dweight` (d) **+=**; `dmodulation` = (d shift, d scale), each (B, d), **+=**, present
///   exactly when `scale` is (the forward had a modulation);
/// - `scratch`: at least [`ln_modulate_bwd_scratch_len`] f32 (contents are overwritten);
/// - saved `mean`, `rstd` (rows) from [`ln_modulate_fwd`]; `dy` (rows, d) f32 (the consumer
///   GEMM's input gradient); `x` (rows, d), `weight` (d), `scale` (B, d) as in the forward.
///
/// Deterministic: no atomics, fixed summation order. Every length is checked before launching.
#[allow(clippy::too_many_arguments)]
pub fn ln_modulate_bwd(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    dweight: &mut CudaSlice<f32>,
    dmodulation: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    scratch: &mut CudaSlice<f32>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    scale: Option<&CudaSlice<f32>>,
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
    let batches = rows / rows_per_batch;
    if batches + 1 > MAX_GRID_Y {
        return Err(Error::Shape(format!(
            "ln_modulate backward: {batches} modulation rows exceed the grid limit"
        )));
    }
    let want = batches * d;
    match (&dmodulation, scale) {
        (Some((ds, dc)), Some(sc)) => {
            if ds.len() != want || dc.len() != want || sc.len() != want {
                return Err(Error::Shape(format!(
                    "ln_modulate backward: dshift/dscale/scale hold {}/{}/{} elements, \
                     expected (B {batches}, d {d}) = {want}",
                    ds.len(),
                    dc.len(),
                    sc.len()
                )));
            }
        }
        (None, None) => {}
        _ => {
            return Err(Error::Shape(
                "ln_modulate backward: dmodulation and scale must be both given or both absent"
                    .into(),
            ))
        }
    }
    let need = ln_modulate_bwd_scratch_len(rows, d, rows_per_batch);
    if scratch.len() < need {
        return Err(Error::Shape(format!(
            "ln_modulate backward: scratch holds {} f32, needs {need}",
            scratch.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let chunks = rows_per_batch.div_ceil(BWD_ROWS);
    let (rows_i, d_i, rpb_i) = (rows as i32, d as i32, rows_per_batch as i32);
    let (batches_i, chunks_i) = (batches as i32, chunks as i32);
    let null: u64 = 0;

    let f = gpu.function(MODULE, "ln_modulate_bwd_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, batches as u32, 1),
        block_dim: (BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: (3 * d * 4) as u32,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut *dx)
        .arg(&mut *scratch)
        .arg(mean)
        .arg(rstd)
        .arg(dy)
        .arg(x)
        .arg(weight);
    match scale {
        Some(sc) => b.arg(sc),
        None => b.arg(&null),
    };
    b.arg(&rows_i).arg(&d_i).arg(&rpb_i);
    // SAFETY: argument order and types match the kernel signature; dx, dy, x hold rows*d
    // elements, mean/rstd rows, weight d, scale B*d, scratch at least B*chunks*3*d, as checked
    // above; the grid is (chunks, B) exactly, each block stays inside its batch's rows, and the
    // dynamic shared memory holds the kernel's 3*d floats (at most 48 000 bytes).
    unsafe { b.launch(cfg) }?;

    let f = gpu.function(MODULE, "ln_modulate_bwd_reduce_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(32) as u32, (batches + 1) as u32, 1),
        block_dim: (RED_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dweight);
    match dmodulation {
        Some((ds, dc)) => b.arg(ds).arg(dc),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&*scratch).arg(&batches_i).arg(&chunks_i).arg(&d_i);
    // SAFETY: argument order and types match the kernel signature; dweight holds d elements,
    // dshift/dscale B*d (or both null, which the kernel checks before use), scratch the
    // B*chunks*3*d partials the first kernel wrote (same stream, so ordered); columns >= d are
    // skipped inside the kernel.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernels: same maths, f64 statistics and accumulation.
pub mod cpu {
    use rayon::prelude::*;

    /// The forward in f64 on any float inputs: returns (y, mean, rstd) unrounded. The f32 twin
    /// below and the finite-difference tests both call this one implementation.
    pub fn ln_modulate_fwd_f64<T: Copy + Into<f64> + Sync>(
        x: &[T],
        weight: &[T],
        modulation: Option<(&[T], &[T])>,
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
                    if let Some((shift, scale)) = modulation {
                        z = z * (1.0 + scale[b * d + j].into()) + shift[b * d + j].into();
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
        modulation: Option<(&[f32], &[f32])>,
        d: usize,
        rows_per_batch: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (y, mean, rstd) = ln_modulate_fwd_f64(x, weight, modulation, d, rows_per_batch);
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        (f(y), f(mean), f(rstd))
    }

    /// The backward with the kernels' accumulation rules: `dx +=`, `dweight +=`,
    /// `dmodulation` = (d shift, d scale) `+=` (present exactly when `scale` is). Uses the saved
    /// f32 `mean`/`rstd` as the kernel does; every sum is f64, rounded once when added.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_modulate_bwd(
        dx: &mut [f32],
        dweight: &mut [f32],
        dmodulation: Option<(&mut [f32], &mut [f32])>,
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        x: &[f32],
        weight: &[f32],
        scale: Option<&[f32]>,
        d: usize,
        rows_per_batch: usize,
    ) {
        let rows = x.len() / d;
        let xh = |r: usize, j: usize| (x[r * d + j] as f64 - mean[r] as f64) * rstd[r] as f64;
        let one_plus_s = |r: usize, j: usize| {
            1.0 + scale.map_or(0.0, |s| s[(r / rows_per_batch) * d + j] as f64)
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
        if let Some((dshift, dscale)) = dmodulation {
            dshift
                .par_iter_mut()
                .zip(dscale.par_iter_mut())
                .enumerate()
                .for_each(|(bj, (dsh, dsc))| {
                    let (b, j) = (bj / d, bj % d);
                    let batch = b * rows_per_batch..(b + 1) * rows_per_batch;
                    let (mut a, mut c) = (0f64, 0f64);
                    for r in batch {
                        let g = dy[r * d + j] as f64;
                        a += g;
                        c += g * xh(r, j) * weight[j] as f64;
                    }
                    *dsh = (*dsh as f64 + a) as f32;
                    *dsc = (*dsc as f64 + c) as f32;
                });
        }
    }
}

#[cfg(test)]
#[path = "ln_modulate_tests.rs"]
mod tests;
