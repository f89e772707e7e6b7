//! Held-out bound of a baseline (AR, SEDD, D3PM) on prepared shards, on the protocol of
//! [`super::ppl`]: every sequence of the split once, in stored order; per batch, antithetic
//! times over its rows and masks from one ChaCha8 stream keyed by the seed (the draws of
//! `Trainer::validate` with the same seed and batch). What is averaged per token:
//! - AR: the exact NLL `−log p(x_{i+1} | x_{≤i})` over the L−1 predicted tokens of each row;
//! - SEDD: the score-entropy bound, over all tokens;
//! - D3PM: the reconstruction term plus T·L_vb (with the chosen α_s rule), over all tokens.
//!
//! PPL = exp(per-token value): a true perplexity for AR, an upper bound for SEDD and D3PM.

use std::time::Instant;

use crate::data::{Check, Loader, LoaderOptions, ShardSet};
use crate::diffusion::algo_batch::{algo_batch, scored_tokens};
use crate::diffusion::d3pm::D3pmOptions;
use crate::diffusion::schedule::antithetic_times;
use crate::error::{Error, Result};
use crate::eval::ppl::{PplOptions, PplReport};
use crate::model::DitParams;
use crate::tensor::Tokens;
use crate::train::algo_objective::BaselineObjective;
use crate::train::trainer::{stream, VALIDATION, VALIDATION_EPS};
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
    let set = ShardSet::open(dir, split, Check::Full)?;
    set.check_model(config.vocab_size, config.mask_index as u32, config.length)?;
    let total = opts.limit.map_or(set.len(), |n| n.min(set.len()));
    if total == 0 {
        return Err(Error::data(
            dir,
            format!("the {split} split holds no sequences to evaluate"),
        ));
    }
    let mut obj = BaselineObjective { d3pm };
    let mut loader = Loader::new(set, LoaderOptions::eval(opts.batch))?;
    let mut rng = stream(opts.seed, VALIDATION, 0);
    let mut eps = stream(opts.seed, VALIDATION_EPS, 0);
    let t0 = Instant::now();
    let (mut sum, mut done, mut scored, mut batches) = (0.0f64, 0u64, 0u64, 0u64);
    let l = config.length;
    while done < total {
        let b = loader.next_batch();
        let rows = (b.rows as u64).min(total - done) as usize;
        let x = Tokens::new(rows, l, b.tokens[..rows * l].to_vec(), config.vocab_size)?;
        if let Some(i) = x
            .ids
            .iter()
            .position(|&id| id as usize == config.mask_index)
        {
            return Err(Error::data(
                dir,
                format!(
                    "{split} sequence {} holds the mask id {} at position {}",
                    b.indices[i / l],
                    config.mask_index,
                    i % l
                ),
            ));
        }
        let t = antithetic_times(&mut rng, rows);
        let nb = algo_batch(&mut rng, &mut eps, &x, &t, &config, &d3pm, 1.0)?;
        let s = obj.eval_loss(params, &nb.as_loss())?;
        if !s.is_finite() {
            return Err(Error::Config(format!(
                "the {} bound of {split} batch {batches} (sequences {}..) is {s}",
                config.algo.name(),
                b.indices[0]
            )));
        }
        sum += s;
        scored += nb.scored() as u64;
        done += rows as u64;
        batches += 1;
        progress(done, total);
    }
    let tokens = scored_tokens(&config, done as usize) as u64;
    let nelbo = sum / tokens as f64;
    Ok(PplReport {
        nelbo,
        ppl: nelbo.exp(),
        sequences: done,
        tokens,
        masked: scored,
        batches,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
