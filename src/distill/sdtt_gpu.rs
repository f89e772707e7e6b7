//! The GPU side of an SDTT run (`distill sdtt --device cuda`): the resident trainer
//! (`cuda::trainer`: the student's weights, gradients, AdamW moments and EMA on the device; the
//! fused `distill_kl` loss in place of the NELBO's) and the round's teacher on the same device
//! (`cuda::rollout::DeviceTeacher`).
//!
//! - The rollout is resident: x_t and eps go up once, the K teacher forwards, the fused sampler
//!   steps (the IMDM posterior in f64 with fix_eps, the CPU rollout's draws) and the target
//!   rule all run on the device, and the target stays there in the buffer the student's fused
//!   loss reads ([`SdttGpu::rollout`], then [`SdttGpu::accumulate`] or
//!   [`SdttGpu::eval_loss_ema`]). Its result is `rollout::teacher_rollout`'s on the same
//!   teacher log-probs (deviation 14.39, withdrawn, says what changed); the host rollout on a
//!   `GpuDenoiser` remains as the tests' oracle.
//! - The teacher is uploaded from the host copy `Sdtt::teacher` on its first use in a round.
//!   At a round boundary the loop reads the student back (`Resident::store`: the round file
//!   needs the host copy anyway) and that copy becomes the teacher, so an uninterrupted run and
//!   one resumed from the round file build their teacher from the same bits.

use crate::cpu::TrainOpts;
use crate::cuda::dit::GpuDit;
use crate::cuda::rollout::DeviceTeacher;
use crate::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use crate::cuda::Gpu;
use crate::diffusion::DistillMode;
use crate::distill::rollout::{Rollout, Spacing};
use crate::error::{Error, Result};
use crate::model::DitParams;
use crate::tensor::{Tensor, Tokens};
use crate::train::objective::DeviceDistillBatch;
use crate::train::{LossInput, Resident};

/// The student trainer and the teacher of an SDTT run on one GPU.
pub struct SdttGpu {
    trainer: GpuTrainer,
    /// The round's teacher and its last rollout; `None` until the round's first rollout.
    teacher: Option<DeviceTeacher>,
    /// The trainer's options; the teacher's GEMMs follow its autotune setting (off by default),
    /// so a resumed run's teacher picks the same cuBLASLt algorithms and the same bits.
    opts: GpuTrainOptions,
}

impl SdttGpu {
    /// The student trains on `gpu`; the state arrives with the first step.
    pub fn new(gpu: Gpu, opts: GpuTrainOptions) -> Self {
        SdttGpu {
            trainer: GpuTrainer::new(gpu, opts),
            teacher: None,
            opts,
        }
    }

    /// The resident student trainer.
    pub fn trainer(&mut self) -> &mut GpuTrainer {
        &mut self.trainer
    }

    pub fn gpu(&self) -> &Gpu {
        self.trainer.gpu()
    }

    /// Forgets the teacher on the device (a round boundary): the next rollout uploads the new
    /// one.
    pub fn drop_teacher(&mut self) {
        self.teacher = None;
    }

    /// The teacher rollout of `xt` (rows at times `t`, eps as given) with `teacher`'s weights
    /// on the device, uploaded first if the device holds no teacher; the target stays on the
    /// device for the next [`SdttGpu::accumulate`] or [`SdttGpu::eval_loss_ema`].
    pub fn rollout(
        &mut self,
        teacher: &DitParams,
        xt: &Tokens,
        t: &[f64],
        eps: Option<&Tensor>,
        spec: (usize, f64, Spacing),
        key: u64,
    ) -> Result<()> {
        let gpu = self.trainer.gpu();
        if self.teacher.is_none() {
            teacher.config.validate()?;
            let mut model = GpuDit::upload_inference(gpu, teacher)?;
            model.gemm.set_autotune(self.opts.autotune);
            self.teacher = Some(DeviceTeacher::from_model(model));
        }
        let dev = self.teacher.as_mut().expect("uploaded above");
        dev.rollout(gpu, xt, t, eps, spec, key)?;
        Ok(())
    }

    /// The last rollout brought to the host (tests, reports).
    pub fn last_rollout(&self) -> Result<Rollout> {
        ran(&self.teacher)?.download(self.trainer.gpu())
    }

    /// The student's loss of the micro-batch `xt` (with `eps`) against the last rollout's
    /// target (which must be of `xt`), its gradient accumulated on the device; `norm` as in
    /// `DistillBatch`.
    pub fn accumulate(
        &mut self,
        xt: &Tokens,
        eps: Option<&Tensor>,
        (mode, norm): (DistillMode, f64),
        opts: &TrainOpts,
    ) -> Result<f64> {
        let target = ran(&self.teacher)?.target()?;
        let b = DeviceDistillBatch {
            xt,
            eps,
            target,
            mode,
            norm,
        };
        self.trainer.accumulate(LossInput::DistillDevice(b), opts)
    }

    /// The EMA student's summed loss (norm 1) of `xt` against the last rollout's target.
    pub fn eval_loss_ema(
        &mut self,
        xt: &Tokens,
        eps: Option<&Tensor>,
        mode: DistillMode,
    ) -> Result<f64> {
        let target = ran(&self.teacher)?.target()?;
        let b = DeviceDistillBatch {
            xt,
            eps,
            target,
            mode,
            norm: 1.0,
        };
        self.trainer.eval_loss_ema(LossInput::DistillDevice(b))
    }
}

/// The teacher of a rollout that has run.
fn ran(teacher: &Option<DeviceTeacher>) -> Result<&DeviceTeacher> {
    teacher
        .as_ref()
        .ok_or_else(|| Error::Config("SDTT on the GPU: no teacher rollout has run".into()))
}
