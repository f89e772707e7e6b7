//! `imdm-engine distill`: ReDi / IM-ReDi as stages of their own (spec 6.2-6.3; SDTT in
//! [`super::sdtt`]), usable on the
//! synthetic data, token files and prepared real-text shards alike.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};

use crate::cpu::CpuDenoiser;
use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use crate::cuda::Backend;
use crate::diffusion::Denoiser;
use crate::distill::redi::{
    generate_couplings, ot_couplings, train_on_couplings_with, DatagenConfig, RediEvent,
    RediTrainConfig,
};
use crate::distill::synthetic::Coupling;
use crate::distill::Couplings;
use crate::error::{Error, Result};
use crate::model::checkpoint;
use crate::train::data;
use crate::train::handoff::{self, WeightsKind};
use crate::train::{CpuDit, Ema, Objective};

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
    /// SDTT / IM-SDTT distillation rounds (spec 6.1) into a resumable run directory.
    #[command(long_about = super::sdtt::LONG_ABOUT)]
    Sdtt(Box<super::sdtt::SdttArgs>),
}

/// `distill redi-data`.
#[derive(Args, Debug)]
pub struct RediDataArgs {
    /// The source model: a weights file (safetensors with its config), a run directory of
    /// `train` or `distill sdtt` (its latest checkpoint), or one checkpoint directory of a run
    /// (e.g. a round checkpoint). Runs give their EMA weights unless --weights raw.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which weights of a run or checkpoint directory: ema (spec 6.2) or raw [default: ema].
    #[arg(long, value_enum)]
    pub weights: Option<WeightsKind>,
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

/// How the EMA of a fine-tune starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmaStart {
    /// The reference's hand-off (spec 2.6, 9): the shadow starts at the initial weights and
    /// keeps the source run's update count (from the run's state.json), so the decay is the
    /// full --ema (nearly, for a count below the warm-up's end) from step 1; a plain weights
    /// file counts as past the warm-up.
    Continue,
    /// A fresh warm-up min(decay, (1+n)/(10+n)) from step 1: the EMA follows the fine-tune
    /// within tens of steps, better for short runs, where a 0.9999 average would still be
    /// mostly the initial weights.
    Fresh,
}

