//! Token embedding with the IMDM eps injection: the only launcher of `kernels/embedding.cu`,
//! its CPU twin and the comparison tests. Maths, shapes and thread mapping: see the kernel's
//! header. Also home of [`TokenId`], the token-id element types every kernel taking ids accepts.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};

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

/// Must equal EMB_BWD_THREADS in the kernel.
const BWD_THREADS: usize = 128;
/// Must equal EMB_BWD_ITEM_ROWS in the kernel: the most rows one stage-1 block sums.
pub const ITEM_ROWS: usize = 64;

/// The host side of the deterministic scatter-add: the token ids grouped by a counting sort
/// (see the kernel header for the layout). Built by [`SegmentPlan::new`]; uploaded by
/// [`EmbeddingBwdPlan::load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPlan {
    /// (rows) row indices sorted by id; rows ascending within an id.
    pub order: Vec<u32>,
    /// (n_items + 1) offsets into `order`; each item has 1..=ITEM_ROWS rows of one id.
    pub item_start: Vec<u32>,
    /// (n_seg) distinct ids, ascending.
    pub seg_token: Vec<u32>,
    /// (n_seg + 1) offsets into the items.
    pub seg_item: Vec<u32>,
}

impl SegmentPlan {
    /// Counting sort of `tokens` over `vocab` ids, O(rows + vocab). Fails on an id >= vocab
    /// (the forward turns those into NaN rows; there is no row of E to send a gradient to).
    pub fn new(tokens: &[u32], vocab: usize) -> Result<Self> {
        if tokens.len() > u32::MAX as usize / 2 {
            return Err(Error::Shape(format!(
                "embedding backward: {} rows is too many for u32 offsets",
                tokens.len()
            )));
        }
        let mut count = vec![0u32; vocab + 1];
        for (r, &t) in tokens.iter().enumerate() {
            if t as usize >= vocab {
                return Err(Error::Shape(format!(
                    "embedding backward: id {t} at row {r} is outside the vocabulary of {vocab}"
                )));
            }
            count[t as usize + 1] += 1;
        }
        // Exclusive prefix sums: ids v occupy order[start[v] .. start[v+1]).
        for v in 0..vocab {
            count[v + 1] += count[v];
        }
        let start = count;
        let mut fill = start.clone();
        let mut order = vec![0u32; tokens.len()];
        for (r, &t) in tokens.iter().enumerate() {
            order[fill[t as usize] as usize] = r as u32;
            fill[t as usize] += 1;
        }
        let (mut item_start, mut seg_token, mut seg_item) = (vec![0u32], Vec::new(), vec![0u32]);
        for v in 0..vocab {
            let (a, b) = (start[v] as usize, start[v + 1] as usize);
            if a == b {
                continue;
            }
            let mut q = a;
            while q < b {
                q = (q + ITEM_ROWS).min(b);
                item_start.push(q as u32);
            }
            seg_token.push(v as u32);
            seg_item.push((item_start.len() - 1) as u32);
        }
        Ok(SegmentPlan {
            order,
            item_start,
            seg_token,
            seg_item,
        })
    }

    pub fn n_items(&self) -> usize {
        self.item_start.len() - 1
    }

    pub fn n_seg(&self) -> usize {
        self.seg_token.len()
    }

    /// The most items `rows` ids can need: one partial item per distinct id plus full ones.
    pub fn max_items(rows: usize) -> usize {
        rows + rows.div_ceil(ITEM_ROWS)
    }
}

/// Device buffers of the embedding backward for up to `max_rows` rows of width `d`: the uploaded
/// [`SegmentPlan`] and the (items, d) f32 partial sums. Allocate once, [`load`] per batch.
///
/// [`load`]: EmbeddingBwdPlan::load
pub struct EmbeddingBwdPlan {
    order: CudaSlice<u32>,
    item_start: CudaSlice<u32>,
    seg_token: CudaSlice<u32>,
    seg_item: CudaSlice<u32>,
    part: CudaSlice<f32>,
    max_rows: usize,
    d: usize,
    rows: usize,
    n_items: usize,
    n_seg: usize,
    vocab: usize,
}

