//! Gated residual add with Philox dropout: the only launcher of `kernels/residual.cu`, its CPU
//! twin and the comparison tests. Maths, the dropout stream rule, shapes and thread mapping:
//! see the kernel's header; the stream itself is [`crate::rng::dropout_keep`].

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::ops::modulation::{ModIn, ModOut, ModRows};
use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "residual";
/// Must equal RES_THREADS in the kernel.
const THREADS: usize = 256;
/// Grid cap; the kernel's grid-stride loop covers any remainder.
const MAX_BLOCKS: usize = 1 << 20;

/// Launches `residual_fwd_bf16`: `h += gate[b] ⊙ dropout_p(branch)` in place, b = r /
/// `rows_per_batch`. `h`: (rows, d) f32; `branch`: (rows, d) bf16; `gate`: the chunk of a
/// modulation buffer, rows as its [`ModRows`], or `None` (gate 1, AR baseline). Dropout keeps an element with
/// probability 1 - `p` (p in [0, 1), 0 draws nothing) and scales kept ones by 1/(1-p); the
/// mask is the Philox stream of (`seed`, `offset`), with `offset` naming the call. Every length
/// is checked before the launch.
#[allow(clippy::too_many_arguments)]
pub fn residual_fwd(
    gpu: &Gpu,
    h: &mut CudaSlice<f32>,
    branch: &CudaSlice<bf16>,
    gate: Option<ModIn<'_>>,
    rows: usize,
    d: usize,
    rows_per_batch: usize,
    p: f32,
    seed: u64,
    offset: u64,
) -> Result<()> {
    if d == 0 || d > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "residual: d {d} must be in 1..=2^31-1 and rows {rows} at most 2^31-1"
        )));
    }
    if h.len() != rows * d || branch.len() != rows * d {
        return Err(Error::Shape(format!(
            "residual: h has {} and branch {} elements, expected rows {rows} x d {d}",
            h.len(),
            branch.len()
        )));
    }
    if rows_per_batch == 0 || rows % rows_per_batch != 0 || rows_per_batch > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "residual: rows {rows} is not a multiple of rows_per_batch {rows_per_batch}"
        )));
    }
    if let Some(g) = &gate {
        g.rows.check(
            "residual",
            g.buf.len(),
            g.chunk,
            1,
            rows / rows_per_batch,
            d,
        )?;
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Config(format!(
            "residual: dropout probability {p} is outside [0, 1)"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "residual_fwd_bf16")?;
    let (rows_i, d_i, rpb_i) = (rows as i32, d as i32, rows_per_batch as i32);
    let stride_i = gate.map_or(0, |g| g.rows.stride()) as i32;
    let gate = gate.map(|g| g.view(0, d));
    let null: u64 = 0;
    let cfg = LaunchConfig {
        grid_dim: (
            (rows * d).div_ceil(8 * THREADS).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(h).arg(branch);
    match &gate {
        Some(g) => b.arg(g),
        None => b.arg(&null),
    };
    b.arg(&rows_i)
        .arg(&d_i)
        .arg(&rpb_i)
        .arg(&stride_i)
        .arg(&p)
        .arg(&seed)
        .arg(&offset);
    // SAFETY: argument order and types match the kernel signature (u64 seed and offset are
    // uint64_t); h and branch hold rows*d elements and the gate view d values at every row
    // offset b * mod_stride (b < rows / rows_per_batch), as checked above, and the kernel's
    // grid-stride loop stays below rows*d.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Must equal RES_BWD_THREADS in the kernel.
const BWD_THREADS: usize = 128;
/// Must equal RES_BWD_ROWS in the kernel: rows per stage-1 block (one partial row each).
const BWD_ROWS: usize = 64;
/// Stage-2 block of the gate reduction: IMDM_RED_WARPS warps of 32 columns.
const RED_THREADS: usize = 256;
/// CUDA's limit on gridDim.y.
const MAX_GRID_Y: usize = 65535;

/// Elements of the scratch buffer [`residual_bwd`] needs for the gate gradient: (B * chunks, d)
/// f32 partial sums, chunks = ceil(rows_per_batch / 64), B = rows / rows_per_batch.
pub fn residual_bwd_scratch_len(rows: usize, d: usize, rows_per_batch: usize) -> usize {
    if rows_per_batch == 0 {
        return 0;
    }
    rows / rows_per_batch * rows_per_batch.div_ceil(BWD_ROWS) * d
}

/// Launches the backward of [`residual_fwd`] (`residual_bwd_bf16`, then
/// `residual_bwd_reduce_f32` when a gate gradient is requested; maths in the kernel header):
/// - `dbranch` (rows, d) bf16 **=** `gate[b] ⊙ keep ⊙ dh / (1 - p)`;
/// - `dgate`: `(d gate **+=** Σ_{rows of b} dh ⊙ dropout(branch) per modulation row of its
///   [`ModRows`] (broadcast: summed over all rows), scratch of at least
///   [`residual_bwd_scratch_len`] f32)`, or `None`; requires `gate`, with its layout;
/// - `dh` (rows, d) f32: the residual-stream gradient, passed through to the skip path
///   untouched; `branch` (rows, d) bf16 and `gate`, `p`, `seed`, `offset`: the forward's.
///
/// The dropout mask is regenerated bit for bit from (`seed`, `offset`). A broadcast gate runs
/// as one batch of all rows (one fixed-order sum, the constant path's). Deterministic: no
/// atomics, fixed summation order. Every length is checked before launching.
#[allow(clippy::too_many_arguments)]
pub fn residual_bwd(
    gpu: &Gpu,
    dbranch: &mut CudaSlice<bf16>,
    dgate: Option<(ModOut<'_>, &mut CudaSlice<f32>)>,
    dh: &CudaSlice<f32>,
    branch: &CudaSlice<bf16>,
    gate: Option<ModIn<'_>>,
    rows: usize,
    d: usize,
    rows_per_batch: usize,
    p: f32,
    seed: u64,
    offset: u64,
) -> Result<()> {
    if d == 0 || d > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "residual backward: d {d} must be in 1..=2^31-1 and rows {rows} at most 2^31-1"
        )));
    }
    let n = rows * d;
    if dbranch.len() != n || dh.len() != n || branch.len() != n {
        return Err(Error::Shape(format!(
            "residual backward: dbranch/dh/branch hold {}/{}/{} elements, expected rows {rows} \
             x d {d}",
            dbranch.len(),
            dh.len(),
            branch.len()
        )));
    }
    if rows_per_batch == 0 || rows % rows_per_batch != 0 || rows_per_batch > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "residual backward: rows {rows} is not a multiple of rows_per_batch {rows_per_batch}"
        )));
    }
    let what = "residual backward";
    if let Some(g) = &gate {
        g.rows
            .check(what, g.buf.len(), g.chunk, 1, rows / rows_per_batch, d)?;
    }
    if let Some((dg, scratch)) = dgate.as_ref() {
        let need = residual_bwd_scratch_len(rows, d, rows_per_batch);
        if gate.map(|g| g.rows) != Some(dg.rows) || scratch.len() < need {
            return Err(Error::Shape(format!(
                "residual backward: dgate needs a gate of its layout ({:?}, gate {:?}); scratch \
                 holds {} f32 (needs {need})",
                dg.rows,
                gate.map(|g| g.rows),
                scratch.len()
            )));
        }
        dg.rows
            .check(what, dg.buf.len(), dg.chunk, 1, rows / rows_per_batch, d)?;
    }
    // Broadcast: one batch of all rows (one gate gradient row, the constant path's order).
    let rows_per_batch = match gate.map(|g| g.rows) {
        Some(ModRows::Broadcast) => rows.max(1),
        _ => rows_per_batch,
    };
    let batches = rows / rows_per_batch;
    let chunks = rows_per_batch.div_ceil(BWD_ROWS);
    if batches * chunks > MAX_GRID_Y {
        return Err(Error::Shape(format!(
            "residual backward: {batches} batches x {chunks} row chunks exceed the grid limit"
        )));
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Config(format!(
            "residual backward: dropout probability {p} is outside [0, 1)"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "residual_bwd_bf16")?;
    let (rows_i, d_i, rpb_i) = (rows as i32, d as i32, rows_per_batch as i32);
    let stride_i = gate.map_or(0, |g| g.rows.stride()) as i32;
    let gate = gate.map(|g| g.view(0, d));
    let null: u64 = 0;
    let units = if d % 8 == 0 { d / 8 } else { d };
    let cfg = LaunchConfig {
        grid_dim: (
            units.div_ceil(BWD_THREADS) as u32,
            (batches * chunks) as u32,
            1,
        ),
        block_dim: (BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut dgate = dgate;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut *dbranch);
    match dgate.as_mut() {
        Some((_, scratch)) => b.arg(&mut **scratch),
        None => b.arg(&null),
    };
    b.arg(dh).arg(branch);
    match &gate {
        Some(g) => b.arg(g),
        None => b.arg(&null),
    };
    b.arg(&rows_i)
        .arg(&d_i)
        .arg(&rpb_i)
        .arg(&stride_i)
        .arg(&p)
        .arg(&seed)
        .arg(&offset);
    // SAFETY: argument order and types match the kernel signature (u64 seed and offset are
    // uint64_t); dbranch, dh, branch hold rows*d elements, the gate view d values at every
    // row offset b * mod_stride, scratch at least B*chunks*d (the caller's rows_per_batch needs
    // at least as many as one batch of all rows), as checked above; blockIdx.y < B*chunks names a row chunk inside one batch
    // and the unit loop stays below d.
    unsafe { b.launch(cfg) }?;

    if let Some((mut dg, scratch)) = dgate {
        let f = gpu.function(MODULE, "residual_bwd_reduce_f32")?;
        let mut dview = dg.view(d);
        let (batches_i, chunks_i) = (batches as i32, chunks as i32);
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(32) as u32, batches as u32, 1),
            block_dim: (RED_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut dview)
            .arg(&*scratch)
            .arg(&batches_i)
            .arg(&chunks_i)
            .arg(&d_i)
            .arg(&stride_i);
        // SAFETY: the dgate view holds d values at every row offset b * mod_stride and scratch
        // the B*chunks*d partials the first kernel wrote on the same stream; columns >= d are
        // skipped inside the kernel.
        unsafe { b.launch(cfg) }?;
    }
    Ok(())
}

/// CPU twin of the kernels: the same Philox decisions ([`crate::rng::dropout_keep`]), f64 maths.
pub mod cpu {
    use crate::cuda::ops::modulation::{HostMod, HostModMut, ModRows};
    use crate::rng::dropout_keep;
    use rayon::prelude::*;

    /// The element type of the twin's forward: f32 reproduces the kernel's f32 product
    /// `branch · scale`; f64 is the same maths unrounded (for finite differences).
    pub trait Real: Copy + Send + Sync {
        /// `branch · scale` in the type's own precision.
        fn scaled(self, scale: f32) -> f64;
        fn to_f64(self) -> f64;
        fn from_f64(v: f64) -> Self;
    }

    impl Real for f32 {
        fn scaled(self, scale: f32) -> f64 {
            (self * scale) as f64
        }
        fn to_f64(self) -> f64 {
            self as f64
        }
        fn from_f64(v: f64) -> Self {
            v as f32
        }
    }

    impl Real for f64 {
        fn scaled(self, scale: f32) -> f64 {
            self * scale as f64
        }
        fn to_f64(self) -> f64 {
            self
        }
        fn from_f64(v: f64) -> Self {
            v
        }
    }

    /// `h += gate[b] · dropout_p(branch)` in place over rows of width `d`, with a (B, d) gate
    /// picked by row / `rows_per_batch` (or none): [`residual_fwd_mod`] with a per-sequence
    /// gate of stride `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_fwd<T: Real>(
        h: &mut [T],
        branch: &[T],
        gate: Option<&[T]>,
        d: usize,
        rows_per_batch: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) {
        let gate = gate.map(|buf| HostMod {
            buf,
            chunk: 0,
            rows: ModRows::PerSequence { stride: d },
        });
        residual_fwd_mod(h, branch, gate, d, rows_per_batch, p, seed, offset);
    }

    /// `h += gate[b] · dropout_p(branch)` in place over rows of width `d`; `branch` holds the
    /// bf16 values as f32; `gate`: a modulation chunk, rows as its layout (sequence b = r /
    /// `rows_per_batch`). As in the kernel, the scale 1/(1-p) is an f32 division and
    /// `branch · scale` is rounded to f32; the gated add is then done in f64 and rounded once
    /// (the kernel's fma), so a large stream cancelling a large branch compares tightly.
    /// Generic over [`Real`] so the finite-difference tests can run the same code in f64.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_fwd_mod<T: Real>(
        h: &mut [T],
        branch: &[T],
        gate: Option<HostMod<'_, T>>,
        d: usize,
        rows_per_batch: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) {
        let scale = 1.0f32 / (1.0 - p);
        h.par_chunks_mut(d).enumerate().for_each(|(r, hr)| {
            let b = r / rows_per_batch;
            for (j, x) in hr.iter_mut().enumerate() {
                let i = r * d + j;
                if p > 0.0 && !dropout_keep(seed, offset, i as u64, p) {
                    continue;
                }
                let g = gate.map_or(1.0, |g| g.at(b, 0, j, d).to_f64());
                *x = T::from_f64(x.to_f64() + g * branch[i].scaled(scale));
            }
        });
    }

    /// The backward with the kernels' rules: `dbranch = gate · keep · scale · dh` (written) and
    /// `dgate += Σ dh · keep · f32(branch · scale)` (f64 sums) per modulation row of its layout
    /// (broadcast: over all rows; per sequence: over its rows) when given (needs `gate`, with
    /// the same layout). `dh` is the residual-stream gradient (unchanged: the skip path's).
    #[allow(clippy::too_many_arguments)]
    pub fn residual_bwd(
        dbranch: &mut [f32],
        dgate: Option<HostModMut<'_>>,
        dh: &[f32],
        branch: &[f32],
        gate: Option<HostMod<'_, f32>>,
        d: usize,
        rows_per_batch: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) {
        let scale = 1.0f32 / (1.0 - p);
        let keep = |i: usize| p == 0.0 || dropout_keep(seed, offset, i as u64, p);
        dbranch.par_chunks_mut(d).enumerate().for_each(|(r, dr)| {
            let b = r / rows_per_batch;
            for (j, v) in dr.iter_mut().enumerate() {
                let i = r * d + j;
                let g = gate.map_or(1.0, |g| g.at(b, 0, j, d) as f64);
                *v = if keep(i) {
                    (g * scale as f64 * dh[i] as f64) as f32
                } else {
                    0.0
                };
            }
        });
        if let Some(dg) = dgate {
            let rows = dh.len() / d;
            let groups = dg.rows.rows(rows / rows_per_batch);
            let group_rows = |g: usize| match dg.rows {
                ModRows::Broadcast => 0..rows,
                ModRows::PerSequence { .. } => g * rows_per_batch..(g + 1) * rows_per_batch,
            };
            let sums: Vec<f64> = (0..groups * d)
                .into_par_iter()
                .map(|gj| {
                    let (g, j) = (gj / d, gj % d);
                    group_rows(g)
                        .map(|r| r * d + j)
                        .filter(|&i| keep(i))
                        .map(|i| dh[i] as f64 * (branch[i] * scale) as f64)
                        .sum()
                })
                .collect();
            for (gj, s) in sums.into_iter().enumerate() {
                let i = dg.index(gj / d, 0, gj % d, d);
                dg.buf[i] = (dg.buf[i] as f64 + s) as f32;
            }
        }
    }
}

#[cfg(test)]
#[path = "residual_tests.rs"]
mod tests;
