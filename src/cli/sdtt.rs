//! `imdm-engine distill sdtt`: SDTT / IM-SDTT distillation rounds (spec 6.1,
//! `distill::sdtt`) into a resumable run directory laid out like `train`'s.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::cli::train::{resolve_device, ObjectiveKind};
use crate::cuda::{DeviceChoice, Gpu};
use crate::data::Manifest;
use crate::diffusion::DistillMode;
use crate::distill::rollout::Spacing;
use crate::distill::sdtt::{
    check_teacher, read_sdtt_config, write_sdtt_config, Sdtt, SdttConfig, SdttEvent, SDTT_FILE,
};
use crate::error::{Error, Result};
use crate::model::{checkpoint, Algo, DitConfig, DitParams};
use crate::train::config::{DataSpec, TokenDtype, TrainConfig};
use crate::train::data;
use crate::train::init::initial_params;
use crate::train::run::{RunConfig, RunDir, RUN_FORMAT};

/// The objective name recorded in `config.json`.
const OBJECTIVE: &str = "sdtt";

pub const LONG_ABOUT: &str = "\
SDTT / IM-SDTT distillation (spec 6.1): the student learns to match in one step the \
--distill-steps teacher steps of size dt, with the student's eps shared by the teacher. Round r \
(--grow-dt-every steps each) uses dt_r = (1 - 1e-3)/--orig-steps * 2^r; at each round boundary \
the student (or its EMA, --ema-on-growth) becomes the teacher. The run ends before the first \
round with round(1/dt) < --min-steps. --imdm (default) trains IM-SDTT (an MDLM teacher file \
gets a zero-output eps MLP, so the student starts equal to it), --mdlm trains the SDTT baseline.

The run directory is `train`'s (config.json, metrics.jsonl, checkpoints/step-N/, latest.json) \
plus sdtt.json (these settings) and rounds/round-RR/{model,ema}.safetensors (the weights that \
end each round; the last round's EMA is the distilled model). metrics.jsonl has loss, kl, round \
and dt per logged step and val_kl (KL(student EMA || teacher) on held-out data). --resume DIR \
continues bit for bit; only --steps and the intervals may be given again.

Defaults are the reference's: kl-bwd, K = 2, 1024 original steps, 10,000 steps per round, lr \
6e-5, warm-up 500, global batch 128, EMA 0.9999, clip 1.0.

--device cuda runs the student on the resident GPU trainer (weights, gradients, AdamW and EMA on the device; the fused distill_kl loss) and the whole teacher rollout on the same GPU: the teacher's forwards, the fused sampler step (the f64 posterior and draws of the CPU rollout) and the target, which the student's loss reads where it is. --device auto takes the GPU when one is usable. A run resumes on either device.";

/// `distill sdtt`.
#[derive(Args, Debug)]
pub struct SdttArgs {
    /// The round-0 teacher: an MDLM or IMDM checkpoint that records its configuration.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Starting weights of the student [default: the teacher]; must have the teacher's shape.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Training data: `synthetic`, `tokens:PATH` or `shards:DIR` (of the teacher's vocabulary
    /// and length; token files hold out their last --eval-size sequences).
    #[arg(long)]
    pub data: Option<String>,
    /// Element type of a token file without a .u16/.u32 extension.
    #[arg(long, value_enum)]
    pub token_dtype: Option<TokenDtype>,
    /// Run directory of a new run.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// IM-SDTT: an IMDM student (the default).
    #[arg(long, conflicts_with = "mdlm")]
    pub imdm: bool,
    /// SDTT: an MDLM student (the MDLM+SDTT baseline).
    #[arg(long)]
    pub mdlm: bool,
    /// Divergence between student and teacher log-probs [default: kl-bwd].
    #[arg(long, value_enum)]
    pub distill_mode: Option<DistillMode>,
    /// Teacher steps per student step, K [default: 2].
    #[arg(long)]
    pub distill_steps: Option<usize>,
    /// Sampling steps of the round-0 teacher; a power of two times --min-steps [default: 1024].
    #[arg(long)]
    pub orig_steps: Option<u64>,
    /// Optimizer steps per round [default: 10000].
    #[arg(long)]
    pub grow_dt_every: Option<u64>,
    /// Final step count: no round with round(1/dt) below it is run [default: 1].
    #[arg(long)]
    pub min_steps: Option<u64>,
    /// Optimizer steps of the run [default: every round of the schedule]; with --resume, a
    /// larger value extends the run.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate [default: 6e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps [default: 500].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Sequences per optimizer step [default: 128].
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Sequences per forward/backward (gradients accumulate) [default: the global batch].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// EMA decay [default: 0.9999].
    #[arg(long)]
    pub ema: Option<f64>,
    /// Global gradient-norm clip, 0 = off [default: 1.0].
    #[arg(long)]
    pub clip: Option<f64>,
    /// At a round boundary, the EMA weights become teacher and student, and the EMA restarts.
    #[arg(long)]
    pub ema_on_growth: bool,
    /// At a round boundary, AdamW restarts (zero moments, step 0).
    #[arg(long)]
    pub reset_optimizer_on_growth: bool,
    /// Teacher step k starts at t - k·dt (the reference starts K = 2 steps at t and t - 2dt,
    /// leaving a gap of one dt).
    #[arg(long)]
    pub corrected_spacing: bool,
    /// Seed of data order, times, masks, eps, rollouts and dropout [default: 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between progress lines [default: 10].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Steps between validations; 0 = only at the end [default: 500].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Held-out sequences for the validation KL; 0 = none [default: 256].
    #[arg(long)]
    pub eval_size: Option<usize>,
    /// Steps between checkpoints; 0 = only the final one [default: 500].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Checkpoints kept on disk [default: 2].
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Where to compute: cpu, cuda (the student and the teacher forwards on the GPU), or auto
    /// (the GPU when one is usable, else the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
}

