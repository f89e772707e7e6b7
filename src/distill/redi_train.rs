//! IM-ReDi / MDM-ReDi training on couplings (spec 6.3) as the reference runs it.
//!
//! One optimizer step takes `batch` couplings from a seeded shuffle (epochs over the set) and
//! splits them into micro-batches of `micro_batch` rows whose losses and gradients add up to
//! the batch's (each normalised by the whole batch's token count), built one at a time so a
//! 512 × 1024 batch never exists at once. The loss is the MDLM NELBO with target x0_gen:
//! x_t = x_T, t as stored, ε from the stored seeds (fresh with `ignore_seed`).
//!
//! - Dropout: the model's `dropout` in train mode (the reference trains with p = 0.1 for its
//!   small and large models), from a Philox stream keyed by `dropout_seed` with one call offset
//!   per micro-batch, the scheme of `train::Trainer`.
//! - EMA hand-off: the shadow starts at the initial weights with its update count at
//!   `ema_updates`. The reference's fine-tune (`training.load_ema`, spec 2.6) keeps the source
//!   run's count, so its decay is (nearly) the full 0.9999 from the first update; 0 restarts
//!   the warm-up min(decay, (1+n)/(10+n)).
//! - Validation on held-out couplings, on the EMA weights: the plain NELBO of spec 4.7 on
//!   x0_gen (fresh times, masks and ε from the fixed validation seed: what the reference
//!   reports) and the coupling NLL (the training loss on the held-out pairs, stored x_T, t and
//!   ε: how well unseen couplings are reproduced).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::cpu::TrainOpts;
use crate::diffusion::noising::nelbo_batch;
use crate::diffusion::schedule::antithetic_times;
use crate::diffusion::LossBatch;
use crate::distill::fit::{FitStep, Fitter};
use crate::distill::Couplings;
use crate::error::{Error, Result};
use crate::model::{DitConfig, DitParams};
use crate::tensor::Tokens;
use crate::train::optim::LrSchedule;
use crate::train::trainer::{stream, VALIDATION, VALIDATION_EPS, VALIDATION_SEED};
use crate::train::Objective;

/// Purpose key of the dropout stream (as in `train::trainer`).
const DROPOUT: u64 = 3;
/// Dropout call offsets reserved per micro-batch.
const DROPOUT_CALLS_PER_MICRO: u64 = 1 << 20;
/// 2^64 / golden ratio.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Seed of the fresh ε of held-out couplings under `ignore_seed`.
const VALID_FRESH_EPS: u64 = 0x5EED_0F7E_57AB;

/// IM-ReDi / MDM-ReDi training settings (spec 6.3).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RediTrainConfig {
    pub steps: u64,
    /// Couplings per optimizer step.
    pub batch: usize,
    /// Couplings per forward/backward (0: the whole batch); must divide `batch`.
    pub micro_batch: usize,
    pub lr: f64,
    pub warmup: u64,
    /// EMA decay (0: none; the reference uses 0.9999).
    pub ema: f64,
    /// Update count the EMA starts at (0: a fresh warm-up; see the module doc).
    pub ema_updates: u64,
    /// Global-norm clip.
    pub clip: f64,
    /// Fresh ε instead of the stored seeds (`algo.ignore_seed`, for couplings from an MDLM).
    pub ignore_seed: bool,
    /// Seed of the shuffle (and of fresh ε with `ignore_seed`).
    pub seed: u64,
    /// Seed of the dropout stream (used when the model's dropout is > 0).
    pub dropout_seed: u64,
    /// Steps between validations (0: only at the end); needs held-out couplings.
    pub eval_every: u64,
}

impl RediTrainConfig {
    /// Rows per micro-batch.
    pub fn micro(&self) -> usize {
        if self.micro_batch == 0 {
            self.batch
        } else {
            self.micro_batch
        }
    }
}

/// A validation on held-out couplings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RediValidation {
    pub step: u64,
    /// Plain NELBO per token on x0_gen (spec 4.7), nats.
    pub nelbo: f64,
    /// The training loss on the held-out couplings, per token, nats.
    pub coupling_nll: f64,
    pub couplings: usize,
}

/// What the loop reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RediEvent {
    Step(FitStep),
    Validation(RediValidation),
}

/// Fits `params` to `pairs` (see the module doc). `progress(step, loss)` after every step.
/// Returns the fitted state (raw weights and EMA).
pub fn train_on_couplings(
    obj: &mut dyn Objective,
    params: DitParams,
    pairs: &Couplings,
    cfg: &RediTrainConfig,
    mut progress: impl FnMut(u64, f64),
) -> Result<Fitter> {
    train_on_couplings_with(obj, params, pairs, None, cfg, |e| {
        if let RediEvent::Step(s) = e {
            progress(s.step, s.loss)
        }
    })
}

