//! `imdm-engine distill`: ReDi / IM-ReDi as stages of their own (spec 6.2-6.3), usable on the
//! synthetic data, token files and prepared real-text shards alike.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::cpu::CpuDenoiser;
use crate::diffusion::Denoiser;
use crate::distill::redi::{
    generate_couplings, ot_couplings, train_on_couplings, DatagenConfig, RediTrainConfig,
};
use crate::distill::synthetic::Coupling;
use crate::distill::Couplings;
use crate::error::{Error, Result};
use crate::gpu::Backend;
use crate::model::checkpoint;
use crate::model::gpu_denoiser::GpuDenoiser;
use crate::train::data;
use crate::train::gpu::{GpuTrainOptions, GpuTrainer};
use crate::train::{CpuDit, Objective};

/// Flags of `imdm-engine distill`.
#[derive(Args, Debug)]
pub struct DistillArgs {
    #[command(subcommand)]
    pub stage: Stage,
}

#[derive(Subcommand, Debug)]
pub enum Stage {
    /// Build IM-ReDi couplings ((x_T, seed) -> x0_gen) from a model and clean data (spec 6.2).
    RediData(RediDataArgs),
    /// Train a student on couplings (spec 6.3) and write its weights.
    RediTrain(RediTrainArgs),
}

/// `distill redi-data`.
#[derive(Args, Debug)]
pub struct RediDataArgs {
    /// The source model (safetensors with its config), e.g. an EMA checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Clean rows x_T is made from: `synthetic`, `tokens:PATH` or `shards:DIR` (train split).
    #[arg(long)]
    pub data: String,
    /// Number of couplings.
    #[arg(long, default_value_t = 4096)]
    pub pairs: usize,
    /// `sample` (the reference: the source samples x0 with --steps) or `ot` (minibatch optimal
    /// transport between seeded eps and real rows under the source's one-step likelihood).
    #[arg(long, value_enum, default_value = "sample")]
    pub coupling: Coupling,
    /// Sampler steps of the source (the reference uses 1024).
    #[arg(long, default_value_t = 1024)]
    pub steps: usize,
    /// Share of rows with x_T masked at t ~ U(0,1] (the reference: 1); the rest are all-mask.
    #[arg(long, default_value_t = 1.0)]
    pub perturbed_frac: f64,
    /// Keep eps through resets while sampling (x0 then depends on the seed alone).
    #[arg(long)]
    pub fix_eps: bool,
    /// Nucleus mass of the source's token distribution (>= 1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Rows per sampler call / per optimal-transport minibatch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Output couplings (safetensors: xT, x0, ts, seeds), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

/// `distill redi-train`.
#[derive(Args, Debug)]
pub struct RediTrainArgs {
    /// Starting weights (the student; an MDLM file into an IMDM student: see --algo).
    #[arg(long)]
    pub init: PathBuf,
    /// Train an IMDM student from an MDLM file (the eps MLP starts at zero output).
    #[arg(long)]
    pub imdm: bool,
    /// Couplings from `distill redi-data`.
    #[arg(long)]
    pub pairs: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 2500)]
    pub warmup: u64,
    /// EMA decay; the EMA weights are what --out receives when > 0.
    #[arg(long, default_value_t = 0.9999)]
    pub ema: f64,
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Fresh eps instead of the stored seeds (couplings made by an MDLM).
    #[arg(long)]
    pub ignore_seed: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Output weights (safetensors), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: DistillArgs) -> Result<()> {
    match a.stage {
        Stage::RediData(a) => redi_data(a),
        Stage::RediTrain(a) => redi_train(a),
    }
}

