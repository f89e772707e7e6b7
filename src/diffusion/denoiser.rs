//! The two contracts between diffusion code and a DiT implementation.
//!
//! - [`LossBatch`]: what one weighted cross-entropy evaluation needs. The MDLM NELBO (spec 4.6),
//!   the IMDM loss (4.7) and IM-ReDi training (6.3) are all `Σ w·(−log p_θ(x0 | xt, ε)) / norm`
//!   with different `xt`, `ε` and `w`, so one batch type serves them all.
//! - [`Denoiser`]: SUBS log-probabilities for a noisy batch; the samplers see nothing else.

use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::tensor::{Tensor, Tokens};

/// One (micro-)batch of a weighted cross-entropy loss.
#[derive(Clone, Copy, Debug)]
pub struct LossBatch<'a> {
    /// (B, L) noisy input; positions equal to `mask_index` are masked.
    pub xt: &'a Tokens,
    /// (B, L) targets. At unmasked positions they equal `xt` (SUBS carry-over gives log p = 0).
    pub x0: &'a Tokens,
    /// (B, L, noise_dim) eps used as given (no reset redraw); `None` for models without the
    /// eps MLP.
    pub eps: Option<&'a Tensor>,
    /// (B·L) per-position weight, e.g. 1/t at masked positions for the NELBO; only masked
    /// positions contribute.
    pub weight: &'a [f32],
    /// Divisor of the weighted sum: the number of tokens of the whole (global) batch, so
    /// micro-batch losses and gradients add up to the batch mean.
    pub norm: f64,
    /// (B) per-sequence sigma(t) for a time-conditioned model (`DitConfig::time_conditioning`);
    /// `None` for every other model, whose conditioning is the constant sigma = 0 (spec 4.2).
    pub sigma: Option<&'a [f64]>,
}

/// Checks a per-sequence sigma against the model and the batch size: present exactly when the
/// configuration is time-conditioned, then B finite values >= 0 (spec 2.2 step 2).
pub fn check_sigma(c: &DitConfig, sigma: Option<&[f64]>, batch: usize) -> Result<()> {
    match (c.time_conditioning, sigma) {
        (false, None) => Ok(()),
        (false, Some(_)) => Err(Error::Config(
            "sigma: given for a model without time conditioning (time_conditioning is off in \
             its config; MDLM and IMDM use the constant sigma = 0)"
                .into(),
        )),
        (true, None) => Err(Error::Config(format!(
            "sigma: the model is time-conditioned (time_conditioning in its config) and needs \
             one sigma per sequence ({batch} values), got none"
        ))),
        (true, Some(s)) => {
            if s.len() != batch {
                return Err(Error::Shape(format!(
                    "sigma: expected B = {batch} values, got {}",
                    s.len()
                )));
            }
            match s.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                Some(i) => Err(Error::Config(format!(
                    "sigma: value {} of sequence {i} must be finite and >= 0",
                    s[i]
                ))),
                None => Ok(()),
            }
        }
    }
}

