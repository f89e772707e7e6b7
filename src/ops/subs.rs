//! SUBS log-softmax in fp32: the only launcher of `kernels/subs.cu`, its CPU twin and the
//! comparison tests. Maths, shapes and thread mapping: see the kernel's header.
//!
//! The launcher gives the kernel dynamic shared memory for one logits row when it fits the
//! device's opt-in limit (H100: 227 KiB, i.e. V <= 58,108 in f32 and twice that in bf16), so the
//! row is read from DRAM once; otherwise the kernel re-reads it from global memory (L2).

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::embedding::TokenId;

const MODULE: &str = "subs";
/// Must equal SUBS_THREADS in the kernel.
const THREADS: usize = 1024;
/// The kernel's static shared memory (two 32-float reduction arrays).
const STATIC_SMEM: usize = 256;

/// Logit element types with a SUBS kernel: the symbol and the elements per 16-byte vector.
trait Logit: DeviceRepr {
    const SYMBOL: &'static str;
    const VEC: usize;
}

impl Logit for f32 {
    const SYMBOL: &'static str = "subs_fwd_f32";
    const VEC: usize = 4;
}

impl Logit for bf16 {
    const SYMBOL: &'static str = "subs_fwd_bf16";
    const VEC: usize = 8;
}

/// Launches `subs_fwd_f32` on f32 logits (rows, vocab): writes `log_probs` (rows, vocab) and
/// `lse` (rows, the log-sum-exp saved for the backward). Every length is checked first.
#[allow(clippy::too_many_arguments)]
pub fn subs_fwd_f32<I: TokenId>(
    gpu: &Gpu,
    log_probs: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    mask_index: usize,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let shape = (mask_index, rows, vocab);
    launch(gpu, log_probs, lse, logits, tokens, shape, true)
}

/// [`subs_fwd_f32`] on bf16 logits (the reference's dtype); the maths stays fp32.
#[allow(clippy::too_many_arguments)]
pub fn subs_fwd_bf16<I: TokenId>(
    gpu: &Gpu,
    log_probs: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<bf16>,
    tokens: &CudaSlice<I>,
    mask_index: usize,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let shape = (mask_index, rows, vocab);
    launch(gpu, log_probs, lse, logits, tokens, shape, true)
}