/// The GPU of `--device` for a student of configuration `c` (train's rule: cuda requires one
/// with an attention kernel for the head dim, auto takes one when usable). Called before the
/// run directory is written, so a refused device leaves nothing behind.
fn open_device(a: &SdttArgs, c: &DitConfig) -> Result<Option<Gpu>> {
    let gpu = resolve_device(a.device, ObjectiveKind::Dit, c).map_err(|e| match e {
        Error::NoDevice(_) | Error::NoKernels | Error::Cuda(_) => Error::Config(format!(
            "--device cuda: no usable GPU ({e}); --device cpu runs the distillation on the CPU"
        )),
        e => e,
    })?;
    if let (Some(g), false) = (&gpu, a.quiet) {
        println!("device: {}", g.name());
    }
    Ok(gpu)
}

/// The student configuration from the teacher file and --imdm/--mdlm.
fn student_config(a: &SdttArgs, teacher: &Path) -> Result<DitConfig> {
    let tc = checkpoint::read_config(teacher)?.ok_or_else(|| {
        Error::checkpoint(
            teacher,
            "--teacher: records no configuration; not an MDLM/IMDM checkpoint of this engine",
        )
    })?;
    check_teacher(&tc, teacher)?;
    tc.algo
        .require_subs(&format!("--teacher {}", teacher.display()), "distill sdtt")?;
    if a.mdlm && tc.algo == Algo::Imdm {
        return Err(Error::checkpoint(
            teacher,
            "--teacher is an IMDM; an MDLM student (--mdlm) distils an MDLM teacher",
        ));
    }
    let mut c = tc.clone();
    c.algo = if a.mdlm { Algo::Mdlm } else { Algo::Imdm };
    if let Some(init) = &a.init {
        let ic = checkpoint::read_config(init)?
            .ok_or_else(|| Error::checkpoint(init, "--init: records no configuration"))?;
        let shape = |c: &DitConfig| {
            (
                c.vocab_size,
                c.mask_index,
                c.hidden,
                c.heads,
                c.blocks,
                c.cond_dim,
                c.length,
            )
        };
        if shape(&ic) != shape(&tc) || ic.causal {
            return Err(Error::Config(format!(
                "--teacher {} is not of the student's shape: the teacher has (V, mask, D, heads, \
                 blocks, cond, L) = {:?}, the student --init {} has {:?}",
                teacher.display(),
                shape(&tc),
                init.display(),
                shape(&ic)
            )));
        }
    }
    Ok(c)
}

/// The data source must speak the teacher's vocabulary.
fn check_data(spec: &DataSpec, flag: &str, teacher: &Path, c: &DitConfig) -> Result<()> {
    if let DataSpec::Tokens { path, dtype } = spec {
        let max = max_token_id(path, *dtype)?;
        if max.is_some_and(|m| m as usize >= c.vocab_size) {
            return Err(Error::Config(format!(
                "--data {flag}: the token file holds id {}, outside the vocabulary of {} of the                  teacher {}; the data was tokenised for another vocabulary",
                max.unwrap_or(0),
                c.vocab_size,
                teacher.display()
            )));
        }
    }
    if let DataSpec::Shards { dir } = spec {
        let m = Manifest::read(dir)?;
        if m.vocab_size != c.vocab_size || m.mask_index as usize != c.mask_index {
            return Err(Error::Config(format!(
                "--data {flag}: vocabulary {} (mask {}), but the teacher {} has vocabulary {} \
                 (mask {})",
                m.vocab_size,
                m.mask_index,
                teacher.display(),
                c.vocab_size,
                c.mask_index
            )));
        }
        if m.length != c.length {
            return Err(Error::Config(format!(
                "--data {flag}: sequences of length {}, the teacher {} has length {}",
                m.length,
                teacher.display(),
                c.length
            )));
        }
    }
    Ok(())
}

