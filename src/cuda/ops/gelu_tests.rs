//! Tests of `gelu`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::testing::grad::{assert_bits_eq, assert_close_scaled, assert_grad, f64s, fd_grad};
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

// ---- backward ----------------------------------------------------------------------------

#[test]
fn twin_grad_matches_finite_differences() {
    // The derivative formulas against f64 central differences of the twin's GELU, over the
    // curved region and the tails.
    let tol = Tol {
        abs: 1e-8,
        rel: 1e-7,
    };
    for kind in [GeluKind::Tanh, GeluKind::Exact] {
        let xs: Vec<f64> = (-1200..=1200).map(|i| i as f64 * 0.01).collect();
        let got: Vec<f64> = xs.iter().map(|&x| cpu::gelu_grad(kind, x)).collect();
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| {
                let h = 1e-5;
                (cpu::gelu(kind, x + h) - cpu::gelu(kind, x - h)) / (2.0 * h)
            })
            .collect();
        assert_grad(&format!("gelu' {kind:?}"), &got, &want, tol);
    }
}

#[test]
fn twin_bwd_matches_finite_differences() {
    // F = Σ G ⊙ GELU(x + bias): dF/dx = dx, dF/dbias = dbias.
    for &(rows, n, with_bias) in &[(5, 7, true), (3, 8, false), (1, 1, true)] {
        let x = rand_bf16(rows as u64, rows * n, -4.0, 4.0);
        let g = rand_bf16(n as u64 + 9, rows * n, -1.0, 1.0);
        let bias = rand_bf16(3, n, -1.0, 1.0);
        for kind in [GeluKind::Tanh, GeluKind::Exact] {
            let bi = with_bias.then_some(&bias[..]);
            let mut dx = vec![0f32; rows * n];
            let db0: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            let mut db = db0.clone();
            cpu::gelu_bwd(kind, &mut dx, Some(&mut db), &g, &x, bi, n);
            let f = |xv: &[f64], bv: &[f64]| -> f64 {
                (0..rows * n)
                    .map(|i| g[i] as f64 * cpu::gelu(kind, xv[i] + bv[i % n]))
                    .sum()
            };
            let (x64, b64) = (f64s(&x), if with_bias { f64s(&bias) } else { vec![0.0; n] });
            let tol = Tol {
                abs: 1e-6,
                rel: 1e-6,
            };
            let tag = format!("{kind:?} rows {rows} n {n} bias {with_bias}");
            let fd = fd_grad(|v| f(v, &b64), &x64, 1e-5, None);
            assert_grad(&format!("gelu dx {tag}"), &f64s(&dx), &fd, tol);
            let fd = fd_grad(|v| f(&x64, v), &b64, 1e-5, None);
            let ddb: Vec<f64> = db.iter().zip(&db0).map(|(a, b)| (a - b) as f64).collect();
            assert_grad(&format!("gelu dbias {tag}"), &ddb, &fd, tol);
        }
    }
}

