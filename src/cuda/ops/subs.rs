//! SUBS log-softmax in fp32: the only launcher of `kernels/subs.cu`, its CPU twin and the
//! comparison tests. Maths, shapes and thread mapping: see the kernel's header.
//!
//! The launcher gives the kernel dynamic shared memory for one logits row when it fits the
//! device's opt-in limit (H100: 227 KiB, i.e. V <= 58,108 in f32 and twice that in bf16), so the
//! row is read from DRAM once; otherwise the kernel re-reads it from global memory (L2).

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::ops::embedding::TokenId;
use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "subs";
/// Must equal SUBS_THREADS in the kernel.
const THREADS: usize = 1024;
/// Must equal SUBS_SUM_THREADS in the kernel (one block sums the per-row losses).
const SUM_THREADS: usize = 1024;
/// The kernel's static shared memory (two 32-float reduction arrays).
const STATIC_SMEM: usize = 256;

/// Logit element types with a SUBS kernel: the symbol and the elements per 16-byte vector.
trait Logit: DeviceRepr {
    const SYMBOL: &'static str;
    /// The fused loss + backward kernel for this logit dtype.
    const BWD_SYMBOL: &'static str;
    const VEC: usize;
}

impl Logit for f32 {
    const SYMBOL: &'static str = "subs_fwd_f32";
    const BWD_SYMBOL: &'static str = "subs_bwd_f32";
    const VEC: usize = 4;
}

impl Logit for bf16 {
    const SYMBOL: &'static str = "subs_fwd_bf16";
    const BWD_SYMBOL: &'static str = "subs_bwd_bf16";
    const VEC: usize = 8;
}

/// Launches `subs_fwd_f32` on f32 logits (rows, ld): writes `log_probs` (rows, ld; the
/// padding columns `vocab..ld` are left as they were) and `lse` (rows, the log-sum-exp saved for
/// the backward). Every length is checked first.
pub fn subs_fwd_f32<I: TokenId>(
    gpu: &Gpu,
    log_probs: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    shape: SubsShape,
) -> Result<()> {
    launch(gpu, log_probs, lse, logits, tokens, shape, true)
}

/// [`subs_fwd_f32`] on bf16 logits (the reference's dtype); the maths stays fp32.
pub fn subs_fwd_bf16<I: TokenId>(
    gpu: &Gpu,
    log_probs: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<bf16>,
    tokens: &CudaSlice<I>,
    shape: SubsShape,
) -> Result<()> {
    launch(gpu, log_probs, lse, logits, tokens, shape, true)
}