fn redi_data(a: RediDataArgs) -> Result<()> {
    super::check_out("--out", &a.out, a.force, &[("--checkpoint", &a.checkpoint)])?;
    if !(0.0..=1.0).contains(&a.perturbed_frac) {
        return Err(Error::Config(format!(
            "--perturbed-frac {}: must be in [0, 1]",
            a.perturbed_frac
        )));
    }
    if a.pairs == 0 || a.batch == 0 || a.steps == 0 {
        return Err(Error::Config(
            "--pairs, --batch and --steps must be positive".into(),
        ));
    }
    if !(a.top_p > 0.0) {
        return Err(Error::Config(format!(
            "--top-p {}: must be > 0 (>= 1: off)",
            a.top_p
        )));
    }
    let params = checkpoint::load(&a.checkpoint, None)?;
    let spec = super::train::parse_data(&a.data, None)?;
    let (mut src, _) = data::open(&spec, &params.config, a.seed, 0)?;
    let x0 = src.next_batch(a.pairs)?;
    let backend = Backend::resolve(a.device.device)?;
    let mut den: Box<dyn Denoiser + '_> = match &backend {
        Backend::Cpu => Box::new(CpuDenoiser::new(params.clone())?),
        Backend::Cuda(gpu) => Box::new(GpuDenoiser::new(gpu, &params)?),
    };
    let t0 = Instant::now();
    let pairs = match a.coupling {
        Coupling::Ot => ot_couplings(den.as_mut(), &x0, a.batch, a.perturbed_frac, a.seed)?,
        Coupling::Sample => {
            let cfg = DatagenConfig {
                steps: a.steps,
                perturbed_frac: a.perturbed_frac,
                fix_eps: a.fix_eps,
                temperature: 1.0,
                top_p: a.top_p,
                batch: a.batch,
                seed: a.seed,
            };
            generate_couplings(den.as_mut(), &x0, &cfg, |done, total| {
                let s = t0.elapsed().as_secs_f64();
                let eta = s / done as f64 * (total - done) as f64;
                crate::sayln!(
                    "{done}/{total} couplings, {:.1} rows/s, ETA {eta:.0}s",
                    done as f64 / s
                );
            })?
        }
    };
    pairs.save(&a.out, params.config.vocab_size)?;
    crate::sayln!(
        "wrote {} ({} couplings of length {}, {:?}) in {:.1}s",
        a.out.display(),
        pairs.len(),
        pairs.xt.len,
        a.coupling,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn redi_train(a: RediTrainArgs) -> Result<()> {
    super::check_out(
        "--out",
        &a.out,
        a.force,
        &[("--init", &a.init), ("--pairs", &a.pairs)],
    )?;
    if !(0.0..1.0).contains(&a.ema) {
        return Err(Error::Config(format!("--ema {}: must be in [0, 1)", a.ema)));
    }
    if a.steps == 0 || a.batch == 0 {
        return Err(Error::Config("--steps and --batch must be positive".into()));
    }
    if !(a.lr.is_finite() && a.lr >= 0.0) || !(a.clip.is_finite() && a.clip >= 0.0) {
        return Err(Error::Config(format!(
            "--lr {} and --clip {} must be finite and >= 0",
            a.lr, a.clip
        )));
    }
    let mut target = checkpoint::read_config(&a.init)?.ok_or_else(|| {
        Error::checkpoint(
            &a.init,
            "has no recorded configuration (write it with `init`/`train`)",
        )
    })?;
    if a.imdm {
        target.algo = crate::model::Algo::Imdm;
    }
    let params = crate::train::init::initial_params(&target, Some(&a.init), a.seed)?;
    let pairs = Couplings::load(&a.pairs, params.config.vocab_size)?;
    let cfg = RediTrainConfig {
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        ema: a.ema,
        clip: a.clip,
        ignore_seed: a.ignore_seed,
        seed: a.seed,
    };
    let mut obj: Box<dyn Objective> = match Backend::resolve(a.device.device)? {
        Backend::Cpu => Box::new(CpuDit),
        Backend::Cuda(gpu) => Box::new(GpuTrainer::new(gpu, GpuTrainOptions::default())),
    };
    let t0 = Instant::now();
    let every = (a.steps / 20).max(1);
    let fit = train_on_couplings(obj.as_mut(), params, &pairs, &cfg, |s, loss| {
        if s % every == 0 || s == a.steps {
            let el = t0.elapsed().as_secs_f64();
            let eta = el / s as f64 * (a.steps - s) as f64;
            crate::sayln!(
                "step {s}/{} | loss {loss:.4} | elapsed {el:.0}s | ETA {eta:.0}s",
                a.steps
            );
        }
    })?;
    let out = if a.ema > 0.0 {
        &fit.ema.shadow
    } else {
        &fit.params
    };
    checkpoint::save(&a.out, out)?;
    crate::sayln!(
        "wrote {} ({} weights after {} steps)",
        a.out.display(),
        if a.ema > 0.0 { "EMA" } else { "raw" },
        a.steps
    );
    Ok(())
}
