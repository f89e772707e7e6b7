//! Validation of what a caller hands the CPU backend: tokens, eps and sigma against the model's
//! configuration (a loss batch has its own [`LossBatch::check`](crate::diffusion::LossBatch::check)), with messages that name the tensor and the expected and actual shape.

use crate::diffusion::check_sigma;
use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::tensor::{Tensor, Tokens};

/// Sizes of one forward.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub batch: usize,
    pub len: usize,
    pub rows: usize,
    pub d: usize,
    /// MLP hidden width
    pub m: usize,
    pub v: usize,
}

/// Checks tokens, eps and sigma against the config; returns the sizes.
pub(super) fn check_inputs(
    c: &DitConfig,
    xt: &Tokens,
    eps: Option<&Tensor>,
    sigma: Option<&[f64]>,
) -> Result<Dims> {
    if xt.ids.len() != xt.batch * xt.len || xt.batch == 0 || xt.len == 0 {
        return Err(Error::Shape(format!(
            "xt: expected a non-empty (B, L) = ({}, {}) with B·L ids, got {}",
            xt.batch,
            xt.len,
            xt.ids.len()
        )));
    }
    if let Some((i, t)) = xt
        .ids
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= c.vocab_size)
    {
        return Err(Error::Shape(format!(
            "xt: id {t} at flat index {i} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    if c.has_eps_mlp() {
        let e = eps.ok_or_else(|| {
            Error::Shape(format!(
                "eps: IMDM needs eps of shape [{}, {}, {}], got none",
                xt.batch, xt.len, c.noise_dim
            ))
        })?;
        e.expect_shape("eps", &[xt.batch, xt.len, c.noise_dim])?;
    }
    check_sigma(c, sigma, xt.batch)?;
    Ok(Dims {
        batch: xt.batch,
        len: xt.len,
        rows: xt.batch * xt.len,
        d: c.hidden,
        m: c.mlp_hidden(),
        v: c.vocab_size,
    })
}
