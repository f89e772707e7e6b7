//! SDTT and IM-SDTT distillation (spec 6.1): a student learns to take in one step what its
//! teacher takes in K steps, round after round, each round's teacher being the previous
//! round's student.
//!
//! - Student: an IMDM (IM-SDTT; from an MDLM teacher file the eps MLP starts at zero output,
//!   so the round-0 student computes exactly the teacher) or an MDLM (SDTT, the reference's
//!   `as_mdlm` path: same code, no eps).
//! - One step: x0 from the data, antithetic t over the global batch, x_t = q(x_t | x0) and
//!   (IMDM) eps at masked positions, the teacher rollout ([`super::rollout`]) with that eps,
//!   then the fused SUBS + distillation loss of the student (`cpu::distill_loss`),
//!   averaged over the masked positions of the global batch, micro-batch gradients
//!   accumulated, and the host update (clip, AdamW, EMA) of `train::update`.
//! - Rounds: step i (0-based) belongs to round r = ⌊i / grow_dt_every⌋ with
//!   dt_r = (1 − 1e-3)/orig_steps · 2^r. Before the first step of round r ≥ 1 the student is
//!   copied into the teacher (with `ema_on_growth` the EMA weights become teacher and student
//!   and the EMA restarts), the optimizer optionally restarts, and round r − 1's weights are
//!   written to `DIR/rounds/round-RR/{model,ema}.safetensors`. The run ends after the last
//!   round whose `round(1/dt_r)` is at least `min_steps` (the reference's exit test).
//!
//! Determinism: times, masks, eps and the rollout's race uniforms are drawn from streams
//! keyed by (seed, purpose, step), the teacher of a round is a file in the run directory,
//! so a resumed run follows the uninterrupted one bit for bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cpu::{self, CpuDenoiser, TrainOpts};
use crate::diffusion::noising::{micro_batch, nelbo_batch, NoisedBatch};
use crate::diffusion::schedule::{antithetic_times, SAMPLING_EPS};
use crate::diffusion::{DistillBatch, DistillMode};
use crate::distill::rollout::{teacher_rollout, Spacing};
use crate::error::{Error, Result};
use crate::model::{checkpoint, Algo, DitConfig, DitParams};
use crate::tensor::Tokens;
use crate::train::config::TrainConfig;
use crate::train::optim::{zero, AdamW, LrSchedule};
use crate::train::run::{
    load_optimizer, RngState, RunDir, TrainState, EMA_FILE, MODEL_FILE, OPTIM_FILE, RUN_FORMAT,
    STATE_FILE,
};
use crate::train::trainer::{adamw_config, stream, VALIDATION_SEED};
use crate::train::update::{host_update, HostState};
use crate::train::DataSource;
use crate::train::Ema;

/// The SDTT settings of a run (`DIR/sdtt.json`); the rest is the run's `TrainConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdttConfig {
    /// The round-0 teacher file (an MDLM or IMDM checkpoint).
    pub teacher: PathBuf,
    /// Student algorithm: `Imdm` (IM-SDTT) or `Mdlm` (SDTT).
    pub student: Algo,
    pub mode: DistillMode,
    /// Teacher steps K per student step.
    pub distill_steps: usize,
    /// Sampling steps of the round-0 teacher (dt_0 = (1 − 1e-3)/orig_steps).
    pub orig_steps: u64,
    /// Optimizer steps per round.
    pub grow_dt_every: u64,
    /// The run stops before a round with round(1/dt) below this.
    pub min_steps: u64,
    pub ema_on_growth: bool,
    pub reset_optimizer_on_growth: bool,
    pub spacing: Spacing,
}

impl Default for SdttConfig {
    /// The reference's `im-sdtt.yaml`.
    fn default() -> Self {
        SdttConfig {
            teacher: PathBuf::new(),
            student: Algo::Imdm,
            mode: DistillMode::KlBwd,
            distill_steps: 2,
            orig_steps: 1024,
            grow_dt_every: 10_000,
            min_steps: 1,
            ema_on_growth: false,
            reset_optimizer_on_growth: false,
            spacing: Spacing::Reference,
        }
    }
}

