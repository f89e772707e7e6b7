//! Tests of `residual`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::cuda::ops::modulation::{HostMod, HostModMut};
use crate::rng::dropout_keep;
use crate::testing::grad::{assert_bits_eq, assert_close_scaled, assert_grad, f64s, fd_grad};
use crate::testing::inputs::rand_f32;
use crate::testing::{assert_close, Tol};
use rayon::prelude::*;

fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
}

/// How a case's gate is laid out: none (AR), one row broadcast over every row (constant
/// conditioning), or one row per sequence inside a (B, 6D) block buffer (time conditioning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lay {
    Plain,
    Broadcast,
    PerRow,
}

/// The chunk read as the gate (gate_mlp): the last of a block's six, so the chunk offset and
/// the row stride both matter.
const GATE: usize = 5;

impl Lay {
    const ALL: [Lay; 3] = [Lay::Plain, Lay::Broadcast, Lay::PerRow];

    /// Elements of the modulation buffer (a block's 6 chunks per row; 1 placeholder if none).
    fn len(self, batch: usize, d: usize) -> usize {
        match self {
            Lay::Plain => 1,
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

    fn host(self, buf: &[f32], d: usize) -> Option<HostMod<'_, f32>> {
        (self != Lay::Plain).then_some(HostMod {
            buf,
            chunk: GATE,
            rows: self.rows(d),
        })
    }

    /// Index of gate column `j` for flat element `i` of rows of width `d`.
    fn index(self, i: usize, d: usize, rpb: usize) -> usize {
        let o = if self == Lay::PerRow {
            (i / d / rpb) * 6 * d
        } else {
            0
        };
        o + GATE * d + i % d
    }
}

/// Runs the kernel on host data and returns the updated h.
#[allow(clippy::too_many_arguments)]
fn run_gpu(
    gpu: &Gpu,
    h: &[f32],
    branch: &[f32],
    gate: Option<HostMod<'_, f32>>,
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
    let dg = gate.map(|g| s.clone_htod(g.buf).unwrap());
    let rows = h.len() / d;
    let dgate = gate.zip(dg.as_ref()).map(|(g, buf)| ModIn {
        buf,
        chunk: g.chunk,
        rows: g.rows,
    });
    residual_fwd(gpu, &mut dh, &db, dgate, rows, d, rpb, p, seed, offset).unwrap();
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
        let h = rand_f32(rows as u64, rows * d, -2.0, 2.0);
        let branch = bf16_round(rand_f32(d as u64, rows * d, -1.0, 1.0));
        for (p, lay) in [
            (0.0f32, Lay::Broadcast),
            (0.1, Lay::Broadcast),
            (0.1, Lay::Plain),
            (0.0, Lay::PerRow),
            (0.5, Lay::PerRow),
        ] {
            let gate = rand_f32(7, lay.len(bsz, d), -1.5, 1.5);
            let g = lay.host(&gate, d);
            let got = run_gpu(&gpu, &h, &branch, g, d, len, p, seed, offset);
            let mut want = h.clone();
            cpu::residual_fwd_mod(&mut want, &branch, g, d, len, p, seed, offset);
            let tag = format!("B{bsz} L{len} D{d} p {p} {lay:?}");
            assert_close(&format!("residual {tag}"), &got, &want, Tol::F32);
        }
    }
    // Large magnitude: a big residual stream and big branch values.
    let (rows, d) = (2 * 33, 768);
    let h = rand_f32(1, rows * d, -3e4, 3e4);
    let branch = bf16_round(rand_f32(2, rows * d, -3e3, 3e3));
    let gate = rand_f32(3, Lay::PerRow.len(2, d), -2.0, 2.0);
    let g = Lay::PerRow.host(&gate, d);
    let got = run_gpu(&gpu, &h, &branch, g, d, 33, 0.1, 5, 6);
    let mut want = h.clone();
    cpu::residual_fwd_mod(&mut want, &branch, g, d, 33, 0.1, 5, 6);
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
        let branch: Vec<f32> = rand_f32(n as u64, n, 0.5, 2.0)
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
    // One row of 8 for 2 sequences of stride 8; a stride that overlaps the chunk.
    let per = |stride| {
        Some(ModIn {
            buf: &gate,
            chunk: 0,
            rows: ModRows::PerSequence { stride },
        })
    };
    let shape_errs = [
        residual_fwd(&gpu, &mut h, &branch, None, 5, 8, 5, 0.0, 0, 0),
        residual_fwd(&gpu, &mut h, &branch, None, 4, 8, 3, 0.0, 0, 0),
        residual_fwd(&gpu, &mut h, &branch, per(8), 4, 8, 2, 0.0, 0, 0),
        residual_fwd(&gpu, &mut h, &branch, per(4), 4, 8, 4, 0.0, 0, 0),
        residual_fwd(
            &gpu,
            &mut h,
            &branch,
            Some(ModIn::broadcast(&gate, 1)),
            4,
            8,
            4,
            0.0,
            0,
            0,
        ),
    ];
    for r in shape_errs {
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
    for p in [1.0f32, -0.1, f32::NAN] {
        let g = Some(ModIn::broadcast(&gate, 0));
        let r = residual_fwd(&gpu, &mut h, &branch, g, 4, 8, 4, p, 0, 0);
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
    // The same gate rows inside a (B, 2D) buffer at chunk 1 (stride 2D), and a broadcast row.
    let wide = [
        0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0,
    ];
    let g = HostMod {
        buf: &wide[..],
        chunk: 1,
        rows: ModRows::PerSequence { stride: 2 * d },
    };
    let mut h2 = vec![1.0f32; 4 * d];
    cpu::residual_fwd_mod(&mut h2, &branch, Some(g), d, rpb, 0.0, 0, 0);
    assert_eq!(h2, h);
    let mut h3 = vec![1.0f32; 4 * d];
    cpu::residual_fwd_mod(
        &mut h3,
        &branch,
        Some(HostMod::broadcast(&gate[..])),
        d,
        rpb,
        0.0,
        0,
        0,
    );
    assert_eq!(&h3[6..], &[7.0, 15.0, 25.0, 10.0, 21.0, 34.0]);
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
    // dbranch and dF/dgate = dgate with dh = G, over the whole modulation buffer (the chunks
    // the gate does not use get exactly 0). B = 3 per-row and broadcast cases.
    let (seed, offset) = (77u64, 5u64);
    for &(rows, d, rpb, p, lay) in &[
        (6, 8, 3, 0.0f32, Lay::PerRow),
        (6, 8, 6, 0.3, Lay::PerRow),
        (15, 7, 5, 0.3, Lay::PerRow),
        (15, 7, 5, 0.3, Lay::Broadcast),
        (5, 7, 1, 0.5, Lay::Broadcast),
        (4, 5, 2, 0.25, Lay::Plain),
        (1, 1, 1, 0.0, Lay::PerRow),
    ] {
        let g = rand_f32(rows as u64 + 1, rows * d, -1.0, 1.0);
        let branch = bf16_round(rand_f32(rows as u64 + 2, rows * d, -1.0, 1.0));
        let gate = rand_f32(rows as u64 + 3, lay.len(rows / rpb, d), -1.5, 1.5);
        let h0 = rand_f32(rows as u64 + 4, rows * d, -2.0, 2.0);
        let dg0 = rand_f32(rows as u64 + 5, gate.len(), -1.0, 1.0);
        let mut dbranch = vec![0f32; rows * d];
        let mut dg = dg0.clone();
        let dgo = (lay != Lay::Plain).then_some(HostModMut {
            buf: &mut dg[..],
            chunk: GATE,
            rows: lay.rows(d),
        });
        let gt = lay.host(&gate, d);
        cpu::residual_bwd(&mut dbranch, dgo, &g, &branch, gt, d, rpb, p, seed, offset);
        let f = |br: &[f64], ga: &[f64]| -> f64 {
            let mut h = f64s(&h0);
            let gs = (lay != Lay::Plain).then_some(HostMod {
                buf: ga,
                chunk: GATE,
                rows: lay.rows(d),
            });
            cpu::residual_fwd_mod(&mut h, br, gs, d, rpb, p, seed, offset);
            h.iter().zip(&g).map(|(a, b)| a * *b as f64).sum()
        };
        let (br64, ga64) = (f64s(&branch), f64s(&gate));
        let tol = Tol {
            abs: 1e-6,
            rel: 1e-6,
        };
        let tag = format!("rows {rows} d {d} rpb {rpb} p {p} {lay:?}");
        let fd = fd_grad(|v| f(v, &ga64), &br64, 1e-3, None);
        assert_grad(
            &format!("residual dbranch {tag}"),
            &f64s(&dbranch),
            &fd,
            tol,
        );
        if lay != Lay::Plain {
            let fd = fd_grad(|v| f(&br64, v), &ga64, 1e-3, None);
            let delta: Vec<f64> = dg.iter().zip(&dg0).map(|(a, b)| (a - b) as f64).collect();
            assert_grad(&format!("residual dgate {tag}"), &delta, &fd, tol);
        } else {
            assert_eq!(dg, dg0, "no gate: dgate untouched");
        }
    }
}

/// Runs the GPU backward; returns (dbranch, dgate) read back (dgate starts at `dg0`, laid out
/// as the gate).
#[allow(clippy::too_many_arguments)]
fn run_bwd(
    gpu: &Gpu,
    dh: &[f32],
    branch: &[f32],
    gate: Option<HostMod<'_, f32>>,
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
    let dgate = gate.map(|g| s.clone_htod(g.buf).unwrap());
    let mut dbranch = s.alloc_zeros::<bf16>(rows * d).unwrap();
    let mut dg = dg0.map(|v| s.clone_htod(v).unwrap());
    let mut scratch = s
        .alloc_zeros::<f32>(residual_bwd_scratch_len(rows, d, rpb))
        .unwrap();
    let (chunk, layout) = gate.map_or((0, ModRows::Broadcast), |g| (g.chunk, g.rows));
    let grads = dg.as_mut().map(|buf| {
        let out = ModOut {
            buf,
            chunk,
            rows: layout,
        };
        (out, &mut scratch)
    });
    let gin = dgate.as_ref().map(|buf| ModIn {
        buf,
        chunk,
        rows: layout,
    });
    residual_bwd(
        gpu,
        &mut dbranch,
        grads,
        &ddh,
        &dbr,
        gin,
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
    // L in 1, 7, 37, 129); every gate layout: broadcast (the DiT's constant conditioning,
    // reduced over all rows), per-sequence rows of a (B, 6D) buffer (time conditioning), none.
    for &(bsz, len, d) in &[
        (8, 1024, 768),
        (1, 1, 768),
        (1, 7, 130),
        (3, 37, 768),
        (2, 129, 64),
        (3, 129, 36),
        (2, 7, 6),
    ] {
        let rows = bsz * len;
        let dh = rand_f32(rows as u64, rows * d, -2.0, 2.0);
        let branch = bf16_round(rand_f32(d as u64, rows * d, -1.0, 1.0));
        for lay in Lay::ALL {
            let gate = rand_f32(7, lay.len(bsz, d), -1.5, 1.5);
            let dg0 = rand_f32(8, gate.len(), -1.0, 1.0);
            for p in [0.0f32, 0.1, 0.5] {
                let g = lay.host(&gate, d);
                let d0 = g.map(|_| &dg0[..]);
                let (got, got_dg) = run_bwd(&gpu, &dh, &branch, g, d0, d, len, p, seed, offset);
                let mut want = vec![0f32; rows * d];
                let mut want_dg = dg0.clone();
                let wd = g.map(|g| HostModMut {
                    buf: &mut want_dg[..],
                    chunk: g.chunk,
                    rows: g.rows,
                });
                cpu::residual_bwd(&mut want, wd, &dh, &branch, g, d, len, p, seed, offset);
                let tag = format!("B{bsz} L{len} D{d} p {p} {lay:?}");
                assert_close(
                    &format!("residual bwd dbranch {tag}"),
                    &got,
                    &want,
                    Tol::BF16,
                );
                // Dropped elements are exactly 0, kept ones never (dh is never 0 here).
                for (i, &v) in got.iter().enumerate() {
                    let keep = p == 0.0 || dropout_keep(seed, offset, i as u64, p);
                    let gi = g.map_or(1.0, |_| gate[lay.index(i, d, len)]);
                    assert!(
                        (v == 0.0) == (!keep || gi == 0.0 || dh[i] == 0.0),
                        "{tag}: element {i} = {v}, twin keeps: {keep}"
                    );
                }
                if lay != Lay::Plain {
                    let scale = 1.0f32 / (1.0 - p);
                    let mut sc: Vec<f64> = dg0.iter().map(|v| v.abs() as f64).collect();
                    for i in 0..rows * d {
                        if p == 0.0 || dropout_keep(seed, offset, i as u64, p) {
                            sc[lay.index(i, d, len)] +=
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
    let (bsz, len, d) = (8, 1024, 768);
    let rows = bsz * len;
    let dh = rand_f32(1, rows * d, -2.0, 2.0);
    let branch = bf16_round(rand_f32(2, rows * d, -1.0, 1.0));
    for lay in [Lay::Broadcast, Lay::PerRow] {
        let gate = rand_f32(3, lay.len(bsz, d), -1.5, 1.5);
        let dg0 = vec![0f32; gate.len()];
        let run = || {
            run_bwd(
                &gpu,
                &dh,
                &branch,
                lay.host(&gate, d),
                Some(&dg0),
                d,
                len,
                0.1,
                4,
                5,
            )
        };
        let (a, b) = (run(), run());
        assert_bits_eq("residual bwd dbranch run-to-run", &a.0, &b.0);
        assert_bits_eq(
            &format!("residual bwd dgate run-to-run {lay:?}"),
            &a.1.unwrap(),
            &b.1.unwrap(),
        );
    }
}

#[test]
fn gpu_bwd_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let mut dbranch = s.alloc_zeros::<bf16>(4 * 8).unwrap();
    let dh = s.alloc_zeros::<f32>(4 * 8).unwrap();
    let branch = s.alloc_zeros::<bf16>(4 * 8).unwrap();
    let gate = s.alloc_zeros::<f32>(8).unwrap();
    let mut dg = s.alloc_zeros::<f32>(4 * 8).unwrap();
    let mut scratch = s.alloc_zeros::<f32>(8).unwrap();
    let per = ModRows::PerSequence { stride: 8 };
    // dgate without a gate, and with a gate of another layout.
    for g in [None, Some(ModIn::broadcast(&gate, 0))] {
        let r = residual_bwd(
            &gpu,
            &mut dbranch,
            Some((
                ModOut {
                    buf: &mut dg,
                    chunk: 0,
                    rows: per,
                },
                &mut scratch,
            )),
            &dh,
            &branch,
            g,
            4,
            8,
            4,
            0.0,
            0,
            0,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
    let r = residual_bwd(
        &gpu,
        &mut dbranch,
        None,
        &dh,
        &branch,
        Some(ModIn::broadcast(&gate, 0)),
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
        Some(ModIn::broadcast(&gate, 0)),
        4,
        8,
        4,
        1.0,
        0,
        0,
    );
    assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::define;
    assert_eq!(THREADS as u64, define("residual.cu", "RES_THREADS"));
    assert_eq!(BWD_THREADS as u64, define("residual.cu", "RES_BWD_THREADS"));
    assert_eq!(BWD_ROWS as u64, define("residual.cu", "RES_BWD_ROWS"));
    let red = define("common.cuh", "IMDM_RED_WARPS") * define("common.cuh", "IMDM_WARP");
    assert_eq!(RED_THREADS as u64, red);
}
