//! Tests of `subs`: the forward here, the fused loss and its backward in `subs_xent_tests.rs`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::model::dit_ref::subs_log_probs;
use crate::tensor::{Tensor, Tokens};
use crate::testing::grad::{assert_bits_eq, assert_grad, f64s, fd_grad};
use crate::testing::{assert_close, Tol};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// fp32 log-softmax over up to 5e4 columns against the f64 twin. The fp32 sum carries a
/// worst-case relative error of about (50 sequential adds per thread + 10 merge levels) x
/// 2^-24 plus `__expf`'s few ulps, about 5e-6, which lands as an absolute error on lse and
/// on every output. Outputs near 0 (a peaked row) would leave `Tol::F32`'s abs 1e-5 only a
/// 2x margin; abs 5e-5 gives 10x. The rel part is `Tol::F32`'s.
const TOL_LOG_SOFTMAX: Tol = Tol {
    abs: 5e-5,
    rel: 1e-5,
};

/// Seeded uniform logits in [lo, hi), rounded to bf16 when `bf16_exact`.
fn rand_logits(seed: u64, n: usize, lo: f32, hi: f32, bf16_exact: bool) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        for x in ch.iter_mut() {
            let a = rng.random_range(lo..hi);
            *x = if bf16_exact {
                bf16::from_f32(a).to_f32()
            } else {
                a
            };
        }
    });
    v
}

/// About half the rows masked, the rest never the mask; rows 0 and 1 carry the first and last
/// column over.
fn tokens(seed: u64, rows: usize, v: usize, mask: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids: Vec<u32> = (0..rows)
        .map(|_| match rng.random_bool(0.5) {
            true => mask as u32,
            false => {
                let x = rng.random_range(0..v - 1);
                (x + (x >= mask) as usize) as u32
            }
        })
        .collect();
    for (r, t) in [(0, 0), (1, v - 1)] {
        if r < rows && t != mask {
            ids[r] = t as u32;
        }
    }
    ids
}

/// GPU (bf16 or f32 logits, cached row or not, row stride `ld`) against the twin. The
/// padding columns of the logits hold NaN (a read would poison the row) and those of the
/// output a sentinel that must survive.
fn check(
    gpu: &Gpu,
    logits: &[f32],
    ids: &[u32],
    mask: usize,
    ld: usize,
    bf16_in: bool,
    cache: bool,
) {
    const SENTINEL: f32 = 7.25;
    let (rows, s) = (ids.len(), &gpu.stream);
    let v = logits.len() / rows;
    let pad = |x: &[f32], fill: f32| -> Vec<f32> {
        let mut out = vec![fill; rows * ld];
        for r in 0..rows {
            out[r * ld..r * ld + v].copy_from_slice(&x[r * v..(r + 1) * v]);
        }
        out
    };
    let padded = pad(logits, f32::NAN);
    let mut lp = s.clone_htod(&vec![SENTINEL; rows * ld]).unwrap();
    let mut lse = s.alloc_zeros::<f32>(rows).unwrap();
    let dtok = s.clone_htod(ids).unwrap();
    let shape = SubsShape {
        rows,
        vocab: v,
        ld,
        mask_index: mask,
    };
    if bf16_in {
        let b: Vec<bf16> = padded.iter().map(|&x| bf16::from_f32(x)).collect();
        let dl = s.clone_htod(&b).unwrap();
        launch(gpu, &mut lp, &mut lse, &dl, &dtok, shape, cache).unwrap();
    } else {
        let dl = s.clone_htod(&padded).unwrap();
        launch(gpu, &mut lp, &mut lse, &dl, &dtok, shape, cache).unwrap();
    }
    // The twin sees exactly what the kernel sees: bf16 inputs are rounded first (the ramp
    // below is not bf16-exact; comparing against unrounded logits once failed by 0.13).
    let seen: Vec<f32> = match bf16_in {
        true => logits.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        false => logits.to_vec(),
    };
    let (lp_ref, lse_ref) = cpu::subs_fwd(&seen, ids, mask, v);
    let tag = format!("rows {rows} V {v} ld {ld} mask {mask} bf16 {bf16_in} cache {cache}");
    let got = s.clone_dtoh(&lp).unwrap();
    assert_close(
        &format!("subs log_probs {tag}"),
        &got,
        &pad(&lp_ref, SENTINEL),
        TOL_LOG_SOFTMAX,
    );
    let got = s.clone_dtoh(&lse).unwrap();
    assert_close(&format!("subs lse {tag}"), &got, &lse_ref, TOL_LOG_SOFTMAX);
}

