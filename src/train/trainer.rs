//! The training loop: one optimizer step = a global batch from the data source, antithetic
//! times over the global batch, micro-batches (masks, ε, NELBO weights; norm = global batch
//! tokens) whose gradients accumulate, a NaN/Inf check that names the first bad tensor,
//! global-norm clipping, AdamW at the scheduled learning rate, and the EMA update. Around it:
//! progress and `metrics.jsonl` entries every `log_every` steps, validation NELBO/PPL on the
//! EMA weights, periodic and final checkpoints.
//!
//! Determinism: every random draw comes from ChaCha8 keyed by (seed, purpose) on stream
//! `step`, the data source is addressed by position, and the arithmetic runs in a fixed order,
//! so the same seed gives the same losses bit for bit, and a run resumed from a checkpoint
//! follows the uninterrupted trajectory exactly (given a deterministic [`Objective`]). The
//! noise is drawn row by row from one stream per step, so the micro-batch size changes only
//! the order of floating-point sums, never the times, masks or ε.
//!
//! Device-resident objectives ([`crate::train::Resident`], the GPU trainer of
//! [`crate::cuda::trainer`]) run the same loop with the weights, gradients, AdamW moments and EMA
//! on the device: `params`, `ema` and `opt` of the [`Trainer`] are then refreshed from the
//! device ([`Trainer::sync_from`]) before each checkpoint and at the end of a run.

use std::path::PathBuf;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::cpu::TrainOpts;
use crate::diffusion::algo_batch::{algo_batch, scored_tokens};
use crate::diffusion::noising::micro_batch;
use crate::diffusion::schedule::antithetic_times;
use crate::error::{Error, Result};
use crate::model::{DitConfig, DitParams};
use crate::tensor::Tokens;
use crate::train::config::TrainConfig;
use crate::train::ema::Ema;
use crate::train::objective::{LossInput, Objective};
use crate::train::optim::{first_non_finite, zero, AdamW, AdamWConfig, LrSchedule};
use crate::train::run::{RngState, RunDir, TrainState, RUN_FORMAT};
use crate::train::source::DataSource;
use crate::train::update::{host_update, HostState};

/// Purposes of the random streams (keys mixed with the seed).
const TIMES: u64 = 1;
const NOISE: u64 = 2;
const DROPOUT: u64 = 3;
pub const VALIDATION: u64 = 4;
/// The ε at masked positions (IMDM), apart from the masks (NOISE) so that an MDLM and an IMDM
/// run with one seed mask the same positions.
const EPS: u64 = 5;
/// The ε of validation and evaluation batches.
pub const VALIDATION_EPS: u64 = 6;
/// Seed of the validation noise (times, masks, ε): fixed, so every validation of every run
/// sees the same noisy held-out batches.
pub const VALIDATION_SEED: u64 = 0x7A1D_A710_0000_0001;
/// Dropout call offsets reserved per micro-batch (the DiT numbers its dropout sites from the
/// offset it is given).
const DROPOUT_CALLS_PER_MICRO: u64 = 1 << 20;

/// 2^64 / golden ratio, to spread the purpose keys.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// ChaCha8 keyed by (seed, purpose) on stream `counter`.
pub fn stream(seed: u64, purpose: u64, counter: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ purpose.wrapping_mul(GOLDEN));
    r.set_stream(counter);
    r
}

/// AdamW settings of a training configuration.
pub fn adamw_config(c: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.adam_eps,
        weight_decay: c.weight_decay,
    }
}

/// One optimizer step's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    /// Steps completed, this one included (1-based).
    pub step: u64,
    /// Batch NELBO per token (the sum of the micro-batch losses).
    pub loss: f64,
    /// Learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A validation result.
#[derive(Clone, Debug, PartialEq)]
pub struct ValLog {
    pub step: u64,
    /// Mean NELBO per token over the held-out set (nats), on the EMA weights.
    pub nelbo: f64,
    /// `exp(nelbo)`.
    pub ppl: f64,
    pub tokens: usize,
}

/// What the loop reports as it goes (the CLI prints these).
#[derive(Clone, Debug)]
pub enum Event {
    /// A logged step: its numbers, throughput over the last interval, elapsed and remaining
    /// time.
    Progress {
        log: StepLog,
        tok_per_s: f64,
        /// Model FLOPs utilisation, `6 · N · tok/s / peak` (N = all parameters, the
        /// convention of docs/benchmarks.md), when the device's peak is known.
        mfu: Option<f64>,
        elapsed_s: f64,
        eta_s: f64,
    },
    Validation(ValLog),
    Checkpoint {
        step: u64,
        dir: PathBuf,
    },
}

