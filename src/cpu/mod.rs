//! The CPU training backend: the DiT forward with saved activations and its hand-written
//! backward, generic over f32 (speed: the CPU demo trains with it) and f64 (finite-difference
//! checks). Its forward is checked against `model::dit_ref`, its backward against f64 central
//! finite differences; it is the gradient reference for the GPU tape.
//!
//! Layout (one responsibility per file):
//! - [`fastmath`]: fixed-order vectorisable sums and dots; branch-free f32 tanh, erf, exp.
//! - [`gemm`]: `C = alpha·op(A)·op(B) + beta·C` through `matrixmultiply`; every large product.
//! - [`layers`]: each op's forward and backward as plain functions on slices (linear, LayerNorm
//!   with adaLN modulation, GELUs, SiLU, gated residual with Philox dropout, embedding).
//! - [`attention`]: rotate-half rotary and softmax attention (softcap, causal), with backward.
//! - [`loss`]: the SUBS log-softmax, fused with the weighted cross-entropy and its gradient.
//! - [`distill_loss`]: the SUBS log-softmax fused with the SDTT distillation losses (KL both
//!   ways, mse, tvd on log-probs) and their gradient.
//! - [`logits_loss`]: the loss hook (forward to logits, a caller's loss writes dlogits, the
//!   backward runs) through which the AR, SEDD and D3PM baselines train.
//! - [`kv_cache`]: incremental decoding of the causal (AR) DiT with a key/value cache.
//! - [`Buf`] (`pool`): activation buffers recycled across steps (page faults were ~15%).
//! - `weights`: typed views of [`DitParams`] (borrowed for f32) and gradient buffers.
//! - `cond`: the conditioning path: time features, the sigma map with its backward, and the
//!   layout of the adaLN modulations (one vector, or one per sequence).
//! - `checks`: validation of tokens, eps and loss batches against the configuration.
//! - `dit`: the whole model: forward keeping per-block activations, backward to every parameter.
//! - [`CpuDenoiser`]: the samplers' [`crate::diffusion::Denoiser`] on this backend.
//!
//! Numerics: the f32 instantiation stores and accumulates in f32 (sgemm, rational tanh/erf and
//! a polynomial exp within 4 ulp); the f64 one uses the library functions and is exact enough
//! for central finite differences. `dit_ref` remains the f64-accumulating reference. Results
//! are deterministic, whatever the thread count: rayon only splits work into fixed chunks of
//! rows, batches or elements that are written independently, matrixmultiply splits only the
//! output, and every reduction over rows runs serially in row order.
//!
//! Speed (`benches/cpu_train.rs`, 2 shared Zen3 cores, 2026-11-23): a D=128, 4-block IMDM
//! step at B=256, L=8 is 10.7 GFLOP; it takes 110-200 ms depending on the machine's load
//! (best 99 GFLOP/s), about 70% of it in sgemm. Two cores peak near 220 GFLOP/s, so no CPU
//! implementation can go below about 50 ms for that step here.
//!
//! Conventions: without time conditioning the conditioning vector is constant (sigma = 0, spec
//! 4.2), so each adaLN modulation is one vector broadcast over all rows and its gradient a sum
//! over all rows; with it (`DitConfig::time_conditioning`) there is one vector per sequence,
//! from that sequence's sigma, and each gradient sums over that sequence's rows. Either way the
//! gradient flows on through the adaLN linears into `sigma_map`. Dropout follows the GPU forward (`cuda::dit`): block i's
//! attention branch uses stream offset `offset + 2i`, its MLP branch `offset + 2i + 1`, and
//! element (row r, column j) of a branch is Philox index `r·D + j` ([`crate::rng::dropout_keep`]).

use std::borrow::Cow;
use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use crate::diffusion::{DistillBatch, LossBatch};
use crate::error::Result;
use crate::model::DitParams;
use crate::tensor::{Tensor, Tokens};

pub mod attention;
mod checks;
mod cond;
mod denoiser;
pub mod distill_loss;
mod dit;
pub mod fastmath;
pub mod gemm;
pub mod kv_cache;
pub mod layers;
pub mod logits_loss;
pub mod loss;
mod pool;
mod weights;

pub use denoiser::CpuDenoiser;
pub use pool::{free_cached_buffers, Buf};