#[test]
fn gpu_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (rows, V, mask): real vocabularies (OWT 50258 at B=2, L=1024; LM1B 30522 at B=4,
    // L=128), then awkward rows, mask columns at 0 / inside a vector, tiny vocabularies.
    for &(rows, v, mask) in &[
        (2 * 1024, 50258, 50257),
        (4 * 128, 30522, 30521),
        (7, 50258, 0),
        (1, 30522, 15001),
        (129, 1001, 500),
        (5, 2, 1),
        (3, 13, 12),
    ] {
        let ids = tokens(v as u64, rows, v, mask);
        for bf16_in in [false, true] {
            let logits = rand_logits(rows as u64, rows * v, -8.0, 8.0, bf16_in);
            // Dense rows, and rows padded to a multiple of 64 (the forward's layout).
            for ld in [v, v.next_multiple_of(64)] {
                check(&gpu, &logits, &ids, mask, ld, bf16_in, true);
                if rows <= 129 {
                    check(&gpu, &logits, &ids, mask, ld, bf16_in, false);
                }
            }
        }
    }
    // The re-read path at the real vocabulary, and an over-large row (no cache possible).
    for &(rows, v) in &[(64, 50258), (3, 130_001)] {
        let ids = tokens(1, rows, v, v - 1);
        for bf16_in in [false, true] {
            let logits = rand_logits(2, rows * v, -8.0, 8.0, bf16_in);
            check(&gpu, &logits, &ids, v - 1, v, bf16_in, rows == 3);
            check(&gpu, &logits, &ids, v - 1, v + 3, bf16_in, false);
        }
    }
    // Structured (zeros, an arange ramp) and large-magnitude logits, all rows masked.
    let (rows, v) = (4, 50258);
    let ids = vec![(v - 1) as u32; rows];
    let ramp: Vec<f32> = (0..rows * v).map(|i| (i % v) as f32 * 1e-3).collect();
    for logits in [
        vec![0.0; rows * v],
        ramp,
        rand_logits(3, rows * v, -3e3, 3e3, true),
    ] {
        check(&gpu, &logits, &ids, v - 1, v, false, true);
        check(&gpu, &logits, &ids, v - 1, v, true, true);
        check(
            &gpu,
            &logits,
            &ids,
            v - 1,
            v.next_multiple_of(64),
            true,
            true,
        );
    }
}