/// The file name of the SDTT settings in a run directory.
pub const SDTT_FILE: &str = "sdtt.json";
/// Folder of the per-round weights.
pub const ROUNDS_DIR: &str = "rounds";

/// Purposes of the random streams (keys mixed with the seed, as in `train::trainer`).
const TIMES: u64 = 1;
const NOISE: u64 = 2;
const DROPOUT: u64 = 3;
const EPS: u64 = 5;
const ROLLOUT: u64 = 7;
const VALIDATION: u64 = 8;
const DROPOUT_CALLS_PER_MICRO: u64 = 1 << 20;

impl SdttConfig {
    /// dt of round `r`.
    pub fn dt(&self, r: u64) -> f64 {
        (1.0 - SAMPLING_EPS) / self.orig_steps as f64 * 2f64.powi(r as i32)
    }

    /// Number of rounds: the first r with round(1/dt_r) < min_steps (Python's `round`, ties
    /// to even, as the reference computes it).
    pub fn rounds(&self) -> u64 {
        (0..64)
            .find(|&r| ((1.0 / self.dt(r)).round_ties_even() as u64) < self.min_steps)
            .unwrap_or(64)
    }

    /// Optimizer steps of the whole schedule.
    pub fn total_steps(&self) -> u64 {
        self.rounds() * self.grow_dt_every
    }

    /// Round of optimizer step `i` (0-based).
    pub fn round_of(&self, i: u64) -> u64 {
        i / self.grow_dt_every
    }

