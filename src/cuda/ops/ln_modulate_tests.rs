//! Tests of the `ln_modulate` forward (the backward's are in `ln_modulate_bwd_tests.rs`) and the
//! modulation layouts they share.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::cuda::ops::modulation::HostMod;
use crate::testing::grad::assert_bits_eq;
use crate::testing::inputs::rand_f32_from;
use crate::testing::{assert_close, Tol};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How a case's modulation is laid out: none (AR), one row broadcast over every row (constant
/// conditioning), or one row per sequence inside a (B, 6D) block buffer (time conditioning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lay {
    Plain,
    Broadcast,
    PerRow,
}

/// The chunk read as shift (scale at the next): the MLP pair, so the chunk offset inside a row
/// and the row stride both matter.
pub(super) const CHUNK: usize = 3;

impl Lay {
    pub(super) const ALL: [Lay; 3] = [Lay::Plain, Lay::Broadcast, Lay::PerRow];

    /// Elements of the modulation buffer (a block's 6 chunks per row).
    pub(super) fn len(self, batch: usize, d: usize) -> usize {
        match self {
            Lay::Plain => 0,
            Lay::Broadcast => 6 * d,
            Lay::PerRow => batch * 6 * d,
        }
    }

    pub(super) fn rows(self, d: usize) -> ModRows {
        match self {
            Lay::PerRow => ModRows::PerSequence { stride: 6 * d },
            _ => ModRows::Broadcast,
        }
    }

    pub(super) fn host<T: Copy>(self, buf: &[T], d: usize) -> Option<HostMod<'_, T>> {
        (self != Lay::Plain).then_some(HostMod {
            buf,
            chunk: CHUNK,
            rows: self.rows(d),
        })
    }

    pub(super) fn device(self, buf: &CudaSlice<f32>, d: usize) -> Option<ModIn<'_>> {
        (self != Lay::Plain).then_some(ModIn {
            buf,
            chunk: CHUNK,
            rows: self.rows(d),
        })
    }

    /// Offset of the modulation row sequence `b` reads.
    pub(super) fn row(self, b: usize, d: usize) -> usize {
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
