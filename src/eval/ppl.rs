//! Held-out NELBO and perplexity of a checkpoint on prepared shards (spec 8.1, `mode=ppl_eval`).
//!
//! The split is read once in stored order (the loader's evaluation mode: every sequence once,
//! the last batch smaller). For each batch of n rows: antithetic times over the n rows (spec
//! 4.5 with n = the evaluation batch), then masks and, for IMDM, a fresh ε at every masked
//! position (spec 4.7: the reported NELBO averages over ε), all from one ChaCha8 stream keyed
//! by the seed. The NELBO per token is `Σ_batches Σ_masked (1/t)·(−log p(x0|xt,ε)) / Σ tokens`
//! (all tokens, masked or not, spec 4.6) and PPL = exp(NELBO).
//!
//! With the trainer's validation seed ([`VALIDATION_SEED`]) and a batch equal to the run's
//! micro-batch, the draws are exactly those of [`Trainer::validate`](crate::train::Trainer::validate)
//! on the same sequences, so the CPU numbers agree with the run's `val_nelbo` bit for bit.
//!
//! Differences from the reference that change no expectation: our random streams, and the
//! order (stored, where the reference shuffles the validation loader with `config.seed`).

use std::time::Instant;

use rand_chacha::ChaCha8Rng;

use crate::data::{Check, Loader, LoaderOptions, ShardSet};
use crate::diffusion::noising::nelbo_batch;
use crate::diffusion::schedule::antithetic_times;
use crate::diffusion::Denoiser;
use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::tensor::Tokens;
use crate::train::objective::weighted_nll;
use crate::train::trainer::{stream, VALIDATION, VALIDATION_EPS, VALIDATION_SEED};

/// Settings of [`heldout_ppl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PplOptions {
    /// Sequences per forward (the antithetic group).
    pub batch: usize,
    /// Seed of times, masks and ε.
    pub seed: u64,
    /// Evaluate only the first this many sequences of the split.
    pub limit: Option<u64>,
}

impl Default for PplOptions {
    fn default() -> Self {
        PplOptions {
            batch: 16,
            seed: VALIDATION_SEED,
            limit: None,
        }
    }
}

/// What [`heldout_ppl`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PplReport {
    /// Mean NELBO per token (nats).
    pub nelbo: f64,
    /// exp(nelbo).
    pub ppl: f64,
    pub sequences: u64,
    pub tokens: u64,
    /// Masked positions that contributed.
    pub masked: u64,
    pub batches: u64,
    pub seconds: f64,
}

/// What [`walk_split`] summed over a split.
pub(crate) struct Walk {
    /// Σ of the per-batch scores.
    pub sum: f64,
    pub sequences: u64,
    /// Σ of the per-batch counts (masked or scored positions).
    pub counted: u64,
    pub batches: u64,
    pub seconds: f64,
}

/// The evaluation protocol of this module (see the module doc), shared by every held-out
/// estimate: opens `split` of `dir` for `config`'s model, walks its first `opts.limit`
/// sequences once in stored order, refuses a sequence holding the mask id, draws each batch's
/// antithetic times, and calls `score(masks, eps, x0, t) -> (sum, count)` with the streams for
/// the masks and ε; a non-finite sum is an error naming `what`, the batch and its first
/// sequence. `progress(done, total)` after every batch.
pub(crate) fn walk_split(
    config: &DitConfig,
    dir: &std::path::Path,
    split: &str,
    opts: PplOptions,
    what: &str,
    progress: &mut dyn FnMut(u64, u64),
    mut score: impl FnMut(&mut ChaCha8Rng, &mut ChaCha8Rng, &Tokens, &[f64]) -> Result<(f64, u64)>,
) -> Result<Walk> {
    let set = ShardSet::open(dir, split, Check::Full)?;
    set.check_model(config.vocab_size, config.mask_index as u32, config.length)?;
    let total = opts.limit.map_or(set.len(), |n| n.min(set.len()));
    if total == 0 {
        return Err(Error::data(
            dir,
            format!("the {split} split holds no sequences to evaluate"),
        ));
    }
    let mut loader = Loader::new(set, LoaderOptions::eval(opts.batch))?;
    let mut rng = stream(opts.seed, VALIDATION, 0);
    let mut eps = stream(opts.seed, VALIDATION_EPS, 0);
    let t0 = Instant::now();
    let (mut sum, mut done, mut counted, mut batches) = (0.0f64, 0u64, 0u64, 0u64);
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
        let (s, n) = score(&mut rng, &mut eps, &x, &t)?;
        if !s.is_finite() {
            return Err(Error::Config(format!(
                "the {what} of {split} batch {batches} (sequences {}..) is {s}",
                b.indices[0]
            )));
        }
        sum += s;
        counted += n;
        done += rows as u64;
        batches += 1;
        progress(done, total);
    }
    Ok(Walk {
        sum,
        sequences: done,
        counted,
        batches,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// NELBO and PPL of `den` on `split` of the prepared folder `dir` (see the module doc).
/// `progress(done, total)` is called after every batch.
pub fn heldout_ppl(
    den: &mut dyn Denoiser,
    dir: &std::path::Path,
    split: &str,
    opts: PplOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PplReport> {
    let config = den.config().clone();
    let w = walk_split(
        &config,
        dir,
        split,
        opts,
        "NELBO",
        progress,
        |rng, eps, x, t| {
            let nb = nelbo_batch(rng, eps, x, t, &config, 1.0)?;
            let lp = den.log_probs(&nb.xt, nb.eps.as_ref())?;
            Ok((weighted_nll(&lp, &nb.as_loss())?, nb.masked() as u64))
        },
    )?;
    let tokens = w.sequences * config.length as u64;
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
