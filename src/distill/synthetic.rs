//! The paper's synthetic experiment (spec 7): data = one token repeated L times. An MDM cannot
//! produce that joint in one step (its one-step samples factorise, so exact-match is
//! V^-(L-1)); IMDM can, once rectification (IM-ReDi) has taught it to map each ε field to one
//! coherent sequence.
//!
//! Stages (every model is evaluated only with fresh ε seeds, disjoint from the coupling seeds):
//! 1. `mdlm`: an MDLM teacher trained on the data (NELBO).
//! 2. `imdm`: an IMDM trained on the data from scratch (NELBO with fresh ε: it learns to ignore
//!    ε, spec 7, so it stays at the MDM floor).
//! 3. Round 1 couplings: the teacher, many steps, from all-mask (or perturbed) x_T with seeded ε.
//! 4. `mdm_redi`: an MDLM student (from the teacher) on those couplings; ε is invisible to it.
//! 5. `imdm_redi_r1`: an IMDM student (the teacher's weights plus a fresh eps MLP) on the same.
//! 6. Round k ≥ 2: couplings from student k−1 (its ε now matters), student k continues from
//!    student k−1 (ReDi^k).
//!
//! 7. `mdlm_sdtt`, `imdm_sdtt`, `imdm_sdtt_redi`: SDTT / IM-SDTT rounds from the teacher, and
//!    IM-ReDi on couplings from the IM-SDTT student (`synthetic_sdtt`).
//!
//! Results: exact-match rate, distinct sequences and conditional total correlation at each step
//! count, as a table, `synthetic.json` and `exact_match.png`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::cpu::{CpuDenoiser, TrainOpts};
use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::trainer::GpuTrainer;
use crate::diffusion::noising::nelbo_batch;
use crate::diffusion::schedule::antithetic_times;
use crate::diffusion::Denoiser;
use crate::diffusion::NoiseRemoval;
use crate::distill::fit::Fitter;
use crate::distill::redi::{
    evaluate, generate_couplings, ot_couplings, train_on_couplings as redi_train, DatagenConfig,
    EvalConfig, RediTrainConfig, StepMetrics,
};
use crate::distill::Couplings;
use crate::error::{Error, Result};
use crate::model::init::init_params;
use crate::model::{Algo, DitConfig, DitParams, NoiseType};
use crate::tensor::Tokens;
use crate::train::data::SyntheticSource;
use crate::train::optim::LrSchedule;
use crate::train::source::DataSource;
use crate::train::{CpuDit, Objective};

/// Where each round's couplings come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Coupling {
    /// The reference (spec 6.2): the source model samples x0 from (x_T, seeded ε) with many
    /// steps.
    Sample,
    /// Minibatch optimal transport between fresh seeded ε and real rows under the source's
    /// one-step likelihood (`redi::ot_couplings`): the data marginal is kept exactly.
    Ot,
}

/// Everything the experiment does, as code (see [`SyntheticConfig::demo`] and `full`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// Data tokens V (the mask is appended: the model vocabulary is V + 1).
    pub vocab: usize,
    /// Sequence length L.
    pub length: usize,
    pub hidden: usize,
    pub heads: usize,
    pub blocks: usize,
    pub noise_dim: usize,
    /// Optimizer steps of the MDLM teacher and of the plain IMDM.
    pub base_steps: u64,
    /// Optimizer steps of each student, per round.
    pub student_steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
    /// Couplings generated per round.
    pub pairs: usize,
    pub coupling: Coupling,
    /// Rows per optimal-transport minibatch.
    pub ot_batch: usize,
    /// Sampler steps of coupling generation.
    pub datagen_steps: usize,
    /// Fraction of coupling rows whose x_T is perturbed (t ~ U(0, 1], masking at α(t)); the
    /// others are all-mask (t = 1), the state a one-step sampler starts from. The reference
    /// perturbs every row (`reflow.perturbed_rect`), which at L = 8 leaves almost no row fully
    /// masked.
    pub perturbed_frac: f64,
    /// Keep ε through resets during datagen.
    pub fix_eps: bool,
    /// Nucleus mass of datagen from an IMDM student (round ≥ 2); ≥ 1 = off (the reference),
    /// tiny = the student's top token (see `DatagenConfig::top_p`).
    pub student_top_p: f64,
    pub rounds: usize,
    /// Student round k trains at lr · decay^(k-1): later rounds refine a map that is already
    /// mostly right.
    pub round_lr_decay: f64,
    /// Step counts evaluated.
    pub eval_steps: Vec<usize>,
    pub eval: EvalConfig,
    /// The SDTT / IM-SDTT rows (`synthetic_sdtt`).
    #[serde(default)]
    pub sdtt: super::synthetic_sdtt::SdttDemo,
    pub seed: u64,
}