/// Floating-point type the CPU backend computes in (f32 or f64).
pub trait Real:
    num_traits::Float
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + pool::Pooled
    + 'static
{
    /// `x` rounded to `Self`.
    fn lit(x: f64) -> Self;
    /// Exact widening (f32 -> f32/f64).
    fn of_f32(x: f32) -> Self;
    /// Rounded to f32.
    fn as_f32(self) -> f32;
    /// Exact widening to f64.
    fn as_f64(self) -> f64;
    /// The error function (f32: [`fastmath::erf`]).
    fn erf(self) -> Self;
    /// tanh for activations (f32: [`fastmath::tanh`], f64: the library function).
    fn tanh_fast(self) -> Self;
    /// e^x for softmax and activations (f32: [`fastmath::exp`], f64: the library function).
    fn exp_fast(self) -> Self;
    /// A parameter slice in `Self`: borrowed when `Self` is f32, converted otherwise.
    fn view(x: &[f32]) -> Cow<'_, [Self]>;
    /// `dst += src`, rounded to f32 (gradients into the f32 container).
    fn add_into_f32(dst: &mut [f32], src: &[Self]);
    /// `matrixmultiply`'s strided product `C = alpha·A·B + beta·C`, A m×k, B k×n.
    ///
    /// # Safety
    /// Every index `(m-1)·rsa + (k-1)·csa`, `(k-1)·rsb + (n-1)·csb` and `(m-1)·rsc + (n-1)·csc`
    /// must lie inside the buffers behind `a`, `b` and `c`, and `c` must alias neither.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Real for f32 {
    #[inline]
    fn lit(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn of_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn as_f32(self) -> f32 {
        self
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn erf(self) -> Self {
        fastmath::erf(self)
    }
    #[inline]
    fn tanh_fast(self) -> Self {
        fastmath::tanh(self)
    }
    #[inline]
    fn exp_fast(self) -> Self {
        fastmath::exp(self)
    }
    #[inline]
    fn view(x: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(x)
    }
    #[inline]
    fn add_into_f32(dst: &mut [f32], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    }
    #[inline]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Real for f64 {
    #[inline]
    fn lit(x: f64) -> Self {
        x
    }
    #[inline]
    fn of_f32(x: f32) -> Self {
        x as f64
    }
    #[inline]
    fn as_f32(self) -> f32 {
        self as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline]
    fn tanh_fast(self) -> Self {
        self.tanh()
    }
    #[inline]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline]
    fn view(x: &[f32]) -> Cow<'_, [f64]> {
        Cow::Owned(x.iter().map(|&v| v as f64).collect())
    }
    #[inline]
    fn add_into_f32(dst: &mut [f32], src: &[f64]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = (*d as f64 + s) as f32);
    }
    #[inline]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// Training-mode options of one loss evaluation.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainOpts {
    /// Dropout stream (seed, call offset) shared with the GPU residual kernel
    /// (`rng::dropout_keep`); `None` disables dropout whatever the config says.
    pub dropout: Option<(u64, u64)>,
}

/// Loss `Σ w·(−log p(x0 | xt, eps)) / norm` over masked positions, and its gradient with
/// respect to every parameter, accumulated (`+=`) into `grads` (same shapes as `p`).
///
/// Dropout with probability `p.config.dropout` applies when `opts.dropout` is set. Fails with a
/// message naming the offending tensor when a shape disagrees with `p.config`, when `x0`
/// differs from `xt` at an unmasked position, or when a target is the mask token.
pub fn loss_and_grad<T: Real>(
    p: &DitParams,
    batch: &LossBatch,
    opts: &TrainOpts,
    grads: &mut DitParams,
) -> Result<f64> {
    dit::loss_and_grad::<T>(p, batch, opts, grads)
}

/// The distillation loss of `batch` (spec 6.1 step 4, [`distill_loss`]) and its gradient with
/// respect to every parameter, accumulated (`+=`) into `grads`. Dropout as in
/// [`loss_and_grad`].
pub fn distill_loss_and_grad<T: Real>(
    p: &DitParams,
    batch: &DistillBatch,
    opts: &TrainOpts,
    grads: &mut DitParams,
) -> Result<f64> {
    dit::distill_loss_and_grad::<T>(p, batch, opts, grads)
}

/// The distillation loss of `batch` in evaluation mode (no dropout, no gradient).
pub fn distill_loss_eval<T: Real>(p: &DitParams, batch: &DistillBatch) -> Result<f64> {
    dit::distill_loss::<T>(p, batch)
}

/// SUBS log-probabilities (B, L, V) in evaluation mode: the same values as
/// `dit_ref::subs_log_probs(dit_ref::forward(..))` up to the accumulation precision of `T`.
/// `sigma` (B) is each sequence's sigma(t) for a time-conditioned model, `None` otherwise.
pub fn log_probs<T: Real>(
    p: &DitParams,
    xt: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
) -> Result<Tensor> {
    dit::log_probs::<T>(p, xt, eps, sigma)
}
