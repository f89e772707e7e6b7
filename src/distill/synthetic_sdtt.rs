//! The distillation rows of the synthetic experiment (spec 6.1 on spec 7's task):
//! `mdlm_sdtt` (an MDLM student, SDTT), `imdm_sdtt` (an IMDM student grafted from the same
//! MDLM teacher, IM-SDTT) and `imdm_sdtt_redi` (IM-ReDi rounds on couplings from the IM-SDTT
//! student), each evaluated like every other row.
//!
//! Scaled to the toy: the round-0 teacher is the experiment's MDLM at `orig_steps` = 16 steps
//! (the reference: 1024), `rounds_to` = 2 final steps (4 rounds: the students imitate 16 -> 8
//! -> 4 -> 2 -> 1 teacher steps of the previous round), `grow_dt_every` steps per round (the
//! reference: 10,000), lr 1e-3 with no EMA (the reference fine-tunes at 6e-5 with EMA 0.9999;
//! a few hundred steps need a larger rate).

use serde::{Deserialize, Serialize};

use crate::diffusion::DistillMode;
use crate::distill::rollout::Spacing;
use crate::distill::sdtt::{Sdtt, SdttConfig};
use crate::distill::synthetic::{
    datagen, eval_model, graft_eps_mlp, train_on_couplings, Engine, Progress, Results,
    SyntheticConfig,
};
use crate::error::Result;
use crate::model::DitParams;
use crate::train::config::TrainConfig;
use crate::train::data::SyntheticSource;

/// The SDTT part of the synthetic experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SdttDemo {
    /// Sampling steps of the round-0 teacher.
    pub orig_steps: u64,
    /// Final step count (the last round's student targets it).
    pub min_steps: u64,
    /// Optimizer steps per round.
    pub grow_dt_every: u64,
    pub lr: f64,
    /// IM-ReDi rounds on couplings from the IM-SDTT student.
    pub redi_rounds: usize,
}

impl Default for SdttDemo {
    fn default() -> Self {
        SdttDemo {
            orig_steps: 16,
            min_steps: 2,
            grow_dt_every: 400,
            lr: 1e-3,
            redi_rounds: 4,
        }
    }
}

/// SDTT rounds from `teacher` into `student` (no run directory).
fn distil(
    cfg: &SyntheticConfig,
    student: DitParams,
    teacher: DitParams,
    name: &str,
    seed: u64,
    prog: &mut dyn Progress,
) -> Result<(DitParams, f64)> {
    let d = &cfg.sdtt;
    let c = student.config.clone();
    let sd = SdttConfig {
        student: c.algo,
        mode: DistillMode::KlBwd,
        distill_steps: 2,
        orig_steps: d.orig_steps,
        grow_dt_every: d.grow_dt_every,
        min_steps: d.min_steps,
        ema_on_growth: false,
        reset_optimizer_on_growth: false,
        spacing: Spacing::Reference,
        teacher: "synthetic mdlm".into(),
    };
    let total = sd.total_steps();
    let tc = TrainConfig {
        batch: cfg.batch,
        micro_batch: cfg.batch,
        steps: total,
        lr: d.lr,
        warmup: cfg.warmup,
        ema: 0.0,
        seed,
        eval_size: 0,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    };
    let src = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, seed)?;
    let mut s = Sdtt::new(tc, sd, student, teacher, Box::new(src), None, None)?;
    let mut losses = vec![];
    while s.step < total {
        let st = s.step()?;
        losses.push(st.loss);
        prog.step(name, st.step, total, st.loss);
    }
    let tail = &losses[losses.len().saturating_sub(20)..];
    Ok((
        s.params,
        tail.iter().sum::<f64>() / tail.len().max(1) as f64,
    ))
}

/// Trains and evaluates the three distillation rows; returns (name, final loss) pairs.
pub fn run(
    engine: &mut Engine,
    cfg: &SyntheticConfig,
    teacher: &DitParams,
    (results, greedy): (
        &mut Results,
        &mut std::collections::BTreeMap<String, crate::distill::redi::StepMetrics>,
    ),
    prog: &mut dyn Progress,
) -> Result<Vec<(String, f64)>> {
    let s = cfg.seed;
    let mut losses = vec![];
    let d = &cfg.sdtt;
    prog.stage(&format!(
        "6/7 SDTT: {} -> {} steps, {} steps per round, MDLM and IMDM students",
        d.orig_steps, d.min_steps, d.grow_dt_every
    ));
    let (mdlm_sdtt, l) = distil(
        cfg,
        teacher.clone(),
        teacher.clone(),
        "mdlm_sdtt",
        s + 40,
        prog,
    )?;
    losses.push(("mdlm_sdtt".to_string(), l));
    eval_model(
        engine,
        cfg,
        &mdlm_sdtt,
        "mdlm_sdtt",
        (results, greedy),
        prog,
    )?;
    let grafted = graft_eps_mlp(cfg, teacher, s + 41);
    let (imdm_sdtt, l) = distil(cfg, grafted.clone(), grafted, "imdm_sdtt", s + 40, prog)?;
    losses.push(("imdm_sdtt".to_string(), l));
    eval_model(
        engine,
        cfg,
        &imdm_sdtt,
        "imdm_sdtt",
        (results, greedy),
        prog,
    )?;

    prog.stage(&format!(
        "7/7 IM-ReDi on couplings from IM-SDTT ({} rounds)",
        d.redi_rounds
    ));
    let mut student = imdm_sdtt.clone();
    let mut last = 0.0;
    for k in 1..=d.redi_rounds {
        let top_p = if k == 1 { 1.0 } else { cfg.student_top_p };
        let pairs = datagen(engine, cfg, &student, top_p, 100 + k)?;
        let lr_scale = cfg.round_lr_decay.powi(k as i32 - 1);
        let (p, l) = train_on_couplings(
            engine,
            cfg,
            lr_scale,
            student,
            &pairs,
            &format!("imdm_sdtt_redi_r{k}"),
            s + 50 + k as u64,
            prog,
        )?;
        student = p;
        last = l;
    }
    losses.push(("imdm_sdtt_redi".to_string(), last));
    eval_model(
        engine,
        cfg,
        &student,
        "imdm_sdtt_redi",
        (results, greedy),
        prog,
    )?;
    Ok(losses)
}