/// The largest id of a flat token file (`None` when empty).
fn max_token_id(path: &Path, dtype: TokenDtype) -> Result<Option<u32>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a token file nobody writes while the run starts.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(match dtype {
        TokenDtype::U16 => map
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .max(),
        TokenDtype::U32 => map
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .max(),
    })
}

fn new_run(a: &SdttArgs, dir: &Path) -> Result<Sdtt> {
    let teacher = a
        .teacher
        .clone()
        .ok_or_else(|| Error::Config("a new run needs --teacher MDLM.safetensors".into()))?;
    let data_flag = a.data.as_deref().ok_or_else(|| {
        Error::Config("a new run needs --data (synthetic, shards:DIR or tokens:PATH)".into())
    })?;
    let model = student_config(a, &teacher)?;
    let spec = super::train::parse_data(data_flag, a.token_dtype)?;
    check_data(&spec, data_flag, &teacher, &model)?;
    let gpu = open_device(a, &model)?;
    let d = SdttConfig::default();
    let sd = SdttConfig {
        teacher: teacher.clone(),
        student: model.algo,
        mode: a.distill_mode.unwrap_or(d.mode),
        distill_steps: a.distill_steps.unwrap_or(d.distill_steps),
        orig_steps: a.orig_steps.unwrap_or(d.orig_steps),
        grow_dt_every: a.grow_dt_every.unwrap_or(d.grow_dt_every),
        min_steps: a.min_steps.unwrap_or(d.min_steps),
        ema_on_growth: a.ema_on_growth,
        reset_optimizer_on_growth: a.reset_optimizer_on_growth,
        spacing: if a.corrected_spacing {
            Spacing::Corrected
        } else {
            Spacing::Reference
        },
    };
    sd.validate()?;
    let td = TrainConfig::default();
    let batch = a.global_batch.unwrap_or(128);
    let cfg = TrainConfig {
        data: spec,
        batch,
        micro_batch: a.micro_batch.unwrap_or(batch),
        steps: a.steps.unwrap_or(sd.total_steps()),
        lr: a.lr.unwrap_or(6e-5),
        warmup: a.warmup.unwrap_or(500),
        ema: a.ema.unwrap_or(td.ema),
        clip: a.clip.unwrap_or(td.clip),
        seed: a.seed.unwrap_or(td.seed),
        log_every: a.log_every.unwrap_or(td.log_every),
        eval_every: a.eval_every.unwrap_or(td.eval_every),
        eval_size: a.eval_size.unwrap_or(td.eval_size),
        save_every: a.save_every.unwrap_or(td.save_every),
        keep_checkpoints: a.keep_checkpoints.unwrap_or(td.keep_checkpoints),
        init: Some(a.init.clone().unwrap_or_else(|| teacher.clone())),
        ..td
    };
    cfg.validate()?;
    let teacher0 = initial_params(&model, Some(&teacher), cfg.seed)?;
    let student: DitParams = match &a.init {
        Some(p) => initial_params(&model, Some(p), cfg.seed)?,
        None => teacher0.clone(),
    };
    let (src, val) = data::open(&cfg.data, &model, cfg.seed, cfg.eval_size)?;
    let rec = RunConfig {
        format: RUN_FORMAT.into(),
        objective: OBJECTIVE.into(),
        model: model.clone(),
        train: cfg.clone(),
    };
    let rd = RunDir::create(dir, &rec)?;
    write_sdtt_config(dir, &sd)?;
    if !a.quiet {
        println!(
            "distilling {} {} ({} parameters, L {}, {:?}, K {}, {} rounds of {} steps from {} \
             steps) on {} into {}",
            model.preset,
            if model.algo == Algo::Imdm {
                "IM-SDTT"
            } else {
                "SDTT"
            },
            student.count(),
            model.length,
            sd.mode,
            sd.distill_steps,
            sd.rounds(),
            sd.grow_dt_every,
            sd.orig_steps,
            src.describe(),
            dir.display()
        );
    }
    let mut s = Sdtt::new(cfg, sd, student, teacher0, src, val, Some(rd))?;
    if let Some(g) = gpu {
        s.use_gpu(g);
    }
    Ok(s)
}