impl SyntheticConfig {
    /// The README's demo: small enough for about 10 minutes on a 2-core CPU.
    pub fn demo() -> Self {
        SyntheticConfig {
            vocab: 64,
            length: 8,
            hidden: 64,
            heads: 4,
            blocks: 2,
            noise_dim: 32,
            base_steps: 400,
            student_steps: 1000,
            batch: 64,
            lr: 3e-3,
            warmup: 50,
            pairs: 4096,
            coupling: Coupling::Ot,
            ot_batch: 256,
            datagen_steps: 16,
            perturbed_frac: 0.5,
            fix_eps: true,
            student_top_p: 1e-6,
            rounds: 16,
            round_lr_decay: 0.9,
            eval_steps: vec![1, 2, 4, 8, 16],
            eval: EvalConfig {
                samples: 1000,
                tc_groups: 50,
                tc_dup: 20,
                batch: 500,
                seed: 7,
            },
            sdtt: Default::default(),
            seed: 0,
        }
    }

    /// The reference configuration: V = 50,000, L = 10, the `synthetic` preset (D 128, 4 heads,
    /// 4 blocks, noise_dim 128).
    pub fn full() -> Self {
        SyntheticConfig {
            vocab: 50_000,
            length: 10,
            hidden: 128,
            heads: 4,
            blocks: 4,
            noise_dim: 128,
            base_steps: 5000,
            student_steps: 5000,
            batch: 512,
            lr: 3e-4,
            warmup: 500,
            pairs: 100_000,
            datagen_steps: 64,
            rounds: 5,
            ..Self::demo()
        }
    }

    /// The DiT configuration of `algo` for this experiment.
    pub fn model(&self, algo: Algo) -> DitConfig {
        let mut c = DitConfig::synthetic();
        c.preset = "synthetic-demo".into();
        c.vocab_size = self.vocab + 1;
        c.mask_index = self.vocab;
        c.length = self.length;
        c.hidden = self.hidden;
        c.heads = self.heads;
        c.blocks = self.blocks;
        c.cond_dim = self.hidden;
        c.noise_dim = self.noise_dim;
        c.noise_type = NoiseType::Rand;
        c.dropout = 0.0;
        c.algo = algo;
        c
    }

    pub fn validate(&self) -> Result<()> {
        self.model(Algo::Imdm).validate()?;
        let bad = |m: &str| Err(Error::Config(format!("synthetic experiment: {m}")));
        if self.vocab < 2 || self.length < 2 {
            return bad("needs vocab >= 2 and length >= 2");
        }
        if self.batch == 0 || self.pairs < self.batch || self.rounds == 0 {
            return bad("needs batch > 0, pairs >= batch and at least one round");
        }
        if self.eval_steps.is_empty() || self.eval_steps.contains(&0) {
            return bad("eval steps must be positive");
        }
        if !(0.0..=1.0).contains(&self.perturbed_frac) {
            return bad("--perturbed-frac must be in [0, 1]");
        }
        if self.ot_batch == 0 || self.datagen_steps == 0 || self.eval.samples == 0 {
            return bad("--ot-batch, --datagen-steps and --samples must be positive");
        }
        if self.base_steps == 0 || self.student_steps == 0 {
            return bad("--base-steps and --student-steps must be positive");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr must be positive and finite");
        }
        if !(self.round_lr_decay.is_finite() && self.round_lr_decay > 0.0) {
            return bad("--round-lr-decay must be positive and finite");
        }
        Ok(())
    }
}

