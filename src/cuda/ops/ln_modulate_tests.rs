//! Tests of `ln_modulate`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::testing::grad::{assert_bits_eq, assert_close_scaled, assert_grad, f64s, fd_grad};
use crate::testing::inputs::rand_f32_from;
use crate::testing::{assert_close, Tol};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Runs GPU vs twin on one shape; `offset` shifts x to test large-mean rows.
fn check(gpu: &Gpu, batch: usize, len: usize, d: usize, modulated: bool, offset: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64((batch * 131 + len * 7 + d) as u64);
    let rows = batch * len;
    let x: Vec<f32> = rand_f32_from(&mut rng, rows * d, -2.0, 2.0)
        .into_iter()
        .map(|v| v + offset)
        .collect();
    let w = rand_f32_from(&mut rng, d, 0.5, 1.5);
    let shift = rand_f32_from(&mut rng, batch * d, -0.5, 0.5);
    let scale = rand_f32_from(&mut rng, batch * d, -0.5, 0.5);
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
    // Real shapes (DiT-small/large widths), awkward ones (L in 1, 7, 129; D not % 4), the
    // register fast path at a partial last float4 column (D = 132, 4) and the generic path
    // above its 1536-wide limit (D = 2048).
    for &(b, l, d) in &[
        (2, 128, 768),
        (1, 1024, 1536),
        (3, 7, 64),
        (1, 1, 256),
        (2, 129, 130),
        (2, 3, 132),
        (1, 2, 4),
        (1, 5, 2048),
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

// ---- backward ----------------------------------------------------------------------------

/// Inputs of one backward problem (host, f32).
struct BwdCase {
    d: usize,
    rpb: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    shift: Vec<f32>,
    scale: Vec<f32>,
    dy: Vec<f32>,
    /// Initial values of the accumulated outputs (the += rule is part of what is tested).
    dx0: Vec<f32>,
    dw0: Vec<f32>,
    dsh0: Vec<f32>,
    dsc0: Vec<f32>,
}

fn bwd_case(seed: u64, rows: usize, d: usize, rpb: usize, offset: f32) -> BwdCase {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b = rows / rpb;
    let x = rand_f32_from(&mut rng, rows * d, -2.0, 2.0)
        .into_iter()
        .map(|v| v + offset)
        .collect();
    BwdCase {
        d,
        rpb,
        x,
        w: rand_f32_from(&mut rng, d, 0.5, 1.5),
        shift: rand_f32_from(&mut rng, b * d, -0.5, 0.5),
        scale: rand_f32_from(&mut rng, b * d, -0.5, 0.5),
        dy: rand_f32_from(&mut rng, rows * d, -1.0, 1.0),
        dx0: rand_f32_from(&mut rng, rows * d, -1.0, 1.0),
        dw0: rand_f32_from(&mut rng, d, -1.0, 1.0),
        dsh0: rand_f32_from(&mut rng, b * d, -1.0, 1.0),
        dsc0: rand_f32_from(&mut rng, b * d, -1.0, 1.0),
    }
}

/// The twin's backward from the twin's saved statistics: (dx, dw, dshift, dscale), each
/// including its initial value.
fn twin_bwd(c: &BwdCase, modulated: bool) -> [Vec<f32>; 4] {
    let m = modulated.then_some((&c.shift[..], &c.scale[..]));
    let (_, mean, rstd) = cpu::ln_modulate_fwd(&c.x, &c.w, m, c.d, c.rpb);
    let (mut dx, mut dw, mut dsh, mut dsc) =
        (c.dx0.clone(), c.dw0.clone(), c.dsh0.clone(), c.dsc0.clone());
    let dm = modulated.then_some((&mut dsh[..], &mut dsc[..]));
    let sc = modulated.then_some(&c.scale[..]);
    cpu::ln_modulate_bwd(
        &mut dx, &mut dw, dm, &mean, &rstd, &c.dy, &c.x, &c.w, sc, c.d, c.rpb,
    );
    [dx, dw, dsh, dsc]
}

#[test]
fn twin_bwd_matches_finite_differences() {
    // F = sum(G * y) with G = dy: its gradient is what the backward computes.
    for &(rows, d, rpb, modulated) in &[
        (6, 8, 3, true),
        (6, 8, 6, true),
        (5, 7, 1, true),
        (4, 5, 2, false),
        (1, 1, 1, true),
    ] {
        let c = bwd_case(rows as u64 * 31 + d as u64, rows, d, rpb, 0.0);
        let [dx, dw, dsh, dsc] = twin_bwd(&c, modulated);
        let (x, w, sh, sc, g) = (
            f64s(&c.x),
            f64s(&c.w),
            f64s(&c.shift),
            f64s(&c.scale),
            f64s(&c.dy),
        );
        let f = |x: &[f64], w: &[f64], sh: &[f64], sc: &[f64]| -> f64 {
            let m = modulated.then_some((sh, sc));
            let (y, _, _) = cpu::ln_modulate_fwd_f64(x, w, m, d, rpb);
            y.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let h = 1e-5;
        let tol = Tol {
            abs: 1e-6,
            rel: 1e-5,
        };
        let delta = |got: &[f32], init: &[f32]| -> Vec<f64> {
            got.iter()
                .zip(init)
                .map(|(&a, &b)| a as f64 - b as f64)
                .collect()
        };
        let tag = format!("rows {rows} d {d} rpb {rpb} mod {modulated}");
        let fd = fd_grad(|v| f(v, &w, &sh, &sc), &x, h, None);
        assert_grad(&format!("ln dx {tag}"), &delta(&dx, &c.dx0), &fd, tol);
        let fd = fd_grad(|v| f(&x, v, &sh, &sc), &w, h, None);
        assert_grad(&format!("ln dweight {tag}"), &delta(&dw, &c.dw0), &fd, tol);
        if modulated {
            let fd = fd_grad(|v| f(&x, &w, v, &sc), &sh, h, None);
            assert_grad(&format!("ln dshift {tag}"), &delta(&dsh, &c.dsh0), &fd, tol);
            let fd = fd_grad(|v| f(&x, &w, &sh, v), &sc, h, None);
            assert_grad(&format!("ln dscale {tag}"), &delta(&dsc, &c.dsc0), &fd, tol);
        } else {
            assert_eq!(dsh, c.dsh0, "no modulation: dshift untouched");
        }
    }
}

#[test]
fn twin_bwd_structured_inputs() {
    // dy = 0: every gradient keeps its initial value exactly.
    let mut c = bwd_case(3, 4, 16, 2, 0.0);
    c.dy.iter_mut().for_each(|v| *v = 0.0);
    let [dx, dw, dsh, dsc] = twin_bwd(&c, true);
    assert_eq!((dx, dw, dsh, dsc), (c.dx0, c.dw0, c.dsh0, c.dsc0));
    // A constant dy along a row is orthogonal to the LayerNorm's image with weight = 1 and
    // no modulation: dx gets nothing (the output is invariant to shifting x).
    let mut c = bwd_case(4, 3, 16, 3, 0.0);
    c.w.iter_mut().for_each(|v| *v = 1.0);
    c.dy.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i / 16) as f32 + 1.0);
    let [dx, ..] = twin_bwd(&c, false);
    for (a, b) in dx.iter().zip(&c.dx0) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

/// Sums of |terms| of dweight, dshift and dscale (tolerance scales for the f32 reductions).
fn param_grad_scales(c: &BwdCase, modulated: bool) -> [Vec<f64>; 3] {
    let (d, rows) = (c.d, c.x.len() / c.d);
    let m = modulated.then_some((&c.shift[..], &c.scale[..]));
    let (_, mean, rstd) = cpu::ln_modulate_fwd(&c.x, &c.w, m, d, c.rpb);
    let (mut sw, mut ssh, mut ssc) = (
        vec![0f64; d],
        vec![0f64; c.scale.len()],
        vec![0f64; c.scale.len()],
    );
    for r in 0..rows {
        let b = r / c.rpb;
        for j in 0..d {
            let xh = ((c.x[r * d + j] - mean[r]) * rstd[r]).abs() as f64;
            let g = c.dy[r * d + j].abs() as f64;
            let s = if modulated {
                (1.0 + c.scale[b * d + j]).abs() as f64
            } else {
                1.0
            };
            sw[j] += g * s * xh;
            ssh[b * d + j] += g;
            ssc[b * d + j] += g * xh * c.w[j].abs() as f64;
        }
    }
    // The initial values are added too.
    for (s, v) in sw.iter_mut().zip(&c.dw0) {
        *s += v.abs() as f64;
    }
    for (s, v) in ssh.iter_mut().zip(&c.dsh0) {
        *s += v.abs() as f64;
    }
    for (s, v) in ssc.iter_mut().zip(&c.dsc0) {
        *s += v.abs() as f64;
    }
    [sw, ssh, ssc]
}

/// Runs the GPU backward on `c` with the twin's saved statistics; returns (dx, dw, dshift,
/// dscale) read back.
fn gpu_bwd(gpu: &Gpu, c: &BwdCase, modulated: bool) -> [Vec<f32>; 4] {
    let (d, rows) = (c.d, c.x.len() / c.d);
    let m = modulated.then_some((&c.shift[..], &c.scale[..]));
    let (_, mean, rstd) = cpu::ln_modulate_fwd(&c.x, &c.w, m, d, c.rpb);
    let s = &gpu.stream;
    let up = |v: &[f32]| s.clone_htod(v).unwrap();
    let (mut dx, mut dw, mut dsh, mut dsc) = (up(&c.dx0), up(&c.dw0), up(&c.dsh0), up(&c.dsc0));
    let mut scratch = s
        .alloc_zeros::<f32>(ln_modulate_bwd_scratch_len(rows, d, c.rpb))
        .unwrap();
    let (dmean, drstd, ddy, dxin, dwt, dscale) = (
        up(&mean),
        up(&rstd),
        up(&c.dy),
        up(&c.x),
        up(&c.w),
        up(&c.scale),
    );
    let dm = modulated.then_some((&mut dsh, &mut dsc));
    let sc = modulated.then_some(&dscale);
    ln_modulate_bwd(
        gpu,
        &mut dx,
        &mut dw,
        dm,
        &mut scratch,
        &dmean,
        &drstd,
        &ddy,
        &dxin,
        &dwt,
        sc,
        rows,
        d,
        c.rpb,
    )
    .unwrap();
    let down = |v: &CudaSlice<f32>| s.clone_dtoh(v).unwrap();
    [down(&dx), down(&dw), down(&dsh), down(&dsc)]
}

/// dx: O(1) values from f32 sums over D (about 1e-6 error at D = 1536) added to an O(1)
/// initial value; abs 5e-5 leaves a wide margin while catching any wrong term.
const TOL_DX: Tol = Tol {
    abs: 5e-5,
    rel: 1e-5,
};
/// Parameter gradients: f32 sums of up to 32 + rows/32/8 + 8 terms in sequence; 2e-5 of the
/// sum of |terms| bounds that with margin at every tested size.
const REL_PARAM: f64 = 2e-5;

#[test]
fn gpu_bwd_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (batch, len, d, rows_per_batch = len or all rows): the DiT shares one modulation row
    // (rows_per_batch = rows); real widths; awkward L in 1, 7, 129 and D not % 4.
    for &(b, l, d) in &[
        (2, 128, 768),
        (1, 1024, 1536),
        (4, 1024, 768),
        (3, 7, 64),
        (1, 1, 256),
        (2, 129, 130),
        (5, 1, 33),
    ] {
        let rows = b * l;
        for rpb in [l, rows] {
            for modulated in [true, false] {
                let c = bwd_case((rows * 7 + d + rpb) as u64, rows, d, rpb, 0.0);
                let got = gpu_bwd(&gpu, &c, modulated);
                let want = twin_bwd(&c, modulated);
                let scales = param_grad_scales(&c, modulated);
                let tag = format!("B{b} L{l} D{d} rpb {rpb} mod {modulated}");
                assert_close(&format!("ln bwd dx {tag}"), &got[0], &want[0], TOL_DX);
                assert_close_scaled(
                    &format!("ln bwd dweight {tag}"),
                    &got[1],
                    &want[1],
                    &scales[0],
                    REL_PARAM,
                );
                if modulated {
                    for (k, name) in [(2, "dshift"), (3, "dscale")] {
                        assert_close_scaled(
                            &format!("ln bwd {name} {tag}"),
                            &got[k],
                            &want[k],
                            &scales[k - 1],
                            REL_PARAM,
                        );
                    }
                } else {
                    assert_eq!(got[2], c.dsh0, "no modulation: dshift untouched");
                    assert_eq!(got[3], c.dsc0, "no modulation: dscale untouched");
                }
            }
        }
    }
    // Large-mean rows (the statistics' precision case).
    let c = bwd_case(11, 2 * 33, 768, 33, 1000.0);
    let (got, want) = (gpu_bwd(&gpu, &c, true), twin_bwd(&c, true));
    assert_close("ln bwd dx offset 1000", &got[0], &want[0], TOL_DX);
    let scales = param_grad_scales(&c, true);
    assert_close_scaled("ln bwd dw offset", &got[1], &want[1], &scales[0], REL_PARAM);
}

#[test]
fn gpu_bwd_is_bitwise_deterministic() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = bwd_case(5, 4 * 1024, 768, 4 * 1024, 0.0);
    let a = gpu_bwd(&gpu, &c, true);
    let b = gpu_bwd(&gpu, &c, true);
    for k in 0..4 {
        assert_bits_eq(&format!("ln bwd run-to-run output {k}"), &a[k], &b[k]);
    }
}

