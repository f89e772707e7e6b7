//! Bias + GELU over a bf16 matrix: the only launcher of `kernels/gelu.cu`, its CPU twin and
//! the comparison tests. Maths, shapes and thread mapping: see the kernel's header.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu_for_tests;
    use crate::testing::{assert_close, Tol};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rayon::prelude::*;

    /// Seeded uniform values in [lo, hi), rounded to bf16, generated in parallel chunks.
    fn rand_bf16(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
            ch.iter_mut()
                .for_each(|x| *x = bf16::from_f32(rng.random_range(lo..hi)).to_f32());
        });
        v
    }

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    /// GPU vs twin for `x` (rows, n); checks y and, when `save_pre`, pre.
    fn check(gpu: &Gpu, kind: GeluKind, x: &[f32], bias: Option<&[f32]>, n: usize, save_pre: bool) {
        let rows = x.len() / n;
        let s = &gpu.stream;
        let dx = s.clone_htod(&to_bf16(x)).unwrap();
        let db = bias.map(|b| s.clone_htod(b).unwrap());
        let mut y = s.alloc_zeros::<bf16>(x.len()).unwrap();
        let mut pre = s.alloc_zeros::<bf16>(x.len()).unwrap();
        let p = save_pre.then_some(&mut pre);
        gelu_fwd(gpu, kind, &mut y, p, &dx, db.as_ref(), rows, n).unwrap();
        let back = |b: &CudaSlice<bf16>| -> Vec<f32> {
            s.clone_dtoh(b)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect()
        };
        let (y_ref, pre_ref) = cpu::gelu_fwd(kind, x, bias, n);
        let tag = format!(
            "{kind:?} rows {rows} n {n} bias {} pre {save_pre}",
            bias.is_some()
        );
        assert_close(&format!("gelu y {tag}"), &back(&y), &y_ref, Tol::BF16);
        if save_pre {
            assert_close(&format!("gelu pre {tag}"), &back(&pre), &pre_ref, Tol::BF16);
        } else {
            assert!(
                back(&pre).iter().all(|&v| v == 0.0),
                "pre untouched when not requested"
            );
        }
    }

    #[test]
    fn gpu_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        // (rows, n): the DiT-small MLP (4D = 3072) at OWT and LM1B batches, then awkward shapes
        // (n not % 8, single rows, rows not a multiple of anything).
        for &(rows, n) in &[
            (32 * 1024, 3072),
            (512 * 128, 3072),
            (1, 3072),
            (7, 130),
            (129, 36),
            (33, 1001),
        ] {
            let x = rand_bf16(rows as u64, rows * n, -6.0, 6.0);
            let bias = rand_bf16(n as u64, n, -1.0, 1.0);
            check(&gpu, GeluKind::Tanh, &x, Some(&bias), n, true);
            check(&gpu, GeluKind::Exact, &x, None, n, false);
            if rows < 1000 {
                check(&gpu, GeluKind::Tanh, &x, None, n, false);
                check(&gpu, GeluKind::Exact, &x, Some(&bias), n, true);
            }
        }
        // Structured: zeros, an arange sweep through the curved region; large magnitude.
        let n = 1024;
        let zeros = vec![0f32; 4 * n];
        let sweep: Vec<f32> = (0..4 * n)
            .map(|i| bf16::from_f32(-8.0 + i as f32 * 4e-3).to_f32())
            .collect();
        let big = rand_bf16(9, 4 * n, -3e4, 3e4);
        for x in [&zeros, &sweep, &big] {
            for kind in [GeluKind::Tanh, GeluKind::Exact] {
                check(&gpu, kind, x, None, n, true);
            }
        }
    }

    #[test]
    fn gpu_rejects_bad_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let x = s.alloc_zeros::<bf16>(4 * 8).unwrap();
        let mut y = s.alloc_zeros::<bf16>(4 * 8).unwrap();
        let mut pre = s.alloc_zeros::<bf16>(3 * 8).unwrap();
        let bias = s.alloc_zeros::<f32>(7).unwrap();
        let r1 = gelu_fwd(&gpu, GeluKind::Tanh, &mut y, None, &x, None, 4, 9);
        let r2 = gelu_fwd(&gpu, GeluKind::Tanh, &mut y, Some(&mut pre), &x, None, 4, 8);
        let r3 = gelu_fwd(&gpu, GeluKind::Exact, &mut y, None, &x, Some(&bias), 4, 8);
        for r in [r1, r2, r3] {
            assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        }
    }

    #[test]
    fn twin_matches_reference_gelus_and_limits() {
        use crate::model::dit_ref::{gelu_exact, gelu_tanh};
        for i in -800..=800 {
            let x = i as f64 * 0.01;
            assert_eq!(cpu::gelu(GeluKind::Tanh, x), gelu_tanh(x));
            assert_eq!(cpu::gelu(GeluKind::Exact, x), gelu_exact(x));
            // The tanh form approximates the exact one to within 5e-4 everywhere.
            let diff = (cpu::gelu(GeluKind::Tanh, x) - cpu::gelu(GeluKind::Exact, x)).abs();
            assert!(diff < 5e-4, "x {x}: tanh vs exact differ by {diff}");
        }
        for kind in [GeluKind::Tanh, GeluKind::Exact] {
            assert_eq!(cpu::gelu(kind, 0.0), 0.0);
            assert!((cpu::gelu(kind, 30.0) - 30.0).abs() < 1e-12);
            assert!(cpu::gelu(kind, -30.0).abs() < 1e-12);
        }
        let (y, pre) = cpu::gelu_fwd(GeluKind::Exact, &[1.0, -1.0], Some(&[0.5, 0.5]), 2);
        assert_eq!(pre, vec![1.5, -0.5]);
        assert!((y[0] as f64 - gelu_exact(1.5)).abs() < 1e-7);
    }

    /// The kernel evaluates the tanh form as `x / (1 + exp(min(-2u, 80)))` in f32; emulate it
    /// here and check it against the textbook form across the whole bf16 range that matters.
    #[test]
    fn kernel_tanh_rewrite_matches_definition() {
        let kernel = |x: f32| -> f32 {
            let u = 0.797_884_6_f32 * (x + 0.044715 * x * x * x);
            x / (1.0 + (-2.0 * u).min(80.0).exp())
        };
        for i in -20000..=20000 {
            let x = i as f32 * 1e-3;
            let (got, want) = (kernel(x) as f64, cpu::gelu(GeluKind::Tanh, x as f64));
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "x {x}: {got} vs {want}"
            );
        }
        for x in [-3e4f32, -1e13, 1e13, 3e4] {
            let (got, want) = (kernel(x) as f64, cpu::gelu(GeluKind::Tanh, x as f64));
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "x {x}: {got} vs {want}"
            );
        }
    }
}