/// Checks a [`SubsShape`] against the kernels' limits: `2 <= vocab <= ld`, `mask_index <
/// vocab`, and every count within an i32.
fn check_shape(shape: &SubsShape) -> Result<()> {
    let SubsShape {
        rows,
        vocab,
        ld,
        mask_index,
    } = *shape;
    if vocab < 2 || ld < vocab || rows.max(ld) > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "subs: need 2 <= vocab <= ld <= 2^31-1 and rows <= 2^31-1, got {shape:?}"
        )));
    }
    if mask_index >= vocab {
        return Err(Error::Shape(format!(
            "subs: mask_index {mask_index} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// The shared launcher; `allow_cache = false` forces the global re-read path (tests).
fn launch<T: Logit, I: TokenId>(
    gpu: &Gpu,
    log_probs: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<T>,
    tokens: &CudaSlice<I>,
    shape: SubsShape,
    allow_cache: bool,
) -> Result<()> {
    check_shape(&shape)?;
    let SubsShape {
        rows,
        vocab,
        ld,
        mask_index,
    } = shape;
    let n = rows * ld;
    if logits.len() != n || log_probs.len() != n {
        return Err(Error::Shape(format!(
            "subs: logits have {} and log_probs {} elements, expected rows {rows} x ld {ld}",
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
    let (vocab_i, ld_i) = (vocab as i32, ld as i32);
    let (mask_u, cache_i) = (mask_index as u32, cache as i32);
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
        .arg(&ld_i)
        .arg(&mask_u)
        .arg(&cache_i);
    // SAFETY: argument order and types match the kernel signature (u32/i32 ids are both 4-byte
    // integers read as u32); logits and log_probs hold rows*ld elements (ld >= vocab), lse and
    // tokens rows,
    // as checked above; one block per row; with cache_i = 1 the dynamic shared memory holds
    // vocab + VEC elements, the most the kernel indexes (row offset < VEC), and the function's
    // dynamic shared memory limit was raised to that size.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The backward kernel's static shared memory (two 32-float arrays and one float), rounded up.
const BWD_STATIC_SMEM: usize = 512;

/// Shape of a SUBS call (forward, or fused cross-entropy): `rows` logit rows of `vocab` real
/// columns stored with row stride `ld >= vocab` (padding columns `vocab..ld` are ignored; the
/// backward gives them gradient 0, the forward leaves them unwritten).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubsShape {
    pub rows: usize,
    pub vocab: usize,
    pub ld: usize,
    pub mask_index: usize,
}

/// Fused SUBS log-softmax + weighted cross-entropy, loss and backward, on bf16 logits
/// (`subs_bwd_bf16`; maths in the kernel header). `logits` (rows, ld) bf16 is overwritten **in
/// place** by d logits (bf16, dense (rows, ld): the operand of the dW and dy GEMMs, K = ld);
/// `loss` (rows) f32 **=** `w_r / norm · (-log p(x0_r | xt_r))` (0 at carry-over rows and rows
/// with w = 0); `tokens` = xt, `targets` = x0, `weight` = w, all (rows). Sum `loss` with
/// [`subs_loss_sum`] or on the host. Every length is checked first.
#[allow(clippy::too_many_arguments)]
pub fn subs_bwd_bf16<I: TokenId>(
    gpu: &Gpu,
    logits: &mut CudaSlice<bf16>,
    loss: &mut CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    targets: &CudaSlice<I>,
    weight: &CudaSlice<f32>,
    shape: SubsShape,
    norm: f32,
) -> Result<()> {
    launch_bwd(
        gpu, logits, loss, tokens, targets, weight, shape, norm, true,
    )
}

/// [`subs_bwd_bf16`] on f32 logits (`subs_bwd_f32`). The gradient is bf16 written in place into
/// the first half of each f32 row's bytes: as bf16 it is (rows, ld) with row stride `2 * ld`
/// elements (view the buffer with `transmute_mut::<bf16>(2 * rows * ld)`); the GEMM consuming
/// it needs `lda = 2 * ld`. The second half of each row keeps stale logits.
#[allow(clippy::too_many_arguments)]
pub fn subs_bwd_f32<I: TokenId>(
    gpu: &Gpu,
    logits: &mut CudaSlice<f32>,
    loss: &mut CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    targets: &CudaSlice<I>,
    weight: &CudaSlice<f32>,
    shape: SubsShape,
    norm: f32,
) -> Result<()> {
    launch_bwd(
        gpu, logits, loss, tokens, targets, weight, shape, norm, true,
    )
}

/// The shared launcher of the fused loss; `allow_cache = false` forces the global re-read path.
#[allow(clippy::too_many_arguments)]
fn launch_bwd<T: Logit, I: TokenId>(
    gpu: &Gpu,
    logits: &mut CudaSlice<T>,
    loss: &mut CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    targets: &CudaSlice<I>,
    weight: &CudaSlice<f32>,
    shape: SubsShape,
    norm: f32,
    allow_cache: bool,
) -> Result<()> {
    check_shape(&shape)?;
    let SubsShape {
        rows,
        vocab,
        ld,
        mask_index,
    } = shape;
    if logits.len() != rows * ld {
        return Err(Error::Shape(format!(
            "subs loss: logits have {} elements, expected rows {rows} x ld {ld}",
            logits.len()
        )));
    }
    if loss.len() != rows || tokens.len() != rows || targets.len() != rows || weight.len() != rows {
        return Err(Error::Shape(format!(
            "subs loss: loss/tokens/targets/weight hold {}/{}/{}/{} elements, expected rows \
             {rows}",
            loss.len(),
            tokens.len(),
            targets.len(),
            weight.len()
        )));
    }
    if !(norm.is_finite() && norm > 0.0) {
        return Err(Error::Config(format!(
            "subs loss: norm {norm} must be finite and positive"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::BWD_SYMBOL)?;
    // The row cache is used on the vector path only (ld % 4 == 0); it holds ld elements.
    let row_bytes = (ld * std::mem::size_of::<T>()).next_multiple_of(16);
    let optin = gpu
        .ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    let cache = allow_cache && ld % 4 == 0 && row_bytes + BWD_STATIC_SMEM <= optin.max(0) as usize;
    let smem = if cache { row_bytes } else { 0 };
    if cache {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let (vocab_i, ld_i, mask_u, cache_i) =
        (vocab as i32, ld as i32, mask_index as u32, cache as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(logits)
        .arg(loss)
        .arg(tokens)
        .arg(targets)
        .arg(weight)
        .arg(&vocab_i)
        .arg(&ld_i)
        .arg(&mask_u)
        .arg(&norm)
        .arg(&cache_i);
    // SAFETY: argument order and types match the kernel signature (u32/i32 ids are both 4-byte
    // integers read as u32); logits hold rows*ld elements and loss/tokens/targets/weight rows, as
    // checked above; one block per row; the kernel reads row elements < ld and x[target] only for
    // target < vocab <= ld; with cache_i = 1 the dynamic shared memory holds the ld elements the
    // kernel caches, and the function's dynamic shared memory limit was raised to that size.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `out[0] =` the sum of `loss` (rows) in f64, rounded once to f32, in a fixed order
/// (`subs_loss_sum_f32`: one block; deterministic). `out` holds 1 element.
pub fn subs_loss_sum(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    loss: &CudaSlice<f32>,
    rows: usize,
) -> Result<()> {
    if out.len() != 1 || loss.len() != rows || rows > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "subs loss sum: out has {} elements (expected 1), loss {} (expected rows {rows})",
            out.len(),
            loss.len()
        )));
    }
    let f = gpu.function(MODULE, "subs_loss_sum_f32")?;
    let rows_i = rows as i32;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (SUM_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(out).arg(loss).arg(&rows_i);
    // SAFETY: argument order and types match the kernel signature; out holds 1 element and loss
    // rows, as checked; one block of the 1024 threads the kernel's reduction array is sized for.
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

    /// The fused SUBS + weighted cross-entropy in f64 (twin of `subs_bwd_*`): returns
    /// (loss (rows), d logits (rows, ld)) for logits (rows, ld) with `vocab` real columns. Row r:
    /// carry-over (`tokens[r] != mask_index`) or `weight[r] == 0` gives loss 0 and a zero
    /// gradient; otherwise with c = f32(w / norm), lse over the real non-mask columns,
    /// `loss = c (lse - x[t])` (x[mask] = -1e6) and `grad_j = c (softmax_j - [j == t])`, 0 at
    /// the mask and padding columns. A target >= vocab gives NaN loss and NaN real-column
    /// gradients, as in the kernel. Generic so the finite-difference test runs it on f64.
    #[allow(clippy::too_many_arguments)]
    pub fn subs_xent<T: Copy + Into<f64> + Sync>(
        logits: &[T],
        tokens: &[u32],
        targets: &[u32],
        weight: &[f32],
        mask_index: usize,
        vocab: usize,
        ld: usize,
        norm: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        let rows = tokens.len();
        let mut loss = vec![0f64; rows];
        let mut grad = vec![0f64; rows * ld];
        grad.par_chunks_mut(ld)
            .zip(loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, l))| {
                if tokens[r] as usize != mask_index || weight[r] == 0.0 {
                    return;
                }
                let t = targets[r] as usize;
                let c = if t < vocab {
                    (weight[r] / norm) as f64
                } else {
                    f64::NAN
                };
                let x = |j: usize| -> f64 { logits[r * ld + j].into() };
                let real = || (0..vocab).filter(|&j| j != mask_index);
                let m = real().map(x).fold(f64::NEG_INFINITY, f64::max);
                let lse = m + real().map(|j| (x(j) - m).exp()).sum::<f64>().ln();
                let xt = if t == mask_index {
                    NEG_INF as f64
                } else if t < vocab {
                    x(t)
                } else {
                    f64::NAN
                };
                *l = c * (lse - xt);
                for j in real() {
                    g[j] = c * ((x(j) - lse).exp() - if j == t { 1.0 } else { 0.0 });
                }
            });
        (loss, grad)
    }
}

#[cfg(test)]
#[path = "subs_tests.rs"]
mod tests;
