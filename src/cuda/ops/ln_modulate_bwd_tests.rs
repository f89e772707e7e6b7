//! Tests of the `ln_modulate` backward: the twin against finite differences and structured
//! inputs, the kernels against the twin (every modulation layout), determinism and shape checks.

use super::tests::{Lay, CHUNK};
use super::*;
use crate::cuda::gpu_for_tests;
use crate::cuda::ops::modulation::HostModMut;
use crate::testing::grad::{assert_bits_eq, assert_close_scaled, assert_grad, f64s, fd_grad};
use crate::testing::inputs::rand_f32_from;
use crate::testing::{assert_close, Tol};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

// ---- backward ----------------------------------------------------------------------------

/// Inputs of one backward problem (host, f32).
struct BwdCase {
    d: usize,
    rpb: usize,
    lay: Lay,
    x: Vec<f32>,
    w: Vec<f32>,
    /// The modulation buffer (layout `lay`; one placeholder element when `Plain`).
    m: Vec<f32>,
    dy: Vec<f32>,
    /// Initial values of the accumulated outputs (the += rule is part of what is tested).
    dx0: Vec<f32>,
    dw0: Vec<f32>,
    dm0: Vec<f32>,
}

fn bwd_case(seed: u64, rows: usize, d: usize, rpb: usize, lay: Lay, offset: f32) -> BwdCase {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b = rows / rpb;
    let x = rand_f32_from(&mut rng, rows * d, -2.0, 2.0)
        .into_iter()
        .map(|v| v + offset)
        .collect();
    let nm = lay.len(b, d).max(1);
    BwdCase {
        d,
        rpb,
        lay,
        x,
        w: rand_f32_from(&mut rng, d, 0.5, 1.5),
        m: rand_f32_from(&mut rng, nm, -0.5, 0.5),
        dy: rand_f32_from(&mut rng, rows * d, -1.0, 1.0),
        dx0: rand_f32_from(&mut rng, rows * d, -1.0, 1.0),
        dw0: rand_f32_from(&mut rng, d, -1.0, 1.0),
        dm0: rand_f32_from(&mut rng, nm, -1.0, 1.0),
    }
}

impl BwdCase {
    fn host_out<'a>(&self, buf: &'a mut [f32]) -> Option<HostModMut<'a>> {
        (self.lay != Lay::Plain).then_some(HostModMut {
            buf,
            chunk: CHUNK,
            rows: self.lay.rows(self.d),
        })
    }
}

/// The twin's backward from the twin's saved statistics: (dx, dw, dmod), each including its
/// initial value.
fn twin_bwd(c: &BwdCase) -> [Vec<f32>; 3] {
    let m = c.lay.host(&c.m, c.d);
    let (_, mean, rstd) = cpu::ln_modulate_fwd(&c.x, &c.w, m, c.d, c.rpb);
    let (mut dx, mut dw, mut dm) = (c.dx0.clone(), c.dw0.clone(), c.dm0.clone());
    let dmo = c.host_out(&mut dm);
    cpu::ln_modulate_bwd(
        &mut dx, &mut dw, dmo, &mean, &rstd, &c.dy, &c.x, &c.w, m, c.d, c.rpb,
    );
    [dx, dw, dm]
}