    /// Checks the flags; messages name them.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.distill_steps == 0 {
            return bad("--distill-steps must be at least 1".into());
        }
        if self.grow_dt_every == 0 {
            return bad("--grow-dt-every must be positive".into());
        }
        if self.min_steps == 0 || self.orig_steps == 0 {
            return bad("--orig-steps and --min-steps must be positive".into());
        }
        let ratio = self.orig_steps / self.min_steps;
        if self.orig_steps % self.min_steps != 0 || !ratio.is_power_of_two() {
            return bad(format!(
                "--orig-steps {} must be a power of two times the final step count --min-steps \
                 {} (each round halves the step count)",
                self.orig_steps, self.min_steps
            ));
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct SdttStep {
    pub step: u64,
    pub round: u64,
    pub dt: f64,
    /// The distillation loss (mean over masked positions).
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Masked positions of the batch.
    pub masked: usize,
}

/// What the loop reports (the CLI prints these).
#[derive(Clone, Debug)]
pub enum SdttEvent {
    Progress {
        log: SdttStep,
        tok_per_s: f64,
        elapsed_s: f64,
        eta_s: f64,
    },
    /// Held-out KL(student EMA ‖ teacher) at `step`, with the teacher of `round`.
    Validation {
        step: u64,
        round: u64,
        kl: f64,
    },
    Round {
        round: u64,
        dt: f64,
        dir: PathBuf,
    },
    Checkpoint {
        step: u64,
        dir: PathBuf,
    },
}

/// The state of an SDTT run and its loop.
pub struct Sdtt {
    pub model: DitConfig,
    pub cfg: TrainConfig,
    pub sdtt: SdttConfig,
    pub params: DitParams,
    pub ema: Ema,
    pub opt: AdamW,
    pub teacher: DitParams,
    /// Optimizer steps completed.
    pub step: u64,
    /// The round whose teacher `teacher` is.
    pub teacher_round: u64,
    grads: DitParams,
    trainable: Vec<bool>,
    data: Box<dyn DataSource>,
    val: Option<Tokens>,
    run: Option<RunDir>,
    elapsed_before: f64,
    started: Instant,
    last_loss: Option<f64>,
    last_report: (u64, Instant),
    observer: Box<dyn FnMut(&SdttEvent)>,
}

/// Refuses a `--teacher` that is not a diffusion denoiser (MDLM/IMDM).
pub fn check_teacher(teacher: &DitConfig, path: &Path) -> Result<()> {
    if teacher.causal {
        return Err(Error::checkpoint(
            path,
            "--teacher: an autoregressive model, not an MDLM/IMDM denoiser",
        ));
    }
    teacher.validate()
}

impl Sdtt {
    /// A new run: the student starts from `student` and the round-0 teacher is `teacher`
    /// (both in the student's configuration). With a run directory, checkpoint 0 is written.
    pub fn new(
        cfg: TrainConfig,
        sdtt: SdttConfig,
        student: DitParams,
        teacher: DitParams,
        data: Box<dyn DataSource>,
        val: Option<Tokens>,
        run: Option<RunDir>,
    ) -> Result<Self> {
        let opt = AdamW::new(&student, adamw_config(&cfg), |_| false);
        let ema = Ema::new(&student, cfg.ema);
        let mut s = Self::assemble(cfg, sdtt, student, ema, opt, teacher, data, val, run, 0.0)?;
        if s.run.is_some() {
            s.save_checkpoint()?;
        }
        Ok(s)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: TrainConfig,
        sdtt: SdttConfig,
        params: DitParams,
        ema: Ema,
        opt: AdamW,
        teacher: DitParams,
        mut data: Box<dyn DataSource>,
        val: Option<Tokens>,
        run: Option<RunDir>,
        elapsed_before: f64,
    ) -> Result<Self> {
        cfg.validate()?;
        sdtt.validate()?;
        let model = params.config.clone();
        model.validate()?;
        let shape = |c: &DitConfig| {
            (
                c.vocab_size,
                c.mask_index,
                c.hidden,
                c.heads,
                c.blocks,
                c.cond_dim,
                c.length,
            )
        };
        if shape(&teacher.config) != shape(&model) {
            return Err(Error::Config(format!(
                "--teacher {}: a model of another shape than the student",
                sdtt.teacher.display()
            )));
        }
        data.set_batch_size(cfg.batch)?;
        if data.seq_len() != model.length {
            return Err(Error::Config(format!(
                "--data: sequences of length {}, the teacher's length is {}",
                data.seq_len(),
                model.length
            )));
        }
        let trainable = opt.trainable();
        let now = Instant::now();
        Ok(Sdtt {
            grads: DitParams::zeros(&model),
            model,
            cfg,
            sdtt,
            params,
            ema,
            opt,
            teacher,
            step: 0,
            teacher_round: 0,
            trainable,
            data,
            val,
            run,
            elapsed_before,
            started: now,
            last_loss: None,
            last_report: (0, now),
            observer: Box::new(|_| {}),
        })
    }

    /// Continues the run in `run` from its latest checkpoint; `teacher0` is the round-0
    /// teacher (the `--teacher` file in the student's configuration).
    pub fn resume(
        cfg: TrainConfig,
        sdtt: SdttConfig,
        model: &DitConfig,
        teacher0: DitParams,
        run: RunDir,
        mut data: Box<dyn DataSource>,
        val: Option<Tokens>,
    ) -> Result<Self> {
        let latest = run.latest()?.ok_or_else(|| {
            Error::Config(format!(
                "--resume {}: the run has no checkpoint yet; start it again",
                run.root.display()
            ))
        })?;
        let dir = run.root.join(&latest.dir);
        let state: TrainState = read_json(&dir.join(STATE_FILE))?;
        if state.format != RUN_FORMAT || state.rng.seed != cfg.seed {
            return Err(Error::checkpoint(
                &dir,
                format!(
                    "format {:?} / seed {} differ from the run's ({RUN_FORMAT:?}, seed {})",
                    state.format, state.rng.seed, cfg.seed
                ),
            ));
        }
        let s = state.step;
        let params = checkpoint::load(dir.join(MODEL_FILE), Some(model))?;
        let shadow = checkpoint::load(dir.join(EMA_FILE), Some(model))?;
        let mut opt = AdamW::new(&params, adamw_config(&cfg), |_| false);
        load_optimizer(&dir.join(OPTIM_FILE), &mut opt)?;
        // The round of the last completed step; its teacher is in force until the next
        // step's boundary (if any) runs again.
        let round = if s == 0 { 0 } else { sdtt.round_of(s - 1) };
        let want_opt = if sdtt.reset_optimizer_on_growth {
            s - round * sdtt.grow_dt_every
        } else {
            s
        };
        if opt.step != want_opt {
            return Err(Error::checkpoint(
                &dir,
                format!("optimizer step {} where {want_opt} was expected", opt.step),
            ));
        }
        let teacher = if round == 0 {
            teacher0
        } else {
            let f = if sdtt.ema_on_growth {
                EMA_FILE
            } else {
                MODEL_FILE
            };
            checkpoint::load(round_dir(&run.root, round - 1).join(f), Some(model))?
        };
        data.seek(state.data_position)?;
        if let Some(p) = &state.data_loader {
            data.restore_loader(p)?;
        }
        run.truncate_metrics_after(s)?;
        run.record_train_config(&cfg)?;
        let ema = Ema {
            decay: state.ema_decay,
            num_updates: state.ema_num_updates,
            shadow,
        };
        let mut t = Self::assemble(
            cfg,
            sdtt,
            params,
            ema,
            opt,
            teacher,
            data,
            val,
            Some(run),
            state.elapsed_s,
        )?;
        t.step = s;
        t.teacher_round = round;
        t.last_report.0 = s;
        t.last_loss = state.last_loss;
        Ok(t)
    }

    pub fn set_observer(&mut self, f: impl FnMut(&SdttEvent) + 'static) {
        self.observer = Box::new(f);
    }

    pub fn run_dir(&self) -> Option<&RunDir> {
        self.run.as_ref()
    }

    pub fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    fn state(&self) -> TrainState {
        TrainState {
            format: RUN_FORMAT.into(),
            step: self.step,
            data_position: self.data.position(),
            data_loader: self.data.loader_position(),
            rng: RngState {
                scheme: "chacha8(seed ^ purpose*golden, stream = step); purposes: 1 times, \
                         2 masks, 5 eps, 7 rollout key; dropout: philox(seed ^ 3*golden)"
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

    fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let state = self.state();
        let keep = self.cfg.keep_checkpoints;
        let Some(run) = &mut self.run else {
            return Err(Error::Config("no run directory to checkpoint into".into()));
        };
        let dir = run.save_checkpoint(&self.params, &self.ema, &self.opt, &state, keep)?;
        (self.observer)(&SdttEvent::Checkpoint {
            step: self.step,
            dir: dir.clone(),
        });
        Ok(dir)
    }

    /// Writes the weights that end round `round` (raw and EMA) into the run directory.
    fn save_round(&mut self, round: u64) -> Result<()> {
        let Some(run) = &self.run else {
            return Ok(());
        };
        let dir = round_dir(&run.root, round);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        checkpoint::save(dir.join(MODEL_FILE), &self.params)?;
        checkpoint::save(dir.join(EMA_FILE), &self.ema.shadow)?;
        (self.observer)(&SdttEvent::Round {
            round,
            dt: self.sdtt.dt(round),
            dir,
        });
        Ok(())
    }

    /// The round boundary before step `self.step` (0-based index of the next step).
    fn grow_if_due(&mut self) -> Result<()> {
        let r = self.sdtt.round_of(self.step);
        if r == self.teacher_round {
            return Ok(());
        }
        self.save_round(self.teacher_round)?;
        if self.sdtt.ema_on_growth {
            self.params = self.ema.shadow.clone();
            self.ema = Ema::new(&self.params, self.cfg.ema);
        }
        self.teacher = self.params.clone();
        if self.sdtt.reset_optimizer_on_growth {
            self.opt = AdamW::new(&self.params, adamw_config(&self.cfg), |_| false);
        }
        self.teacher_round = r;
        Ok(())
    }

    /// Noised micro-batches of one global batch, drawn row by row from the step's streams.
    fn noised(&self, x0: &Tokens, t: &[f64], s: u64, seed: u64) -> Result<Vec<NoisedBatch>> {
        let (mut noise, mut eps) = (stream(seed, NOISE, s), stream(seed, EPS, s));
        let m = self.cfg.micro_batch;
        (0..self.cfg.accumulation())
            .map(|k| {
                let (xk, tk) = micro_batch(x0, t, m, k)?;
                nelbo_batch(&mut noise, &mut eps, &xk, tk, &self.model, 1.0)
            })
            .collect()
    }

    /// One optimizer step (with the round boundary before it when due).
    pub fn step(&mut self) -> Result<SdttStep> {
        self.grow_if_due()?;
        let (s, seed) = (self.step, self.cfg.seed);
        let b = self.cfg.batch;
        let x0 = self.data.next_batch(b)?;
        if x0.batch != b || x0.len != self.model.length {
            return Err(Error::Shape(format!(
                "data source returned {}x{}, expected {b}x{}",
                x0.batch, x0.len, self.model.length
            )));
        }
        let t = antithetic_times(&mut stream(seed, TIMES, s), b);
        let batches = self.noised(&x0, &t, s, seed)?;
        let masked: usize = batches.iter().map(|nb| nb.masked()).sum();
        let norm = masked.max(1) as f64;
        let (round, dt) = (self.sdtt.round_of(s), self.sdtt.dt(self.sdtt.round_of(s)));
        let mut key = stream(seed, ROLLOUT, s);
        let mut teacher = CpuDenoiser::new(self.teacher.clone())?;
        zero(&mut self.grads);
        let accum = self.cfg.accumulation() as u64;
        let mut loss = 0.0;
        for (k, nb) in batches.iter().enumerate() {
            let ro = teacher_rollout(
                &mut teacher,
                &nb.xt,
                &nb.t,
                nb.eps.as_ref(),
                (self.sdtt.distill_steps, dt, self.sdtt.spacing),
                key.next_u64(),
            )?;
            let batch = DistillBatch {
                xt: &nb.xt,
                eps: nb.eps.as_ref(),
                target: &ro.target,
                mode: self.sdtt.mode,
                norm,
                sigma: None,
            };
            let opts = TrainOpts {
                dropout: (self.model.dropout > 0.0).then(|| {
                    let dseed = seed ^ DROPOUT.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    (dseed, (s * accum + k as u64) * DROPOUT_CALLS_PER_MICRO)
                }),
            };
            loss +=
                cpu::distill_loss_and_grad::<f32>(&self.params, &batch, &opts, &mut self.grads)?;
        }
        let lr = LrSchedule {
            peak: self.cfg.lr,
            warmup: self.cfg.warmup,
        }
        .at(s);
        let state = HostState {
            params: &mut self.params,
            grads: &mut self.grads,
            trainable: &self.trainable,
            opt: &mut self.opt,
            ema: &mut self.ema,
        };
        let grad_norm = host_update(state, s + 1, loss, lr, self.cfg.clip)?;
        self.step = s + 1;
        self.last_loss = Some(loss);
        Ok(SdttStep {
            step: s + 1,
            round,
            dt,
            loss,
            lr,
            grad_norm,
            masked,
        })
    }

    /// Held-out KL(student ‖ teacher) (kl-bwd whatever the training mode) of `params` against
    /// the current teacher, with fixed times, masks, eps and rollout draws.
    pub fn validation_kl(&self, params: &DitParams) -> Result<Option<f64>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let mut rng = stream(VALIDATION_SEED, VALIDATION, 0);
        let mut eps = stream(VALIDATION_SEED, EPS, 0);
        let mut key = stream(VALIDATION_SEED, ROLLOUT, 0);
        let (m, l) = (self.cfg.micro_batch, val.len);
        let dt = self.sdtt.dt(self.teacher_round);
        let mut teacher = CpuDenoiser::new(self.teacher.clone())?;
        let (mut sum, mut masked) = (0.0, 0usize);
        for start in (0..val.batch).step_by(m) {
            let n = m.min(val.batch - start);
            let x = Tokens {
                batch: n,
                len: l,
                ids: val.ids[start * l..(start + n) * l].to_vec(),
            };
            let t = antithetic_times(&mut rng, n);
            let nb = nelbo_batch(&mut rng, &mut eps, &x, &t, &self.model, 1.0)?;
            let ro = teacher_rollout(
                &mut teacher,
                &nb.xt,
                &nb.t,
                nb.eps.as_ref(),
                (self.sdtt.distill_steps, dt, self.sdtt.spacing),
                key.next_u64(),
            )?;
            let batch = DistillBatch {
                xt: &nb.xt,
                eps: nb.eps.as_ref(),
                target: &ro.target,
                mode: DistillMode::KlBwd,
                norm: 1.0,
                sigma: None,
            };
            sum += cpu::distill_loss_eval::<f32>(params, &batch)?;
            masked += nb.masked();
        }
        Ok(Some(sum / masked.max(1) as f64))
    }

    fn validate(&mut self) -> Result<()> {
        let Some(kl) = self.validation_kl(&self.ema.shadow)? else {
            return Ok(());
        };
        let (step, round) = (self.step, self.teacher_round);
        if let Some(run) = &self.run {
            run.append_metrics(&json!({
                "kind": "val", "step": step, "round": round, "val_kl": kl,
                "elapsed_s": self.elapsed_s(),
            }))?;
        }
        (self.observer)(&SdttEvent::Validation { step, round, kl });
        Ok(())
    }

    fn report(&mut self, log: &SdttStep) -> Result<()> {
        let (s0, t0) = self.last_report;
        let el = t0.elapsed().as_secs_f64();
        let n = log.step.saturating_sub(s0) as f64;
        let tok_per_s = if el > 0.0 {
            n * (self.cfg.batch * self.model.length) as f64 / el
        } else {
            0.0
        };
        let per_step = if n > 0.0 { el / n } else { 0.0 };
        let eta_s = per_step * self.cfg.steps.saturating_sub(log.step) as f64;
        let kl = (self.sdtt.mode == DistillMode::KlBwd).then_some(log.loss);
        if let Some(run) = &self.run {
            run.append_metrics(&json!({
                "kind": "train", "step": log.step, "round": log.round, "dt": log.dt,
                "loss": log.loss, "kl": kl, "lr": log.lr, "grad_norm": log.grad_norm,
                "masked": log.masked, "tok_per_s": tok_per_s, "elapsed_s": self.elapsed_s(),
            }))?;
        }
        let elapsed_s = self.elapsed_s();
        (self.observer)(&SdttEvent::Progress {
            log: log.clone(),
            tok_per_s,
            elapsed_s,
            eta_s,
        });
        self.last_report = (log.step, Instant::now());
        Ok(())
    }

    /// Trains until step `stop` (at most `cfg.steps`). Reaching `cfg.steps` ends the run:
    /// validation, the last round's weights and the final checkpoint.
    pub fn run_until(&mut self, stop: u64) -> Result<()> {
        let end = self.cfg.steps;
        let first = self.step;
        self.last_report = (self.step, Instant::now());
        while self.step < stop.min(end) {
            let log = self.step()?;
            let s = log.step;
            if s % self.cfg.log_every == 0 || s == end {
                self.report(&log)?;
            }
            if s < end {
                if self.cfg.eval_every > 0 && s % self.cfg.eval_every == 0 {
                    self.validate()?;
                }
                if self.run.is_some() && self.cfg.save_every > 0 && s % self.cfg.save_every == 0 {
                    self.save_checkpoint()?;
                }
            }
        }
        if self.step == end && self.step > first {
            self.validate()?;
            self.save_round(self.teacher_round)?;
            if self.run.is_some() {
                self.save_checkpoint()?;
            }
        }
        Ok(())
    }

    /// The loss of the last step taken.
    pub fn state_last_loss(&self) -> Option<f64> {
        self.last_loss
    }

    pub fn run(&mut self) -> Result<()> {
        self.run_until(self.cfg.steps)
    }
}

/// `DIR/rounds/round-RR`.
pub fn round_dir(root: &Path, round: u64) -> PathBuf {
    root.join(ROUNDS_DIR).join(format!("round-{round:02}"))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::checkpoint(path, format!("invalid JSON: {e}")))
}

/// Reads `DIR/sdtt.json`.
pub fn read_sdtt_config(root: &Path) -> Result<SdttConfig> {
    read_json(&root.join(SDTT_FILE))
}

/// Writes `DIR/sdtt.json` (a new run).
pub fn write_sdtt_config(root: &Path, c: &SdttConfig) -> Result<()> {
    let path = root.join(SDTT_FILE);
    let js = serde_json::to_string_pretty(c).expect("serialises");
    std::fs::write(&path, js).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
#[path = "sdtt_tests.rs"]
mod tests;
