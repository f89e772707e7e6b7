//! Gated residual add with Philox dropout: the only launcher of `kernels/residual.cu`, its CPU
//! twin and the comparison tests. Maths, the dropout stream rule, shapes and thread mapping:
//! see the kernel's header; the stream itself is [`crate::rng::dropout_keep`].

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "residual";
/// Must equal RES_THREADS in the kernel.
const THREADS: usize = 256;
/// Grid cap; the kernel's grid-stride loop covers any remainder.
const MAX_BLOCKS: usize = 1 << 20;

/// Launches `residual_fwd_bf16`: `h += gate[b] ⊙ dropout_p(branch)` in place, b = r /
/// `rows_per_batch`. `h`: (rows, d) f32; `branch`: (rows, d) bf16; `gate`: (rows /
/// rows_per_batch, d) f32 or `None` (gate 1, AR baseline). Dropout keeps an element with
/// probability 1 - `p` (p in [0, 1), 0 draws nothing) and scales kept ones by 1/(1-p); the
/// mask is the Philox stream of (`seed`, `offset`), with `offset` naming the call. Every length
/// is checked before the launch.
#[allow(clippy::too_many_arguments)]
pub fn residual_fwd(
    gpu: &Gpu,
    h: &mut CudaSlice<f32>,
    branch: &CudaSlice<bf16>,
    gate: Option<&CudaSlice<f32>>,
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
    if let Some(g) = gate {
        let want = rows / rows_per_batch * d;
        if g.len() != want {
            return Err(Error::Shape(format!(
                "residual: gate has {} elements, expected (B {}, d {d}) = {want}",
                g.len(),
                rows / rows_per_batch
            )));
        }
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
    match gate {
        Some(g) => b.arg(g),
        None => b.arg(&null),
    };
    b.arg(&rows_i)
        .arg(&d_i)
        .arg(&rpb_i)
        .arg(&p)
        .arg(&seed)
        .arg(&offset);
    // SAFETY: argument order and types match the kernel signature (u64 seed and offset are
    // uint64_t); h and branch hold rows*d elements and gate (rows/rows_per_batch)*d, as checked
    // above, and the kernel's grid-stride loop stays below rows*d.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Must equal RES_BWD_THREADS in the kernel.
const BWD_THREADS: usize = 128;
/// Must equal RES_BWD_ROWS in the kernel: rows per stage-1 block (one partial row each).
const BWD_ROWS: usize = 64;
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
/// - `dgate`: `(d gate (B, d) f32 **+=** Σ_{rows of b} dh ⊙ dropout(branch), scratch of at least
///   [`residual_bwd_scratch_len`] f32)`, or `None`; requires `gate`;
/// - `dh` (rows, d) f32: the residual-stream gradient, passed through to the skip path
///   untouched; `branch` (rows, d) bf16 and `gate`, `p`, `seed`, `offset`: the forward's.
///
/// The dropout mask is regenerated bit for bit from (`seed`, `offset`). Deterministic: no
/// atomics, fixed summation order. Every length is checked before launching.
#[allow(clippy::too_many_arguments)]
pub fn residual_bwd(
    gpu: &Gpu,
    dbranch: &mut CudaSlice<bf16>,
    dgate: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    dh: &CudaSlice<f32>,
    branch: &CudaSlice<bf16>,
    gate: Option<&CudaSlice<f32>>,
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
    let batches = rows / rows_per_batch;
    let chunks = rows_per_batch.div_ceil(BWD_ROWS);
    if batches * chunks > MAX_GRID_Y {
        return Err(Error::Shape(format!(
            "residual backward: {batches} batches x {chunks} row chunks exceed the grid limit"
        )));
    }
    let want = batches * d;
    if let Some(g) = gate {
        if g.len() != want {
            return Err(Error::Shape(format!(
                "residual backward: gate has {} elements, expected (B {batches}, d {d}) = {want}",
                g.len()
            )));
        }
    }
    if let Some((dg, scratch)) = dgate.as_ref() {
        let need = residual_bwd_scratch_len(rows, d, rows_per_batch);
        if gate.is_none() || dg.len() != want || scratch.len() < need {
            return Err(Error::Shape(format!(
                "residual backward: dgate needs a gate; dgate has {} elements (expected {want}), \
                 scratch {} (needs {need})",
                dg.len(),
                scratch.len()
            )));
        }
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
    match gate {
        Some(g) => b.arg(g),
        None => b.arg(&null),
    };
    b.arg(&rows_i)
        .arg(&d_i)
        .arg(&rpb_i)
        .arg(&p)
        .arg(&seed)
        .arg(&offset);
    // SAFETY: argument order and types match the kernel signature (u64 seed and offset are
    // uint64_t); dbranch, dh, branch hold rows*d elements, gate B*d, scratch at least
    // B*chunks*d, as checked above; blockIdx.y < B*chunks names a row chunk inside one batch
    // and the unit loop stays below d.
    unsafe { b.launch(cfg) }?;

    if let Some((dg, scratch)) = dgate {
        let f = gpu.function(MODULE, "residual_bwd_reduce_f32")?;
        let (batches_i, chunks_i) = (batches as i32, chunks as i32);
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(32) as u32, batches as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(dg)
            .arg(&*scratch)
            .arg(&batches_i)
            .arg(&chunks_i)
            .arg(&d_i);
        // SAFETY: dgate holds B*d elements and scratch the B*chunks*d partials the first kernel
        // wrote on the same stream; columns >= d are skipped inside the kernel.
        unsafe { b.launch(cfg) }?;
    }
    Ok(())
}

/// CPU twin of the kernels: the same Philox decisions ([`crate::rng::dropout_keep`]), f64 maths.
pub mod cpu {
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

    /// `h += gate[b] · dropout_p(branch)` in place over rows of width `d`; `branch` holds the
    /// bf16 values as f32. As in the kernel, the scale 1/(1-p) is an f32 division and
    /// `branch · scale` is rounded to f32; the gated add is then done in f64 and rounded once
    /// (the kernel's fma), so a large stream cancelling a large branch compares tightly.
    /// Generic over [`Real`] so the finite-difference tests can run the same code in f64.
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
        let scale = 1.0f32 / (1.0 - p);
        h.par_chunks_mut(d).enumerate().for_each(|(r, hr)| {
            let b = r / rows_per_batch;
            for (j, x) in hr.iter_mut().enumerate() {
                let i = r * d + j;
                if p > 0.0 && !dropout_keep(seed, offset, i as u64, p) {
                    continue;
                }
                let g = gate.map_or(1.0, |g| g[b * d + j].to_f64());
                *x = T::from_f64(x.to_f64() + g * branch[i].scaled(scale));
            }
        });
    }

    /// The backward with the kernels' rules: `dbranch = gate · keep · scale · dh` (written) and
    /// `dgate += Σ_{rows of b} dh · keep · f32(branch · scale)` (f64 sums) when given (needs
    /// `gate`). `dh` is the residual-stream gradient (unchanged: the skip path's gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn residual_bwd(
        dbranch: &mut [f32],
        dgate: Option<&mut [f32]>,
        dh: &[f32],
        branch: &[f32],
        gate: Option<&[f32]>,
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
                let g = gate.map_or(1.0, |g| g[b * d + j] as f64);
                *v = if keep(i) {
                    (g * scale as f64 * dh[i] as f64) as f32
                } else {
                    0.0
                };
            }
        });
        if let Some(dg) = dgate {
            dg.par_iter_mut().enumerate().for_each(|(bj, v)| {
                let (b, j) = (bj / d, bj % d);
                let s: f64 = (b * rows_per_batch..(b + 1) * rows_per_batch)
                    .map(|r| r * d + j)
                    .filter(|&i| keep(i))
                    .map(|i| dh[i] as f64 * (branch[i] * scale) as f64)
                    .sum();
                *v = (*v as f64 + s) as f32;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gpu_for_tests;
    use crate::cuda::ops::grad_check::{
        assert_bits_eq, assert_close_scaled, assert_grad, f64s, fd_grad,
    };
    use crate::rng::dropout_keep;
    use crate::testing::{assert_close, Tol};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rayon::prelude::*;

    /// Seeded uniform values in [lo, hi), generated in parallel chunks.
    fn rand_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
            ch.iter_mut().for_each(|x| *x = rng.random_range(lo..hi));
        });
        v
    }

    fn bf16_round(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
    }

    /// Runs the kernel on host data and returns the updated h.
    #[allow(clippy::too_many_arguments)]
    fn run_gpu(
        gpu: &Gpu,
        h: &[f32],
        branch: &[f32],
        gate: Option<&[f32]>,
        d: usize,
        rpb: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Vec<f32> {
        let s = &gpu.stream;
        let mut dh = s.clone_htod(h).unwrap();
        let bb: Vec<bf16> = branch.iter().map(|&x| bf16::from_f32(x)).collect();
        let db = s.clone_htod(&bb).unwrap();
        let dg = gate.map(|g| s.clone_htod(g).unwrap());
        let rows = h.len() / d;
        residual_fwd(
            gpu,
            &mut dh,
            &db,
            dg.as_ref(),
            rows,
            d,
            rpb,
            p,
            seed,
            offset,
        )
        .unwrap();
        s.clone_dtoh(&dh).unwrap()
    }

    #[test]
    fn gpu_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        let (seed, offset) = (0x1234_5678_9abc_def0_u64, 3u64 << 32 | 17);
        // (batch, len, d): DiT-small OWT and LM1B, then awkward ones (d % 8 != 0 takes the
        // scalar path; L in 1, 7, 129).
        for &(bsz, len, d) in &[
            (32, 1024, 768),
            (512, 128, 768),
            (1, 1, 768),
            (1, 7, 130),
            (2, 129, 64),
            (3, 129, 36),
            (2, 7, 6),
        ] {
            let rows = bsz * len;
            let h = rand_vec(rows as u64, rows * d, -2.0, 2.0);
            let branch = bf16_round(rand_vec(d as u64, rows * d, -1.0, 1.0));
            let gate = rand_vec(7, bsz * d, -1.5, 1.5);
            for (p, gated) in [(0.0f32, true), (0.1, true), (0.1, false), (0.5, true)] {
                let g = gated.then_some(&gate[..]);
                let got = run_gpu(&gpu, &h, &branch, g, d, len, p, seed, offset);
                let mut want = h.clone();
                cpu::residual_fwd(&mut want, &branch, g, d, len, p, seed, offset);
                let tag = format!("B{bsz} L{len} D{d} p {p} gate {gated}");
                assert_close(&format!("residual {tag}"), &got, &want, Tol::F32);
            }
        }
        // Large magnitude: a big residual stream and big branch values.
        let (rows, d) = (2 * 33, 768);
        let h = rand_vec(1, rows * d, -3e4, 3e4);
        let branch = bf16_round(rand_vec(2, rows * d, -3e3, 3e3));
        let gate = rand_vec(3, 2 * d, -2.0, 2.0);
        let got = run_gpu(&gpu, &h, &branch, Some(&gate), d, 33, 0.1, 5, 6);
        let mut want = h.clone();
        cpu::residual_fwd(&mut want, &branch, Some(&gate), d, 33, 0.1, 5, 6);
        assert_close("residual large", &got, &want, Tol::F32);
    }

    /// The kernel's dropped set must be exactly the twin's, on both the vector path (d % 8 ==
    /// 0) and the scalar one; and the kept fraction must be binomial.
    #[test]
    fn gpu_dropout_mask_is_the_twins_exactly() {
        let Some(gpu) = gpu_for_tests() else { return };
        for &(rows, d, p, seed, offset) in &[
            (32 * 1024, 768, 0.1f32, 42u64, 0u64),
            (32 * 1024, 768, 0.5, u64::MAX - 3, 1 << 40 | 9),
            (129, 130, 0.1, 7, 11),
            (7, 6, 0.9, 8, 12),
        ] {
            let n = rows * d;
            // h = 0, gate 1, branch never 0: an element is 0 afterwards iff it was dropped.
            let branch: Vec<f32> = rand_vec(n as u64, n, 0.5, 2.0)
                .into_iter()
                .enumerate()
                .map(|(i, x)| bf16::from_f32(if i % 3 == 0 { -x } else { x }).to_f32())
                .collect();
            let got = run_gpu(&gpu, &vec![0.0; n], &branch, None, d, rows, p, seed, offset);
            let keep: Vec<bool> = (0..n as u64)
                .into_par_iter()
                .map(|i| dropout_keep(seed, offset, i, p))
                .collect();
            let wrong: Vec<usize> = (0..n).filter(|&i| (got[i] != 0.0) != keep[i]).collect();
            assert!(
                wrong.is_empty(),
                "rows {rows} d {d} p {p}: {} elements disagree with the twin's mask, first at {} \
                 (got {}, twin keeps: {})",
                wrong.len(),
                wrong[0],
                got[wrong[0]],
                keep[wrong[0]]
            );
            let kept = keep.iter().filter(|&&k| k).count() as f64;
            let sigma = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
            let dev = (kept - n as f64 * (1.0 - p as f64)).abs();
            assert!(
                dev <= 5.0 * sigma,
                "p {p}: kept {kept} of {n}, {dev:.0} > 5 sigma {sigma:.0}"
            );
        }
    }

    #[test]
    fn gpu_rejects_bad_shapes_and_probabilities() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let mut h = s.alloc_zeros::<f32>(4 * 8).unwrap();
        let branch = s.alloc_zeros::<bf16>(4 * 8).unwrap();
        let gate = s.alloc_zeros::<f32>(8).unwrap();
        let shape_errs = [
            residual_fwd(&gpu, &mut h, &branch, None, 5, 8, 5, 0.0, 0, 0),
            residual_fwd(&gpu, &mut h, &branch, None, 4, 8, 3, 0.0, 0, 0),
            residual_fwd(&gpu, &mut h, &branch, Some(&gate), 4, 8, 2, 0.0, 0, 0),
        ];
        for r in shape_errs {
            assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        }
        for p in [1.0f32, -0.1, f32::NAN] {
            let r = residual_fwd(&gpu, &mut h, &branch, Some(&gate), 4, 8, 4, p, 0, 0);
            assert!(matches!(r, Err(Error::Config(_))), "p {p}: {r:?}");
        }
    }

    #[test]
    fn twin_gated_add_and_unbiased_dropout() {
        // p = 0: the plain gated add, gate picked by batch row.
        let (d, rpb) = (3, 2);
        let mut h = vec![1.0f32; 4 * d];
        let branch: Vec<f32> = (0..4 * d).map(|i| i as f32).collect();
        let gate = [1.0, 2.0, 3.0, -1.0, -2.0, -3.0];
        cpu::residual_fwd(&mut h, &branch, Some(&gate), d, rpb, 0.0, 0, 0);
        assert_eq!(&h[..6], &[1.0, 3.0, 7.0, 4.0, 9.0, 16.0]);
        assert_eq!(&h[6..], &[-5.0, -13.0, -23.0, -8.0, -19.0, -32.0]);
        // p > 0: dropped elements stay put, kept ones add branch/(1-p), and the mean factor is
        // 1 (inverted dropout is unbiased): 5 sigma of sqrt(p/(1-p)/n).
        let (n, p) = (1usize << 20, 0.25f32);
        let mut h = vec![0.0f32; n];
        cpu::residual_fwd(&mut h, &vec![1.0; n], None, 1024, 1024, p, 9, 10);
        let scale = 1.0 / (1.0 - p);
        assert!(h.iter().enumerate().all(|(i, &x)| {
            x == if dropout_keep(9, 10, i as u64, p) {
                scale
            } else {
                0.0
            }
        }));
        let mean = h.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let sd = (p as f64 / (1.0 - p as f64) / n as f64).sqrt();
        assert!((mean - 1.0).abs() < 5.0 * sd, "mean factor {mean}");
    }

    // ---- backward ----------------------------------------------------------------------------

    #[test]
    fn twin_bwd_matches_finite_differences() {
        // F = Σ G ⊙ h_out with h_out = residual_fwd(h, branch, gate) run in f64: dF/dbranch =
        // dbranch and dF/dgate = dgate with dh = G.
        let (seed, offset) = (77u64, 5u64);
        for &(rows, d, rpb, p, gated) in &[
            (6, 8, 3, 0.0f32, true),
            (6, 8, 6, 0.3, true),
            (5, 7, 1, 0.5, true),
            (4, 5, 2, 0.25, false),
            (1, 1, 1, 0.0, true),
        ] {
            let g = rand_vec(rows as u64 + 1, rows * d, -1.0, 1.0);
            let branch = bf16_round(rand_vec(rows as u64 + 2, rows * d, -1.0, 1.0));
            let gate = rand_vec(rows as u64 + 3, rows / rpb * d, -1.5, 1.5);
            let h0 = rand_vec(rows as u64 + 4, rows * d, -2.0, 2.0);
            let dg0 = rand_vec(rows as u64 + 5, rows / rpb * d, -1.0, 1.0);
            let gt = gated.then_some(&gate[..]);
            let mut dbranch = vec![0f32; rows * d];
            let mut dg = dg0.clone();
            let dgo = gated.then_some(&mut dg[..]);
            cpu::residual_bwd(&mut dbranch, dgo, &g, &branch, gt, d, rpb, p, seed, offset);
            let f = |br: &[f64], ga: &[f64]| -> f64 {
                let mut h = f64s(&h0);
                let gs = gated.then_some(ga);
                cpu::residual_fwd(&mut h, br, gs, d, rpb, p, seed, offset);
                h.iter().zip(&g).map(|(a, b)| a * *b as f64).sum()
            };
            let (br64, ga64) = (f64s(&branch), f64s(&gate));
            let tol = Tol {
                abs: 1e-6,
                rel: 1e-6,
            };
            let tag = format!("rows {rows} d {d} rpb {rpb} p {p} gate {gated}");
            let fd = fd_grad(|v| f(v, &ga64), &br64, 1e-3, None);
            assert_grad(
                &format!("residual dbranch {tag}"),
                &f64s(&dbranch),
                &fd,
                tol,
            );
            if gated {
                let fd = fd_grad(|v| f(&br64, v), &ga64, 1e-3, None);
                let delta: Vec<f64> = dg.iter().zip(&dg0).map(|(a, b)| (a - b) as f64).collect();
                assert_grad(&format!("residual dgate {tag}"), &delta, &fd, tol);
            } else {
                assert_eq!(dg, dg0, "no gate: dgate untouched");
            }
        }
    }

    /// Runs the GPU backward; returns (dbranch, dgate) read back (dgate starts at `dg0`).
    #[allow(clippy::too_many_arguments)]
    fn run_bwd(
        gpu: &Gpu,
        dh: &[f32],
        branch: &[f32],
        gate: Option<&[f32]>,
        dg0: Option<&[f32]>,
        d: usize,
        rpb: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let (rows, s) = (dh.len() / d, &gpu.stream);
        let ddh = s.clone_htod(dh).unwrap();
        let bb: Vec<bf16> = branch.iter().map(|&x| bf16::from_f32(x)).collect();
        let dbr = s.clone_htod(&bb).unwrap();
        let dgate = gate.map(|g| s.clone_htod(g).unwrap());
        let mut dbranch = s.alloc_zeros::<bf16>(rows * d).unwrap();
        let mut dg = dg0.map(|v| s.clone_htod(v).unwrap());
        let mut scratch = s
            .alloc_zeros::<f32>(residual_bwd_scratch_len(rows, d, rpb))
            .unwrap();
        let grads = dg.as_mut().map(|g| (g, &mut scratch));
        residual_bwd(
            gpu,
            &mut dbranch,
            grads,
            &ddh,
            &dbr,
            dgate.as_ref(),
            rows,
            d,
            rpb,
            p,
            seed,
            offset,
        )
        .unwrap();
        let out: Vec<f32> = s
            .clone_dtoh(&dbranch)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        (out, dg.map(|g| s.clone_dtoh(&g).unwrap()))
    }

    #[test]
    fn gpu_bwd_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        let (seed, offset) = (0x1234_5678_9abc_def0_u64, 3u64 << 32 | 17);
        // (batch, len, d): DiT-small OWT, then awkward ones (d % 8 != 0 takes the scalar path;
        // L in 1, 7, 129); rows_per_batch = len (per-sample gates) and rows (the DiT's shared
        // modulation row).
        for &(bsz, len, d) in &[
            (8, 1024, 768),
            (1, 1, 768),
            (1, 7, 130),
            (2, 129, 64),
            (3, 129, 36),
            (2, 7, 6),
        ] {
            let rows = bsz * len;
            let dh = rand_vec(rows as u64, rows * d, -2.0, 2.0);
            let branch = bf16_round(rand_vec(d as u64, rows * d, -1.0, 1.0));
            for rpb in [len, rows] {
                let gate = rand_vec(7, rows / rpb * d, -1.5, 1.5);
                let dg0 = rand_vec(8, rows / rpb * d, -1.0, 1.0);
                for (p, gated) in [(0.0f32, true), (0.1, true), (0.1, false), (0.5, true)] {
                    let g = gated.then_some(&gate[..]);
                    let d0 = gated.then_some(&dg0[..]);
                    let (got, got_dg) = run_bwd(&gpu, &dh, &branch, g, d0, d, rpb, p, seed, offset);
                    let mut want = vec![0f32; rows * d];
                    let mut want_dg = dg0.clone();
                    let wd = gated.then_some(&mut want_dg[..]);
                    cpu::residual_bwd(&mut want, wd, &dh, &branch, g, d, rpb, p, seed, offset);
                    let tag = format!("B{bsz} L{len} D{d} rpb {rpb} p {p} gate {gated}");
                    assert_close(
                        &format!("residual bwd dbranch {tag}"),
                        &got,
                        &want,
                        Tol::BF16,
                    );
                    // Dropped elements are exactly 0, kept ones never (dh is never 0 here).
                    for (i, &v) in got.iter().enumerate() {
                        let keep = p == 0.0 || dropout_keep(seed, offset, i as u64, p);
                        let gi = g.map_or(1.0, |g| g[(i / d / rpb) * d + i % d]);
                        assert!(
                            (v == 0.0) == (!keep || gi == 0.0 || dh[i] == 0.0),
                            "{tag}: element {i} = {v}, twin keeps: {keep}"
                        );
                    }
                    if gated {
                        let scale = 1.0f32 / (1.0 - p);
                        let mut sc: Vec<f64> = dg0.iter().map(|v| v.abs() as f64).collect();
                        for i in 0..rows * d {
                            if p == 0.0 || dropout_keep(seed, offset, i as u64, p) {
                                sc[(i / d / rpb) * d + i % d] +=
                                    (dh[i] as f64 * (branch[i] * scale) as f64).abs();
                            }
                        }
                        assert_close_scaled(
                            &format!("residual bwd dgate {tag}"),
                            &got_dg.unwrap(),
                            &want_dg,
                            &sc,
                            2e-5,
                        );
                    } else {
                        assert!(got_dg.is_none());
                    }
                }
            }
        }
    }

    #[test]
    fn gpu_bwd_is_bitwise_deterministic() {
        let Some(gpu) = gpu_for_tests() else { return };
        let (rows, d) = (8 * 1024, 768);
        let dh = rand_vec(1, rows * d, -2.0, 2.0);
        let branch = bf16_round(rand_vec(2, rows * d, -1.0, 1.0));
        let gate = rand_vec(3, d, -1.5, 1.5);
        let dg0 = vec![0f32; d];
        let run = || {
            run_bwd(
                &gpu,
                &dh,
                &branch,
                Some(&gate),
                Some(&dg0),
                d,
                rows,
                0.1,
                4,
                5,
            )
        };
        let (a, b) = (run(), run());
        assert_bits_eq("residual bwd dbranch run-to-run", &a.0, &b.0);
        assert_bits_eq(
            "residual bwd dgate run-to-run",
            &a.1.unwrap(),
            &b.1.unwrap(),
        );
    }

    #[test]
    fn gpu_bwd_rejects_bad_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let mut dbranch = s.alloc_zeros::<bf16>(4 * 8).unwrap();
        let dh = s.alloc_zeros::<f32>(4 * 8).unwrap();
        let branch = s.alloc_zeros::<bf16>(4 * 8).unwrap();
        let gate = s.alloc_zeros::<f32>(8).unwrap();
        let mut dg = s.alloc_zeros::<f32>(8).unwrap();
        let mut scratch = s.alloc_zeros::<f32>(8).unwrap();
        // dgate without a gate.
        let r = residual_bwd(
            &gpu,
            &mut dbranch,
            Some((&mut dg, &mut scratch)),
            &dh,
            &branch,
            None,
            4,
            8,
            4,
            0.0,
            0,
            0,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        let r = residual_bwd(
            &gpu,
            &mut dbranch,
            None,
            &dh,
            &branch,
            Some(&gate),
            4,
            8,
            3,
            0.0,
            0,
            0,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        let r = residual_bwd(
            &gpu,
            &mut dbranch,
            None,
            &dh,
            &branch,
            Some(&gate),
            4,
            8,
            4,
            1.0,
            0,
            0,
        );
        assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    }
}