/// `distill redi-train`.
#[derive(Args, Debug)]
pub struct RediTrainArgs {
    /// Starting weights (the student): a weights file, a run directory (its latest
    /// checkpoint) or a checkpoint directory; runs give their EMA weights unless --weights raw.
    /// An MDLM into an IMDM student: see --imdm.
    #[arg(long)]
    pub init: PathBuf,
    /// Which weights of a run or checkpoint directory: ema (the reference's load_ema) or raw
    /// [default: ema].
    #[arg(long, value_enum)]
    pub weights: Option<WeightsKind>,
    /// Train an IMDM student from an MDLM file (the eps MLP starts at zero output).
    #[arg(long)]
    pub imdm: bool,
    /// Couplings from `distill redi-data`.
    #[arg(long)]
    pub pairs: PathBuf,
    /// Held-out couplings for validation (instead of a split of --pairs).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Without --valid: the share of --pairs held out for validation (the last rows, rounded
    /// down; 0 = none).
    #[arg(long, default_value_t = 0.01)]
    pub valid_frac: f64,
    /// Steps between validations on the EMA weights (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Couplings per optimizer step (the reference: 512).
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// Couplings per forward/backward; the gradients of batch/micro-batch micro-batches
    /// accumulate [default: the batch].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 2500)]
    pub warmup: u64,
    /// Dropout on the block branches in training [default: the model's, 0.1 for the OWT/LM1B
    /// presets]; 0 turns it off.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Seed of the dropout masks [default: --seed].
    #[arg(long)]
    pub dropout_seed: Option<u64>,
    /// EMA decay; the EMA weights are what --out receives when > 0.
    #[arg(long, default_value_t = 0.9999)]
    pub ema: f64,
    /// How the EMA starts.
    #[arg(long, value_enum, default_value = "continue")]
    pub ema_warmup: EmaStart,
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Fresh eps instead of the stored seeds (couplings made by an MDLM).
    #[arg(long)]
    pub ignore_seed: bool,
    /// Seed of the coupling order (and of fresh eps with --ignore-seed).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Output weights (safetensors), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the training and validation log here (JSON lines, written at the end).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: DistillArgs) -> Result<()> {
    match a.stage {
        Stage::RediData(a) => redi_data(a),
        Stage::RediTrain(a) => redi_train(a),
        Stage::Sdtt(a) => super::sdtt::run(*a),
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
    let source = handoff::resolve("--checkpoint", &a.checkpoint, a.weights)?;
    if source.checkpoint_dir.is_some() {
        println!("source weights: {}", source.weights.display());
    }
    let params = checkpoint::load(&source.weights, None)?;
    params.config.algo.require_subs(
        &format!("--checkpoint {}", source.weights.display()),
        "redi-datagen",
    )?;
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
    if let Some(m) = &a.metrics {
        super::check_out_path("--metrics", m)?;
    }
    if !(0.0..1.0).contains(&a.valid_frac) {
        return Err(Error::Config(format!(
            "--valid-frac {}: must be in [0, 1)",
            a.valid_frac
        )));
    }
    if let Some(p) = a.dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Config(format!("--dropout {p}: must be in [0, 1)")));
        }
    }
    let micro = a.micro_batch.unwrap_or(a.batch);
    if micro == 0 || a.batch % micro != 0 {
        return Err(Error::Config(format!(
            "--micro-batch {micro}: must be positive and divide --batch {}",
            a.batch
        )));
    }
    let source = handoff::resolve("--init", &a.init, a.weights)?;
    let mut target = checkpoint::read_config(&source.weights)?.ok_or_else(|| {
        Error::checkpoint(
            &source.weights,
            "has no recorded configuration (write it with `init`/`train`)",
        )
    })?;
    target.algo.require_subs(
        &format!("--init {}", source.weights.display()),
        "redi-train",
    )?;
    if a.imdm {
        target.algo = crate::model::Algo::Imdm;
    }
    if let Some(p) = a.dropout {
        target.dropout = p;
    }
    let params = crate::train::init::initial_params(&target, Some(&source.weights), a.seed)?;
    let mut pairs = Couplings::load(&a.pairs, params.config.vocab_size)?;
    let valid = match &a.valid {
        Some(v) => Couplings::load(v, params.config.vocab_size)?,
        None => {
            let n = (pairs.len() as f64 * a.valid_frac).floor() as usize;
            pairs.split_off_last(n)
        }
    };
    let ema_updates = match a.ema_warmup {
        EmaStart::Fresh => 0,
        EmaStart::Continue => source.ema_updates.unwrap_or_else(|| Ema::warmup_end(a.ema)),
    };
    let cfg = RediTrainConfig {
        steps: a.steps,
        batch: a.batch,
        micro_batch: micro,
        lr: a.lr,
        warmup: a.warmup,
        ema: a.ema,
        ema_updates,
        clip: a.clip,
        ignore_seed: a.ignore_seed,
        seed: a.seed,
        dropout_seed: a.dropout_seed.unwrap_or(a.seed),
        eval_every: a.eval_every,
    };
    println!(
        "redi-train: {} ({}), {} training couplings, {} held out, batch {} in micro-batches \
         of {micro}, dropout {}, EMA {} from update {}",
        source.weights.display(),
        params.config.algo.name().to_uppercase(),
        pairs.len(),
        valid.len(),
        a.batch,
        params.config.dropout,
        a.ema,
        ema_updates
    );
    let mut obj: Box<dyn Objective> = match Backend::resolve(a.device.device)? {
        Backend::Cpu => Box::new(CpuDit),
        Backend::Cuda(gpu) => Box::new(GpuTrainer::new(gpu, GpuTrainOptions::default())),
    };
    let t0 = Instant::now();
    let every = (a.steps / 20).max(1);
    let mut log: Vec<serde_json::Value> = vec![];
    let (mut last_loss, mut last_val) = (None, None);
    let fit = train_on_couplings_with(
        obj.as_mut(),
        params,
        &pairs,
        Some(&valid),
        &cfg,
        |e| match e {
            RediEvent::Step(s) => {
                last_loss = Some(s.loss);
                if s.step % every == 0 || s.step == a.steps {
                    let el = t0.elapsed().as_secs_f64();
                    let eta = el / s.step as f64 * (a.steps - s.step) as f64;
                    crate::sayln!(
                        "step {}/{} | loss {:.4} | lr {:.2e} | grad norm {:.3} | elapsed \
                         {el:.0}s | ETA {eta:.0}s",
                        s.step,
                        a.steps,
                        s.loss,
                        s.lr,
                        s.grad_norm
                    );
                    log.push(serde_json::json!({
                        "kind": "train", "step": s.step, "loss": s.loss, "lr": s.lr,
                        "grad_norm": s.grad_norm, "elapsed_s": el,
                    }));
                }
            }
            RediEvent::Validation(v) => {
                last_val = Some(*v);
                crate::sayln!(
                    "valid step {} | NELBO {:.4} | coupling NLL {:.4} | {} couplings (EMA)",
                    v.step,
                    v.nelbo,
                    v.coupling_nll,
                    v.couplings
                );
                log.push(serde_json::json!({
                    "kind": "val", "step": v.step, "val_nelbo": v.nelbo,
                    "val_coupling_nll": v.coupling_nll, "val_couplings": v.couplings,
                    "elapsed_s": t0.elapsed().as_secs_f64(),
                }));
            }
        },
    )?;
    let out = if a.ema > 0.0 {
        &fit.ema.shadow
    } else {
        &fit.params
    };
    if let Some(m) = &a.metrics {
        let mut text: String = log.iter().map(|v| format!("{v}\n")).collect();
        text += &format!(
            "{}\n",
            serde_json::json!({
                "kind": "final", "step": a.steps, "loss": last_loss,
                "val_nelbo": last_val.map(|v| v.nelbo),
                "val_coupling_nll": last_val.map(|v| v.coupling_nll),
                "elapsed_s": t0.elapsed().as_secs_f64(), "out": a.out,
            })
        );
        write_text_atomic(m, &text)?;
    }
    checkpoint::save(&a.out, out)?;
    crate::sayln!(
        "wrote {} ({} weights after {} steps)",
        a.out.display(),
        if a.ema > 0.0 { "EMA" } else { "raw" },
        a.steps
    );
    Ok(())
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_text_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