/// The state of a run and the loop that advances it.
pub struct Trainer {
    pub model: DitConfig,
    pub cfg: TrainConfig,
    pub params: DitParams,
    pub ema: Ema,
    pub opt: AdamW,
    /// Optimizer steps completed.
    pub step: u64,
    grads: DitParams,
    trainable: Vec<bool>,
    data: Box<dyn DataSource>,
    val: Option<Tokens>,
    run: Option<RunDir>,
    elapsed_before: f64,
    started: Instant,
    last_loss: Option<f64>,
    last_val: Option<ValLog>,
    /// (step, time) of the last progress report.
    last_report: (u64, Instant),
    observer: Box<dyn FnMut(&Event)>,
    /// Peak FLOP/s of the training device, for the MFU of progress reports.
    peak_flops: Option<f64>,
}

impl Trainer {
    /// A new run from `params` (a fresh init or fine-tuning weights). With a run directory,
    /// checkpoint 0 is written at once, so a run can be resumed from its very start.
    pub fn new(
        cfg: TrainConfig,
        params: DitParams,
        data: Box<dyn DataSource>,
        val: Option<Tokens>,
        run: Option<RunDir>,
    ) -> Result<Self> {
        cfg.validate()?;
        let opt = AdamW::new(&params, adamw_config(&cfg), |n| cfg.freeze.is_frozen(n));
        let ema = Ema::new(&params, cfg.ema);
        let mut t = Self::assemble(cfg, params, ema, opt, data, val, run, 0.0)?;
        if t.run.is_some() {
            t.save_checkpoint()?;
        }
        Ok(t)
    }

    /// Continues the run in `run` from its latest checkpoint. `cfg` is the run's recorded
    /// configuration; only the step count and the intervals may differ (the changes are
    /// recorded in `config.json`). `data` must be the source that configuration describes
    /// (it is moved to the recorded position).
    pub fn resume(
        cfg: TrainConfig,
        model: &DitConfig,
        run: RunDir,
        mut data: Box<dyn DataSource>,
        val: Option<Tokens>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (dir, ld) = run
            .load_resumable(model, adamw_config(&cfg), |n| cfg.freeze.is_frozen(n))?
            .ok_or_else(|| {
                Error::Config(format!(
                    "--resume {}: the run has no checkpoint yet",
                    run.root.display()
                ))
            })?;
        if ld.state.rng.seed != cfg.seed {
            return Err(Error::checkpoint(
                &dir,
                format!(
                    "seed {} differs from the run's configured seed {}",
                    ld.state.rng.seed, cfg.seed
                ),
            ));
        }
        if cfg.steps < ld.state.step {
            return Err(Error::Config(format!(
                "--steps {} is below the step {} the run has already reached",
                cfg.steps, ld.state.step
            )));
        }
        data.seek(ld.state.data_position)?;
        if let Some(p) = &ld.state.data_loader {
            data.restore_loader(p)?;
        }
        run.truncate_metrics_after(ld.state.step)?;
        run.record_train_config(&cfg)?;
        let mut t = Self::assemble(
            cfg,
            ld.params,
            ld.ema,
            ld.opt,
            data,
            val,
            Some(run),
            ld.state.elapsed_s,
        )?;
        t.step = ld.state.step;
        t.last_report.0 = t.step;
        t.last_loss = ld.state.last_loss;
        Ok(t)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: TrainConfig,
        params: DitParams,
        ema: Ema,
        opt: AdamW,
        mut data: Box<dyn DataSource>,
        val: Option<Tokens>,
        run: Option<RunDir>,
        elapsed_before: f64,
    ) -> Result<Self> {
        let model = params.config.clone();
        model.validate()?;
        data.set_batch_size(cfg.batch)?;
        if data.seq_len() != model.length {
            return Err(Error::Config(format!(
                "the data has sequences of length {}, the model's length is {}",
                data.seq_len(),
                model.length
            )));
        }
        if let Some(v) = &val {
            if v.len != model.length || v.batch == 0 {
                return Err(Error::Config(format!(
                    "validation set {}x{} does not fit length {}",
                    v.batch, v.len, model.length
                )));
            }
        }
        let trainable = opt.trainable();
        if !trainable.iter().any(|&t| t) {
            return Err(Error::Config(
                "every parameter is frozen (--freeze / --ln-tune); nothing to train".into(),
            ));
        }
        let grads = DitParams::zeros(&model);
        let now = Instant::now();
        Ok(Trainer {
            model,
            cfg,
            params,
            ema,
            opt,
            step: 0,
            grads,
            trainable,
            data,
            val,
            run,
            elapsed_before,
            started: now,
            last_loss: None,
            last_val: None,
            last_report: (0, now),
            observer: Box::new(|_| {}),
            peak_flops: None,
        })
    }

