//! The fused distillation loss (spec 6.1 step 4): the only launcher of `kernels/distill_kl.cu`
//! and its CPU twin. Maths, shapes, thread mapping and the in-place gradient layout: see the
//! kernel's header.
//!
//! The launcher gives the kernel dynamic shared memory for the row's logits when it fits the
//! device's opt-in limit (H100/H200: 227 KiB, i.e. V <= 58,000 or so in f32 and twice that in
//! bf16), so the logits cross DRAM once; the teacher row is read twice (the second time mostly
//! from L2).

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::ops::embedding::TokenId;
use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "distill_kl";
/// Must equal DKL_THREADS in the kernel.
const THREADS: usize = 1024;
/// The kernel's static shared memory (two 32-float and one 32-float2 reduction arrays).
const STATIC_SMEM: usize = 512;

pub use crate::diffusion::DistillMode;

/// The kernel's `mode` code of each divergence (`DistillMode::ALL` order).
fn code(mode: DistillMode) -> u32 {
    match mode {
        DistillMode::KlBwd => 0,
        DistillMode::KlFwd => 1,
        DistillMode::Mse => 2,
        DistillMode::Tvd => 3,
    }
}

/// Shape of a distillation-loss call: `rows` student logit rows of `vocab` real columns (the
/// mask column included) with row stride `ld >= vocab`, and the teacher's log-probs for the same
/// rows with row stride `ldt >= vocab`. Padding columns are never read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistillKlShape {
    pub rows: usize,
    pub vocab: usize,
    pub ld: usize,
    pub ldt: usize,
    pub mask_index: usize,
}

