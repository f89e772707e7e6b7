//! The CPU training backend: the DiT forward with saved activations and its hand-written
//! backward, generic over f32 (speed: the CPU demo trains with it) and f64 (finite-difference
//! checks). Its forward is checked against `model::dit_ref`, its backward against f64 central
//! finite differences; it is the gradient reference for the GPU tape.
//!
//! STUB: signatures fixed so that training and sampling code can be written against them.

use crate::diffusion::LossBatch;
use crate::error::Result;
use crate::model::DitParams;
use crate::tensor::{Tensor, Tokens};

/// Floating-point type the CPU backend computes in.
pub trait Real: Copy + Send + Sync + 'static {}
impl Real for f32 {}
impl Real for f64 {}

/// Training-mode options of one loss evaluation.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainOpts {
    /// Dropout stream (seed, call offset) shared with the GPU residual kernel
    /// (`rng::dropout_keep`); `None` disables dropout whatever the config says.
    pub dropout: Option<(u64, u64)>,
}

/// Loss `Σ w·(−log p(x0 | xt, eps)) / norm` over masked positions, and its gradient with
/// respect to every parameter, accumulated (`+=`) into `grads` (same shapes as `p`).
pub fn loss_and_grad<T: Real>(
    _p: &DitParams,
    _batch: &LossBatch,
    _opts: &TrainOpts,
    _grads: &mut DitParams,
) -> Result<f64> {
    todo!("cpu::loss_and_grad")
}

/// SUBS log-probabilities (B, L, V) in evaluation mode.
pub fn log_probs<T: Real>(_p: &DitParams, _xt: &Tokens, _eps: Option<&Tensor>) -> Result<Tensor> {
    todo!("cpu::log_probs")
}
