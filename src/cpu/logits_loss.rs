//! The loss hook of the CPU backend: the DiT forward to raw logits, a caller's loss that
//! replaces the logits by their gradient, and the existing backward to every parameter. The
//! baselines (AR, SEDD, D3PM; `crate::diffusion::{ar, sedd, d3pm}`) train through it, each
//! with its own loss on the logits; MDLM/IMDM keep the fused SUBS loss of [`super::loss`].
//!
//! The input may be shorter than the model's length (the AR model reads `x0[:, :-1]`, spec
//! 2.4); rotary positions start at 0 either way.

use crate::cpu::checks::check_inputs;
use crate::cpu::dit::{backward, forward};
use crate::cpu::weights::{check_shapes, expected_shapes, Weights};
use crate::cpu::{Real, TrainOpts};
use crate::error::Result;
use crate::model::DitParams;
use crate::tensor::{Tensor, Tokens};

/// Raw logits (B·L, V) of `xt` in evaluation mode (no dropout), in `T`, with σ (B) per
/// sequence for time-conditioned models (`None` for the others; checked as `LossBatch`'s).
pub fn logits<T: Real>(
    p: &DitParams,
    xt: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
) -> Result<Vec<T>> {
    let c = &p.config;
    c.validate()?;
    let w = Weights::<T>::view(p)?;
    let n = check_inputs(c, xt, eps, sigma)?;
    let mut acts = forward(&w, c, xt, eps, sigma, n, None);
    let out = std::mem::take(&mut acts.logits).into_vec();
    w.recycle();
    Ok(out)
}

/// `loss(logits)` of one forward of `xt` (σ per row as in [`logits`]) and its gradient with
/// respect to every parameter, accumulated (`+=`) into `grads`. `loss` receives the logits
/// (B·L, V) and must replace them **in place** by `d loss / d logits`; its return value is
/// returned. Dropout as in [`super::loss_and_grad`].
pub fn logits_loss_and_grad<T: Real>(
    p: &DitParams,
    xt: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
    opts: &TrainOpts,
    grads: &mut DitParams,
    loss: impl FnOnce(&mut [T]) -> Result<f64>,
) -> Result<f64> {
    let c = &p.config;
    c.validate()?;
    let w = Weights::<T>::view(p)?;
    check_shapes(grads, &expected_shapes(c), "grads")?;
    let n = check_inputs(c, xt, eps, sigma)?;
    let p_drop = c.dropout as f32;
    let dropout = opts
        .dropout
        .filter(|_| p_drop > 0.0)
        .map(|(seed, offset)| (seed, offset, p_drop));
    let mut acts = forward(&w, c, xt, eps, sigma, n, dropout);
    let mut dlogits = std::mem::take(&mut acts.logits);
    let value = loss(&mut dlogits)?;
    let mut g = w.zeros_like();
    backward(&w, &mut g, &acts, c, xt, n, &dlogits);
    g.add_into(grads);
    g.recycle();
    w.recycle();
    Ok(value)
}
