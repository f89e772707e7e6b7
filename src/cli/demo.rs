//! `imdm-engine demo`: the paper's synthetic experiment (spec 7), small enough for a laptop
//! CPU by default, the reference configuration with `--full`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use crate::cuda::{Backend, DeviceChoice};
use crate::distill::synthetic::{run as run_experiment, table, Engine, Progress, SyntheticConfig};
use crate::error::{Error, Result};
use crate::train::CpuDit;

pub const LONG_ABOUT: &str = "\
The paper's synthetic experiment: every training sequence is one token repeated L times.
An MDM samples positions independently in one step, so its 1-step exact-match rate is stuck
at V^-(L-1); IMDM, rectified on its own couplings (IM-ReDi), maps each eps field to one
coherent sequence and escapes that floor.

Stages: an MDLM teacher and a plain IMDM trained on the data; couplings from the teacher
(many steps, seeded eps); an MDM student and IM-ReDi rounds (round k+1's couplings come from
round k's student); then SDTT distillation from the teacher (an MDLM student, mdlm_sdtt, and an
IMDM one, imdm_sdtt: 4 rounds from 16 to 2 teacher steps, 400 steps each) and IM-ReDi on
couplings from the IM-SDTT student (imdm_sdtt_redi, 4 rounds). Every model is sampled at 1, 2, 4, 8, 16 steps with fresh eps seeds,
never those of the couplings. Prints a table of exact-match rates (distinct sequences);
with --out DIR writes DIR/synthetic.json and DIR/exact_match.png.

The default (V = 64, L = 8, a 2-block width-64 DiT, 16 rounds) runs on the CPU in about
4 minutes on 2 cores.
--full is the reference configuration (V = 50,000, L = 10, the `synthetic` preset), meant
for a GPU: --device cuda|auto trains and samples there (head dims 32/64/96/128 only; the small
default runs on the CPU).";

/// Flags of `imdm-engine demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The reference configuration (V = 50,000, L = 10, `synthetic` preset) instead of the
    /// small CPU one.
    #[arg(long)]
    pub full: bool,
    /// IM-ReDi rounds (default: 16 for the demo, 5 for --full).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Data tokens V (the mask is appended).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Sequence length L.
    #[arg(long)]
    pub length: Option<usize>,
    /// Optimizer steps of each student round.
    #[arg(long)]
    pub student_steps: Option<u64>,
    /// Optimizer steps of the MDLM teacher and of the plain IMDM.
    #[arg(long)]
    pub base_steps: Option<u64>,
    /// Where each round's couplings come from: `ot` (default; minibatch optimal transport
    /// between eps and real rows under the source's one-step likelihood, keeping the data
    /// marginal) or `sample` (the reference: the source samples x0 with many steps).
    #[arg(long, value_enum)]
    pub coupling: Option<crate::distill::synthetic::Coupling>,
    /// Share of coupling rows with a perturbed x_T (t ~ U(0,1]); the rest are all-mask.
    #[arg(long)]
    pub perturbed_frac: Option<f64>,
    /// Rows per optimal-transport minibatch (--coupling ot).
    #[arg(long)]
    pub ot_batch: Option<usize>,
    /// Width D of every model (heads stay at 4).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// DiT blocks of every model.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Couplings generated per round.
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Nucleus mass when a student generates the next round's couplings (>= 1: off, as the
    /// reference; the default 1e-6 keeps the student's top token, so couplings become a
    /// function of eps).
    #[arg(long)]
    pub student_top_p: Option<f64>,
    /// Step counts to evaluate, comma-separated (default 1,2,4,8,16).
    #[arg(long, value_delimiter = ',')]
    pub eval_steps: Option<Vec<usize>>,
    /// Student round k trains at lr * decay^(k-1).
    #[arg(long)]
    pub round_lr_decay: Option<f64>,
    /// Peak learning rate of every stage.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Sampler steps of coupling generation.
    #[arg(long)]
    pub datagen_steps: Option<usize>,
    /// Optimizer steps per SDTT round of the mdlm_sdtt / imdm_sdtt rows (default 400).
    #[arg(long)]
    pub sdtt_steps_per_round: Option<u64>,
    /// IM-ReDi rounds of the imdm_sdtt_redi row (default 4).
    #[arg(long)]
    pub sdtt_redi_rounds: Option<usize>,
    /// Samples per model and step count.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Seed of everything (data, initialisation, noise, sampling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Write synthetic.json and exact_match.png into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace synthetic.json and exact_match.png already in --out.
    #[arg(long)]
    pub force: bool,
}

