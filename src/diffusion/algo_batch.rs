//! The training / validation batch of every algorithm from clean rows and their antithetic
//! times: MDLM/IMDM's NELBO batch as before ([`nelbo_batch`]), and the baselines':
//! - AR: no noise; `xt = x0`, weight 1 at the predicted positions 1..L (0 at position 0);
//! - SEDD: `q(x_t | x_0)` at t (spec 4.4), weight `dσ` at masked positions, σ(t) per row;
//! - D3PM: t discretised to the T-step grid first (`d3pm::discretize`), then masked at that
//!   t, weight T at masked positions, σ(t) per row.
//!
//! The weights are informational for the baselines (their losses read σ and the tokens); the
//! masks come from the same stream as MDLM's, so one seed masks an MDLM and a SEDD batch at
//! the same positions (for the same t).

use rand::Rng;

use crate::diffusion::d3pm::{discretize, D3pmOptions};
use crate::diffusion::noising::{nelbo_batch, q_xt, NoisedBatch};
use crate::diffusion::schedule::alpha;
use crate::diffusion::{sedd, LossBatch};
use crate::error::{Error, Result};
use crate::model::{Algo, DitConfig};
use crate::tensor::Tokens;

/// One batch of any algorithm, with the per-row σ of time-conditioned models.
#[derive(Clone, Debug, PartialEq)]
pub struct AlgoBatch {
    pub noised: NoisedBatch,
    /// (B) σ(t) = −ln α(t) for SEDD and D3PM; `None` otherwise.
    pub sigma: Option<Vec<f64>>,
}

impl AlgoBatch {
    /// The borrowed view a loss implementation takes.
    pub fn as_loss(&self) -> LossBatch<'_> {
        LossBatch {
            sigma: self.sigma.as_deref(),
            ..self.noised.as_loss()
        }
    }

    /// Positions that carry a loss term (masked, or predicted for AR).
    pub fn scored(&self) -> usize {
        self.noised.masked()
    }
}

/// Tokens the loss of `rows` sequences averages over: every token, or the L−1 predicted ones
/// for AR (position 0 is never scored, as in the reference).
pub fn scored_tokens(c: &DitConfig, rows: usize) -> usize {
    match c.algo {
        Algo::Ar => rows * c.length.saturating_sub(1),
        _ => rows * c.length,
    }
}

/// The batch of `config.algo` for clean rows `x0` at times `t` (one per row); `norm` is the
/// divisor of the summed loss ([`scored_tokens`] of the global batch in training).
pub fn algo_batch<R: Rng, E: Rng>(
    masks: &mut R,
    eps_rng: &mut E,
    x0: &Tokens,
    t: &[f64],
    config: &DitConfig,
    d3pm: &D3pmOptions,
    norm: f64,
) -> Result<AlgoBatch> {
    if x0.len != config.length || t.len() != x0.batch {
        return Err(Error::Shape(format!(
            "batch {}x{} with {} times for a model of length {}",
            x0.batch,
            x0.len,
            t.len(),
            config.length
        )));
    }
    let (mask, l) = (config.mask_index as u32, x0.len);
    let weights = |xt: &Tokens, w_row: &dyn Fn(usize) -> f64| -> Vec<f32> {
        xt.ids
            .iter()
            .enumerate()
            .map(|(i, &id)| if id == mask { w_row(i / l) as f32 } else { 0.0 })
            .collect()
    };
    Ok(match config.algo {
        Algo::Mdlm | Algo::Imdm => AlgoBatch {
            noised: nelbo_batch(masks, eps_rng, x0, t, config, norm)?,
            sigma: None,
        },
        Algo::Ar => AlgoBatch {
            noised: NoisedBatch {
                xt: x0.clone(),
                x0: x0.clone(),
                eps: None,
                weight: (0..x0.batch * l)
                    .map(|i| if i % l == 0 { 0.0 } else { 1.0 })
                    .collect(),
                t: t.to_vec(),
                norm,
            },
            sigma: None,
        },
        Algo::Sedd | Algo::D3pm => {
            let tt: Vec<f64> = match config.algo {
                Algo::D3pm => t.iter().map(|&x| discretize(x, d3pm.steps)).collect(),
                _ => t.to_vec(),
            };
            let sigma: Vec<f64> = tt.iter().map(|&x| -alpha(x).ln()).collect();
            let xt = q_xt(masks, x0, &tt, mask)?;
            let weight = match config.algo {
                Algo::D3pm => weights(&xt, &|_| d3pm.steps as f64),
                _ => weights(&xt, &|b| sedd::dsigma(sigma[b])),
            };
            AlgoBatch {
                noised: NoisedBatch {
                    xt,
                    x0: x0.clone(),
                    eps: None,
                    weight,
                    t: tt,
                    norm,
                },
                sigma: Some(sigma),
            }
        }
    })
}

#[cfg(test)]
#[path = "algo_batch_tests.rs"]
mod tests;