#[test]
fn twin_bwd_matches_finite_differences() {
    // F = sum(G * y) with G = dy: its gradient is what the backward computes. B = 3 per-row
    // and broadcast cases: each sequence's rows feed only its own modulation row.
    for &(rows, d, rpb, lay) in &[
        (6, 8, 3, Lay::PerRow),
        (6, 8, 6, Lay::PerRow),
        (15, 7, 5, Lay::PerRow),
        (15, 7, 5, Lay::Broadcast),
        (5, 7, 1, Lay::Broadcast),
        (4, 5, 2, Lay::Plain),
        (1, 1, 1, Lay::PerRow),
    ] {
        let c = bwd_case(rows as u64 * 31 + d as u64, rows, d, rpb, lay, 0.0);
        let [dx, dw, dm] = twin_bwd(&c);
        let (x, w, m, g) = (f64s(&c.x), f64s(&c.w), f64s(&c.m), f64s(&c.dy));
        let f = |x: &[f64], w: &[f64], m: &[f64]| -> f64 {
            let (y, _, _) = cpu::ln_modulate_fwd_f64(x, w, lay.host(m, d), d, rpb);
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
        let tag = format!("rows {rows} d {d} rpb {rpb} {lay:?}");
        let fd = fd_grad(|v| f(v, &w, &m), &x, h, None);
        assert_grad(&format!("ln dx {tag}"), &delta(&dx, &c.dx0), &fd, tol);
        let fd = fd_grad(|v| f(&x, v, &m), &w, h, None);
        assert_grad(&format!("ln dweight {tag}"), &delta(&dw, &c.dw0), &fd, tol);
        if lay != Lay::Plain {
            // Over the whole buffer: the chunks the LayerNorm does not read get exactly 0.
            let fd = fd_grad(|v| f(&x, &w, v), &m, h, None);
            assert_grad(&format!("ln dmod {tag}"), &delta(&dm, &c.dm0), &fd, tol);
        } else {
            assert_eq!(dm, c.dm0, "no modulation: dmod untouched");
        }
    }
}

#[test]
fn twin_bwd_structured_inputs() {
    // dy = 0: every gradient keeps its initial value exactly.
    let mut c = bwd_case(3, 4, 16, 2, Lay::PerRow, 0.0);
    c.dy.iter_mut().for_each(|v| *v = 0.0);
    let [dx, dw, dm] = twin_bwd(&c);
    assert_eq!((dx, dw, dm), (c.dx0, c.dw0, c.dm0));
    // A constant dy along a row is orthogonal to the LayerNorm's image with weight = 1 and
    // no modulation: dx gets nothing (the output is invariant to shifting x).
    let mut c = bwd_case(4, 3, 16, 3, Lay::Plain, 0.0);
    c.w.iter_mut().for_each(|v| *v = 1.0);
    c.dy.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i / 16) as f32 + 1.0);
    let [dx, ..] = twin_bwd(&c);
    for (a, b) in dx.iter().zip(&c.dx0) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // Broadcast: the one row's gradient is the sum of the per-sequence rows' gradients.
    let (rows, d, rpb) = (12, 8, 4);
    let cb = bwd_case(9, rows, d, rpb, Lay::Broadcast, 0.0);
    let mut cp = bwd_case(9, rows, d, rpb, Lay::PerRow, 0.0);
    cp.m = (0..rows / rpb).flat_map(|_| cb.m.iter().copied()).collect();
    cp.dm0 = vec![0.0; cp.m.len()];
    let (x, w, dy) = (cb.x.clone(), cb.w.clone(), cb.dy.clone());
    (cp.x, cp.w, cp.dy) = (x, w, dy);
    let [_, _, dmb] = twin_bwd(&cb);
    let [_, _, dmp] = twin_bwd(&cp);
    for k in 0..6 * d {
        let sum: f32 = (0..rows / rpb).map(|b| dmp[b * 6 * d + k]).sum();
        let want = cb.dm0[k] + sum;
        assert!(
            (dmb[k] - want).abs() < 1e-5,
            "element {k}: {} vs {want}",
            dmb[k]
        );
    }
}

/// Sums of |terms| of dweight and dmod (tolerance scales for the f32 reductions).
fn param_grad_scales(c: &BwdCase) -> [Vec<f64>; 2] {
    let (d, rows) = (c.d, c.x.len() / c.d);
    let m = c.lay.host(&c.m, d);
    let (_, mean, rstd) = cpu::ln_modulate_fwd(&c.x, &c.w, m, d, c.rpb);
    let (mut sw, mut sm) = (vec![0f64; d], vec![0f64; c.m.len()]);
    for r in 0..rows {
        let o = c.lay.row(r / c.rpb, d);
        for j in 0..d {
            let xh = ((c.x[r * d + j] - mean[r]) * rstd[r]).abs() as f64;
            let g = c.dy[r * d + j].abs() as f64;
            let s = m.map_or(1.0, |m| (1.0 + m.at(r / c.rpb, 1, j, d)).abs() as f64);
            sw[j] += g * s * xh;
            if c.lay != Lay::Plain {
                sm[o + CHUNK * d + j] += g;
                sm[o + (CHUNK + 1) * d + j] += g * xh * c.w[j].abs() as f64;
            }
        }
    }
    // The initial values are added too.
    for (s, v) in sw.iter_mut().zip(&c.dw0) {
        *s += v.abs() as f64;
    }
    for (s, v) in sm.iter_mut().zip(&c.dm0) {
        *s += v.abs() as f64;
    }
    [sw, sm]
}