/// Where the experiment computes: the CPU backend, or the GPU (training through
/// `cuda::trainer::GpuTrainer`, sampling through `cuda::denoiser::GpuDenoiser`).
pub enum Engine {
    Cpu(CpuDit),
    Cuda(Box<GpuTrainer>),
}

impl Engine {
    fn objective(&mut self) -> &mut dyn Objective {
        match self {
            Engine::Cpu(o) => o,
            Engine::Cuda(t) => t.as_mut(),
        }
    }

    /// A denoiser over `params` on this engine.
    fn denoiser<'a>(&'a self, params: &DitParams) -> Result<Box<dyn Denoiser + 'a>> {
        Ok(match self {
            Engine::Cpu(_) => Box::new(CpuDenoiser::new(params.clone())?),
            Engine::Cuda(t) => Box::new(GpuDenoiser::new(t.gpu(), params)?),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Cpu(_) => "CPU",
            Engine::Cuda(_) => "GPU",
        }
    }
}

/// model name -> step count -> metrics.
pub type Results = BTreeMap<String, BTreeMap<String, StepMetrics>>;

/// What a run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyntheticReport {
    pub config: SyntheticConfig,
    pub results: Results,
    /// model -> one-step metrics with greedy noise removal.
    pub greedy_1step: BTreeMap<String, StepMetrics>,
    /// Final training loss of each model (mean of the last 20 steps).
    pub final_loss: BTreeMap<String, f64>,
    pub seconds: f64,
}

/// Messages for the caller (the CLI prints them).
pub trait Progress {
    fn stage(&mut self, msg: &str);
    fn step(&mut self, _stage: &str, _step: u64, _total: u64, _loss: f64) {}
}

fn lr(cfg: &SyntheticConfig, scale: f64) -> LrSchedule {
    LrSchedule {
        peak: cfg.lr * scale,
        warmup: cfg.warmup,
    }
}

fn mean_tail(v: &[f64]) -> f64 {
    let tail = &v[v.len().saturating_sub(20)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

/// NELBO training on the synthetic data (stages 1-2).
fn train_on_data(
    engine: &mut Engine,
    cfg: &SyntheticConfig,
    params: DitParams,
    name: &str,
    seed: u64,
    prog: &mut dyn Progress,
) -> Result<(DitParams, f64)> {
    let c = params.config.clone();
    let mut src = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, seed)?;
    let mut fit = Fitter::new(params, lr(cfg, 1.0), 0.0, 1.0, |_| false);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xA5A5);
    // ε apart from the masks: the MDLM and IMDM teachers see the same masked positions.
    let mut eps = ChaCha8Rng::seed_from_u64(seed ^ 0x5A5A);
    let mut losses = vec![];
    let norm = (cfg.batch * c.length) as f64;
    for s in 0..cfg.base_steps {
        let x0 = src.next_batch(cfg.batch)?;
        let t = antithetic_times(&mut rng, cfg.batch);
        let nb = nelbo_batch(&mut rng, &mut eps, &x0, &t, &c, norm)?;
        let st = fit.step(engine.objective(), &[nb.as_loss()], |_| {
            TrainOpts::default()
        })?;
        losses.push(st.loss);
        prog.step(name, s + 1, cfg.base_steps, st.loss);
    }
    Ok((fit.params, mean_tail(&losses)))
}

