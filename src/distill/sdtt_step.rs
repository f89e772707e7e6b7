//! One SDTT optimizer step and the validation KL (`distill::sdtt`), on either device with the
//! same streams: the CPU backend with the host update, or the resident GPU trainer with the
//! teacher and its rollout on the same device ([`super::gpu::SdttGpu`]). The times, masks, eps, rollout keys
//! and dropout offsets are drawn identically on both, so a run may resume on the other device
//! (with that device's numerics from then on).

use rand::RngCore;

use super::*;
use crate::cpu::{self, CpuDenoiser, TrainOpts};
use crate::diffusion::noising::{micro_batch, nelbo_batch, NoisedBatch};
use crate::diffusion::schedule::antithetic_times;
use crate::diffusion::{DistillBatch, DistillMode};
use crate::distill::rollout::teacher_rollout;
use crate::train::optim::{zero, LrSchedule};
use crate::train::trainer::{stream, VALIDATION_SEED};
use crate::train::update::{host_update, HostState};
use crate::train::Resident;

/// The round's teacher for one step or validation pass.
enum Teacher {
    Cpu(CpuDenoiser),
    /// `Sdtt::device`'s teacher.
    Gpu,
}

impl Sdtt {
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

    /// The teacher of this pass; on the GPU the device state is loaded first if it is not.
    fn round_teacher(&mut self) -> Result<Teacher> {
        match self.device.as_mut() {
            Some(dev) => {
                let r = dev.trainer();
                if !r.is_loaded() {
                    r.load(&self.params, &self.ema, &self.opt)?;
                }
                Ok(Teacher::Gpu)
            }
            None => Ok(Teacher::Cpu(CpuDenoiser::new(self.teacher.clone())?)),
        }
    }

    /// The run's GPU side (the teacher of a [`Teacher::Gpu`] pass).
    fn gpu_side(device: &mut Option<SdttGpu>) -> Result<&mut SdttGpu> {
        device
            .as_mut()
            .ok_or_else(|| Error::Config("SDTT: no GPU for the teacher".into()))
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
        let mut teacher = self.round_teacher()?;
        match self.device.as_mut() {
            Some(dev) => dev.trainer().zero_grads()?,
            None => zero(&mut self.grads),
        }
        let accum = self.cfg.accumulation() as u64;
        let spec = (self.sdtt.distill_steps, dt, self.sdtt.spacing);
        let mut loss = 0.0;
        for (k, nb) in batches.iter().enumerate() {
            let (xt, eps, rkey) = (&nb.xt, nb.eps.as_ref(), key.next_u64());
            let opts = TrainOpts {
                dropout: (self.model.dropout > 0.0).then(|| {
                    let dseed = seed ^ DROPOUT.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    (dseed, (s * accum + k as u64) * DROPOUT_CALLS_PER_MICRO)
                }),
            };
            loss += match &mut teacher {
                Teacher::Gpu => {
                    // The rollout's target stays on the device for the student's loss.
                    let dev = Self::gpu_side(&mut self.device)?;
                    dev.rollout(&self.teacher, xt, &nb.t, eps, spec, rkey)?;
                    dev.accumulate(xt, eps, (self.sdtt.mode, norm), &opts)?
                }
                Teacher::Cpu(t) => {
                    let ro = teacher_rollout(t, xt, &nb.t, eps, spec, rkey)?;
                    let batch = DistillBatch {
                        xt,
                        eps,
                        target: &ro.target,
                        mode: self.sdtt.mode,
                        norm,
                        sigma: None,
                    };
                    cpu::distill_loss_and_grad::<f32>(&self.params, &batch, &opts, &mut self.grads)?
                }
            };
        }
        let lr = LrSchedule {
            peak: self.cfg.lr,
            warmup: self.cfg.warmup,
        }
        .at(s);
        let grad_norm = match self.device.as_mut() {
            Some(dev) => dev.trainer().update(s + 1, loss, lr, self.cfg.clip)?,
            None => {
                let state = HostState {
                    params: &mut self.params,
                    grads: &mut self.grads,
                    trainable: &self.trainable,
                    opt: &mut self.opt,
                    ema: &mut self.ema,
                };
                host_update(state, s + 1, loss, lr, self.cfg.clip)?
            }
        };
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

    /// The held-out batches of the validation KL (fixed times, masks and eps), in
    /// micro-batches.
    fn validation_batches(&self, val: &Tokens) -> Result<Vec<NoisedBatch>> {
        let mut rng = stream(VALIDATION_SEED, VALIDATION, 0);
        let mut eps = stream(VALIDATION_SEED, EPS, 0);
        let (m, l) = (self.cfg.micro_batch, val.len);
        (0..val.batch)
            .step_by(m)
            .map(|start| {
                let n = m.min(val.batch - start);
                let x = Tokens {
                    batch: n,
                    len: l,
                    ids: val.ids[start * l..(start + n) * l].to_vec(),
                };
                let t = antithetic_times(&mut rng, n);
                nelbo_batch(&mut rng, &mut eps, &x, &t, &self.model, 1.0)
            })
            .collect()
    }

    /// Held-out KL(student ‖ teacher) (kl-bwd whatever the training mode) of `params` against
    /// the current teacher, with fixed times, masks, eps and rollout draws, on the CPU.
    pub fn validation_kl(&self, params: &DitParams) -> Result<Option<f64>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let mut key = stream(VALIDATION_SEED, ROLLOUT, 0);
        let dt = self.sdtt.dt(self.teacher_round);
        let mut teacher = CpuDenoiser::new(self.teacher.clone())?;
        let spec = (self.sdtt.distill_steps, dt, self.sdtt.spacing);
        let (mut sum, mut masked) = (0.0, 0usize);
        for nb in self.validation_batches(val)? {
            let (xt, eps) = (&nb.xt, nb.eps.as_ref());
            let ro = teacher_rollout(&mut teacher, xt, &nb.t, eps, spec, key.next_u64())?;
            let batch = DistillBatch {
                xt,
                eps,
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

    /// [`Sdtt::validation_kl`] of the EMA weights, on the run's device: with a GPU, the
    /// teacher rollout and the student's EMA forward both run there.
    pub fn validation_kl_ema(&mut self) -> Result<Option<f64>> {
        if self.device.is_none() {
            return self.validation_kl(&self.ema.shadow);
        }
        let Some(val) = self.val.take() else {
            return Ok(None);
        };
        let batches = self.validation_batches(&val);
        self.val = Some(val);
        let mut key = stream(VALIDATION_SEED, ROLLOUT, 0);
        let dt = self.sdtt.dt(self.teacher_round);
        let spec = (self.sdtt.distill_steps, dt, self.sdtt.spacing);
        self.round_teacher()?;
        let (mut sum, mut masked) = (0.0, 0usize);
        for nb in batches? {
            let (xt, eps) = (&nb.xt, nb.eps.as_ref());
            let dev = Self::gpu_side(&mut self.device)?;
            dev.rollout(&self.teacher, xt, &nb.t, eps, spec, key.next_u64())?;
            sum += dev.eval_loss_ema(xt, eps, DistillMode::KlBwd)?;
            masked += nb.masked();
        }
        Ok(Some(sum / masked.max(1) as f64))
    }
}
