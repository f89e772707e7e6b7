//! The GPU side of an SDTT run (`distill sdtt --device cuda`): the resident trainer
//! (`cuda::trainer`: the student's weights, gradients, AdamW moments and EMA on the device; the
//! fused `distill_kl` loss in place of the NELBO's) and the round's teacher as a
//! `GpuDenoiser` on the same device.
//!
//! - The rollout is `rollout::teacher_rollout` on the `GpuDenoiser`: each of the K teacher
//!   forwards runs on the GPU and its log-probs come back to the host, where the sampler's f64
//!   posterior (`diffusion::posterior`) draws the unmasking and the target is assembled; the
//!   target then goes up to the trainer (deviation 14.39). There is one posterior in the
//!   engine, and the GPU rollout is the CPU rollout with another denoiser.
//! - The teacher is uploaded from the host copy `Sdtt::teacher` on its first use in a round.
//!   At a round boundary the loop reads the student back (`Resident::store`: the round file
//!   needs the host copy anyway) and that copy becomes the teacher, so an uninterrupted run and
//!   one resumed from the round file build their teacher from the same bits.

use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::dit::{GpuDit, Workspace};
use crate::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use crate::cuda::Gpu;
use crate::distill::rollout::{teacher_rollout, Rollout, Spacing};
use crate::error::Result;
use crate::model::DitParams;
use crate::tensor::{Tensor, Tokens};

/// The student trainer and the teacher of an SDTT run on one GPU.
pub struct SdttGpu {
    trainer: GpuTrainer,
    /// The teacher's inference model and workspace between uses (a `GpuDenoiser` taken apart,
    /// since it borrows the trainer's device); `None` until the round's first rollout.
    teacher: Option<(GpuDit, Option<Workspace>)>,
}

impl SdttGpu {
    /// The student trains on `gpu`; the state arrives with the first step.
    pub fn new(gpu: Gpu, opts: GpuTrainOptions) -> Self {
        SdttGpu {
            trainer: GpuTrainer::new(gpu, opts),
            teacher: None,
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
    /// on the device, uploaded first if the device holds no teacher (see the module doc).
    pub fn rollout(
        &mut self,
        teacher: &DitParams,
        xt: &Tokens,
        t: &[f64],
        eps: Option<&Tensor>,
        spec: (usize, f64, Spacing),
        key: u64,
    ) -> Result<Rollout> {
        let gpu = self.trainer.gpu();
        let (model, ws) = match self.teacher.take() {
            Some(parts) => parts,
            None => GpuDenoiser::new(gpu, teacher)?.into_parts(),
        };
        let mut den = GpuDenoiser::from_parts(gpu, model, ws);
        let ro = teacher_rollout(&mut den, xt, t, eps, spec, key);
        self.teacher = Some(den.into_parts());
        ro
    }
}
