//! Gated residual add with Philox dropout: the only launcher of `kernels/residual.cu`, its CPU
//! twin and the comparison tests. Maths, the dropout stream rule, shapes and thread mapping:
//! see the kernel's header; the stream itself is [`crate::rng::dropout_keep`].

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

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

/// CPU twin of the kernel: the same Philox decisions ([`crate::rng::dropout_keep`]), f64 maths.
pub mod cpu {
    use crate::rng::dropout_keep;
    use rayon::prelude::*;

    /// `h += gate[b] · dropout_p(branch)` in place over rows of width `d`; `branch` holds the
    /// bf16 values as f32. As in the kernel, the scale 1/(1-p) is an f32 division and
    /// `branch · scale` is rounded to f32; the gated add is then done in f64 and rounded once
    /// (the kernel's fma), so a large stream cancelling a large branch compares tightly.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_fwd(
        h: &mut [f32],
        branch: &[f32],
        gate: Option<&[f32]>,
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
                let g = gate.map_or(1.0, |g| g[b * d + j] as f64);
                *x = (*x as f64 + g * (branch[i] * scale) as f64) as f32;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu_for_tests;
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
}
