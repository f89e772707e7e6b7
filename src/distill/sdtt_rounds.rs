//! The bookkeeping of an SDTT run (`distill::sdtt`): the loop over steps with its progress,
//! validation and checkpoints, and the round boundaries with their round files. With a GPU the
//! device state is read back before anything is written (checkpoint, round file) and at the
//! end of [`Sdtt::run_until`].

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use super::*;
use crate::train::run::{RngState, TrainState, EMA_FILE, MODEL_FILE, RUN_FORMAT};
use crate::train::Resident;

impl Sdtt {
    /// With a GPU: reads the device state (weights, EMA, optimizer) back into `params`, `ema`
    /// and `opt`, which are otherwise stale. A no-op on the CPU.
    pub fn sync_from_device(&mut self) -> Result<()> {
        if let Some(dev) = self.device.as_mut() {
            let r = dev.trainer();
            if r.is_loaded() {
                r.store(&mut self.params, &mut self.ema, &mut self.opt)?;
            }
        }
        Ok(())
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

    pub(super) fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.sync_from_device()?;
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
        if self.run.is_none() {
            return Ok(());
        }
        self.sync_from_device()?;
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
    pub(super) fn grow_if_due(&mut self) -> Result<()> {
        let r = self.sdtt.round_of(self.step);
        if r == self.teacher_round {
            return Ok(());
        }
        // The new teacher is the host copy (see `sdtt_gpu.rs`), so read the device back first.
        self.sync_from_device()?;
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
        if let Some(dev) = self.device.as_mut() {
            dev.drop_teacher();
            if self.sdtt.ema_on_growth || self.sdtt.reset_optimizer_on_growth {
                dev.trainer().load(&self.params, &self.ema, &self.opt)?;
            }
        }
        Ok(())
    }

    fn validate(&mut self) -> Result<()> {
        let Some(kl) = self.validation_kl_ema()? else {
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
        self.sync_from_device()
    }

    /// The loss of the last step taken.
    pub fn state_last_loss(&self) -> Option<f64> {
        self.last_loss
    }

    pub fn run(&mut self) -> Result<()> {
        self.run_until(self.cfg.steps)
    }
}
