//! Validation of what a caller hands the CPU backend: tokens, eps and a loss batch against the
//! model's configuration, with messages that name the tensor and the expected and actual shape.

use crate::diffusion::LossBatch;
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

/// Checks tokens and eps against the config; returns the sizes.
pub(super) fn check_inputs(c: &DitConfig, xt: &Tokens, eps: Option<&Tensor>) -> Result<Dims> {
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
    Ok(Dims {
        batch: xt.batch,
        len: xt.len,
        rows: xt.batch * xt.len,
        d: c.hidden,
        m: c.mlp_hidden(),
        v: c.vocab_size,
    })
}

/// Checks the loss batch beyond shapes: targets equal inputs at unmasked rows (SUBS carry-over)
/// and are never the mask token.
pub(super) fn check_batch(c: &DitConfig, b: &LossBatch, rows: usize) -> Result<()> {
    let (xt, x0) = (b.xt, b.x0);
    if (x0.batch, x0.len) != (xt.batch, xt.len) || x0.ids.len() != rows {
        return Err(Error::Shape(format!(
            "x0: expected shape [{}, {}] like xt, got [{}, {}] with {} ids",
            xt.batch,
            xt.len,
            x0.batch,
            x0.len,
            x0.ids.len()
        )));
    }
    if b.weight.len() != rows {
        return Err(Error::Shape(format!(
            "weight: expected B·L = {rows} entries, got {}",
            b.weight.len()
        )));
    }
    if !(b.norm.is_finite() && b.norm > 0.0) {
        return Err(Error::Config(format!(
            "loss norm must be finite and positive, got {}",
            b.norm
        )));
    }
    let mask = c.mask_index as u32;
    for (i, (&t, &x)) in xt.ids.iter().zip(&x0.ids).enumerate() {
        if x == mask || x as usize >= c.vocab_size {
            return Err(Error::Shape(format!(
                "x0: target {x} at flat index {i} is the mask token or outside the vocabulary \
                 of {}",
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
    Ok(())
}
