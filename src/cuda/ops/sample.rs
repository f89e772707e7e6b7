//! The fused sampler step: the only launcher of `kernels/sample.cu`, its CPU twin and the
//! comparison tests. Maths, counter layout and thread mapping: see the kernel's header.
//!
//! One launch per sampler step: every masked position of the batch draws its outcome (new
//! token, stay masked, reset) from the IMDM or MDLM posterior with the float64 exponential race
//! of `diffusion::posterior`, using the same Philox counters as `diffusion::SamplerStream`, so
//! the kernel and the CPU driver produce the same samples. Only two counters (unmasks, resets)
//! need to come back to the host, for the cache rule.
//!
//! Not on the GPU: nucleus filtering (it needs a sort of each row); the GPU driver
//! (`cuda::denoiser`) falls back to the CPU posterior when it is on.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::diffusion::SamplerKind;
use crate::error::{Error, Result};
use crate::model::NoiseType;

const MODULE: &str = "sample";
/// Must equal SAMPLE_THREADS in the kernel.
const THREADS: u32 = 256;
/// `cat` at positions that were not masked (the kernel's SAMPLE_NONE).
pub const NONE: u32 = u32::MAX;

/// The kernel's scalar arguments, field for field the `SampleParams` struct of
/// `kernels/sample.cu` (72 bytes, asserted on both sides). Build it with [`SampleParams::new`]
/// and the `with_*` methods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// B·L positions.
    pub rows: u32,
    /// L: the batch row of position `pos` is `pos / len`.
    pub len: u32,
    /// V.
    pub vocab: u32,
    pub mask_index: u32,
    /// Sampler step i (the race's counter word 2).
    pub step: u32,
    /// Step whose forward sees a reset's fresh eps (i + 1).
    pub eps_step: u32,
    /// Philox key: the sampler seed, low and high words.
    pub key_lo: u32,
    pub key_hi: u32,
    /// 0: IMDM posterior, 1: MDLM.
    pub kind: u32,
    /// 1: argmax of the log-probs (greedy noise removal).
    pub greedy: u32,
    /// 1: a reset writes fresh eps into the eps buffer.
    pub write_eps: u32,
    pub noise_dim: u32,
    /// 0: rand, 1: randn.
    pub noise_type: u32,
    pub noise_scale: f32,
    /// Row stride of the log-probs (>= V; the GPU forward pads rows to a multiple of 64).
    pub ld: u32,
    /// Explicit padding (0), so the struct has no implicit padding bytes.
    pub pad_: u32,
    /// > 0; exactly 1 skips the power.
    pub temperature: f64,
}

const _: () = assert!(std::mem::size_of::<SampleParams>() == 72);

// SAFETY: SampleParams is #[repr(C)], made of plain integers and floats (no implicit padding:
// 15 u32 and an f32 fill 64 bytes, then an 8-aligned f64), and matches the kernel's struct
// layout.
unsafe impl DeviceRepr for SampleParams {}

impl SampleParams {
    /// Step `step` of a run keyed by `seed`, for a (batch, len) grid over `vocab` tokens:
    /// T = 1, not greedy, no eps redraw.
    pub fn new(
        kind: SamplerKind,
        (batch, len, vocab, mask_index): (usize, usize, usize, usize),
        seed: u64,
        step: u32,
    ) -> Self {
        SampleParams {
            rows: (batch * len) as u32,
            len: len as u32,
            vocab: vocab as u32,
            mask_index: mask_index as u32,
            step,
            eps_step: step.wrapping_add(1),
            key_lo: seed as u32,
            key_hi: (seed >> 32) as u32,
            kind: match kind {
                SamplerKind::ImdmPosterior => 0,
                SamplerKind::MdlmPosterior => 1,
            },
            greedy: 0,
            write_eps: 0,
            noise_dim: 0,
            noise_type: 0,
            noise_scale: 1.0,
            ld: vocab as u32,
            pad_: 0,
            temperature: 1.0,
        }
    }

    /// Log-probs rows stored with stride `ld` (>= V) instead of V.
    pub fn with_ld(mut self, ld: usize) -> Self {
        self.ld = ld as u32;
        self
    }

    pub fn with_temperature(mut self, t: f64) -> Self {
        self.temperature = t;
        self
    }

