//! LayerNorm (no bias) + adaLN modulate: the only launcher of `kernels/ln_modulate.cu`, its CPU
//! twin and the comparison tests. Maths, shapes and thread mapping: see the kernel's header.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

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

/// CPU twin of the kernel: same maths and outputs, f32 result with f64 statistics.
pub mod cpu {
    use rayon::prelude::*;

    /// Returns (y (rows, d) f32, mean (rows), rstd (rows)).
    pub fn ln_modulate_fwd(
        x: &[f32],
        weight: &[f32],
        modulation: Option<(&[f32], &[f32])>,
        d: usize,
        rows_per_batch: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = x.len() / d;
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![(0f32, 0f32); rows];
        y.par_chunks_mut(d)
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(r, (yr, st))| {
                let xr = &x[r * d..(r + 1) * d];
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                let b = r / rows_per_batch;
                for j in 0..d {
                    let mut z = (xr[j] as f64 - mean) * rstd * weight[j] as f64;
                    if let Some((shift, scale)) = modulation {
                        z = z * (1.0 + scale[b * d + j] as f64) + shift[b * d + j] as f64;
                    }
                    yr[j] = z as f32;
                }
                *st = (mean as f32, rstd as f32);
            });
        let (mean, rstd) = stats.into_iter().unzip();
        (y, mean, rstd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu_for_tests;
    use crate::testing::{assert_close, Tol};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..hi)).collect()
    }

    /// Runs GPU vs twin on one shape; `offset` shifts x to test large-mean rows.
    fn check(gpu: &Gpu, batch: usize, len: usize, d: usize, modulated: bool, offset: f32) {
        let mut rng = ChaCha8Rng::seed_from_u64((batch * 131 + len * 7 + d) as u64);
        let rows = batch * len;
        let x: Vec<f32> = rand_vec(&mut rng, rows * d, -2.0, 2.0)
            .into_iter()
            .map(|v| v + offset)
            .collect();
        let w = rand_vec(&mut rng, d, 0.5, 1.5);
        let shift = rand_vec(&mut rng, batch * d, -0.5, 0.5);
        let scale = rand_vec(&mut rng, batch * d, -0.5, 0.5);
        let m = modulated.then_some((&shift[..], &scale[..]));
        let (y_ref, mean_ref, rstd_ref) = cpu::ln_modulate_fwd(&x, &w, m, d, len);

        let s = &gpu.stream;
        let dx = s.clone_htod(&x).unwrap();
        let dw = s.clone_htod(&w).unwrap();
        let dsh = s.clone_htod(&shift).unwrap();
        let dsc = s.clone_htod(&scale).unwrap();
        let mut out = LnModulateOut::new(gpu, rows, d).unwrap();
        let md = modulated.then_some((&dsh, &dsc));
        ln_modulate_fwd(gpu, &mut out, &dx, &dw, md, rows, d, len).unwrap();
        let y: Vec<f32> = s
            .clone_dtoh(&out.y)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let mean = s.clone_dtoh(&out.mean).unwrap();
        let rstd = s.clone_dtoh(&out.rstd).unwrap();
        let tag = format!("B{batch} L{len} D{d} mod={modulated} offset={offset}");
        assert_close(&format!("ln_modulate y {tag}"), &y, &y_ref, Tol::BF16);
        assert_close(
            &format!("ln_modulate mean {tag}"),
            &mean,
            &mean_ref,
            Tol::F32,
        );
        assert_close(
            &format!("ln_modulate rstd {tag}"),
            &rstd,
            &rstd_ref,
            Tol::F32,
        );
    }

    #[test]
    fn gpu_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        // Real shapes (DiT-small/large widths), awkward ones (L in 1, 7, 129; D not % 4).
        for &(b, l, d) in &[
            (2, 128, 768),
            (1, 1024, 1536),
            (3, 7, 64),
            (1, 1, 256),
            (2, 129, 130),
        ] {
            check(&gpu, b, l, d, true, 0.0);
            check(&gpu, b, l, d, false, 0.0);
        }
        check(&gpu, 2, 33, 768, true, 1000.0);
    }

    #[test]
    fn twin_normalises_rows() {
        // Structured input: an arange row normalises to zero mean, unit variance.
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| i as f32).collect();
        let (y, mean, _) = cpu::ln_modulate_fwd(&x, &vec![1.0; d], None, d, 1);
        assert!((mean[0] - 3.5).abs() < 1e-6);
        let m: f32 = y.iter().sum::<f32>() / d as f32;
        let v: f32 = y.iter().map(|a| a * a).sum::<f32>() / d as f32;
        assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-4, "mean {m} var {v}");
        // Modulation: y = z (1 + scale) + shift.
        let (y2, _, _) = cpu::ln_modulate_fwd(
            &x,
            &vec![1.0; d],
            Some((&vec![0.5; d], &vec![1.0; d])),
            d,
            1,
        );
        for (a, b) in y.iter().zip(&y2) {
            assert!((a * 2.0 + 0.5 - b).abs() < 1e-5);
        }
    }
}
