//! Tests of `ln_modulate`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::cuda::ops::modulation::{HostMod, HostModMut};
use crate::testing::grad::{assert_bits_eq, assert_close_scaled, assert_grad, f64s, fd_grad};
use crate::testing::inputs::rand_f32_from;
use crate::testing::{assert_close, Tol};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How a case's modulation is laid out: none (AR), one row broadcast over every row (constant
/// conditioning), or one row per sequence inside a (B, 6D) block buffer (time conditioning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lay {
    Plain,
    Broadcast,
    PerRow,
}

/// The chunk read as shift (scale at the next): the MLP pair, so the chunk offset inside a row
/// and the row stride both matter.
const CHUNK: usize = 3;

impl Lay {
    const ALL: [Lay; 3] = [Lay::Plain, Lay::Broadcast, Lay::PerRow];

    /// Elements of the modulation buffer (a block's 6 chunks per row).
    fn len(self, batch: usize, d: usize) -> usize {
        match self {
            Lay::Plain => 0,
            Lay::Broadcast => 6 * d,
            Lay::PerRow => batch * 6 * d,
        }
    }

    fn rows(self, d: usize) -> ModRows {
        match self {
            Lay::PerRow => ModRows::PerSequence { stride: 6 * d },
            _ => ModRows::Broadcast,
        }
    }

    fn host<T: Copy>(self, buf: &[T], d: usize) -> Option<HostMod<'_, T>> {
        (self != Lay::Plain).then_some(HostMod {
            buf,
            chunk: CHUNK,
            rows: self.rows(d),
        })
    }

    fn device(self, buf: &CudaSlice<f32>, d: usize) -> Option<ModIn<'_>> {
        (self != Lay::Plain).then_some(ModIn {
            buf,
            chunk: CHUNK,
            rows: self.rows(d),
        })
    }

    /// Offset of the modulation row sequence `b` reads.
    fn row(self, b: usize, d: usize) -> usize {
        if self == Lay::PerRow {
            b * 6 * d
        } else {
            0
        }
    }
}

/// A plain f64 reference of the forward, written from the kernel header's maths with explicit
/// indices: y[r, j] = (x - mean) rstd w (1 + m[o + (CHUNK+1) D + j]) + m[o + CHUNK D + j].
fn plain_fwd(x: &[f32], w: &[f32], m: &[f32], lay: Lay, d: usize, len: usize) -> Vec<f64> {
    let mut y = vec![0f64; x.len()];
    for r in 0..x.len() / d {
        let row = &x[r * d..(r + 1) * d];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let o = lay.row(r / len, d);
        for j in 0..d {
            let mut z = (row[j] as f64 - mean) / (var + 1e-5).sqrt() * w[j] as f64;
            if lay != Lay::Plain {
                let (sh, sc) = (m[o + CHUNK * d + j], m[o + (CHUNK + 1) * d + j]);
                z = z * (1.0 + sc as f64) + sh as f64;
            }
            y[r * d + j] = z;
        }
    }
    y
}

/// Runs GPU vs twin on one shape; `offset` shifts x to test large-mean rows.
fn check(gpu: &Gpu, batch: usize, len: usize, d: usize, lay: Lay, offset: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64((batch * 131 + len * 7 + d) as u64);
    let rows = batch * len;
    let x: Vec<f32> = rand_f32_from(&mut rng, rows * d, -2.0, 2.0)
        .into_iter()
        .map(|v| v + offset)
        .collect();
    let w = rand_f32_from(&mut rng, d, 0.5, 1.5);
    let m = rand_f32_from(&mut rng, lay.len(batch, d).max(1), -0.5, 0.5);
    let (y_ref, mean_ref, rstd_ref) = cpu::ln_modulate_fwd(&x, &w, lay.host(&m, d), d, len);

    let s = &gpu.stream;
    let dx = s.clone_htod(&x).unwrap();
    let dw = s.clone_htod(&w).unwrap();
    let dm = s.clone_htod(&m).unwrap();
    let mut out = LnModulateOut::new(gpu, rows, d).unwrap();
    ln_modulate_fwd(gpu, &mut out, &dx, &dw, lay.device(&dm, d), rows, d, len).unwrap();
    let y: Vec<f32> = s
        .clone_dtoh(&out.y)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let mean = s.clone_dtoh(&out.mean).unwrap();
    let rstd = s.clone_dtoh(&out.rstd).unwrap();
    let tag = format!("B{batch} L{len} D{d} {lay:?} offset={offset}");
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
    // Real shapes (DiT-small/large widths), awkward ones (L in 1, 7, 37, 129; D not % 4), the
    // register fast path at a partial last float4 column (D = 132, 4) and the generic path
    // above its 1536-wide limit (D = 2048); per-sequence rows at B = 3.
    for &(b, l, d) in &[
        (2, 128, 768),
        (1, 1024, 1536),
        (3, 7, 64),
        (3, 37, 768),
        (1, 1, 256),
        (2, 129, 130),
        (3, 3, 132),
        (1, 2, 4),
        (3, 5, 2048),
    ] {
        for lay in Lay::ALL {
            check(&gpu, b, l, d, lay, 0.0);
        }
    }
    check(&gpu, 2, 33, 768, Lay::PerRow, 1000.0);
}