    pub fn with_greedy(mut self, greedy: bool) -> Self {
        self.greedy = greedy as u32;
        self
    }

    /// Resets redraw the `noise_dim` eps columns for step `eps_step` (pass `None` under
    /// `fix_eps` and at the last step). `noise_dim` is also needed without a redraw when an eps
    /// buffer is passed: give it with `write = false`.
    pub fn with_eps(mut self, noise_dim: usize, kind: NoiseType, scale: f32, write: bool) -> Self {
        self.noise_dim = noise_dim as u32;
        self.noise_type = match kind {
            NoiseType::Rand => 0,
            NoiseType::Randn => 1,
        };
        self.noise_scale = scale;
        self.write_eps = write as u32;
        self
    }

    pub fn sampler_kind(&self) -> SamplerKind {
        if self.kind == 0 {
            SamplerKind::ImdmPosterior
        } else {
            SamplerKind::MdlmPosterior
        }
    }

    pub fn noise_kind(&self) -> NoiseType {
        if self.noise_type == 0 {
            NoiseType::Rand
        } else {
            NoiseType::Randn
        }
    }

    pub fn seed(&self) -> u64 {
        self.key_lo as u64 | (self.key_hi as u64) << 32
    }

    /// Host-side checks shared by the launcher and the twin: sizes against the buffer lengths
    /// (`eps_len` is `None` without an eps buffer).
    pub fn check(
        &self,
        x_len: usize,
        cat_len: usize,
        eps_len: Option<usize>,
        counters_len: usize,
        log_probs_len: usize,
        alphas_len: usize,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::Shape(format!("sample: {m}")));
        let (rows, len, v) = (self.rows as usize, self.len as usize, self.vocab as usize);
        if v < 2 || v == u32::MAX as usize || self.mask_index >= self.vocab {
            return bad(format!(
                "vocab {v} must be in 2..2^32-1 and mask_index {} below it",
                self.mask_index
            ));
        }
        if len == 0 || rows % len != 0 || rows > i32::MAX as usize {
            return bad(format!(
                "rows {rows} must be a multiple of len {len} (> 0) and at most 2^31-1"
            ));
        }
        if self.kind > 1 || self.noise_type > 1 || self.greedy > 1 || self.write_eps > 1 {
            return bad(format!("flag out of range in {self:?}"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature {} must be positive and finite",
                self.temperature
            ));
        }
        if x_len != rows || cat_len != rows {
            return bad(format!(
                "x has {x_len} and cat {cat_len} elements, expected rows {rows}"
            ));
        }
        let ld = self.ld as usize;
        if ld < v {
            return bad(format!("row stride ld {ld} is below the vocabulary {v}"));
        }
        if log_probs_len != rows * ld {
            return bad(format!(
                "log_probs has {log_probs_len} elements, expected rows {rows} x ld {ld}"
            ));
        }
        if alphas_len != 2 * (rows / len) || counters_len != 2 {
            return bad(format!(
                "alphas has {alphas_len} elements (expected 2 per batch row: {}) and counters \
                 {counters_len} (expected 2)",
                2 * (rows / len)
            ));
        }
        match eps_len {
            Some(n) if n != rows * self.noise_dim as usize => {
                return bad(format!(
                    "eps has {n} elements, expected rows {rows} x noise_dim {}",
                    self.noise_dim
                ))
            }
            None if self.write_eps == 1 => return bad("write_eps needs an eps buffer".into()),
            _ => {}
        }
        if self.write_eps == 1 && (self.kind != 0 || self.noise_dim == 0) {
            return bad("write_eps needs the IMDM posterior and noise_dim > 0".into());
        }
        Ok(())
    }
}