impl EmbeddingBwdPlan {
    pub fn new(gpu: &Gpu, max_rows: usize, d: usize) -> Result<Self> {
        let s = &gpu.stream;
        let items = SegmentPlan::max_items(max_rows);
        Ok(EmbeddingBwdPlan {
            order: s.alloc_zeros(max_rows.max(1))?,
            item_start: s.alloc_zeros(items + 1)?,
            seg_token: s.alloc_zeros(max_rows.max(1))?,
            seg_item: s.alloc_zeros(max_rows + 1)?,
            part: s.alloc_zeros((items * d).max(1))?,
            max_rows,
            d,
            rows: 0,
            n_items: 0,
            n_seg: 0,
            vocab: 0,
        })
    }

    /// Builds the plan for `tokens` (the forward's input ids, host copy) on the host and
    /// uploads it (four small copies, about 8 bytes per row).
    pub fn load(&mut self, gpu: &Gpu, tokens: &[u32], vocab: usize) -> Result<()> {
        if tokens.len() > self.max_rows {
            return Err(Error::Shape(format!(
                "embedding backward: {} rows exceed the plan's capacity of {}",
                tokens.len(),
                self.max_rows
            )));
        }
        let plan = SegmentPlan::new(tokens, vocab)?;
        let s = &gpu.stream;
        if !tokens.is_empty() {
            s.memcpy_htod(&plan.order, &mut self.order)?;
            s.memcpy_htod(&plan.seg_token, &mut self.seg_token)?;
        }
        s.memcpy_htod(&plan.item_start, &mut self.item_start)?;
        s.memcpy_htod(&plan.seg_item, &mut self.seg_item)?;
        self.rows = tokens.len();
        self.n_items = plan.n_items();
        self.n_seg = plan.n_seg();
        self.vocab = vocab;
        Ok(())
    }
}

