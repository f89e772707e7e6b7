//! The baselines' objective on the CPU backend: the loss of `config.algo` (AR, SEDD, D3PM) on
//! an [`AlgoBatch`](crate::diffusion::algo_batch::AlgoBatch)'s [`LossBatch`], through the
//! logits hook of `cpu::logits_loss`, in f32. MDLM and IMDM keep [`super::CpuDit`].
//!
//! - AR reads the clean rows (`x0`) and the norm (the predicted tokens of the global batch).
//! - SEDD reads `xt`, `x0` and σ per row.
//! - D3PM reads `xt`, `x0` and σ per row (α_t = e^{−σ}), and runs a second forward of `x0`
//!   at σ = 0 for the reconstruction term, with its own dropout offsets.

use crate::cpu::logits_loss::{logits, logits_loss_and_grad};
use crate::cpu::{Real, TrainOpts};
use crate::diffusion::d3pm::{self, D3pmOptions};
use crate::diffusion::{ar, sedd, LossBatch};
use crate::error::{Error, Result};
use crate::model::{Algo, DitParams};
use crate::train::Objective;

/// Dropout offset of D3PM's reconstruction forward, inside the micro-batch's reserved range.
const RECON_DROPOUT_OFFSET: u64 = 1 << 19;

/// The AR / SEDD / D3PM objective.
#[derive(Clone, Copy, Debug, Default)]
pub struct BaselineObjective {
    pub d3pm: D3pmOptions,
}

fn sigma_of<'a>(b: &LossBatch<'a>, algo: Algo) -> Result<&'a [f64]> {
    b.sigma.ok_or_else(|| {
        Error::Config(format!(
            "the {} loss needs one sigma per sequence; the batch has none",
            algo.name()
        ))
    })
}

/// The loss of `b` (gradient into `grads` when given) in `T`.
fn run<T: Real>(
    o: &D3pmOptions,
    p: &DitParams,
    b: &LossBatch,
    opts: &TrainOpts,
    grads: Option<&mut DitParams>,
) -> Result<f64> {
    let c = &p.config;
    let (mask, v, len) = (c.mask_index, c.vocab_size, b.xt.len);
    match c.algo {
        Algo::Ar => match grads {
            Some(g) => ar::loss_and_grad::<T>(p, b.x0, b.norm, opts, g),
            None => Ok(ar::nll_sum::<T>(p, b.x0)? / b.norm),
        },
        Algo::Sedd => {
            let sigma = sigma_of(b, c.algo)?;
            let f = |z: &mut [T]| {
                sedd::loss_in_place(z, &b.xt.ids, &b.x0.ids, sigma, len, b.norm, mask, v)
            };
            match grads {
                Some(g) => {
                    logits_loss_and_grad::<T>(p, b.xt, None, Some(sigma), opts, g, |z| Ok(f(z)))
                }
                None => Ok(f(&mut logits::<T>(p, b.xt, None, Some(sigma))?)),
            }
        }
        Algo::D3pm => {
            let sigma = sigma_of(b, c.algo)?;
            let alpha_t: Vec<f64> = sigma.iter().map(|&s| (-s).exp()).collect();
            let zero = vec![0.0; sigma.len()];
            let vb = |z: &mut [T]| {
                d3pm::vb_in_place(z, &b.xt.ids, &b.x0.ids, &alpha_t, len, b.norm, mask, v, o)
            };
            let rec =
                |z: &mut [T]| d3pm::recon_in_place(z, &b.x0.ids, b.norm, mask, v, o.subs_masking);
            match grads {
                Some(g) => {
                    let l1 = logits_loss_and_grad::<T>(p, b.xt, None, Some(sigma), opts, g, |z| {
                        Ok(vb(z))
                    })?;
                    let o2 = TrainOpts {
                        dropout: opts
                            .dropout
                            .map(|(s, off)| (s, off.wrapping_add(RECON_DROPOUT_OFFSET))),
                    };
                    let l2 = logits_loss_and_grad::<T>(p, b.x0, None, Some(&zero), &o2, g, |z| {
                        Ok(rec(z))
                    })?;
                    Ok(l1 + l2)
                }
                None => {
                    let l1 = vb(&mut logits::<T>(p, b.xt, None, Some(sigma))?);
                    let l2 = rec(&mut logits::<T>(p, b.x0, None, Some(&zero))?);
                    Ok(l1 + l2)
                }
            }
        }
        Algo::Mdlm | Algo::Imdm => Err(Error::Config(format!(
            "the baseline objective trains ar, sedd and d3pm models; {} trains with the NELBO",
            c.algo.name()
        ))),
    }
}

impl BaselineObjective {
    /// The loss in f64 (finite-difference checks).
    pub fn loss_f64(
        &self,
        p: &DitParams,
        b: &LossBatch,
        grads: Option<&mut DitParams>,
    ) -> Result<f64> {
        run::<f64>(&self.d3pm, p, b, &TrainOpts::default(), grads)
    }
}

impl Objective for BaselineObjective {
    fn name(&self) -> &'static str {
        "cpu-baseline"
    }

    fn loss_and_grad(
        &mut self,
        params: &DitParams,
        batch: &LossBatch,
        opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64> {
        run::<f32>(&self.d3pm, params, batch, opts, Some(grads))
    }

    fn eval_loss(&mut self, params: &DitParams, batch: &LossBatch) -> Result<f64> {
        run::<f32>(&self.d3pm, params, batch, &TrainOpts::default(), None)
    }
}

#[cfg(test)]
#[path = "algo_objective_tests.rs"]
mod tests;