    /// The training device's peak FLOP/s (None: no MFU in the reports).
    pub fn set_peak_flops(&mut self, peak: Option<f64>) {
        self.peak_flops = peak.filter(|p| *p > 0.0);
    }

    /// Receives progress, validation and checkpoint events.
    pub fn set_observer(&mut self, f: impl FnMut(&Event) + 'static) {
        self.observer = Box::new(f);
    }

    /// The run directory, if the trainer writes one.
    pub fn run_dir(&self) -> Option<&RunDir> {
        self.run.as_ref()
    }

    /// Mutable access to the run directory (e.g. for the checkpoint-failure test hook).
    pub fn run_dir_mut(&mut self) -> Option<&mut RunDir> {
        self.run.as_mut()
    }

    /// Training wall time so far, across resumes.
    pub fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// The scalar state a checkpoint records.
    pub fn state(&self) -> TrainState {
        TrainState {
            format: RUN_FORMAT.into(),
            step: self.step,
            data_position: self.data.position(),
            data_loader: self.data.loader_position(),
            rng: RngState {
                scheme: "chacha8(seed ^ purpose*golden, stream = step); purposes: 1 times, \
                         2 masks+eps; dropout: philox(seed ^ 3*golden, offset = micro-batch*2^20)"
                    .into(),
                seed: self.cfg.seed,
                counter: self.step,
            },
            ema_decay: self.ema.decay,
            ema_num_updates: self.ema.num_updates,
            tokens_seen: self.step * (self.cfg.batch * self.model.length) as u64,
            elapsed_s: self.elapsed_s(),
            last_loss: self.last_loss,
        }
    }

    /// One optimizer step (no logging, validation or checkpoint).
    pub fn step(&mut self, obj: &mut dyn Objective) -> Result<StepLog> {
        let (s, seed) = (self.step, self.cfg.seed);
        let (b, m, l) = (self.cfg.batch, self.cfg.micro_batch, self.model.length);
        let x0 = self.data.next_batch(b)?;
        if x0.batch != b || x0.len != l {
            return Err(Error::Shape(format!(
                "data source returned {}x{}, expected {b}x{l}",
                x0.batch, x0.len
            )));
        }
        let t = antithetic_times(&mut stream(seed, TIMES, s), b);
        let (mut noise, mut eps) = (stream(seed, NOISE, s), stream(seed, EPS, s));
        let norm = scored_tokens(&self.model, b) as f64;
        // A resident objective (GPU) keeps the state on its device; see `Resident`.
        let resident = obj.resident().is_some();
        if let Some(r) = obj.resident() {
            if !r.is_loaded() {
                r.load(&self.params, &self.ema, &self.opt)?;
            }
            r.zero_grads()?;
        } else {
            zero(&mut self.grads);
        }
        let mut loss = 0.0f64;
        let accum = self.cfg.accumulation() as u64;
        for k in 0..accum {
            let (xk, tk) = micro_batch(&x0, &t, m, k as usize)?;
            let nb = algo_batch(
                &mut noise,
                &mut eps,
                &xk,
                tk,
                &self.model,
                &self.cfg.d3pm,
                norm,
            )?;
            let opts = TrainOpts {
                dropout: (self.model.dropout > 0.0).then(|| {
                    let dseed = seed ^ DROPOUT.wrapping_mul(GOLDEN);
                    (dseed, (s * accum + k) * DROPOUT_CALLS_PER_MICRO)
                }),
            };
            loss += if resident {
                let r = obj.resident().expect("resident");
                r.accumulate(LossInput::Nelbo(nb.as_loss()), &opts)?
            } else {
                obj.loss_and_grad(&self.params, &nb.as_loss(), &opts, &mut self.grads)?
            };
        }
        let step = s + 1;
        let lr = LrSchedule {
            peak: self.cfg.lr,
            warmup: self.cfg.warmup,
        }
        .at(s);
        let grad_norm = if resident {
            let r = obj.resident().expect("resident");
            r.update(step, loss, lr, self.cfg.clip)?
        } else {
            self.host_update(step, loss, lr)?
        };
        self.step = step;
        self.last_loss = Some(loss);
        Ok(StepLog {
            step,
            loss,
            lr,
            grad_norm,
        })
    }

