//! Held-out bound of a baseline (AR, SEDD, D3PM) on prepared shards, on the protocol of
//! [`super::ppl`]: every sequence of the split once, in stored order; per batch, antithetic
//! times over its rows and masks from one ChaCha8 stream keyed by the seed (the draws of
//! `Trainer::validate` with the same seed and batch). What is averaged per token:
//! - AR: the exact NLL `−log p(x_{i+1} | x_{≤i})` over the L−1 predicted tokens of each row;
//! - SEDD: the score-entropy bound, over all tokens;
//! - D3PM: the reconstruction term plus T·L_vb (with the chosen α_s rule), over all tokens.
//!
//! PPL = exp(per-token value): a true perplexity for AR, an upper bound for SEDD and D3PM.

use crate::diffusion::algo_batch::{algo_batch, scored_tokens};
use crate::diffusion::d3pm::D3pmOptions;
use crate::error::Result;
use crate::eval::ppl::{walk_split, PplOptions, PplReport};
use crate::model::DitParams;
use crate::train::algo_objective::BaselineObjective;
use crate::train::Objective;

/// The held-out bound of the baseline `params` on `split` of `dir` (see the module doc);
/// `progress(done, total)` after every batch. `masked` of the report counts scored positions.
pub fn heldout_bound(
    params: &DitParams,
    d3pm: D3pmOptions,
    dir: &std::path::Path,
    split: &str,
    opts: PplOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PplReport> {
    let config = params.config.clone();
    let mut obj = BaselineObjective { d3pm };
    let what = format!("{} bound", config.algo.name());
    let w = walk_split(
        &config,
        dir,
        split,
        opts,
        &what,
        progress,
        |rng, eps, x, t| {
            let nb = algo_batch(rng, eps, x, t, &config, &d3pm, 1.0)?;
            Ok((obj.eval_loss(params, &nb.as_loss())?, nb.scored() as u64))
        },
    )?;
    let tokens = scored_tokens(&config, w.sequences as usize) as u64;
    let nelbo = w.sum / tokens as f64;
    Ok(PplReport {
        nelbo,
        ppl: nelbo.exp(),
        sequences: w.sequences,
        tokens,
        masked: w.counted,
        batches: w.batches,
        seconds: w.seconds,
    })
}