/// IM-ReDi / MDM-ReDi training on couplings (stage 4-6).
pub(super) fn train_on_couplings(
    engine: &mut Engine,
    cfg: &SyntheticConfig,
    lr_scale: f64,
    params: DitParams,
    pairs: &Couplings,
    name: &str,
    seed: u64,
    prog: &mut dyn Progress,
) -> Result<(DitParams, f64)> {
    let rc = RediTrainConfig {
        steps: cfg.student_steps,
        batch: cfg.batch,
        lr: cfg.lr * lr_scale,
        warmup: cfg.warmup,
        ema: 0.0,
        clip: 1.0,
        ignore_seed: false,
        seed,
        micro_batch: 0,
        ema_updates: 0,
        dropout_seed: seed,
        eval_every: 0,
    };
    let mut losses = vec![];
    let fit = redi_train(engine.objective(), params, pairs, &rc, |s, loss| {
        losses.push(loss);
        prog.step(name, s, cfg.student_steps, loss);
    })?;
    Ok((fit.params, mean_tail(&losses)))
}

/// IMDM weights that compute exactly `mdlm` (the eps MLP's last layer starts at zero).
pub(super) fn graft_eps_mlp(cfg: &SyntheticConfig, mdlm: &DitParams, seed: u64) -> DitParams {
    let mut p = init_params(&cfg.model(Algo::Imdm), seed);
    let src: BTreeMap<String, &crate::tensor::Tensor> = mdlm.named().into_iter().collect();
    for (name, t) in p.named_mut() {
        if let Some(s) = src.get(&name) {
            t.data.copy_from_slice(&s.data);
        }
    }
    p
}

pub(super) fn eval_model(
    engine: &Engine,
    cfg: &SyntheticConfig,
    params: &DitParams,
    name: &str,
    (results, greedy): (&mut Results, &mut BTreeMap<String, StepMetrics>),
    prog: &mut dyn Progress,
) -> Result<()> {
    let mut den = engine.denoiser(params)?;
    let den = den.as_mut();
    let mut row = BTreeMap::new();
    for &n in &cfg.eval_steps {
        let m = evaluate(den, n, NoiseRemoval::Ancestral, &cfg.eval)?;
        prog.stage(&format!(
            "  eval {name:<14} {n:>3} steps: exact-match {:.4}  distinct {:>5}/{} ({} coherent)  \
             tc {:.2} bits",
            m.exact_match, m.distinct, m.samples, m.distinct_exact, m.tc
        ));
        row.insert(n.to_string(), m);
    }
    results.insert(name.to_string(), row);
    // One step with greedy noise removal (argmax per position): deterministic given ε, so
    // any diversity must come from ε. An MDM collapses to one sequence here.
    let g = evaluate(den, 1, NoiseRemoval::Greedy, &cfg.eval)?;
    prog.stage(&format!(
        "  eval {name:<14}   1 greedy: exact-match {:.4}  distinct {:>5}/{}  tc {:.2} bits",
        g.exact_match, g.distinct, g.samples, g.tc
    ));
    greedy.insert(name.to_string(), g);
    Ok(())
}

pub(super) fn datagen(
    engine: &Engine,
    cfg: &SyntheticConfig,
    source: &DitParams,
    top_p: f64,
    round: usize,
) -> Result<Couplings> {
    let c = &source.config;
    let mut src = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, cfg.seed ^ 0xDA7A)?;
    src.seek(round as u64 * cfg.pairs as u64)?;
    let x0: Tokens = src.next_batch(cfg.pairs)?;
    let mut den = engine.denoiser(source)?;
    let den = den.as_mut();
    if cfg.coupling == Coupling::Ot {
        let seed = cfg.seed ^ (0x07_0000 + round as u64);
        return ot_couplings(den, &x0, cfg.ot_batch, cfg.perturbed_frac, seed);
    }
    let dg = DatagenConfig {
        steps: cfg.datagen_steps,
        perturbed_frac: cfg.perturbed_frac,
        fix_eps: cfg.fix_eps,
        temperature: 1.0,
        top_p,
        batch: 512,
        seed: cfg.seed ^ (0xC0FF_EE00 + round as u64),
    };
    generate_couplings(den, &x0, &dg, |_, _| {})
}

