//! `imdm-engine train`: MDLM / IMDM training on the CPU backend or the GPU (`--device cuda`:
//! `cuda::GpuTrainer`, weights, optimizer and EMA resident on the device), and the AR, SEDD
//! and D3PM baselines on the CPU, into a resumable run directory. The flags resolve
//! (`train_resolve`) into a [`RunConfig`] written to `DIR/config.json`; `--resume` continues a
//! run from its recorded configuration (on either device).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::cli::ConfigArgs;
use crate::cuda::ops::attention::HEAD_DIMS;
use crate::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use crate::cuda::{DeviceChoice, Gpu};
use crate::data::shards::MANIFEST;
use crate::diffusion::d3pm::AlphaS;
use crate::error::{Error, Result};
use crate::model::{Algo, DitConfig, DitParams};
use crate::train::algo_objective::BaselineObjective;
use crate::train::config::{DataSpec, TokenDtype, TrainConfig};
use crate::train::curves::{plot_runs, CURVES_FILE};
use crate::train::init::initial_params;
use crate::train::run::{RunConfig, RunDir, RUN_FORMAT};
use crate::train::{data, CpuDit, Event, LinearSoftmax, Objective, Trainer};

use super::train_resolve::{resolve_model, resolve_resume, resolve_train};

/// What the run optimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveKind {
    /// The DiT (spec 2) on the selected device.
    Dit,
    /// Testing aid: a position-wise linear softmax with exact gradients on the DiT's
    /// embedding / eps MLP / output tensors. Exercises the whole loop without the DiT.
    LinearSoftmax,
}

impl ObjectiveKind {
    /// The name recorded in `config.json`. "cpu-dit" is the historical name of the DiT
    /// objective; it names the model and loss, not the device (a run may resume on either).
    fn recorded(self) -> &'static str {
        match self {
            ObjectiveKind::Dit => "cpu-dit",
            ObjectiveKind::LinearSoftmax => "linear-softmax",
        }
    }

    pub(super) fn from_recorded(s: &str) -> Result<Self> {
        match s {
            "cpu-dit" => Ok(ObjectiveKind::Dit),
            "linear-softmax" => Ok(ObjectiveKind::LinearSoftmax),
            other => Err(Error::Config(format!(
                "the run's objective {other:?} is unknown to this binary"
            ))),
        }
    }

    fn build(self, gpu: Option<Gpu>, model: &DitConfig, cfg: &TrainConfig) -> Box<dyn Objective> {
        match (self, gpu) {
            (ObjectiveKind::Dit, _) if !model.algo.is_subs() => {
                Box::new(BaselineObjective { d3pm: cfg.d3pm })
            }
            (ObjectiveKind::Dit, Some(gpu)) => {
                Box::new(GpuTrainer::new(gpu, GpuTrainOptions::default()))
            }
            (ObjectiveKind::Dit, None) => Box::new(CpuDit),
            (ObjectiveKind::LinearSoftmax, _) => Box::new(LinearSoftmax),
        }
    }
}

/// The GPU to train on, if any: `cuda` requires one (and a model the GPU kernels support),
/// `auto` takes one when usable and the model fits the kernels, `cpu` never. The flag checks
/// come before opening the device, so they fail the same way on every machine.
pub(super) fn resolve_device(
    choice: DeviceChoice,
    kind: ObjectiveKind,
    model: &DitConfig,
) -> Result<Option<Gpu>> {
    let fits = HEAD_DIMS.contains(&model.head_dim());
    let subs = model.algo.is_subs();
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Cuda => {
            if !subs {
                return Err(Error::Config(format!(
                    "--device cuda: the GPU trainer trains mdlm and imdm (the NELBO); the {} \
                     baseline trains on the CPU (--device cpu)",
                    model.algo.name()
                )));
            }
            if kind == ObjectiveKind::LinearSoftmax {
                return Err(Error::Config(
                    "--device cuda: the linear-softmax test objective runs on the CPU only".into(),
                ));
            }
            if !fits {
                return Err(Error::Config(format!(
                    "--device cuda: head dim {} (hidden {} / heads {}) has no GPU attention \
                     kernel; supported head dims: {HEAD_DIMS:?}",
                    model.head_dim(),
                    model.hidden,
                    model.heads
                )));
            }
            Ok(Some(Gpu::new(0)?))
        }
        DeviceChoice::Auto => Ok((kind == ObjectiveKind::Dit && fits && subs)
            .then(|| Gpu::new(0).ok())
            .flatten()),
    }
}