impl LossBatch<'_> {
    /// Checks the batch against the model, the one check both backends run before computing:
    /// a non-empty (B, L) input with ids in the vocabulary, targets of the same shape that are
    /// never the mask token and equal the input where it is not masked (SUBS carries unmasked
    /// tokens over), B·L weights, a finite positive norm, and eps of shape (B, L, noise_dim)
    /// when the model has the eps MLP, and a sigma exactly when the model is time-conditioned
    /// ([`check_sigma`]). Returns (B, L).
    pub fn check(&self, c: &DitConfig) -> Result<(usize, usize)> {
        let (xt, x0) = (self.xt, self.x0);
        let (bsz, len) = (xt.batch, xt.len);
        let rows = bsz * len;
        if rows == 0 || xt.ids.len() != rows {
            return Err(Error::Shape(format!(
                "xt: expected a non-empty (B, L) = ({bsz}, {len}) with B·L ids, got {}",
                xt.ids.len()
            )));
        }
        if (x0.batch, x0.len) != (bsz, len) || x0.ids.len() != rows {
            return Err(Error::Shape(format!(
                "x0: expected shape [{bsz}, {len}] like xt, got [{}, {}] with {} ids",
                x0.batch,
                x0.len,
                x0.ids.len()
            )));
        }
        if self.weight.len() != rows {
            return Err(Error::Shape(format!(
                "weight: expected B·L = {rows} entries, got {}",
                self.weight.len()
            )));
        }
        if !(self.norm.is_finite() && self.norm > 0.0) {
            return Err(Error::Config(format!(
                "loss norm must be finite and positive, got {}",
                self.norm
            )));
        }
        let mask = c.mask_index as u32;
        for (i, (&t, &x)) in xt.ids.iter().zip(&x0.ids).enumerate() {
            if t as usize >= c.vocab_size {
                return Err(Error::Shape(format!(
                    "xt: id {t} at flat index {i} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            if x == mask || x as usize >= c.vocab_size {
                return Err(Error::Shape(format!(
                    "x0: target {x} at flat index {i} is the mask token or outside the \
                     vocabulary of {}",
                    c.vocab_size
                )));
            }
            if t != mask && t != x {
                return Err(Error::Shape(format!(
                    "x0: target {x} differs from the unmasked input {t} at flat index {i} (SUBS \
                     carries unmasked tokens over, so x0 must equal xt there)"
                )));
            }
        }
        if c.has_eps_mlp() {
            let e = self.eps.ok_or_else(|| {
                Error::Shape(format!(
                    "eps: the IMDM loss needs eps of shape [{bsz}, {len}, {}], got none",
                    c.noise_dim
                ))
            })?;
            e.expect_shape("eps", &[bsz, len, c.noise_dim])?;
        }
        check_sigma(c, self.sigma, bsz)?;
        Ok((bsz, len))
    }
}

/// A DiT in evaluation mode (no dropout) as the samplers see it.
pub trait Denoiser {
    fn config(&self) -> &DitConfig;
    /// SUBS log-probabilities (B, L, V), f32, for `xt` and, for IMDM, `eps` (B, L, noise_dim)
    /// used as given.
    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor>;
}

/// Which divergence the distillation loss measures between the student's and the teacher's
/// SUBS log-probabilities at a masked position (spec 6.1 step 4; the maths is in
/// `cpu::distill_loss`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum DistillMode {
    /// KL(student ‖ teacher) (the reference's default).
    #[default]
    KlBwd,
    /// KL(teacher ‖ student).
    KlFwd,
    /// Squared difference of the log-probs, summed over the vocabulary.
    Mse,
    /// Absolute difference of the log-probs (on log-probs, as the reference has it).
    Tvd,
}

impl DistillMode {
    /// Every mode, in the order of the GPU kernel's mode codes.
    pub const ALL: [DistillMode; 4] = [Self::KlBwd, Self::KlFwd, Self::Mse, Self::Tvd];
}

/// One (micro-)batch of the distillation loss: the student's input and the teacher's target.
#[derive(Clone, Copy, Debug)]
pub struct DistillBatch<'a> {
    /// (B, L) noisy input; only positions holding the mask contribute.
    pub xt: &'a Tokens,
    /// (B, L, noise_dim) eps used as given (reset = 0); `None` without the eps MLP.
    pub eps: Option<&'a Tensor>,
    /// (B·L·V) teacher log-probs, read at masked positions.
    pub target: &'a [f32],
    pub mode: DistillMode,
    /// Divisor of the summed row losses: the masked positions of the whole (global) batch.
    pub norm: f64,
    /// (B) per-sequence sigma(t) of a time-conditioned student; `None` otherwise (as in
    /// [`LossBatch::sigma`]).
    pub sigma: Option<&'a [f64]>,
}

#[cfg(test)]
#[path = "denoiser_tests.rs"]
mod tests;