/// Runs the whole experiment; with `out`, writes `synthetic.json` and `exact_match.png` there.
pub fn run(
    engine: &mut Engine,
    cfg: &SyntheticConfig,
    out: Option<&Path>,
    prog: &mut dyn Progress,
) -> Result<SyntheticReport> {
    cfg.validate()?;
    let start = Instant::now();
    let mut results = Results::new();
    let mut greedy = BTreeMap::new();
    let mut final_loss = BTreeMap::new();
    let s = cfg.seed;

    prog.stage("1/7 training the MDLM teacher on the data");
    let (teacher, l) = train_on_data(
        engine,
        cfg,
        init_params(&cfg.model(Algo::Mdlm), s),
        "mdlm",
        s + 1,
        prog,
    )?;
    final_loss.insert("mdlm".into(), l);
    eval_model(
        engine,
        cfg,
        &teacher,
        "mdlm",
        (&mut results, &mut greedy),
        prog,
    )?;

    prog.stage("2/7 training a plain IMDM on the data");
    let (imdm, l) = train_on_data(
        engine,
        cfg,
        init_params(&cfg.model(Algo::Imdm), s),
        "imdm",
        s + 2,
        prog,
    )?;
    final_loss.insert("imdm".into(), l);
    eval_model(
        engine,
        cfg,
        &imdm,
        "imdm",
        (&mut results, &mut greedy),
        prog,
    )?;

    prog.stage(&format!(
        "3/7 round-1 couplings from the teacher ({:?})",
        cfg.coupling
    ));
    let pairs = datagen(engine, cfg, &teacher, 1.0, 0)?;

    prog.stage("4/7 MDM student on the round-1 couplings");
    let (mdm, l) = train_on_couplings(
        engine,
        cfg,
        1.0,
        teacher.clone(),
        &pairs,
        "mdm_redi",
        s + 3,
        prog,
    )?;
    final_loss.insert("mdm_redi".into(), l);
    eval_model(
        engine,
        cfg,
        &mdm,
        "mdm_redi",
        (&mut results, &mut greedy),
        prog,
    )?;

    prog.stage("5/7 IM-ReDi rounds");
    let mut student = graft_eps_mlp(cfg, &teacher, s + 4);
    let mut pairs = pairs;
    for k in 1..=cfg.rounds {
        if k > 1 {
            prog.stage(&format!("  round {k}: couplings from student {}", k - 1));
            pairs = datagen(engine, cfg, &student, cfg.student_top_p, k - 1)?;
        }
        let name = format!("imdm_redi_r{k}");
        let lr_scale = cfg.round_lr_decay.powi(k as i32 - 1);
        let (p, l) = train_on_couplings(
            engine,
            cfg,
            lr_scale,
            student,
            &pairs,
            &name,
            s + 10 + k as u64,
            prog,
        )?;
        student = p;
        final_loss.insert(name.clone(), l);
        eval_model(
            engine,
            cfg,
            &student,
            &name,
            (&mut results, &mut greedy),
            prog,
        )?;
    }
    let last = results[&format!("imdm_redi_r{}", cfg.rounds)].clone();
    results.insert("imdm_redi".into(), last);
    // The distillation rows run on the CPU backend (the GPU trainer does not drive the
    // distillation objective).
    if matches!(engine, Engine::Cpu(_)) {
        let rows =
            super::synthetic_sdtt::run(engine, cfg, &teacher, (&mut results, &mut greedy), prog)?;
        final_loss.extend(rows);
    } else {
        prog.stage("6/7-7/7 SDTT rows skipped: the distillation objective runs on the CPU only");
    }
    let report = SyntheticReport {
        config: cfg.clone(),
        results,
        greedy_1step: greedy,
        final_loss,
        seconds: start.elapsed().as_secs_f64(),
    };
    if let Some(dir) = out {
        write_outputs(&report, dir)?;
    }
    Ok(report)
}

pub use super::report::{table, write_outputs};