/// Broadcast (stride 0) gives the same bits as a per-sequence buffer holding that row B times:
/// the two layouts differ only in which row the kernel reads.
#[test]
fn gpu_broadcast_equals_repeated_rows() {
    let Some(gpu) = gpu_for_tests() else { return };
    let (batch, len, d) = (3, 37, 768);
    let rows = batch * len;
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let x = rand_f32_from(&mut rng, rows * d, -2.0, 2.0);
    let w = rand_f32_from(&mut rng, d, 0.5, 1.5);
    let one = rand_f32_from(&mut rng, 6 * d, -0.5, 0.5);
    let rep: Vec<f32> = (0..batch).flat_map(|_| one.iter().copied()).collect();
    let s = &gpu.stream;
    let (dx, dw) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
    let (m1, m3) = (s.clone_htod(&one).unwrap(), s.clone_htod(&rep).unwrap());
    let run = |m: ModIn<'_>| {
        let mut out = LnModulateOut::new(&gpu, rows, d).unwrap();
        ln_modulate_fwd(&gpu, &mut out, &dx, &dw, Some(m), rows, d, len).unwrap();
        let y: Vec<f32> = s
            .clone_dtoh(&out.y)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        y
    };
    let a = run(ModIn::broadcast(&m1, CHUNK));
    let b = run(Lay::PerRow.device(&m3, d).unwrap());
    assert_bits_eq("ln broadcast vs repeated rows", &a, &b);
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
    let pair: Vec<f32> = [vec![0.5; d], vec![1.0; d]].concat();
    let (y2, _, _) = cpu::ln_modulate_fwd(&x, &vec![1.0; d], Some(HostMod::broadcast(&pair)), d, 1);
    for (a, b) in y.iter().zip(&y2) {
        assert!((a * 2.0 + 0.5 - b).abs() < 1e-5);
    }
}

#[test]
fn twin_matches_plain_reference() {
    // B = 3, L = 37 (not a multiple of the 8-row forward block or the 32-row backward chunk).
    let (batch, len, d) = (3, 37, 20);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = rand_f32_from(&mut rng, batch * len * d, -2.0, 2.0);
    let w = rand_f32_from(&mut rng, d, 0.5, 1.5);
    for lay in Lay::ALL {
        let m = rand_f32_from(&mut rng, lay.len(batch, d).max(1), -0.5, 0.5);
        let (y, _, _) = cpu::ln_modulate_fwd_f64(&x, &w, lay.host(&m, d), d, len);
        let want = plain_fwd(&x, &w, &m, lay, d, len);
        let err = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "{lay:?}: twin vs plain reference {err:e}");
    }
    // Per-sequence rows really differ: a sequence reading another's row changes y.
    let m = rand_f32_from(&mut rng, Lay::PerRow.len(batch, d), -0.5, 0.5);
    let a = plain_fwd(&x, &w, &m, Lay::PerRow, d, len);
    let b = plain_fwd(&x, &w, &m, Lay::Broadcast, d, len);
    assert!(a[..len * d] == b[..len * d] && a[len * d..] != b[len * d..]);
}

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
