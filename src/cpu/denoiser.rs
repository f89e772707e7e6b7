//! The samplers' view of a DiT on the CPU backend: f32 SUBS log-probabilities, no dropout.

use crate::cpu::log_probs;
use crate::diffusion::Denoiser;
use crate::error::Result;
use crate::model::{DitConfig, DitParams};
use crate::tensor::{Tensor, Tokens};

/// A [`Denoiser`] computing with [`log_probs`]`::<f32>` (sgemm, f32 accumulation).
#[derive(Clone, Debug)]
pub struct CpuDenoiser {
    pub params: DitParams,
}

impl CpuDenoiser {
    /// Checks the configuration once; shapes are checked on every call.
    pub fn new(params: DitParams) -> Result<Self> {
        params.config.validate()?;
        Ok(CpuDenoiser { params })
    }
}

impl Denoiser for CpuDenoiser {
    fn config(&self) -> &DitConfig {
        &self.params.config
    }

    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        log_probs::<f32>(&self.params, xt, eps, None)
    }
}