/// The long `--help` text of `train`.
pub const LONG_ABOUT: &str = "\
Train a masked diffusion model (MDLM NELBO, spec 4.6, or IMDM, spec 4.7) on the CPU or the GPU \
(--device cuda: weights, gradients, AdamW and EMA stay on the device; bit-reproducible), or one \
of the baselines on the CPU: --algo ar (or --ar; the causal DiT, next-token cross-entropy), \
--algo sedd (score entropy, time-conditioned) or --algo d3pm (discrete-time L_vb, \
time-conditioned; --d3pm-steps, --d3pm-alpha-s).

A new run needs a model (--preset, optionally with size overrides, or --init with a checkpoint \
that records its configuration), --data and --run-dir. Defaults follow the reference (spec 9): \
AdamW lr 3e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, constant LR after linear warmup, \
clip 1.0, EMA 0.9999 with warm-up, antithetic times over the global batch.

Progress (step, loss, lr, gradient norm, tok/s, MFU = 6·params·tok/s over the bf16 peak on \
known GPUs, elapsed, ETA) goes to stdout and to DIR/metrics.jsonl (plotted into DIR/curves.png at the end; \
`imdm-engine plot` redraws it). Checkpoints go to DIR/checkpoints/step-N/ \
(model.safetensors, ema.safetensors, optim.safetensors, state.json); DIR/latest.json names the \
last complete one. Validation (NELBO and PPL on held-out data) uses the EMA weights.

--resume DIR continues a run bit for bit from its latest checkpoint with the recorded \
configuration; only --steps (to extend the run) and the logging, validation and checkpoint \
intervals may be given again.

Example: imdm-engine train --preset minimini --algo imdm --data synthetic --batch 32 \
--steps 2000 --lr 1e-3 --warmup 100 --run-dir runs/demo";

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Hidden width D (overrides the preset; noise_dim follows unless --noise-dim is given).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Attention heads (overrides the preset; must divide --hidden).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Number of DiT blocks (overrides the preset).
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Width of the conditioning vector (overrides the preset).
    #[arg(long)]
    pub cond_dim: Option<usize>,
    /// Dropout on the block branches in training (overrides the preset; 0.1 for OWT/LM1B).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Scale of eps (`algo.noise_scale`, default 1).
    #[arg(long)]
    pub noise_scale: Option<f64>,

    /// Training data: `synthetic` (spec 1.3: one token uniform over the vocabulary without the
    /// mask, repeated over the sequence), `shards:DIR` (a folder from `data prepare`: its train
    /// split, reshuffled every epoch; validation on the first --eval-size sequences of its
    /// valid split; V, mask and length default to the manifest's) or `tokens:PATH` (flat
    /// little-endian (N, L) ids; the dtype comes from a .u16/.u32 extension or --token-dtype).
    /// Token files hold out their last --eval-size sequences for validation.
    #[arg(long)]
    pub data: Option<String>,
    /// Element type of a token file, when its extension is not .u16 or .u32.
    #[arg(long, value_enum)]
    pub token_dtype: Option<TokenDtype>,

    /// Global batch: sequences per optimizer step [default: 512].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sequences per forward/backward; gradients of batch/micro-batch micro-batches
    /// accumulate [default: the global batch].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Optimizer steps of the run [default: 1000000]. With --resume, a larger value extends
    /// the run.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate [default: 3e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps; step n runs at lr·n/warmup until then [default: 2500].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// AdamW weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// EMA decay, with warm-up min(decay, (1+n)/(10+n)); 0 = off [default: 0.9999].
    #[arg(long)]
    pub ema: Option<f64>,
    /// Global gradient-norm clip; 0 = off [default: 1.0].
    #[arg(long)]
    pub clip: Option<f64>,
    /// Seed of the initialisation, data order, times, masks, eps and dropout [default: 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Freeze parameters whose reference name starts with this prefix (repeatable), e.g.
    /// `vocab_embed.` or `blocks.0.`.
    #[arg(long)]
    pub freeze: Vec<String>,
    /// Train only the LayerNorm weights (the reference's optim.ln_tune).
    #[arg(long)]
    pub ln_tune: bool,
    /// Record the GPU time of every NVTX range (CUDA events) over the whole run and write a
    /// Chrome trace here (Perfetto opens it), then print the per-range summary. GPU only.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// D3PM's number of discrete steps T (d3pm models; the reference's is 1000).
    #[arg(long)]
    pub d3pm_steps: Option<usize>,
    /// D3PM's α_s in the second L_vb term: as-written (`t − dt`, the reference's code) or
    /// corrected (`1 − t + dt`, the exact posterior; deviation 14.53).
    #[arg(long, value_enum)]
    pub d3pm_alpha_s: Option<AlphaS>,
    /// Initial weights (.safetensors) to fine-tune. An MDLM checkpoint loads into an IMDM run
    /// with the eps MLP initialised as the reference does (zero last layer), so step 0 equals
    /// the MDLM.
    #[arg(long)]
    pub init: Option<PathBuf>,

    /// Steps between progress lines and metrics entries [default: 10].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Steps between validations on the EMA weights; 0 = only at the end [default: 500].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Held-out sequences for validation NELBO/PPL; 0 = none [default: 256].
    #[arg(long)]
    pub eval_size: Option<usize>,
    /// Steps between checkpoints; 0 = only the final one [default: 500].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Checkpoints kept on disk, newest first [default: 2].
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,

    /// Run directory of a new run (created; must not already hold a run).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Where to train: cpu, cuda (the GPU; the model's head dim must be 32, 64, 96 or 128), or
    /// auto (cuda when a GPU is usable, else cpu).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
    /// What to optimise (testing aid; see the enum).
    #[arg(long, value_enum, hide = true)]
    pub objective: Option<ObjectiveKind>,
}

