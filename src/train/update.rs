//! The host optimizer update, shared by the training loop ([`crate::train::Trainer`]) and the
//! distillation fitter ([`crate::distill::fit::Fitter`]): check the loss and gradients for
//! non-finite values, clip to the global norm, AdamW, check the weights again, EMA. The
//! GPU trainer applies the same rule on the device (`Resident::update`).

use crate::error::{Error, Result};
use crate::model::DitParams;
use crate::train::optim::{clip_grad_norm, first_non_finite, AdamW};
use crate::train::Ema;

/// The optimizer state one update touches, borrowed from its owner.
pub struct HostState<'a> {
    pub params: &'a mut DitParams,
    /// Accumulated gradients of this step (clipped in place).
    pub grads: &'a mut DitParams,
    /// Per tensor, reference order: false for frozen tensors.
    pub trainable: &'a [bool],
    pub opt: &'a mut AdamW,
    pub ema: &'a mut Ema,
}

/// Applies update `step` (1-based, for messages) with the summed micro-batch `loss`, learning
/// rate `lr` and global-norm clip `clip` (≤ 0: off). Returns the gradient norm before
/// clipping. A NaN or Inf stops with [`Error::NonFinite`] naming the step and the first bad
/// tensor, before the weights change (or, if the update itself overflows, the first weight
/// that went bad).
pub fn host_update(s: HostState<'_>, step: u64, loss: f64, lr: f64, clip: f64) -> Result<f64> {
    let bad_grad =
        first_non_finite(s.grads).map(|(n, i, v)| format!("gradient of {n} (element {i} = {v})"));
    check_finite(step, loss, bad_grad)?;
    let grad_norm = clip_grad_norm(s.grads, s.trainable, clip);
    s.opt.step(s.params, s.grads, lr)?;
    if let Some((n, i, v)) = first_non_finite(s.params) {
        return Err(Error::NonFinite {
            step,
            what: format!("parameter {n} became non-finite after the update (element {i} = {v})"),
        });
    }
    s.ema.update(s.params)?;
    Ok(grad_norm)
}

/// The non-finite check before an update (host and GPU trainers): a non-finite `loss`, or
/// `bad_grad` (the first non-finite gradient, described), stops step `step` with
/// [`Error::NonFinite`] naming what went bad.
pub fn check_finite(step: u64, loss: f64, bad_grad: Option<String>) -> Result<()> {
    if !loss.is_finite() {
        let mut what = format!("the loss is {loss}");
        if let Some(g) = &bad_grad {
            what += &format!("; first non-finite tensor: {g}");
        }
        return Err(Error::NonFinite { step, what });
    }
    match bad_grad {
        Some(g) => Err(Error::NonFinite {
            step,
            what: format!("non-finite {g}"),
        }),
        None => Ok(()),
    }
}