/// The kernel's tanh-form derivative (sigmoid form, |x| > 10 clamp) emulated in f32 against
/// the textbook derivative over the bf16 range that matters and far beyond.
#[test]
fn kernel_tanh_grad_rewrite_matches_definition() {
    let kernel = |x: f32| -> f32 {
        if x.abs() > 10.0 {
            return if x > 0.0 { 1.0 } else { 0.0 };
        }
        let x2 = x * x;
        let u = 0.797_884_6_f32 * x * (1.0 + 0.044715 * x2);
        let e = (-2.0 * u).exp();
        let s = 1.0 / (1.0 + e);
        let oms = e * s;
        let du = 0.797_884_6_f32 * (1.0 + 3.0 * 0.044715 * x2);
        s + 2.0 * x * du * s * oms
    };
    for i in -30000..=30000 {
        let x = i as f32 * 1e-3;
        let (got, want) = (kernel(x) as f64, cpu::gelu_grad(GeluKind::Tanh, x as f64));
        assert!(
            (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
            "x {x}: {got} vs {want}"
        );
    }
    for x in [-3e38f32, -1e13, -10.001, 10.001, 1e13, 3e38] {
        let (got, want) = (kernel(x) as f64, cpu::gelu_grad(GeluKind::Tanh, x as f64));
        assert!((got - want).abs() <= 1e-6, "x {x}: {got} vs {want}");
    }
}

/// Runs the GPU backward; returns (dx, dbias) read back (dbias starts at `db0`).
#[allow(clippy::too_many_arguments)]
fn run_bwd(
    gpu: &Gpu,
    kind: GeluKind,
    dy: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    db0: Option<&[f32]>,
    n: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (rows, s) = (x.len() / n, &gpu.stream);
    let (ddy, dxin) = (
        s.clone_htod(&to_bf16(dy)).unwrap(),
        s.clone_htod(&to_bf16(x)).unwrap(),
    );
    let db = bias.map(|b| s.clone_htod(b).unwrap());
    let mut dx = s.alloc_zeros::<bf16>(x.len()).unwrap();
    let mut dbias = db0.map(|v| s.clone_htod(v).unwrap());
    let mut scratch = s.alloc_zeros::<f32>(gelu_bwd_scratch_len(rows, n)).unwrap();
    let grads = dbias.as_mut().map(|d| (d, &mut scratch));
    gelu_bwd(gpu, kind, &mut dx, grads, &ddy, &dxin, db.as_ref(), rows, n).unwrap();
    let dx: Vec<f32> = s
        .clone_dtoh(&dx)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    (dx, dbias.map(|d| s.clone_dtoh(&d).unwrap()))
}

/// Σ_rows |dy GELU'(x + bias)| + |db0| per column: the scale of the f32 bias-gradient sums.
fn dbias_scale(
    kind: GeluKind,
    dy: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    db0: &[f32],
    n: usize,
) -> Vec<f64> {
    let mut sc: Vec<f64> = db0.iter().map(|v| v.abs() as f64).collect();
    for i in 0..x.len() {
        let b = bias.map_or(0.0, |b| b[i % n] as f64);
        sc[i % n] += (dy[i] as f64 * cpu::gelu_grad(kind, x[i] as f64 + b)).abs();
    }
    sc
}

#[test]
fn gpu_bwd_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (rows, n): the DiT-small MLP (4D = 3072), then awkward shapes (n not % 8: scalar path;
    // rows not a multiple of the 64-row chunk; a single row).
    for &(rows, n) in &[
        (8 * 1024, 3072),
        (129, 3072),
        (1, 3072),
        (7, 130),
        (129, 36),
        (33, 1001),
    ] {
        let x = rand_bf16(rows as u64 + 1, rows * n, -6.0, 6.0);
        let dy = rand_bf16(rows as u64 + 2, rows * n, -1.0, 1.0);
        let bias = rand_bf16(n as u64, n, -1.0, 1.0);
        let db0 = rand_bf16(n as u64 + 5, n, -1.0, 1.0);
        for kind in [GeluKind::Tanh, GeluKind::Exact] {
            for with_bias in [true, false] {
                let bi = with_bias.then_some(&bias[..]);
                let (dx, db) = run_bwd(&gpu, kind, &dy, &x, bi, Some(&db0), n);
                let mut want_dx = vec![0f32; x.len()];
                let mut want_db = db0.clone();
                cpu::gelu_bwd(kind, &mut want_dx, Some(&mut want_db), &dy, &x, bi, n);
                let tag = format!("{kind:?} rows {rows} n {n} bias {with_bias}");
                assert_close(&format!("gelu bwd dx {tag}"), &dx, &want_dx, Tol::BF16);
                let sc = dbias_scale(kind, &dy, &x, bi, &db0, n);
                assert_close_scaled(
                    &format!("gelu bwd dbias {tag}"),
                    &db.unwrap(),
                    &want_db,
                    &sc,
                    2e-5,
                );
            }
            // Without a bias gradient: dx only.
            let (dx, db) = run_bwd(&gpu, kind, &dy, &x, None, None, n);
            assert!(db.is_none());
            let mut want_dx = vec![0f32; x.len()];
            cpu::gelu_bwd(kind, &mut want_dx, None, &dy, &x, None, n);
            assert_close("gelu bwd dx only", &dx, &want_dx, Tol::BF16);
        }
    }
    // Structured: zeros, an arange sweep through the curved region; large magnitude.
    let n = 1024;
    let sweep: Vec<f32> = (0..4 * n)
        .map(|i| bf16::from_f32(-8.0 + i as f32 * 4e-3).to_f32())
        .collect();
    let ones = vec![1f32; 4 * n];
    for x in [vec![0f32; 4 * n], sweep, rand_bf16(9, 4 * n, -3e4, 3e4)] {
        for kind in [GeluKind::Tanh, GeluKind::Exact] {
            let (dx, _) = run_bwd(&gpu, kind, &ones, &x, None, None, n);
            let mut want = vec![0f32; x.len()];
            cpu::gelu_bwd(kind, &mut want, None, &ones, &x, None, n);
            assert_close(
                &format!("gelu bwd structured {kind:?}"),
                &dx,
                &want,
                Tol::BF16,
            );
        }
    }
}

#[test]
fn gpu_bwd_is_bitwise_deterministic() {
    let Some(gpu) = gpu_for_tests() else { return };
    let (rows, n) = (4 * 1024, 3072);
    let x = rand_bf16(1, rows * n, -6.0, 6.0);
    let dy = rand_bf16(2, rows * n, -1.0, 1.0);
    let db0 = vec![0f32; n];
    let a = run_bwd(&gpu, GeluKind::Tanh, &dy, &x, None, Some(&db0), n);
    let b = run_bwd(&gpu, GeluKind::Tanh, &dy, &x, None, Some(&db0), n);
    assert_bits_eq("gelu bwd dx run-to-run", &a.0, &b.0);
    assert_bits_eq("gelu bwd dbias run-to-run", &a.1.unwrap(), &b.1.unwrap());
}

#[test]
fn gpu_bwd_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let (dy, x) = (
        s.alloc_zeros::<bf16>(4 * 8).unwrap(),
        s.alloc_zeros::<bf16>(4 * 8).unwrap(),
    );
    let mut dx = s.alloc_zeros::<bf16>(4 * 8).unwrap();
    let mut db = s.alloc_zeros::<f32>(8).unwrap();
    let mut small = s.alloc_zeros::<f32>(1).unwrap();
    let r1 = gelu_bwd(&gpu, GeluKind::Tanh, &mut dx, None, &dy, &x, None, 4, 9);
    let r2 = gelu_bwd(
        &gpu,
        GeluKind::Exact,
        &mut dx,
        Some((&mut db, &mut small)),
        &dy,
        &x,
        None,
        4,
        8,
    );
    for r in [r1, r2] {
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::define;
    assert_eq!(THREADS as u64, define("gelu.cu", "GELU_THREADS"));
    assert_eq!(BWD_THREADS as u64, define("gelu.cu", "GELU_BWD_THREADS"));
    assert_eq!(BWD_ROWS as u64, define("gelu.cu", "GELU_BWD_ROWS"));
    let red = define("common.cuh", "IMDM_RED_WARPS") * define("common.cuh", "IMDM_WARP");
    assert_eq!(RED_THREADS as u64, red);
}
