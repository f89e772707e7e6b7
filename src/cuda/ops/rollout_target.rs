//! The target rule of the device teacher rollout: the only launcher of
//! `kernels/rollout_target.cu` and its CPU twin. Maths, shapes and thread mapping: see the
//! kernel's header.
//!
//! After each teacher step's fused sampler launch (`ops::sample`, which wrote every masked
//! position's outcome into `cat`), one launch copies the step's log-prob row into the target
//! at the positions that step unmasked and records the step in `at`; after the last step it
//! also copies the last row into every position no step unmasked. The target row stride `ldt`
//! is free, so it can be the one the distillation loss (`ops::distill_kl`) reads best.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "rollout_target";
/// Must equal ROLLOUT_THREADS in the kernel.
const THREADS: u32 = 256;
/// `at` of a position no step has unmasked (the kernel's ROLLOUT_NONE).
pub const NONE: u32 = u32::MAX;

/// The kernel's scalar arguments, field for field the `RolloutTargetParams` struct of
/// `kernels/rollout_target.cu` (32 bytes, asserted on both sides).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutTargetParams {
    /// B·L positions.
    pub rows: u32,
    /// V.
    pub vocab: u32,
    pub mask_index: u32,
    /// Row stride of the log-probs (>= V).
    pub ld: u32,
    /// Row stride of the target (>= V).
    pub ldt: u32,
    /// Teacher step k (0-based); step 0 initialises `at`.
    pub step: u32,
    /// 1 at the last step.
    pub last: u32,
    /// Explicit padding (0).
    pub pad_: u32,
}

const _: () = assert!(std::mem::size_of::<RolloutTargetParams>() == 32);

// SAFETY: RolloutTargetParams is #[repr(C)], eight u32 with no padding, and matches the kernel's
// struct layout (size asserted on both sides).
unsafe impl DeviceRepr for RolloutTargetParams {}

impl RolloutTargetParams {
    /// Step `step` of `steps` over `rows` positions of `vocab` columns, log-probs at stride
    /// `ld`, target at stride `ldt`.
    pub fn new(
        (rows, vocab, mask_index): (usize, usize, usize),
        (ld, ldt): (usize, usize),
        step: usize,
        steps: usize,
    ) -> Self {
        RolloutTargetParams {
            rows: rows as u32,
            vocab: vocab as u32,
            mask_index: mask_index as u32,
            ld: ld as u32,
            ldt: ldt as u32,
            step: step as u32,
            last: (step + 1 == steps) as u32,
            pad_: 0,
        }
    }

    /// Host-side checks shared by the launcher and the twin, against the buffer lengths.
    pub fn check(
        &self,
        target_len: usize,
        at_len: usize,
        cat_len: usize,
        log_probs_len: usize,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::Shape(format!("rollout_target: {m}")));
        let (rows, v) = (self.rows as usize, self.vocab as usize);
        let (ld, ldt) = (self.ld as usize, self.ldt as usize);
        if v < 2 || v == u32::MAX as usize || self.mask_index >= self.vocab {
            return bad(format!(
                "vocab {v} must be in 2..2^32-1 and mask_index {} below it",
                self.mask_index
            ));
        }
        if ld < v || ldt < v {
            return bad(format!(
                "row strides ld {ld} and ldt {ldt} must be at least the vocabulary {v}"
            ));
        }
        if rows > i32::MAX as usize || self.last > 1 || self.pad_ != 0 {
            return bad(format!("rows {rows} above 2^31-1 or a flag out of range"));
        }
        if at_len != rows || cat_len != rows {
            return bad(format!(
                "at has {at_len} and cat {cat_len} elements, expected rows {rows}"
            ));
        }
        if log_probs_len != rows * ld || target_len != rows * ldt {
            return bad(format!(
                "log_probs has {log_probs_len} elements (expected rows {rows} x ld {ld}) and \
                 target {target_len} (expected rows x ldt {ldt})"
            ));
        }
        Ok(())
    }
}

/// Launches `rollout_target_f32`: the target rule of teacher step `p.step` (see the kernel
/// header) from the step's outcomes `cat` (rows) and SUBS `log_probs` (rows, ld) into `target`
/// (rows, ldt) and `at` (rows). Every length is checked first.
pub fn rollout_target_f32(
    gpu: &Gpu,
    target: &mut CudaSlice<f32>,
    at: &mut CudaSlice<u32>,
    cat: &CudaSlice<u32>,
    log_probs: &CudaSlice<f32>,
    p: &RolloutTargetParams,
) -> Result<()> {
    p.check(target.len(), at.len(), cat.len(), log_probs.len())?;
    if p.rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "rollout_target_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (p.rows, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(target).arg(at).arg(cat).arg(log_probs).arg(p);
    // SAFETY: argument order and types match the kernel signature (RolloutTargetParams is the
    // kernel's struct, size asserted on both sides); target holds rows*ldt elements, log_probs
    // rows*ld, at and cat rows, as checked above; one block per position and columns below
    // V <= ld, ldt, so every index the kernel forms is in bounds.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernel, on host buffers: same arguments, same checks, same writes.
pub mod cpu {
    use rayon::prelude::*;

    use super::{RolloutTargetParams, NONE};
    use crate::error::Result;

    pub fn rollout_target(
        target: &mut [f32],
        at: &mut [u32],
        cat: &[u32],
        log_probs: &[f32],
        p: &RolloutTargetParams,
    ) -> Result<()> {
        p.check(target.len(), at.len(), cat.len(), log_probs.len())?;
        if p.rows == 0 {
            return Ok(());
        }
        let (v, ld, ldt) = (p.vocab as usize, p.ld as usize, p.ldt as usize);
        target
            .par_chunks_mut(ldt)
            .zip(at.par_iter_mut())
            .zip(cat.par_iter())
            .zip(log_probs.par_chunks(ld))
            .for_each(|(((dst, a), &c), src)| {
                let unmasked = c < p.vocab && c != p.mask_index;
                let prev = if p.step == 0 { NONE } else { *a };
                *a = if unmasked { p.step } else { prev };
                if unmasked || (p.last == 1 && *a == NONE) {
                    dst[..v].copy_from_slice(&src[..v]);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
#[path = "rollout_target_tests.rs"]
mod tests;
