//! What the baselines' samplers (SEDD, D3PM) see of a network: raw logits (B·L, V) for a
//! batch and, for time-conditioned models, one σ per row. Their outputs are not SUBS
//! log-probabilities, so they do not go through [`super::Denoiser`].

use crate::cpu::logits_loss::logits;
use crate::error::Result;
use crate::model::{DitConfig, DitParams};
use crate::tensor::Tokens;

/// A network in evaluation mode that returns raw logits.
pub trait LogitsModel {
    fn config(&self) -> &DitConfig;
    /// Logits (B·L·V, row-major) of `xt` with σ per row (`None`: the constant σ = 0 path).
    fn logits(&mut self, xt: &Tokens, sigma: Option<&[f64]>) -> Result<Vec<f32>>;
}

/// [`LogitsModel`] on the CPU backend (f32).
#[derive(Clone, Debug)]
pub struct CpuLogits {
    pub params: DitParams,
}

impl LogitsModel for CpuLogits {
    fn config(&self) -> &DitConfig {
        &self.params.config
    }

    fn logits(&mut self, xt: &Tokens, sigma: Option<&[f64]>) -> Result<Vec<f32>> {
        logits::<f32>(&self.params, xt, None, sigma)
    }
}
