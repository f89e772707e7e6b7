//! One optimizer step from ready-made loss batches: zero, accumulate, check for non-finite
//! values, clip, AdamW, EMA. The distillation stages and the synthetic experiment build
//! coupling batches and call this. The update itself is [`host_update`], the rule
//! `train::Trainer::step` applies to NELBO batches from a data source.

use crate::cpu::TrainOpts;
use crate::diffusion::LossBatch;
use crate::error::Result;
use crate::model::DitParams;
use crate::train::optim::{zero, AdamW, AdamWConfig, LrSchedule};
use crate::train::update::{host_update, HostState};
use crate::train::{Ema, Objective};

/// Optimizer state of one model being fitted.
pub struct Fitter {
    pub params: DitParams,
    pub ema: Ema,
    pub opt: AdamW,
    pub lr: LrSchedule,
    /// Global-norm clip (≤ 0: off).
    pub clip: f64,
    /// Optimizer steps completed.
    pub step: u64,
    grads: DitParams,
    trainable: Vec<bool>,
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitStep {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

impl Fitter {
    /// AdamW with the reference's betas/eps, `frozen` tensors (by reference name) excluded.
    pub fn new(
        params: DitParams,
        lr: LrSchedule,
        ema_decay: f64,
        clip: f64,
        frozen: impl Fn(&str) -> bool,
    ) -> Self {
        let opt = AdamW::new(&params, AdamWConfig::default(), &frozen);
        let trainable = opt.trainable();
        Fitter {
            ema: Ema::new(&params, ema_decay),
            grads: DitParams::zeros(&params.config),
            params,
            opt,
            lr,
            clip,
            step: 0,
            trainable,
        }
    }

    /// One update from `batches` (micro-batches whose `norm` is the whole batch's token count,
    /// so their losses and gradients add up to the batch mean). `opts(k)` gives micro-batch k's
    /// training options (dropout stream).
    pub fn step(
        &mut self,
        obj: &mut dyn Objective,
        batches: &[LossBatch],
        opts: impl Fn(usize) -> TrainOpts,
    ) -> Result<FitStep> {
        self.begin();
        let mut loss = 0.0f64;
        for (k, b) in batches.iter().enumerate() {
            loss += self.accumulate(obj, b, &opts(k))?;
        }
        self.finish(loss)
    }

    /// Starts a step built one micro-batch at a time ([`Fitter::accumulate`], then
    /// [`Fitter::finish`]), so only one micro-batch's inputs exist at once.
    pub fn begin(&mut self) {
        zero(&mut self.grads);
    }

    /// Adds micro-batch `b`'s gradient; returns its loss.
    pub fn accumulate(
        &mut self,
        obj: &mut dyn Objective,
        b: &LossBatch,
        opts: &TrainOpts,
    ) -> Result<f64> {
        obj.loss_and_grad(&self.params, b, opts, &mut self.grads)
    }

    /// Applies the update of the accumulated gradients whose micro-batch losses sum to `loss`.
    pub fn finish(&mut self, loss: f64) -> Result<FitStep> {
        let step = self.step + 1;
        let lr = self.lr.at(self.step);
        let state = HostState {
            params: &mut self.params,
            grads: &mut self.grads,
            trainable: &self.trainable,
            opt: &mut self.opt,
            ema: &mut self.ema,
        };
        let grad_norm = host_update(state, step, loss, lr, self.clip)?;
        self.step = step;
        Ok(FitStep {
            step,
            loss,
            lr,
            grad_norm,
        })
    }
}