#[test]
fn gpu_bwd_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let z = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (rows, d) = (4, 8);
    let (mut dx, mut dw, mut scratch) = (z(rows * d), z(d), z(1));
    let (mean, rstd, dy, x, w, sc) = (z(rows), z(rows), z(rows * d), z(rows * d), z(d), z(d));
    // Scratch too small.
    let r = ln_modulate_bwd(
        &gpu,
        &mut dx,
        &mut dw,
        None,
        &mut scratch,
        &mean,
        &rstd,
        &dy,
        &x,
        &w,
        None,
        rows,
        d,
        rows,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let mut scratch = z(ln_modulate_bwd_scratch_len(rows, d, rows));
    // scale without dmodulation.
    let r = ln_modulate_bwd(
        &gpu,
        &mut dx,
        &mut dw,
        None,
        &mut scratch,
        &mean,
        &rstd,
        &dy,
        &x,
        &w,
        Some(&sc),
        rows,
        d,
        rows,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // rows not a multiple of rows_per_batch.
    let r = ln_modulate_bwd(
        &gpu,
        &mut dx,
        &mut dw,
        None,
        &mut scratch,
        &mean,
        &rstd,
        &dy,
        &x,
        &w,
        None,
        rows,
        d,
        3,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::define;
    assert_eq!(
        ROWS_PER_BLOCK as u64,
        define("ln_modulate.cu", "ROWS_PER_BLOCK")
    );
    assert_eq!(BWD_ROWS as u64, define("ln_modulate.cu", "LN_BWD_ROWS"));
    assert_eq!(
        BWD_THREADS as u64,
        define("ln_modulate.cu", "LN_BWD_THREADS")
    );
    let red = define("common.cuh", "IMDM_RED_WARPS") * define("common.cuh", "IMDM_WARP");
    assert_eq!(RED_THREADS as u64, red);
}