/// The shared launcher; `allow_cache = false` forces the global re-read path (tests).
fn launch<T: Logit, I: TokenId>(
    gpu: &Gpu,
    log_probs: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<T>,
    tokens: &CudaSlice<I>,
    (mask_index, rows, vocab): (usize, usize, usize),
    allow_cache: bool,
) -> Result<()> {
    if !(2..=i32::MAX as usize).contains(&vocab) || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "subs: vocab {vocab} must be in 2..=2^31-1 and rows {rows} at most 2^31-1"
        )));
    }
    if mask_index >= vocab {
        return Err(Error::Shape(format!(
            "subs: mask_index {mask_index} is outside the vocabulary of {vocab}"
        )));
    }
    let n = rows * vocab;
    if logits.len() != n || log_probs.len() != n {
        return Err(Error::Shape(format!(
            "subs: logits have {} and log_probs {} elements, expected rows {rows} x vocab {vocab}",
            logits.len(),
            log_probs.len()
        )));
    }
    if lse.len() != rows || tokens.len() != rows {
        return Err(Error::Shape(format!(
            "subs: lse has {} and tokens {} elements, expected rows {rows}",
            lse.len(),
            tokens.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::SYMBOL)?;
    // Room for the row at an offset of up to VEC - 1 elements, in whole 16-byte vectors.
    let row_bytes = ((vocab + T::VEC) * std::mem::size_of::<T>()).next_multiple_of(16);
    let optin = gpu
        .ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    let cache = allow_cache && row_bytes + STATIC_SMEM <= optin.max(0) as usize;
    let smem = if cache { row_bytes } else { 0 };
    if cache {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let (vocab_i, mask_u, cache_i) = (vocab as i32, mask_index as u32, cache as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(log_probs)
        .arg(lse)
        .arg(logits)
        .arg(tokens)
        .arg(&vocab_i)
        .arg(&mask_u)
        .arg(&cache_i);
    // SAFETY: argument order and types match the kernel signature (u32/i32 ids are both 4-byte
    // integers read as u32); logits and log_probs hold rows*vocab elements, lse and tokens rows,
    // as checked above; one block per row; with cache_i = 1 the dynamic shared memory holds
    // vocab + VEC elements, the most the kernel indexes (row offset < VEC), and the function's
    // dynamic shared memory limit was raised to that size.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernels: the same SUBS maths with f64 max / sum / lse.
pub mod cpu {
    pub use crate::model::dit_ref::NEG_INF;
    use rayon::prelude::*;

    /// Returns (log_probs (rows, v), lse (rows)) for logits (rows, v) given as f32 (bf16
    /// logits: their exact f32 values). Ids >= v give a NaN row and lse, as in the kernel.
    pub fn subs_fwd(
        logits: &[f32],
        tokens: &[u32],
        mask_index: usize,
        v: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0f32; logits.len()];
        let mut lse = vec![0f32; tokens.len()];
        out.par_chunks_mut(v)
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each(|(r, (row, l))| {
                let tok = tokens[r] as usize;
                if tok != mask_index {
                    if tok >= v {
                        row.fill(f32::NAN);
                        *l = f32::NAN;
                    } else {
                        row.fill(NEG_INF);
                        row[tok] = 0.0;
                        *l = 0.0;
                    }
                    return;
                }
                let x = &logits[r * v..(r + 1) * v];
                let kept = || x.iter().enumerate().filter(|&(j, _)| j != mask_index);
                let m = kept()
                    .map(|(_, &a)| a as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = kept().map(|(_, &a)| (a as f64 - m).exp()).sum();
                let lse_r = m + s.ln();
                for (j, o) in row.iter_mut().enumerate() {
                    let a = if j == mask_index { NEG_INF } else { x[j] };
                    *o = (a as f64 - lse_r) as f32;
                }
                *l = lse_r as f32;
            });
        (out, lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu_for_tests;
    use crate::model::dit_ref::subs_log_probs;
    use crate::tensor::{Tensor, Tokens};
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

    /// GPU (bf16 or f32 logits, cached row or not) against the twin.
    fn check(gpu: &Gpu, logits: &[f32], ids: &[u32], mask: usize, bf16_in: bool, cache: bool) {
        let (rows, s) = (ids.len(), &gpu.stream);
        let v = logits.len() / rows;
        let mut lp = s.alloc_zeros::<f32>(logits.len()).unwrap();
        let mut lse = s.alloc_zeros::<f32>(rows).unwrap();
        let dtok = s.clone_htod(ids).unwrap();
        let shape = (mask, rows, v);
        if bf16_in {
            let b: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
            let dl = s.clone_htod(&b).unwrap();
            launch(gpu, &mut lp, &mut lse, &dl, &dtok, shape, cache).unwrap();
        } else {
            let dl = s.clone_htod(logits).unwrap();
            launch(gpu, &mut lp, &mut lse, &dl, &dtok, shape, cache).unwrap();
        }
        // The twin sees exactly what the kernel sees: bf16 inputs are rounded first (the ramp
        // below is not bf16-exact; comparing against unrounded logits once failed by 0.13).
        let seen: Vec<f32> = match bf16_in {
            true => logits.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            false => logits.to_vec(),
        };
        let (lp_ref, lse_ref) = cpu::subs_fwd(&seen, ids, mask, v);
        let tag = format!("rows {rows} V {v} mask {mask} bf16 {bf16_in} cache {cache}");
        let got = s.clone_dtoh(&lp).unwrap();
        assert_close(
            &format!("subs log_probs {tag}"),
            &got,
            &lp_ref,
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
                check(&gpu, &logits, &ids, mask, bf16_in, true);
                if rows <= 129 {
                    check(&gpu, &logits, &ids, mask, bf16_in, false);
                }
            }
        }
        // The re-read path at the real vocabulary, and an over-large row (no cache possible).
        for &(rows, v) in &[(64, 50258), (3, 130_001)] {
            let ids = tokens(1, rows, v, v - 1);
            for bf16_in in [false, true] {
                let logits = rand_logits(2, rows * v, -8.0, 8.0, bf16_in);
                check(&gpu, &logits, &ids, v - 1, bf16_in, rows == 3);
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
            check(&gpu, &logits, &ids, v - 1, false, true);
            check(&gpu, &logits, &ids, v - 1, true, true);
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
        subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, 99, rows, v).unwrap();
        let (got, l) = (s.clone_dtoh(&lp).unwrap(), s.clone_dtoh(&lse).unwrap());
        assert!(
            got[v..2 * v].iter().all(|x| x.is_nan()) && l[1].is_nan(),
            "id >= V: NaN row"
        );
        assert!(got[2 * v + 5] == 0.0 && got[2 * v] == cpu::NEG_INF && l[2] == 0.0);
        let bad = [
            subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, 100, rows, v),
            subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, 9, rows, v + 1),
            subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, 9, rows - 1, v),
            subs_fwd_f32(&gpu, &mut lp, &mut lse, &logits, &ids, 0, rows * v, 1),
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
}