#[test]
fn gpu_bad_ids_and_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let (rows, v, s) = (3, 100, &gpu.stream);
    let logits = s
        .clone_htod(&rand_logits(4, rows * v, -1.0, 1.0, false))
        .unwrap();
    let mut lp = s.alloc_zeros::<f32>(rows * v).unwrap();
    let mut lse = s.alloc_zeros::<f32>(rows).unwrap();
    let ids = s.clone_htod(&[99u32, 100, 5]).unwrap();
    let sh = |rows, vocab, ld, mask_index| SubsShape {
        rows,
        vocab,
        ld,
        mask_index,
    };
    subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, sh(rows, v, v, 99)).unwrap();
    let (got, l) = (s.clone_dtoh(&lp).unwrap(), s.clone_dtoh(&lse).unwrap());
    assert!(
        got[v..2 * v].iter().all(|x| x.is_nan()) && l[1].is_nan(),
        "id >= V: NaN row"
    );
    assert!(got[2 * v + 5] == 0.0 && got[2 * v] == cpu::NEG_INF && l[2] == 0.0);
    let bad = [
        subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, sh(rows, v, v, 100)),
        subs_fwd_f32(
            &gpu,
            &mut lp,
            &mut lse,
            &logits,
            &ids,
            sh(rows, v + 1, v + 1, 9),
        ),
        subs_fwd_f32(
            &gpu,
            &mut lp,
            &mut lse,
            &logits,
            &ids,
            sh(rows - 1, v, v, 9),
        ),
        subs_fwd_f32(
            &gpu,
            &mut lp,
            &mut lse,
            &logits,
            &ids,
            sh(rows * v, 1, 1, 0),
        ),
        subs_fwd_f32(
            &gpu,
            &mut lp,
            &mut lse,
            &logits,
            &ids,
            sh(rows, v, v - 1, 9),
        ),
        subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, sh(rows, 60, 64, 9)),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
}

#[test]
fn twin_matches_dit_ref() {
    for &(bsz, len, v, mask) in &[(2, 7, 1001, 1000), (1, 3, 50258, 50257), (3, 1, 17, 4)] {
        let logits = rand_logits(v as u64, bsz * len * v, -8.0, 8.0, false);
        let ids = tokens(5, bsz * len, v, mask);
        let t = Tensor::from_vec(&[bsz, len, v], logits.clone()).unwrap();
        let toks = Tokens::new(bsz, len, ids.clone(), v).unwrap();
        let want = subs_log_probs(&t, &toks, mask);
        let (got, _) = cpu::subs_fwd(&logits, &ids, mask, v);
        assert_close(
            &format!("subs twin vs dit_ref V {v}"),
            &got,
            &want.data,
            Tol::F32,
        );
    }
}

#[test]
fn twin_is_a_normalised_subs_distribution() {
    let (v, mask) = (6, 2);
    let logits = [
        1.0f32, -2.0, 50.0, 0.5, 3.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
    ];
    let (lp, lse) = cpu::subs_fwd(&logits, &[2, 4], mask, v);
    // Masked row: softmax over the 5 non-mask columns sums to 1; the mask logit (50) is
    // ignored, and its output is -1e6 - lse.
    let want_lse = [1.0f64, -2.0, 0.5, 3.0, 0.0]
        .iter()
        .map(|a| a.exp())
        .sum::<f64>()
        .ln();
    assert!((lse[0] as f64 - want_lse).abs() < 1e-6);
    let total: f64 = (0..v)
        .filter(|&j| j != mask)
        .map(|j| (lp[j] as f64).exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-6, "sum {total}");
    assert_eq!(lp[mask], (cpu::NEG_INF as f64 - want_lse) as f32);
    // Carry-over row: 0 at the token, -1e6 elsewhere, lse 0.
    assert_eq!(
        &lp[v..],
        &[
            cpu::NEG_INF,
            cpu::NEG_INF,
            cpu::NEG_INF,
            cpu::NEG_INF,
            0.0,
            cpu::NEG_INF
        ]
    );
    assert_eq!(lse[1], 0.0);
    // Shift invariance: adding a constant to a masked row leaves its log-probs unchanged.
    let shifted: Vec<f32> = logits[..v].iter().map(|a| a + 100.0).collect();
    let (lp2, lse2) = cpu::subs_fwd(&shifted, &[2], mask, v);
    for j in (0..v).filter(|&j| j != mask) {
        assert!((lp2[j] - lp[j]).abs() < 1e-4, "col {j}");
    }
    assert!((lse2[0] - lse[0] - 100.0).abs() < 1e-4);
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::define;
    assert_eq!(THREADS as u64, define("subs.cu", "SUBS_THREADS"));
    assert_eq!(SUM_THREADS as u64, define("subs.cu", "SUBS_SUM_THREADS"));
}

#[path = "subs_xent_tests.rs"]
mod xent;