/// Launches the embedding backward for the ids last [`EmbeddingBwdPlan::load`]ed:
/// `dtable` (V, d) f32 **+=** the scatter-add of `dh` (rows, d) f32 rows by id
/// (`embedding_bwd_f32`, then `embedding_bwd_reduce_f32`). Deterministic: no atomics, fixed
/// summation order. Every length is checked before launching.
pub fn embedding_bwd(
    gpu: &Gpu,
    dtable: &mut CudaSlice<f32>,
    plan: &mut EmbeddingBwdPlan,
    dh: &CudaSlice<f32>,
    rows: usize,
    d: usize,
) -> Result<()> {
    if d == 0 || d > i32::MAX as usize || d != plan.d || rows != plan.rows {
        return Err(Error::Shape(format!(
            "embedding backward: rows {rows} x d {d}, but the plan was loaded for rows {} x d {}",
            plan.rows, plan.d
        )));
    }
    if dh.len() != rows * d || dtable.len() != plan.vocab * d {
        return Err(Error::Shape(format!(
            "embedding backward: dh has {} elements (expected {}), dtable {} (expected V {} x d \
             {d})",
            dh.len(),
            rows * d,
            dtable.len(),
            plan.vocab
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let units = if d % 4 == 0 { d / 4 } else { d };
    let tiles = units.div_ceil(BWD_THREADS) as u32;
    let (n_items_i, n_seg_i, d_i, vocab_i) = (
        plan.n_items as i32,
        plan.n_seg as i32,
        d as i32,
        plan.vocab as i32,
    );

    let f = gpu.function(MODULE, "embedding_bwd_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (plan.n_items as u32, tiles, 1),
        block_dim: (BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut plan.part)
        .arg(dh)
        .arg(&plan.order)
        .arg(&plan.item_start)
        .arg(&n_items_i)
        .arg(&d_i);
    // SAFETY: argument order and types match the kernel signature; the plan's buffers hold the
    // uploaded counting sort (order: rows ids < rows, item_start: n_items + 1 offsets <= rows),
    // part holds at least n_items*d floats (capacity max_items(max_rows)*d), dh rows*d; one
    // block per item, units strided below d.
    unsafe { b.launch(cfg) }?;

    let f = gpu.function(MODULE, "embedding_bwd_reduce_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (plan.n_seg as u32, tiles, 1),
        block_dim: (BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dtable)
        .arg(&plan.part)
        .arg(&plan.seg_token)
        .arg(&plan.seg_item)
        .arg(&n_seg_i)
        .arg(&d_i)
        .arg(&vocab_i);
    // SAFETY: argument order and types match the kernel signature; seg_token holds n_seg ids <
    // V (validated by SegmentPlan::new; the kernel re-checks), seg_item n_seg + 1 offsets <=
    // n_items into the partials written by the first kernel on the same stream; dtable holds
    // V*d floats, as checked above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Launches `embedding_eps_bwd_bf16`: `d_eps_add` (rows, d) bf16 **=** `dh` at rows whose id is
/// `mask_index`, 0 elsewhere (the backward of the forward's masked eps add). Lengths checked.
#[allow(clippy::too_many_arguments)]
pub fn embedding_eps_bwd<I: TokenId>(
    gpu: &Gpu,
    d_eps_add: &mut CudaSlice<bf16>,
    dh: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    mask_index: usize,
    rows: usize,
    d: usize,
) -> Result<()> {
    if d == 0 || d > i32::MAX as usize || rows > i32::MAX as usize || mask_index > u32::MAX as usize
    {
        return Err(Error::Shape(format!(
            "embedding eps backward: d {d} must be in 1..=2^31-1, rows {rows} at most 2^31-1"
        )));
    }
    if d_eps_add.len() != rows * d || dh.len() != rows * d || tokens.len() != rows {
        return Err(Error::Shape(format!(
            "embedding eps backward: d_eps_add/dh hold {}/{} elements (expected rows {rows} x d \
             {d}), tokens {}",
            d_eps_add.len(),
            dh.len(),
            tokens.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "embedding_eps_bwd_bf16")?;
    let (rows_i, d_i, mask_u) = (rows as i32, d as i32, mask_index as u32);
    let cfg = LaunchConfig {
        grid_dim: (
            (rows * d).div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(d_eps_add)
        .arg(dh)
        .arg(tokens)
        .arg(&rows_i)
        .arg(&d_i)
        .arg(&mask_u);
    // SAFETY: argument order and types match the kernel signature (u32/i32 ids are 4-byte
    // integers read as u32); d_eps_add and dh hold rows*d elements and tokens rows, as checked
    // above; the grid-stride loop stays below rows*d.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernels: the same lookup and the same single f32 add, so it is bit-exact.
pub mod cpu {
    use rayon::prelude::*;

    /// Element types of the twin's forward: f32 (the kernel's) and f64 (finite differences).
    pub trait Elem: Copy + Send + Sync + std::ops::AddAssign {
        const NAN: Self;
    }
    impl Elem for f32 {
        const NAN: Self = f32::NAN;
    }
    impl Elem for f64 {
        const NAN: Self = f64::NAN;
    }

    /// Returns h (rows, d) for `tokens`; `eps_add` (rows, d) holds the bf16 values as f32.
    /// Ids >= V give NaN rows, as in the kernel.
    pub fn embedding_fwd<T: Elem>(
        table: &[T],
        tokens: &[u32],
        eps_add: Option<&[T]>,
        mask_index: usize,
        d: usize,
    ) -> Vec<T> {
        let vocab = table.len() / d;
        let mut h = vec![T::NAN; tokens.len() * d];
        h.par_chunks_mut(d).enumerate().for_each(|(r, hr)| {
            let tok = tokens[r] as usize;
            if tok >= vocab {
                hr.fill(T::NAN);
                return;
            }
            hr.copy_from_slice(&table[tok * d..(tok + 1) * d]);
            if let Some(e) = eps_add.filter(|_| tok == mask_index) {
                for (x, a) in hr.iter_mut().zip(&e[r * d..(r + 1) * d]) {
                    *x += *a;
                }
            }
        });
        h
    }

    /// `dtable += ` the scatter-add of `dh` rows by id, each (id, column) summed in f64 over
    /// its rows in ascending order and rounded once. Ids >= V contribute nothing.
    pub fn embedding_bwd(dtable: &mut [f32], dh: &[f32], tokens: &[u32], d: usize) {
        let vocab = dtable.len() / d;
        let mut rows_of: Vec<Vec<usize>> = vec![Vec::new(); vocab];
        for (r, &t) in tokens.iter().enumerate() {
            if (t as usize) < vocab {
                rows_of[t as usize].push(r);
            }
        }
        dtable
            .par_chunks_mut(d)
            .zip(rows_of.par_iter())
            .filter(|(_, rs)| !rs.is_empty())
            .for_each(|(row, rs)| {
                for (j, v) in row.iter_mut().enumerate() {
                    let s: f64 = rs.iter().map(|&r| dh[r * d + j] as f64).sum();
                    *v = (*v as f64 + s) as f32;
                }
            });
    }

    /// `d_eps_add = dh` at rows whose id is `mask_index`, 0 elsewhere.
    pub fn embedding_eps_bwd(
        d_eps_add: &mut [f32],
        dh: &[f32],
        tokens: &[u32],
        mask_index: usize,
        d: usize,
    ) {
        d_eps_add
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(r, out)| {
                if tokens[r] as usize == mask_index {
                    out.copy_from_slice(&dh[r * d..(r + 1) * d]);
                } else {
                    out.fill(0.0);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gpu_for_tests;
    use crate::cuda::ops::grad_check::{assert_close_scaled, assert_grad, f64s, fd_grad};
    use crate::testing::Tol;
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

    // ---- backward ----------------------------------------------------------------------------

    /// The GPU's two stages emulated in f32 in exactly the kernels' order (stage 1: each item's
    /// rows in plan order; stage 2: each segment's items in order, then one add into dtable),
    /// so the GPU result must match it bit for bit.
    fn emulate_gpu_bwd(plan: &SegmentPlan, dtable: &mut [f32], dh: &[f32], d: usize) {
        let part: Vec<Vec<f32>> = (0..plan.n_items())
            .map(|k| {
                let mut s = vec![0f32; d];
                for q in plan.item_start[k]..plan.item_start[k + 1] {
                    let r = plan.order[q as usize] as usize;
                    for j in 0..d {
                        s[j] += dh[r * d + j];
                    }
                }
                s
            })
            .collect();
        for (sg, &tok) in plan.seg_token.iter().enumerate() {
            let mut s = vec![0f32; d];
            for p in &part[plan.seg_item[sg] as usize..plan.seg_item[sg + 1] as usize] {
                for j in 0..d {
                    s[j] += p[j];
                }
            }
            for j in 0..d {
                dtable[tok as usize * d + j] += s[j];
            }
        }
    }

    /// Σ |terms| per element of dtable (its initial value and every dh row added to it).
    fn dtable_scale(dtable0: &[f32], dh: &[f32], ids: &[u32], d: usize) -> Vec<f64> {
        let mut sc: Vec<f64> = dtable0.iter().map(|v| v.abs() as f64).collect();
        for (r, &t) in ids.iter().enumerate() {
            for j in 0..d {
                sc[t as usize * d + j] += dh[r * d + j].abs() as f64;
            }
        }
        sc
    }

    #[test]
    fn segment_plan_is_a_stable_counting_sort() {
        for &(rows, vocab, mask) in &[(300, 50, 49), (1000, 7, 3), (1, 10, 0), (129, 50258, 50257)]
        {
            let ids = tokens(rows as u64, rows, vocab, mask);
            let plan = SegmentPlan::new(&ids, vocab).unwrap();
            // order: a permutation, ids non-decreasing, rows ascending within an id.
            let mut seen = vec![false; rows];
            for w in plan.order.windows(2) {
                let (a, b) = (w[0] as usize, w[1] as usize);
                assert!(
                    ids[a] < ids[b] || (ids[a] == ids[b] && a < b),
                    "order {a} {b}"
                );
            }
            plan.order.iter().for_each(|&r| seen[r as usize] = true);
            assert!(seen.iter().all(|&x| x), "order is a permutation");
            // items: 1..=ITEM_ROWS rows of one id each, covering order exactly.
            assert_eq!(*plan.item_start.last().unwrap() as usize, rows);
            for k in 0..plan.n_items() {
                let (a, b) = (plan.item_start[k] as usize, plan.item_start[k + 1] as usize);
                assert!(b > a && b - a <= ITEM_ROWS, "item {k}: {a}..{b}");
                let t = ids[plan.order[a] as usize];
                assert!(plan.order[a..b].iter().all(|&r| ids[r as usize] == t));
            }
            // segments: the distinct ids ascending, each owning exactly its items.
            let mut distinct: Vec<u32> = ids.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(plan.seg_token, distinct);
            assert_eq!(*plan.seg_item.last().unwrap() as usize, plan.n_items());
            for (sg, &t) in plan.seg_token.iter().enumerate() {
                let (k0, k1) = (plan.seg_item[sg] as usize, plan.seg_item[sg + 1] as usize);
                let n: usize = (k0..k1)
                    .map(|k| (plan.item_start[k + 1] - plan.item_start[k]) as usize)
                    .sum();
                assert_eq!(n, ids.iter().filter(|&&x| x == t).count(), "id {t}");
                assert_eq!(k1 - k0, n.div_ceil(ITEM_ROWS), "id {t}: items");
            }
            assert!(plan.n_items() <= SegmentPlan::max_items(rows));
        }
        assert!(matches!(SegmentPlan::new(&[1, 5], 5), Err(Error::Shape(_))));
    }

    #[test]
    fn twin_bwd_matches_finite_differences() {
        // F = Σ G ⊙ h, h = embedding_fwd(table, ids, eps) in f64.
        let (d, vocab, mask) = (5, 6, 5);
        let ids = [2u32, 5, 0, 5, 2, 2, 5];
        let rows = ids.len();
        let g = rand_vec(1, rows * d, -1.0, 1.0);
        let table = rand_vec(2, vocab * d, -1.0, 1.0);
        let eps = rand_vec(3, rows * d, -1.0, 1.0);
        let dt0 = rand_vec(4, vocab * d, -1.0, 1.0);
        let mut dt = dt0.clone();
        cpu::embedding_bwd(&mut dt, &g, &ids, d);
        let mut de = vec![7f32; rows * d];
        cpu::embedding_eps_bwd(&mut de, &g, &ids, mask, d);
        let f = |t: &[f64], e: &[f64]| -> f64 {
            let h = cpu::embedding_fwd(t, &ids, Some(e), mask, d);
            h.iter().zip(&g).map(|(a, b)| a * *b as f64).sum()
        };
        let (t64, e64) = (f64s(&table), f64s(&eps));
        let tol = Tol {
            abs: 1e-6,
            rel: 1e-6,
        };
        let fd = fd_grad(|v| f(v, &e64), &t64, 1e-3, None);
        let delta: Vec<f64> = dt.iter().zip(&dt0).map(|(a, b)| (a - b) as f64).collect();
        assert_grad("embedding dtable", &delta, &fd, tol);
        let fd = fd_grad(|v| f(&t64, v), &e64, 1e-3, None);
        assert_grad("embedding d eps_add", &f64s(&de), &fd, tol);
        // Unused ids (1, 3, 4) keep their initial gradient exactly.
        for v in [1, 3, 4] {
            assert_eq!(&dt[v * d..(v + 1) * d], &dt0[v * d..(v + 1) * d]);
        }
    }

    #[test]
    fn plan_emulation_matches_twin() {
        // The GPU algorithm's f32 summation order (emulated here) against the f64 twin, with a
        // dominant mask id whose rows span many items.
        // The real shape (32 x 1024 rows, D 768, V 50258: the mask id spans 256 items) is the
        // one the GPU test checks against this emulation bit for bit.
        for &(rows, d, vocab) in &[(2000, 24, 300), (32 * 1024, 768, 50258)] {
            let mask = vocab - 1;
            let ids = tokens(11, rows, vocab, mask);
            let dh = rand_vec(12, rows * d, -1.0, 1.0);
            let dt0 = rand_vec(13, vocab * d, -1.0, 1.0);
            let plan = SegmentPlan::new(&ids, vocab).unwrap();
            let mut got = dt0.clone();
            emulate_gpu_bwd(&plan, &mut got, &dh, d);
            let mut want = dt0.clone();
            cpu::embedding_bwd(&mut want, &dh, &ids, d);
            let sc = dtable_scale(&dt0, &dh, &ids, d);
            let tag = format!("rows {rows} d {d} V {vocab}");
            assert_close_scaled(
                &format!("embedding bwd emulation vs twin {tag}"),
                &got,
                &want,
                &sc,
                1e-5,
            );
        }
    }

    /// Runs the GPU dE backward; returns dtable read back (it starts at `dt0`).
    fn run_bwd(gpu: &Gpu, dt0: &[f32], dh: &[f32], ids: &[u32], d: usize) -> Vec<f32> {
        let (s, vocab) = (&gpu.stream, dt0.len() / d);
        let mut plan = EmbeddingBwdPlan::new(gpu, ids.len() + 5, d).unwrap();
        plan.load(gpu, ids, vocab).unwrap();
        let mut dt = s.clone_htod(dt0).unwrap();
        let ddh = s.clone_htod(dh).unwrap();
        embedding_bwd(gpu, &mut dt, &mut plan, &ddh, ids.len(), d).unwrap();
        s.clone_dtoh(&dt).unwrap()
    }

    #[test]
    fn gpu_bwd_matches_twin_and_emulation() {
        let Some(gpu) = gpu_for_tests() else { return };
        // (rows, d, V): DiT-small OWT (32 x 1024 rows), then awkward widths and row counts.
        for &(rows, d, vocab) in &[
            (32 * 1024, 768, 50258),
            (1, 768, 50258),
            (7, 130, 1000),
            (129, 66, 17),
            (3 * 129, 6, 5),
        ] {
            let mask = vocab - 1;
            let ids = tokens(rows as u64, rows, vocab, mask);
            let dh = rand_vec(d as u64, rows * d, -1.0, 1.0);
            let dt0 = rand_vec(vocab as u64, vocab * d, -0.5, 0.5);
            let got = run_bwd(&gpu, &dt0, &dh, &ids, d);
            let tag = format!("rows {rows} d {d} V {vocab}");
            let plan = SegmentPlan::new(&ids, vocab).unwrap();
            let mut emu = dt0.clone();
            emulate_gpu_bwd(&plan, &mut emu, &dh, d);
            assert_bits_eq(&format!("embedding bwd vs emulation {tag}"), &got, &emu);
            let mut want = dt0.clone();
            cpu::embedding_bwd(&mut want, &dh, &ids, d);
            let sc = dtable_scale(&dt0, &dh, &ids, d);
            assert_close_scaled(&format!("embedding bwd {tag}"), &got, &want, &sc, 1e-5);
            // The same call twice: bit-identical (no atomics).
            let again = run_bwd(&gpu, &dt0, &dh, &ids, d);
            assert_bits_eq(&format!("embedding bwd run-to-run {tag}"), &got, &again);
        }
    }

    #[test]
    fn gpu_eps_bwd_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        for &(rows, d, vocab) in &[(32 * 1024, 768, 50258), (1, 768, 50258), (129, 66, 17)] {
            let mask = vocab - 1;
            let ids = tokens(rows as u64 + 3, rows, vocab, mask);
            let dh = rand_vec(d as u64 + 3, rows * d, -2.0, 2.0);
            let (ddh, dtok) = (s.clone_htod(&dh).unwrap(), s.clone_htod(&ids).unwrap());
            let mut de = s.alloc_zeros::<bf16>(rows * d).unwrap();
            embedding_eps_bwd(&gpu, &mut de, &ddh, &dtok, mask, rows, d).unwrap();
            let got: Vec<f32> = s
                .clone_dtoh(&de)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let mut want = vec![0f32; rows * d];
            cpu::embedding_eps_bwd(&mut want, &dh, &ids, mask, d);
            // One round to nearest even on both sides: bit-exact after rounding the twin.
            let want: Vec<f32> = want.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
            assert_bits_eq(&format!("embedding eps bwd rows {rows} d {d}"), &got, &want);
        }
    }

    #[test]
    fn gpu_bwd_rejects_bad_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let (d, vocab) = (8, 10);
        let mut plan = EmbeddingBwdPlan::new(&gpu, 4, d).unwrap();
        assert!(matches!(
            plan.load(&gpu, &[1, 2, 3, 4, 5], vocab),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            plan.load(&gpu, &[1, 2, 10], vocab),
            Err(Error::Shape(_))
        ));
        plan.load(&gpu, &[1, 2, 3], vocab).unwrap();
        let mut dt = s.alloc_zeros::<f32>(vocab * d).unwrap();
        let dh = s.alloc_zeros::<f32>(4 * d).unwrap();
        let r = embedding_bwd(&gpu, &mut dt, &mut plan, &dh, 4, d);
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        let dh = s.alloc_zeros::<f32>(3 * d).unwrap();
        let mut small = s.alloc_zeros::<f32>((vocab - 1) * d).unwrap();
        let r = embedding_bwd(&gpu, &mut small, &mut plan, &dh, 3, d);
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        embedding_bwd(&gpu, &mut dt, &mut plan, &dh, 3, d).unwrap();
    }
}