/// Runs the GPU backward on `c` with the twin's saved statistics; returns (dx, dw, dmod) read
/// back.
fn gpu_bwd(gpu: &Gpu, c: &BwdCase) -> [Vec<f32>; 3] {
    let (d, rows) = (c.d, c.x.len() / c.d);
    let (_, mean, rstd) = cpu::ln_modulate_fwd(&c.x, &c.w, c.lay.host(&c.m, d), d, c.rpb);
    let s = &gpu.stream;
    let up = |v: &[f32]| s.clone_htod(v).unwrap();
    let (mut dx, mut dw, mut dm) = (up(&c.dx0), up(&c.dw0), up(&c.dm0));
    let mut scratch = s
        .alloc_zeros::<f32>(ln_modulate_bwd_scratch_len(rows, d, c.rpb))
        .unwrap();
    let (dmean, drstd, ddy, dxin, dwt, dmod) = (
        up(&mean),
        up(&rstd),
        up(&c.dy),
        up(&c.x),
        up(&c.w),
        up(&c.m),
    );
    let dmo = (c.lay != Lay::Plain).then_some(ModOut {
        buf: &mut dm,
        chunk: CHUNK,
        rows: c.lay.rows(d),
    });
    ln_modulate_bwd(
        gpu,
        &mut dx,
        &mut dw,
        dmo,
        &mut scratch,
        &dmean,
        &drstd,
        &ddy,
        &dxin,
        &dwt,
        c.lay.device(&dmod, d),
        rows,
        d,
        c.rpb,
    )
    .unwrap();
    let down = |v: &CudaSlice<f32>| s.clone_dtoh(v).unwrap();
    [down(&dx), down(&dw), down(&dm)]
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
    // (batch, len, d) with every layout: broadcast (the DiT's constant conditioning, reduced
    // over all rows), per-sequence rows of a (B, 6D) buffer (time conditioning) and none; real
    // widths; awkward L in 1, 7, 37, 129 and D not % 4.
    for &(b, l, d) in &[
        (2, 128, 768),
        (1, 1024, 1536),
        (4, 1024, 768),
        (3, 7, 64),
        (3, 37, 768),
        (1, 1, 256),
        (2, 129, 130),
        (5, 1, 33),
    ] {
        let rows = b * l;
        for lay in Lay::ALL {
            let c = bwd_case((rows * 7 + d + l) as u64, rows, d, l, lay, 0.0);
            let got = gpu_bwd(&gpu, &c);
            let want = twin_bwd(&c);
            let scales = param_grad_scales(&c);
            let tag = format!("B{b} L{l} D{d} {lay:?}");
            assert_close(&format!("ln bwd dx {tag}"), &got[0], &want[0], TOL_DX);
            assert_close_scaled(
                &format!("ln bwd dweight {tag}"),
                &got[1],
                &want[1],
                &scales[0],
                REL_PARAM,
            );
            if lay != Lay::Plain {
                assert_close_scaled(
                    &format!("ln bwd dmod {tag}"),
                    &got[2],
                    &want[2],
                    &scales[1],
                    REL_PARAM,
                );
            } else {
                assert_eq!(got[2], c.dm0, "no modulation: dmod untouched");
            }
        }
    }
    // Large-mean rows (the statistics' precision case).
    let c = bwd_case(11, 2 * 33, 768, 33, Lay::PerRow, 1000.0);
    let (got, want) = (gpu_bwd(&gpu, &c), twin_bwd(&c));
    assert_close("ln bwd dx offset 1000", &got[0], &want[0], TOL_DX);
    let scales = param_grad_scales(&c);
    assert_close_scaled("ln bwd dw offset", &got[1], &want[1], &scales[0], REL_PARAM);
}

#[test]
fn gpu_bwd_is_bitwise_deterministic() {
    let Some(gpu) = gpu_for_tests() else { return };
    for lay in [Lay::Broadcast, Lay::PerRow] {
        let c = bwd_case(5, 4 * 1024, 768, 1024, lay, 0.0);
        let a = gpu_bwd(&gpu, &c);
        let b = gpu_bwd(&gpu, &c);
        for k in 0..3 {
            assert_bits_eq(
                &format!("ln bwd run-to-run output {k} {lay:?}"),
                &a[k],
                &b[k],
            );
        }
    }
}

#[test]
fn gpu_bwd_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let z = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (rows, d) = (4, 8);
    let (mut dx, mut dw, mut scratch) = (z(rows * d), z(d), z(1));
    let (mean, rstd, dy, x, w, sc) = (z(rows), z(rows), z(rows * d), z(rows * d), z(d), z(2 * d));
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
        Some(ModIn::broadcast(&sc, 0)),
        rows,
        d,
        rows,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // Per-sequence rows: a (B, 2D) buffer of 2 sequences is too short for 4 (stride 2D), and
    // the gradient's layout must be the modulation's.
    let mut dm = z(4 * 2 * d);
    let per = ModRows::PerSequence { stride: 2 * d };
    for (m_rows, rpb) in [(per, 1), (ModRows::Broadcast, 2)] {
        let r = ln_modulate_bwd(
            &gpu,
            &mut dx,
            &mut dw,
            Some(ModOut {
                buf: &mut dm,
                chunk: 0,
                rows: per,
            }),
            &mut scratch,
            &mean,
            &rstd,
            &dy,
            &x,
            &w,
            Some(ModIn {
                buf: &sc,
                chunk: 0,
                rows: m_rows,
            }),
            rows,
            d,
            rpb,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{m_rows:?}: {r:?}");
    }
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