fn resume_run(a: &SdttArgs, dir: &Path) -> Result<Sdtt> {
    let fixed = a.teacher.is_some()
        || a.init.is_some()
        || a.data.is_some()
        || a.imdm
        || a.mdlm
        || a.distill_mode.is_some()
        || a.distill_steps.is_some()
        || a.orig_steps.is_some()
        || a.grow_dt_every.is_some()
        || a.min_steps.is_some()
        || a.lr.is_some()
        || a.warmup.is_some()
        || a.global_batch.is_some()
        || a.micro_batch.is_some()
        || a.ema.is_some()
        || a.clip.is_some()
        || a.ema_on_growth
        || a.reset_optimizer_on_growth
        || a.corrected_spacing
        || a.seed.is_some()
        || a.eval_size.is_some();
    if fixed {
        return Err(Error::Config(format!(
            "--resume {}: only --steps and the intervals (--log-every, --eval-every, \
             --save-every, --keep-checkpoints) may be given; the run's recorded configuration \
             ({SDTT_FILE}, config.json) is used",
            dir.display()
        )));
    }
    let (rd, rec) = RunDir::open(dir)?;
    if rec.objective != OBJECTIVE {
        return Err(Error::Config(format!(
            "--resume {}: a {:?} run, not an SDTT run (use `imdm-engine train --resume`)",
            dir.display(),
            rec.objective
        )));
    }
    let sd = read_sdtt_config(dir)?;
    let gpu = open_device(a, &rec.model)?;
    let mut cfg = rec.train.clone();
    if let Some(s) = a.steps {
        cfg.steps = s;
    }
    macro_rules! set {
        ($($f:ident),*) => {$(if let Some(x) = a.$f { cfg.$f = x; })*};
    }
    set!(log_every, eval_every, save_every, keep_checkpoints);
    let teacher0 = initial_params(&rec.model, Some(&sd.teacher), cfg.seed)?;
    let (src, val) = data::open(&cfg.data, &rec.model, cfg.seed, cfg.eval_size)?;
    let mut s = Sdtt::resume(cfg, sd, &rec.model, teacher0, rd, src, val)?;
    if let Some(g) = gpu {
        s.use_gpu(g);
    }
    if !a.quiet {
        println!(
            "resuming {} at step {} of {}",
            dir.display(),
            s.step,
            s.cfg.steps
        );
    }
    Ok(s)
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

pub fn run(a: SdttArgs) -> Result<()> {
    let mut s = match (&a.resume, &a.run_dir) {
        (Some(dir), None) => resume_run(&a, dir)?,
        (Some(_), Some(_)) => {
            return Err(Error::Config(
                "--run-dir and --resume: give only --resume DIR to continue a run".into(),
            ))
        }
        (None, Some(dir)) => new_run(&a, dir)?,
        (None, None) => {
            return Err(Error::Config(
                "give --run-dir DIR for a new run or --resume DIR to continue one".into(),
            ))
        }
    };
    let steps = s.cfg.steps;
    let mode = s.sdtt.mode;
    if !a.quiet {
        s.set_observer(move |e| match e {
            SdttEvent::Progress {
                log,
                tok_per_s,
                elapsed_s,
                eta_s,
            } => println!(
                "step {}/{steps} | round {} dt {:.3e} (1/dt {:.0}) | {mode:?} {:.5} | lr {:.2e} | \
                 grad norm {:.3} | {tok_per_s:.0} tok/s | elapsed {} | ETA {}",
                log.step,
                log.round,
                log.dt,
                1.0 / log.dt,
                log.loss,
                log.lr,
                log.grad_norm,
                hms(*elapsed_s),
                hms(*eta_s)
            ),
            SdttEvent::Validation { step, round, kl } => println!(
                "validation at step {step}: KL(student EMA || round-{round} teacher) {kl:.5}"
            ),
            SdttEvent::Round { round, dt, dir } => {
                println!("round {round} (dt {dt:.3e}) done: {}", dir.display())
            }
            SdttEvent::Checkpoint { step, dir } => {
                println!("checkpoint at step {step}: {}", dir.display())
            }
        });
    }
    s.run()?;
    let root = s.run_dir().map(|r| r.root.clone()).unwrap_or_default();
    let kl = s.validation_kl_ema()?;
    println!(
        "done: {} steps, round {} (dt {:.3e}); last loss {}; {}; rounds in {}",
        s.step,
        s.teacher_round,
        s.sdtt.dt(s.teacher_round),
        s.state_last_loss()
            .map_or("-".into(), |l| format!("{l:.5}")),
        kl.map_or("no validation".into(), |k| format!("validation KL {k:.5}")),
        root.join(crate::distill::sdtt::ROUNDS_DIR).display()
    );
    Ok(())
}