/// Launches `sample_fwd_f32`: one sampler step over the masked positions of `x` (updated in
/// place), from the SUBS `log_probs` (rows, ld) and `alphas` (B, 2) f64 (α_t, α_s per batch row).
/// Writes `cat` (rows): the winning category of each masked position (a token, `mask_index` for
/// stay, V for reset) and [`NONE`] elsewhere; adds (unmasks, resets) to `counters` (2); writes
/// a reset's fresh eps into `eps` (rows, noise_dim) bf16 when `p.write_eps`. Every length is
/// checked first.
#[allow(clippy::too_many_arguments)]
pub fn sample_fwd_f32(
    gpu: &Gpu,
    x: &mut CudaSlice<u32>,
    cat: &mut CudaSlice<u32>,
    eps: Option<&mut CudaSlice<bf16>>,
    counters: &mut CudaSlice<u32>,
    log_probs: &CudaSlice<f32>,
    alphas: &CudaSlice<f64>,
    p: &SampleParams,
) -> Result<()> {
    p.check(
        x.len(),
        cat.len(),
        eps.as_ref().map(|e| e.len()),
        counters.len(),
        log_probs.len(),
        alphas.len(),
    )?;
    if p.rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "sample_fwd_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (p.rows, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let null: u64 = 0;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(cat);
    match eps {
        Some(e) => b.arg(e),
        None => b.arg(&null),
    };
    b.arg(counters).arg(log_probs).arg(alphas).arg(p);
    // SAFETY: argument order and types match the kernel signature (SampleParams is the kernel's
    // struct, size asserted on both sides); x and cat hold rows elements, log_probs rows*ld,
    // alphas 2*(rows/len), counters 2 and eps rows*noise_dim (or null, never written then:
    // write_eps needs a buffer), as checked above; one block per position, so every index the
    // kernel forms is below these bounds.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernel: a thin wrapper over `diffusion::posterior::sample_masked` (or
/// `greedy_token`) with the race uniforms and reset eps of `diffusion::SamplerStream`, exactly
/// as the CPU driver (`diffusion::sampler::generate`) uses them.
pub mod cpu {
    use rayon::prelude::*;

    use super::{SampleParams, NONE};
    use crate::diffusion::posterior::{greedy_token, sample_masked, Outcome};
    use crate::diffusion::{SamplerStream, StepAlphas, TokenFilter};
    use crate::error::Result;

    /// The kernel's semantics on host buffers; `eps` holds f32 values (the kernel then rounds
    /// them to bf16). Same arguments, same checks.
    pub fn sample_fwd(
        x: &mut [u32],
        cat: &mut [u32],
        eps: Option<&mut [f32]>,
        counters: &mut [u32],
        log_probs: &[f32],
        alphas: &[f64],
        p: &SampleParams,
    ) -> Result<()> {
        p.check(
            x.len(),
            cat.len(),
            eps.as_ref().map(|e| e.len()),
            counters.len(),
            log_probs.len(),
            alphas.len(),
        )?;
        let (len, v, nd) = (p.len as usize, p.vocab as usize, p.noise_dim as usize);
        let mask = p.mask_index;
        let stream = SamplerStream::new(p.seed());
        let filter = TokenFilter {
            nucleus_p: 1.0,
            temperature: p.temperature,
        };
        let outcomes: Vec<(usize, Outcome)> = x
            .par_iter()
            .enumerate()
            .filter(|(_, &t)| t == mask)
            .map(|(pos, _)| {
                let row = &log_probs[pos * v..(pos + 1) * v];
                let outcome = if p.greedy == 1 {
                    match greedy_token(row) {
                        tok if tok == mask => Outcome::Stay,
                        tok => Outcome::Token(tok),
                    }
                } else {
                    let b = pos / len;
                    let a = StepAlphas {
                        alpha_t: alphas[2 * b],
                        alpha_s: alphas[2 * b + 1],
                    };
                    let u = stream.race_uniforms(p.step, pos as u32);
                    sample_masked(p.sampler_kind(), a, row, mask as usize, filter, u)
                };
                (pos, outcome)
            })
            .collect();
        cat.iter_mut()
            .zip(x.iter())
            .filter(|(_, &t)| t != mask)
            .for_each(|(c, _)| *c = NONE);
        let mut eps = eps;
        for (pos, outcome) in outcomes {
            match outcome {
                Outcome::Token(t) => {
                    x[pos] = t;
                    cat[pos] = t;
                    counters[0] += 1;
                }
                Outcome::Stay => cat[pos] = mask,
                Outcome::Reset => {
                    cat[pos] = p.vocab;
                    counters[1] += 1;
                    if let (1, Some(e)) = (p.write_eps, eps.as_deref_mut()) {
                        for d in 0..nd {
                            e[pos * nd + d] = stream.reset_eps(
                                p.eps_step,
                                pos as u32,
                                d as u32,
                                p.noise_kind(),
                                p.noise_scale,
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "sample_tests.rs"]
mod tests;