impl DistillKlShape {
    /// `2 <= vocab <= ld`, `vocab <= ldt`, `mask_index < vocab`, every count within an i32.
    fn check(&self) -> Result<()> {
        let DistillKlShape {
            rows,
            vocab,
            ld,
            ldt,
            mask_index,
        } = *self;
        if vocab < 2 || ld < vocab || ldt < vocab || rows.max(ld).max(ldt) > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "distill_kl: need 2 <= vocab <= ld, vocab <= ldt, all <= 2^31-1, and rows <= \
                 2^31-1, got {self:?}"
            )));
        }
        if mask_index >= vocab {
            return Err(Error::Shape(format!(
                "distill_kl: mask_index {mask_index} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }
}

/// The kernel's scalar arguments, field for field the `DistillKlParams` struct of
/// `kernels/distill_kl.cu` (28 bytes, asserted on both sides).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillKlParams {
    pub vocab: i32,
    pub ld: i32,
    pub ldt: i32,
    pub mask_index: u32,
    pub mode: u32,
    pub scale: f32,
    pub cache_row: i32,
}

const _: () = assert!(std::mem::size_of::<DistillKlParams>() == 28);

// SAFETY: DistillKlParams is #[repr(C)], seven 4-byte integers and floats with no padding, and
// matches the kernel's struct layout (size asserted on both sides).
unsafe impl DeviceRepr for DistillKlParams {}

/// Logit element types with a distill_kl kernel.
trait Logit: DeviceRepr {
    const SYMBOL: &'static str;
    /// Alignment the kernel's vector path needs (one unit = 4 elements).
    const UNIT_BYTES: usize;
}

impl Logit for f32 {
    const SYMBOL: &'static str = "distill_kl_fwd_bwd_f32";
    const UNIT_BYTES: usize = 16;
}

impl Logit for bf16 {
    const SYMBOL: &'static str = "distill_kl_fwd_bwd_bf16";
    const UNIT_BYTES: usize = 8;
}

/// The fused distillation loss and its backward on f32 student logits (`distill_kl_fwd_bwd_f32`;
/// maths in the kernel header). Row r is a masked position iff `tokens[r] == mask_index`; there
/// `loss[r] =` the divergence of `mode` (not scaled) between the SUBS log-softmax of `logits`
/// row r and `teacher` row r (f32 log-probs), and elsewhere 0. `logits` (rows, ld) is
/// overwritten **in place** by `scale ·` d loss / d logits as bf16 in the first half of each f32
/// row's bytes: as bf16 it is (rows, ld) with row stride `2 * ld` (zeros at unmasked rows, the
/// mask column and the padding), the layout [`crate::cuda::ops::subs::subs_bwd_f32`] leaves for the DiT
/// backward. Pass `scale = 1 / (number of masked rows)` for the reference's mean over masked
/// positions. `teacher` must not overlap `logits`. Every length is checked first.
#[allow(clippy::too_many_arguments)]
pub fn distill_kl_fwd_bwd_f32<I: TokenId>(
    gpu: &Gpu,
    logits: &mut CudaSlice<f32>,
    loss: &mut CudaSlice<f32>,
    teacher: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    shape: DistillKlShape,
    mode: DistillMode,
    scale: f32,
) -> Result<()> {
    launch(gpu, logits, loss, teacher, tokens, shape, mode, scale, true)
}

/// [`distill_kl_fwd_bwd_f32`] on bf16 logits (`distill_kl_fwd_bwd_bf16`): the gradient is a dense
/// (rows, ld) bf16 matrix over the same buffer; the maths stays fp32.
#[allow(clippy::too_many_arguments)]
pub fn distill_kl_fwd_bwd_bf16<I: TokenId>(
    gpu: &Gpu,
    logits: &mut CudaSlice<bf16>,
    loss: &mut CudaSlice<f32>,
    teacher: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    shape: DistillKlShape,
    mode: DistillMode,
    scale: f32,
) -> Result<()> {
    launch(gpu, logits, loss, teacher, tokens, shape, mode, scale, true)
}

/// The shared launcher; `allow_cache = false` forces the global re-read path (tests).
#[allow(clippy::too_many_arguments)]
fn launch<T: Logit, I: TokenId>(
    gpu: &Gpu,
    logits: &mut CudaSlice<T>,
    loss: &mut CudaSlice<f32>,
    teacher: &CudaSlice<f32>,
    tokens: &CudaSlice<I>,
    shape: DistillKlShape,
    mode: DistillMode,
    scale: f32,
    allow_cache: bool,
) -> Result<()> {
    shape.check()?;
    let DistillKlShape {
        rows,
        vocab,
        ld,
        ldt,
        mask_index,
    } = shape;
    if logits.len() != rows * ld || teacher.len() != rows * ldt {
        return Err(Error::Shape(format!(
            "distill_kl: logits have {} elements (expected rows {rows} x ld {ld}) and teacher {} \
             (expected rows {rows} x ldt {ldt})",
            logits.len(),
            teacher.len()
        )));
    }
    if loss.len() != rows || tokens.len() != rows {
        return Err(Error::Shape(format!(
            "distill_kl: loss has {} and tokens {} elements, expected rows {rows}",
            loss.len(),
            tokens.len()
        )));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::Config(format!(
            "distill_kl: scale {scale} must be finite and positive (1 / masked rows)"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, T::SYMBOL)?;
    // The cache holds the vocab / 4 full units of the row; the kernel uses it on the vector
    // path only, which needs these strides (the alignment of the buffers is checked there).
    let row_bytes = (vocab / 4) * T::UNIT_BYTES;
    let optin = gpu
        .ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    let cache = allow_cache
        && ld % 4 == 0
        && ldt % 4 == 0
        && row_bytes > 0
        && row_bytes + STATIC_SMEM <= optin.max(0) as usize;
    let smem = if cache { row_bytes } else { 0 };
    if cache {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let p = DistillKlParams {
        vocab: vocab as i32,
        ld: ld as i32,
        ldt: ldt as i32,
        mask_index: mask_index as u32,
        mode: code(mode),
        scale,
        cache_row: cache as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(logits).arg(loss).arg(teacher).arg(tokens).arg(&p);
    // SAFETY: argument order and types match the kernel signature (DistillKlParams is the
    // kernel's struct, size asserted on both sides; u32/i32 ids are both 4-byte integers read
    // as u32); logits hold rows*ld elements, teacher rows*ldt, loss and tokens rows, as checked
    // above; one block per row, and the kernel reads row elements < vocab <= ld (ldt) and
    // writes elements < ld; with cache_row = 1 the dynamic shared memory holds the vocab / 4
    // units the kernel caches, and the function's limit was raised to that size.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernels: the same maths in f64, rayon over rows.
pub mod cpu {
    use super::{DistillKlShape, DistillMode};
    use rayon::prelude::*;

    /// Returns (loss (rows), gradient (rows, ld)) for student logits (rows, ld) and teacher
    /// log-probs (rows, ldt) in f64: row r with `tokens[r] == mask_index` gets the divergence
    /// of `mode` (not scaled) and `scale ·` its gradient with respect to the logits; other rows,
    /// the mask column and the padding get 0. The mask and padding columns of both inputs are
    /// never read. `scale` is applied as an f64 (the kernel multiplies in f32). Generic so the
    /// finite-difference tests run it on f64 logits; bf16 logits: pass their exact f32 values.
    pub fn distill_kl<T: Copy + Into<f64> + Sync>(
        logits: &[T],
        teacher: &[f32],
        tokens: &[u32],
        shape: DistillKlShape,
        mode: DistillMode,
        scale: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        let DistillKlShape {
            rows,
            vocab,
            ld,
            ldt,
            mask_index,
        } = shape;
        assert!(logits.len() == rows * ld && teacher.len() == rows * ldt && tokens.len() == rows);
        let mut loss = vec![0f64; rows];
        let mut grad = vec![0f64; rows * ld];
        grad.par_chunks_mut(ld)
            .zip(loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, l))| {
                if tokens[r] as usize != mask_index {
                    return;
                }
                let z = |j: usize| -> f64 { logits[r * ld + j].into() };
                let lt = |j: usize| teacher[r * ldt + j] as f64;
                let real: Vec<usize> = (0..vocab).filter(|&j| j != mask_index).collect();
                let m = real.iter().map(|&j| z(j)).fold(f64::NEG_INFINITY, f64::max);
                let lse = m + real.iter().map(|&j| (z(j) - m).exp()).sum::<f64>().ln();
                let ls = |j: usize| z(j) - lse;
                let d = |j: usize| ls(j) - lt(j);
                let p = |j: usize| ls(j).exp();
                let sign = |x: f64| {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        x
                    }
                };
                let sum = |f: &dyn Fn(usize) -> f64| real.iter().map(|&j| f(j)).sum::<f64>();
                let (loss_r, big_r) = match mode {
                    DistillMode::KlBwd => {
                        let kl = sum(&|j| p(j) * d(j));
                        (kl, kl)
                    }
                    DistillMode::KlFwd => {
                        // 0 log 0 = 0 at teacher columns of probability 0.
                        let term = |j: usize| {
                            let q = lt(j).exp();
                            if lt(j) == f64::NEG_INFINITY {
                                0.0
                            } else {
                                q * (lt(j) - ls(j))
                            }
                        };
                        (sum(&term), sum(&|j| lt(j).exp()))
                    }
                    DistillMode::Mse => (sum(&|j| d(j) * d(j)), sum(&d)),
                    DistillMode::Tvd => (sum(&|j| d(j).abs()), sum(&|j| sign(d(j)))),
                };
                *l = loss_r;
                let c = scale as f64;
                for &j in &real {
                    g[j] = c * match mode {
                        DistillMode::KlBwd => p(j) * (d(j) - big_r),
                        DistillMode::KlFwd => p(j) * big_r - lt(j).exp(),
                        DistillMode::Mse => 2.0 * d(j) - 2.0 * p(j) * big_r,
                        DistillMode::Tvd => sign(d(j)) - p(j) * big_r,
                    };
                }
            });
        (loss, grad)
    }
}

#[cfg(test)]
#[path = "distill_kl_tests.rs"]
mod tests;
