//! Token embedding with the IMDM eps injection: the only launcher of `kernels/embedding.cu`,
//! its CPU twin and the comparison tests. Maths, shapes and thread mapping: see the kernel's
//! header. Also home of [`TokenId`], the token-id element types every kernel taking ids accepts.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

const MODULE: &str = "embedding";
/// Must equal EMB_THREADS in the kernel.
const THREADS: usize = 256;
/// Grid cap; the kernel's grid-stride loop covers any remainder.
const MAX_BLOCKS: usize = 1 << 20;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
}

/// Device token ids: `u32`, or `i32` as-is (valid ids have the same bits; a negative id reads
/// as an id >= V, which the kernels turn into a NaN row instead of an out-of-bounds access).
pub trait TokenId: DeviceRepr + sealed::Sealed {}
impl TokenId for u32 {}
impl TokenId for i32 {}

/// Launches `embedding_fwd_f32`: `h[r] = table[tokens[r]]`, plus `eps_add[r]` at rows whose
/// token is `mask_index` when `eps_add` is given (IMDM; `None` is MDLM). `table`: (V, d) f32
/// with V = `table.len() / d`; `tokens`: (rows); `eps_add`: (rows, d) bf16; `h`: (rows, d).
/// Every length is checked before the launch.
#[allow(clippy::too_many_arguments)]
pub fn embedding_fwd<I: TokenId>(
    gpu: &Gpu,
    h: &mut CudaSlice<f32>,
    table: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    eps_add: Option<&CudaSlice<bf16>>,
    mask_index: usize,
    rows: usize,
    d: usize,
) -> Result<()> {
    if d == 0 || d > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "embedding: d {d} must be in 1..=2^31-1 and rows {rows} at most 2^31-1"
        )));
    }
    let vocab = table.len() / d;
    if table.len() % d != 0 || vocab == 0 || vocab > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "embedding: table has {} elements, not a non-empty (V, {d}) matrix",
            table.len()
        )));
    }
    if h.len() != rows * d || tokens.len() != rows {
        return Err(Error::Shape(format!(
            "embedding: h has {} elements for rows {rows} x d {d}, tokens {} for rows {rows}",
            h.len(),
            tokens.len()
        )));
    }
    if let Some(e) = eps_add {
        if e.len() != rows * d {
            return Err(Error::Shape(format!(
                "embedding: eps_add has {} elements, expected rows {rows} x d {d}",
                e.len()
            )));
        }
    }
    if mask_index >= vocab {
        return Err(Error::Shape(format!(
            "embedding: mask_index {mask_index} is outside the vocabulary of {vocab}"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "embedding_fwd_f32")?;
    let (rows_i, d_i, vocab_i, mask_u) = (rows as i32, d as i32, vocab as i32, mask_index as u32);
    let null: u64 = 0;
    let units = rows * d / if d % 4 == 0 { 4 } else { 1 };
    let cfg = LaunchConfig {
        grid_dim: (units.div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(h).arg(table).arg(tokens);
    match eps_add {
        Some(e) => b.arg(e),
        None => b.arg(&null),
    };
    b.arg(&rows_i).arg(&d_i).arg(&vocab_i).arg(&mask_u);
    // SAFETY: argument order and types match the kernel signature (u32/i32 ids are both 4-byte
    // integers read as u32); h and eps_add hold rows*d elements, tokens rows and table V*d, as
    // checked above; the kernel's grid-stride loop stays below rows*d and never reads table
    // rows at ids >= V.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernel: the same lookup and the same single f32 add, so it is bit-exact.
pub mod cpu {
    use rayon::prelude::*;

    /// Returns h (rows, d) for `tokens`; `eps_add` (rows, d) holds the bf16 values as f32.
    /// Ids >= V give NaN rows, as in the kernel.
    pub fn embedding_fwd(
        table: &[f32],
        tokens: &[u32],
        eps_add: Option<&[f32]>,
        mask_index: usize,
        d: usize,
    ) -> Vec<f32> {
        let vocab = table.len() / d;
        let mut h = vec![0f32; tokens.len() * d];
        h.par_chunks_mut(d).enumerate().for_each(|(r, hr)| {
            let tok = tokens[r] as usize;
            if tok >= vocab {
                hr.fill(f32::NAN);
                return;
            }
            hr.copy_from_slice(&table[tok * d..(tok + 1) * d]);
            if let Some(e) = eps_add.filter(|_| tok == mask_index) {
                for (x, a) in hr.iter_mut().zip(&e[r * d..(r + 1) * d]) {
                    *x += a;
                }
            }
        });
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu_for_tests;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rayon::prelude::*;

    /// Seeded uniform values in [lo, hi), generated in parallel chunks.
    fn rand_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
            ch.iter_mut().for_each(|x| *x = rng.random_range(lo..hi));
        });
        v
    }

    /// Bit-exact comparison (NaN equal to NaN) with the first mismatch in the message.
    fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let bad = got
            .iter()
            .zip(want)
            .position(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()));
        if let Some(i) = bad {
            let n = got.iter().zip(want).filter(|(g, w)| g != w).count();
            panic!(
                "{name}: {n} mismatches; first at {i}: got {} want {}",
                got[i], want[i]
            );
        }
    }

    /// Tokens with about half the rows masked; the rest uniform over the vocabulary.
    fn tokens(seed: u64, rows: usize, vocab: usize, mask: usize) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows)
            .map(|_| {
                if rng.random_bool(0.5) {
                    mask as u32
                } else {
                    rng.random_range(0..vocab as u32)
                }
            })
            .collect()
    }

    fn run_gpu(
        gpu: &Gpu,
        table: &[f32],
        ids: &[u32],
        eps: Option<&[f32]>,
        mask: usize,
        d: usize,
    ) -> Vec<f32> {
        let s = &gpu.stream;
        let dt = s.clone_htod(table).unwrap();
        let dtok = s.clone_htod(ids).unwrap();
        let de = eps.map(|e| {
            let b: Vec<bf16> = e.iter().map(|&x| bf16::from_f32(x)).collect();
            s.clone_htod(&b).unwrap()
        });
        let mut h = s.alloc_zeros::<f32>(ids.len() * d).unwrap();
        embedding_fwd(gpu, &mut h, &dt, &dtok, de.as_ref(), mask, ids.len(), d).unwrap();
        s.clone_dtoh(&h).unwrap()
    }

    /// eps values already rounded to bf16, so the twin sees what the kernel reads.
    fn bf16_round(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
    }

    #[test]
    fn gpu_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        // (rows, d, V): DiT-small OWT and LM1B, then awkward widths (not % 4) and row counts.
        for &(rows, d, vocab) in &[
            (32 * 1024, 768, 50258),
            (512 * 128, 768, 30522),
            (1, 768, 50258),
            (7, 130, 1000),
            (129, 66, 17),
            (3 * 129, 6, 5),
        ] {
            let mask = vocab - 1;
            let table = rand_vec(vocab as u64, vocab * d, -0.04, 0.04);
            let ids = tokens(rows as u64, rows, vocab, mask);
            let eps = bf16_round(rand_vec(d as u64, rows * d, -1.0, 1.0));
            for with_eps in [true, false] {
                let e = with_eps.then_some(&eps[..]);
                let got = run_gpu(&gpu, &table, &ids, e, mask, d);
                let want = cpu::embedding_fwd(&table, &ids, e, mask, d);
                assert_bits_eq(
                    &format!("embedding rows {rows} d {d} eps {with_eps}"),
                    &got,
                    &want,
                );
            }
        }
        // Large magnitude, and an arange table (row t of E holds t*d + j exactly).
        let (rows, d, vocab) = (33, 768, 300);
        let big = rand_vec(1, vocab * d, -3e4, 3e4);
        let arange: Vec<f32> = (0..vocab * d).map(|i| i as f32).collect();
        let eps = bf16_round(rand_vec(2, rows * d, -500.0, 500.0));
        let ids = tokens(3, rows, vocab, 7);
        for table in [&big, &arange] {
            let got = run_gpu(&gpu, table, &ids, Some(&eps), 7, d);
            assert_bits_eq(
                "embedding structured",
                &got,
                &cpu::embedding_fwd(table, &ids, Some(&eps), 7, d),
            );
        }
    }

    #[test]
    fn gpu_bad_ids_and_i32_ids() {
        let Some(gpu) = gpu_for_tests() else { return };
        let (d, vocab) = (64, 100);
        let table = rand_vec(5, vocab * d, -1.0, 1.0);
        let ids: Vec<u32> = vec![3, 99, 100, u32::MAX, 0];
        let got = run_gpu(&gpu, &table, &ids, None, 99, d);
        assert_bits_eq(
            "embedding bad ids",
            &got,
            &cpu::embedding_fwd(&table, &ids, None, 99, d),
        );
        assert!(
            got[2 * d..4 * d].iter().all(|x| x.is_nan()),
            "ids >= V give NaN rows"
        );
        // i32 ids: the same rows, and -1 is a NaN row.
        let s = &gpu.stream;
        let ids_i: Vec<i32> = vec![3, 99, -1, 0];
        let (dt, dtok) = (s.clone_htod(&table).unwrap(), s.clone_htod(&ids_i).unwrap());
        let mut h = s.alloc_zeros::<f32>(4 * d).unwrap();
        embedding_fwd(&gpu, &mut h, &dt, &dtok, None, 99, 4, d).unwrap();
        let got = s.clone_dtoh(&h).unwrap();
        let want = cpu::embedding_fwd(&table, &[3, 99, u32::MAX, 0], None, 99, d);
        assert_bits_eq("embedding i32 ids", &got, &want);
    }

    #[test]
    fn gpu_rejects_bad_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let table = s.alloc_zeros::<f32>(10 * 8).unwrap();
        let ids = s.alloc_zeros::<u32>(4).unwrap();
        let eps = s.alloc_zeros::<bf16>(3 * 8).unwrap();
        let mut h = s.alloc_zeros::<f32>(4 * 8).unwrap();
        let cases = [
            embedding_fwd(&gpu, &mut h, &table, &ids, None, 9, 5, 8),
            embedding_fwd(&gpu, &mut h, &table, &ids, None, 9, 4, 6),
            embedding_fwd(&gpu, &mut h, &table, &ids, Some(&eps), 9, 4, 8),
            embedding_fwd(&gpu, &mut h, &table, &ids, None, 10, 4, 8),
        ];
        for (k, r) in cases.into_iter().enumerate() {
            assert!(matches!(r, Err(Error::Shape(_))), "case {k}: {r:?}");
        }
    }

    #[test]
    fn twin_looks_up_rows_and_adds_eps_only_at_mask_rows() {
        let (d, vocab, mask) = (3, 4, 3);
        let table: Vec<f32> = (0..vocab * d).map(|i| i as f32).collect();
        let ids = [2u32, 3, 0, 3, 7];
        let eps: Vec<f32> = (0..ids.len() * d).map(|i| 0.5 + i as f32).collect();
        let h = cpu::embedding_fwd(&table, &ids, Some(&eps), mask, d);
        assert_eq!(&h[0..3], &[6.0, 7.0, 8.0]);
        assert_eq!(&h[3..6], &[9.0 + 3.5, 10.0 + 4.5, 11.0 + 5.5]);
        assert_eq!(&h[6..9], &[0.0, 1.0, 2.0]);
        assert_eq!(&h[9..12], &[9.0 + 9.5, 10.0 + 10.5, 11.0 + 11.5]);
        assert!(
            h[12..15].iter().all(|x| x.is_nan()),
            "id 7 >= V gives a NaN row"
        );
        // MDLM: no injection anywhere.
        let h0 = cpu::embedding_fwd(&table, &ids[..4], None, mask, d);
        assert_eq!(&h0[3..6], &[9.0, 10.0, 11.0]);
    }
}