/// Parses `--data`.
pub(crate) fn parse_data(s: &str, dtype: Option<TokenDtype>) -> Result<DataSpec> {
    if s == "synthetic" {
        return Ok(DataSpec::Synthetic);
    }
    if let Some(dir) = s.strip_prefix("shards:") {
        let dir = PathBuf::from(dir);
        if !dir.join(MANIFEST).is_file() {
            return Err(Error::Config(format!(
                "--data {s}: {} has no {MANIFEST} (prepare it with `imdm-engine data prepare`)",
                dir.display()
            )));
        }
        return Ok(DataSpec::Shards { dir });
    }
    let Some(path) = s.strip_prefix("tokens:") else {
        return Err(Error::Config(format!(
            "--data {s}: expected `synthetic` or `tokens:PATH` or `shards:DIR`"
        )));
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(Error::Config(format!(
            "--data {s}: token file {} does not exist",
            path.display()
        )));
    }
    let by_ext = match path.extension().and_then(|e| e.to_str()) {
        Some("u16") => Some(TokenDtype::U16),
        Some("u32") => Some(TokenDtype::U32),
        _ => None,
    };
    let dtype = dtype.or(by_ext).ok_or_else(|| {
        Error::Config(format!(
            "--data {s}: cannot tell the token dtype; name the file .u16 or .u32 or pass \
             --token-dtype u16|u32"
        ))
    })?;
    Ok(DataSpec::Tokens { path, dtype })
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

fn printer(steps: u64, algo: Algo) -> impl FnMut(&Event) {
    let what = match algo {
        Algo::Ar => "NLL",
        Algo::Sedd | Algo::D3pm => "bound",
        Algo::Mdlm | Algo::Imdm => "NELBO",
    };
    move |e| match e {
        Event::Progress {
            log,
            tok_per_s,
            mfu,
            elapsed_s,
            eta_s,
        } => crate::sayln!(
            "step {}/{steps} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s{} | \
             elapsed {} | ETA {}",
            log.step,
            log.loss,
            log.lr,
            log.grad_norm,
            tok_per_s,
            mfu.map_or(String::new(), |m| format!(" | MFU {:.1}%", 100.0 * m)),
            hms(*elapsed_s),
            hms(*eta_s)
        ),
        Event::Validation(v) => crate::sayln!(
            "validation at step {}: {what} {:.4} nats/token, PPL {:.3} (EMA weights, {} tokens)",
            v.step,
            v.nelbo,
            v.ppl,
            v.tokens
        ),
        Event::Checkpoint { step, dir } => {
            crate::sayln!("checkpoint at step {step}: {}", dir.display())
        }
    }
}

/// Refuses sizes the machine cannot hold, naming the flags, before anything is allocated.
fn check_sizes(model: &DitConfig, cfg: &TrainConfig) -> Result<()> {
    crate::sizes::check_model(model, 5)?;
    crate::sizes::check(
        &format!(
            "--micro-batch {} x L {} x V {}: the logits and their gradients",
            cfg.micro_batch, model.length, model.vocab_size
        ),
        &[cfg.micro_batch, model.length, model.vocab_size, 4],
        4,
    )?;
    crate::sizes::check(
        &format!(
            "--batch {} x L {}: the token batch",
            cfg.batch, model.length
        ),
        &[cfg.batch, model.length, 8],
        4,
    )?;
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    if a.trace.is_some() && a.device == DeviceChoice::Cpu {
        return Err(Error::Config(
            "--trace records GPU time: it needs --device cuda (or auto with a GPU)".into(),
        ));
    }
    let (mut trainer, objective, model, gpu) = match (&a.resume, &a.run_dir) {
        (Some(dir), _) => {
            let (rd, rec) = RunDir::open(dir)?;
            let cfg = resolve_resume(&a, dir, &rec)?;
            check_sizes(&rec.model, &cfg)?;
            let kind = ObjectiveKind::from_recorded(&rec.objective)?;
            let gpu = resolve_device(a.device, kind, &rec.model)?;
            let (src, val) = data::open(&cfg.data, &rec.model, cfg.seed, cfg.eval_size)?;
            let t = if rd.has_checkpoint() {
                let t = Trainer::resume(cfg, &rec.model, rd, src, val)?;
                if !a.quiet {
                    crate::sayln!(
                        "resuming {} at step {} of {}",
                        dir.display(),
                        t.step,
                        t.cfg.steps
                    );
                }
                t
            } else {
                // The run stopped before its first checkpoint: start it again in place.
                crate::noteln!(
                    "note: {} has no checkpoint yet; starting the run again from step 0 with \
                     its recorded configuration",
                    dir.display()
                );
                rd.truncate_metrics_after(0)?;
                rd.record_train_config(&cfg)?;
                let params = initial_params(&rec.model, cfg.init.as_deref(), cfg.seed)?;
                Trainer::new(cfg, params, src, val, Some(rd))?
            };
            (t, kind, rec.model, gpu)
        }
        (None, Some(dir)) => {
            let model = resolve_model(&a)?;
            let cfg = resolve_train(&a)?;
            check_sizes(&model, &cfg)?;
            let gpu = resolve_device(a.device, a.objective.unwrap_or(ObjectiveKind::Dit), &model)?;
            let (src, val) = data::open(&cfg.data, &model, cfg.seed, cfg.eval_size)?;
            let params: DitParams = initial_params(&model, cfg.init.as_deref(), cfg.seed)?;
            let rec = RunConfig {
                format: RUN_FORMAT.into(),
                objective: a.objective.unwrap_or(ObjectiveKind::Dit).recorded().into(),
                model: model.clone(),
                train: cfg.clone(),
            };
            let description = src.describe();
            let rd = RunDir::create(dir, &rec)?;
            let t = Trainer::new(cfg, params, src, val, Some(rd))?;
            if !a.quiet {
                crate::sayln!(
                    "training {} {} ({} parameters, L {}) on {description} into {} ({})",
                    model.preset,
                    model.algo.name(),
                    t.params.count(),
                    model.length,
                    dir.display(),
                    gpu.as_ref().map_or("CPU".to_string(), |g| g.name())
                );
            }
            (t, a.objective.unwrap_or(ObjectiveKind::Dit), model, gpu)
        }
        (None, None) => {
            return Err(Error::Config(
                "give --run-dir DIR for a new run or --resume DIR to continue one".into(),
            ))
        }
    };
    if !a.quiet {
        trainer.set_observer(printer(trainer.cfg.steps, model.algo));
    }
    trainer.set_peak_flops(
        gpu.as_ref()
            .and_then(|g| g.peak_bf16_tflops())
            .map(|t| t * 1e12),
    );
    let traced = match (&a.trace, &gpu) {
        (Some(_), Some(g)) => {
            crate::cuda::trace::start(&g.ctx, &g.stream)?;
            Some(g.name())
        }
        (Some(p), None) => {
            eprintln!(
                "warning: no GPU in use, so no trace is written to {}",
                p.display()
            );
            None
        }
        _ => None,
    };
    let mut obj = objective.build(gpu, &model, &trainer.cfg);
    let val = trainer.run(obj.as_mut())?;
    if let (Some(p), Some(device)) = (&a.trace, traced) {
        let (spans, dropped) = crate::cuda::trace::finish()?;
        crate::cuda::trace::write(p, &spans, dropped, &device)?;
    }
    let root = trainer
        .run_dir()
        .map(|r| r.root.clone())
        .unwrap_or_default();
    let last = trainer.run_dir().and_then(|r| r.latest().ok().flatten());
    if trainer.run_dir().is_some() {
        // The curves are a convenience: a plotting failure does not fail the run.
        let png = root.join(CURVES_FILE);
        if let Err(e) = plot_runs(std::slice::from_ref(&root), &png, false) {
            crate::noteln!("warning: no {}: {e}", png.display());
        }
    }
    crate::sayln!(
        "done: {} steps of {} {}; last loss {}; {}; checkpoint {}",
        trainer.step,
        model.preset,
        model.algo.name(),
        trainer
            .state()
            .last_loss
            .map_or("-".into(), |l| format!("{l:.4}")),
        val.map_or("no validation".into(), |v| format!(
            "validation NELBO {:.4}, PPL {:.3}",
            v.nelbo, v.ppl
        )),
        last.map_or("-".into(), |l| root.join(l.dir).display().to_string())
    );
    Ok(())
}