    /// The host update of step `step` (the rule shared with the distillation fitter).
    fn host_update(&mut self, step: u64, loss: f64, lr: f64) -> Result<f64> {
        let state = HostState {
            params: &mut self.params,
            grads: &mut self.grads,
            trainable: &self.trainable,
            opt: &mut self.opt,
            ema: &mut self.ema,
        };
        host_update(state, step, loss, lr, self.cfg.clip)
    }

    /// With a resident objective: copies its device state (weights, EMA, optimizer) into
    /// `params`, `ema` and `opt`, which are otherwise stale. A no-op for host objectives. The
    /// loop calls it before every checkpoint and at the end of [`Trainer::run_until`].
    pub fn sync_from(&mut self, obj: &mut dyn Objective) -> Result<()> {
        if let Some(r) = obj.resident() {
            if r.is_loaded() {
                r.store(&mut self.params, &mut self.ema, &mut self.opt)?;
            }
        }
        Ok(())
    }

    /// Mean NELBO per token of the held-out set on the EMA weights (spec 8.1): antithetic
    /// times within each evaluation batch of `micro_batch` rows, masks and ε from a fixed
    /// seed. `None` without a held-out set.
    pub fn validate(&mut self, obj: &mut dyn Objective) -> Result<Option<ValLog>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        // A loaded resident objective evaluates its own (device) EMA weights.
        let resident = obj.resident().is_some_and(|r| r.is_loaded());
        let mut rng = stream(VALIDATION_SEED, VALIDATION, 0);
        let mut eps = stream(VALIDATION_SEED, VALIDATION_EPS, 0);
        let (m, l) = (self.cfg.micro_batch, val.len);
        let mut sum = 0.0;
        for start in (0..val.batch).step_by(m) {
            let n = m.min(val.batch - start);
            let x = Tokens {
                batch: n,
                len: l,
                ids: val.ids[start * l..(start + n) * l].to_vec(),
            };
            let t = antithetic_times(&mut rng, n);
            let nb = algo_batch(&mut rng, &mut eps, &x, &t, &self.model, &self.cfg.d3pm, 1.0)?;
            sum += if resident {
                let r = obj.resident().expect("resident");
                r.eval_loss_ema(LossInput::Nelbo(nb.as_loss()))?
            } else {
                obj.eval_loss(&self.ema.shadow, &nb.as_loss())?
            };
        }
        let tokens = scored_tokens(&self.model, val.batch);
        let nelbo = sum / tokens as f64;
        let v = ValLog {
            step: self.step,
            nelbo,
            ppl: nelbo.exp(),
            tokens,
        };
        if let Some(run) = &self.run {
            run.append_metrics(&json!({
                "kind": "val",
                "step": v.step,
                "val_nelbo": v.nelbo,
                "val_ppl": v.ppl,
                "val_tokens": v.tokens,
                "elapsed_s": self.elapsed_s(),
            }))?;
        }
        (self.observer)(&Event::Validation(v.clone()));
        self.last_val = Some(v.clone());
        Ok(Some(v))
    }

    /// Writes a checkpoint of the current state (needs a run directory).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let state = self.state();
        let keep = self.cfg.keep_checkpoints;
        let Some(run) = &mut self.run else {
            return Err(Error::Config("no run directory to checkpoint into".into()));
        };
        let dir = run.save_checkpoint(&self.params, &self.ema, &self.opt, &state, keep)?;
        (self.observer)(&Event::Checkpoint {
            step: self.step,
            dir: dir.clone(),
        });
        Ok(dir)
    }

    /// What makes a checkpoint good: every raw and EMA weight is finite, and a probe forward
    /// of the raw weights (those a resume continues from) on the first validation rows gives a
    /// finite loss. Otherwise the run stops before writing, so the previous checkpoint stays
    /// the latest; the error names the first non-finite weight.
    pub fn check_before_checkpoint(&mut self, obj: &mut dyn Objective) -> Result<()> {
        let step = self.step;
        for (what, p) in [("weight", &self.params), ("EMA weight", &self.ema.shadow)] {
            if let Some((n, i, v)) = first_non_finite(p) {
                return Err(Error::NonFinite {
                    step,
                    what: format!(
                        "{what} {n} is non-finite (element {i} = {v}); this step is not \
                         checkpointed"
                    ),
                });
            }
        }
        let Some(val) = &self.val else {
            return Ok(());
        };
        let n = self.cfg.micro_batch.min(val.batch);
        let x = Tokens {
            batch: n,
            len: val.len,
            ids: val.ids[..n * val.len].to_vec(),
        };
        let mut rng = stream(VALIDATION_SEED, VALIDATION, 0);
        let mut eps = stream(VALIDATION_SEED, VALIDATION_EPS, 0);
        let t = antithetic_times(&mut rng, n);
        let nb = algo_batch(&mut rng, &mut eps, &x, &t, &self.model, &self.cfg.d3pm, 1.0)?;
        let loss = obj.eval_loss(&self.params, &nb.as_loss())?;
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                step,
                what: format!(
                    "every weight is finite, but a probe forward on {n} validation rows gives \
                     loss {loss} (weights too large: a learning rate too high?); this step is \
                     not checkpointed"
                ),
            });
        }
        Ok(())
    }

    fn report(&mut self, log: &StepLog) -> Result<()> {
        let (s0, t0) = self.last_report;
        let dt = t0.elapsed().as_secs_f64();
        let tokens = (log.step - s0) as f64 * (self.cfg.batch * self.model.length) as f64;
        let tok_per_s = if dt > 0.0 { tokens / dt } else { 0.0 };
        let per_step = if log.step > s0 {
            dt / (log.step - s0) as f64
        } else {
            0.0
        };
        let eta_s = per_step * self.cfg.steps.saturating_sub(log.step) as f64;
        let elapsed_s = self.elapsed_s();
        let mfu = self
            .peak_flops
            .map(|p| 6.0 * self.params.count() as f64 * tok_per_s / p);
        if let Some(run) = &self.run {
            run.append_metrics(&json!({
                "kind": "train",
                "step": log.step,
                "loss": log.loss,
                "lr": log.lr,
                "grad_norm": log.grad_norm,
                "tok_per_s": tok_per_s,
                "mfu": mfu,
                "tokens": log.step * (self.cfg.batch * self.model.length) as u64,
                "elapsed_s": elapsed_s,
            }))?;
        }
        (self.observer)(&Event::Progress {
            log: log.clone(),
            tok_per_s,
            mfu,
            elapsed_s,
            eta_s,
        });
        self.last_report = (log.step, Instant::now());
        Ok(())
    }

    /// Trains until `cfg.steps`, with logging, validation and checkpoints; then validates
    /// and checkpoints once more. Returns the last validation, if any.
    pub fn run(&mut self, obj: &mut dyn Objective) -> Result<Option<ValLog>> {
        self.run_until(obj, self.cfg.steps)
    }

    /// Trains until step `stop` (at most `cfg.steps`). Reaching `cfg.steps` ends the run:
    /// final validation and final checkpoint. Stopping earlier (tests: an interruption) does
    /// neither, and so does a call that finds the run already complete.
    pub fn run_until(&mut self, obj: &mut dyn Objective, stop: u64) -> Result<Option<ValLog>> {
        let end = self.cfg.steps;
        let first = self.step;
        self.last_report = (self.step, Instant::now());
        while self.step < stop.min(end) {
            let log = self.step(obj)?;
            let s = log.step;
            if s % self.cfg.log_every == 0 || s == end {
                self.report(&log)?;
            }
            if s < end {
                if self.cfg.eval_every > 0 && s % self.cfg.eval_every == 0 {
                    self.validate(obj)?;
                }
                if self.run.is_some() && self.cfg.save_every > 0 && s % self.cfg.save_every == 0 {
                    self.sync_from(obj)?;
                    self.check_before_checkpoint(obj)?;
                    self.save_checkpoint()?;
                }
            }
        }
        if self.step == end && self.step > first {
            if self.last_val.as_ref().is_none_or(|v| v.step != end) {
                self.validate(obj)?;
            }
            if self.run.is_some() {
                self.sync_from(obj)?;
                self.check_before_checkpoint(obj)?;
                self.save_checkpoint()?;
            }
        }
        self.sync_from(obj)?;
        Ok(self.last_val.clone())
    }
}