struct Console {
    start: Instant,
    last: Instant,
}

impl Progress for Console {
    fn stage(&mut self, msg: &str) {
        crate::sayln!("[{:>6.1}s] {msg}", self.start.elapsed().as_secs_f64());
    }

    fn step(&mut self, stage: &str, step: u64, total: u64, loss: f64) {
        if step == total || self.last.elapsed().as_secs_f64() > 2.0 {
            self.last = Instant::now();
            let end = if step == total { "\n" } else { "\r" };
            let _ = write!(
                std::io::stdout(),
                "          {stage:<14} step {step:>5}/{total}  loss {loss:.4}   {end}"
            );
            let _ = std::io::stdout().flush();
        }
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let mut cfg = if a.full {
        SyntheticConfig::full()
    } else {
        SyntheticConfig::demo()
    };
    macro_rules! set {
        ($($f:ident => $field:ident),*) => {$(if let Some(v) = a.$f { cfg.$field = v; })*};
    }
    set!(rounds => rounds, vocab => vocab, length => length, student_steps => student_steps,
         base_steps => base_steps, pairs => pairs, student_top_p => student_top_p,
         eval_steps => eval_steps, lr => lr, datagen_steps => datagen_steps,
         coupling => coupling, ot_batch => ot_batch, perturbed_frac => perturbed_frac, round_lr_decay => round_lr_decay, hidden => hidden, blocks => blocks);
    if let Some(n) = a.sdtt_steps_per_round {
        cfg.sdtt.grow_dt_every = n;
    }
    if let Some(n) = a.sdtt_redi_rounds {
        cfg.sdtt.redi_rounds = n;
    }
    if let Some(n) = a.samples {
        cfg.eval.samples = n;
    }
    cfg.seed = a.seed;
    if let Some(p) = a.student_top_p {
        if !(p > 0.0) {
            return Err(Error::Config(format!("--student-top-p {p}: must be > 0")));
        }
    }
    cfg.validate()?;
    if let Some(dir) = &a.out {
        crate::outputs::check_output_dir(
            "--out",
            dir,
            a.force,
            &["synthetic.json", "exact_match.png"],
        )?;
    }
    // The GPU attention kernels cover head dims 32/64/96/128; the CPU demo's 64/4 = 16 runs on
    // the CPU under `auto` (and is refused under `cuda`).
    let hd = cfg.model(crate::model::Algo::Imdm).head_dim();
    let gpu_ok = crate::cuda::ops::attention::HEAD_DIMS.contains(&hd);
    let choice = match (a.device.device, gpu_ok) {
        (DeviceChoice::Cuda, false) => {
            return Err(Error::Config(format!(
                "--device cuda: head dim {hd} (hidden {} / 4 heads) has no GPU attention kernel \
                 (32, 64, 96, 128); use --hidden 128 or more, or --device cpu",
                cfg.hidden
            )))
        }
        (DeviceChoice::Auto, false) => DeviceChoice::Cpu,
        (c, _) => c,
    };
    let mut engine = match Backend::resolve(choice)? {
        Backend::Cpu => Engine::Cpu(CpuDit),
        Backend::Cuda(gpu) => {
            Engine::Cuda(Box::new(GpuTrainer::new(gpu, GpuTrainOptions::default())))
        }
    };
    crate::sayln!(
        "synthetic experiment: V = {}, L = {}, DiT {} blocks x width {}, noise_dim {}, {} rounds \
         ({})",
        cfg.vocab,
        cfg.length,
        cfg.blocks,
        cfg.hidden,
        cfg.noise_dim,
        cfg.rounds,
        engine.name()
    );
    let now = Instant::now();
    let mut console = Console {
        start: now,
        last: now,
    };
    let report = run_experiment(&mut engine, &cfg, a.out.as_deref(), &mut console)?;
    crate::sayln!("\n{}", table(&report));
    crate::sayln!("total {:.0} s", report.seconds);
    if let Some(dir) = &a.out {
        crate::sayln!(
            "wrote {} and {}",
            dir.join("synthetic.json").display(),
            dir.join("exact_match.png").display()
        );
    }
    Ok(())
}
