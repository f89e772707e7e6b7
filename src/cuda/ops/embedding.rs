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
#[path = "embedding_tests.rs"]
mod tests;