/// [`train_on_couplings`] with held-out couplings `valid` (validated every `eval_every`
/// steps and at the end) and every event reported.
pub fn train_on_couplings_with(
    obj: &mut dyn Objective,
    params: DitParams,
    pairs: &Couplings,
    valid: Option<&Couplings>,
    cfg: &RediTrainConfig,
    mut on_event: impl FnMut(&RediEvent),
) -> Result<Fitter> {
    let m = cfg.micro();
    if cfg.batch == 0 || cfg.batch > pairs.len() {
        return Err(Error::Config(format!(
            "redi training: batch {} must be in 1..={} (the number of couplings)",
            cfg.batch,
            pairs.len()
        )));
    }
    if m == 0 || cfg.batch % m != 0 {
        return Err(Error::Config(format!(
            "redi training: micro-batch {m} must divide the batch {}",
            cfg.batch
        )));
    }
    let c = params.config.clone();
    for (what, p) in
        std::iter::once(("couplings", pairs)).chain(valid.map(|v| ("held-out couplings", v)))
    {
        if p.xt.len != c.length {
            return Err(Error::Shape(format!(
                "redi training: {what} of length {} for a model of length {}",
                p.xt.len, c.length
            )));
        }
    }
    let lr = LrSchedule {
        peak: cfg.lr,
        warmup: cfg.warmup,
    };
    let mut fit = Fitter::new(params, lr, cfg.ema, cfg.clip, |_| false);
    fit.ema.num_updates = cfg.ema_updates;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut cursor = order.len();
    let norm = (cfg.batch * c.length) as f64;
    let accum = (cfg.batch / m) as u64;
    let dseed = cfg.dropout_seed ^ DROPOUT.wrapping_mul(GOLDEN);
    let valid = valid.filter(|v| !v.is_empty());
    for s in 0..cfg.steps {
        if cursor + cfg.batch > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let rows = &order[cursor..cursor + cfg.batch];
        cursor += cfg.batch;
        fit.begin();
        let mut loss = 0.0;
        for (k, chunk) in rows.chunks(m).enumerate() {
            // Row by row from one stream: fresh ε (ignore_seed) does not depend on m.
            let b = pairs.batch(chunk, &c, cfg.ignore_seed, &mut rng);
            let lb = LossBatch {
                xt: &b.xt,
                x0: &b.x0,
                eps: b.eps.as_ref(),
                weight: &b.weight,
                norm,
                sigma: None,
            };
            let opts = TrainOpts {
                dropout: (c.dropout > 0.0)
                    .then(|| (dseed, (s * accum + k as u64) * DROPOUT_CALLS_PER_MICRO)),
            };
            loss += fit.accumulate(obj, &lb, &opts)?;
        }
        let st = fit.finish(loss)?;
        on_event(&RediEvent::Step(st));
        let last = s + 1 == cfg.steps;
        if let Some(v) = valid {
            if last || (cfg.eval_every > 0 && (s + 1) % cfg.eval_every == 0) {
                let r = validate_couplings(obj, &fit.ema.shadow, v, m, cfg.ignore_seed, s + 1)?;
                on_event(&RediEvent::Validation(r));
            }
        }
    }
    Ok(fit)
}

/// Validation of `params` on `valid` (see the module doc), in evaluation batches of `batch`
/// rows.
pub fn validate_couplings(
    obj: &mut dyn Objective,
    params: &DitParams,
    valid: &Couplings,
    batch: usize,
    ignore_seed: bool,
    step: u64,
) -> Result<RediValidation> {
    let c: &DitConfig = &params.config;
    let (l, n) = (valid.xt.len, valid.len());
    let mut masks = stream(VALIDATION_SEED, VALIDATION, 0);
    let mut eps = stream(VALIDATION_SEED, VALIDATION_EPS, 0);
    let mut fresh = ChaCha8Rng::seed_from_u64(VALID_FRESH_EPS);
    let (mut nelbo, mut nll) = (0.0, 0.0);
    let rows: Vec<usize> = (0..n).collect();
    for chunk in rows.chunks(batch.max(1)) {
        let b = valid.batch(chunk, c, ignore_seed, &mut fresh);
        nll += obj.eval_loss(
            params,
            &LossBatch {
                xt: &b.xt,
                x0: &b.x0,
                eps: b.eps.as_ref(),
                weight: &b.weight,
                norm: 1.0,
                sigma: None,
            },
        )?;
        let x0 = Tokens {
            batch: chunk.len(),
            len: l,
            ids: b.x0.ids,
        };
        let t = antithetic_times(&mut masks, chunk.len());
        let nb = nelbo_batch(&mut masks, &mut eps, &x0, &t, c, 1.0)?;
        nelbo += obj.eval_loss(params, &nb.as_loss())?;
    }
    let tokens = (n * l) as f64;
    Ok(RediValidation {
        step,
        nelbo: nelbo / tokens,
        coupling_nll: nll / tokens,
        couplings: n,
    })
}
