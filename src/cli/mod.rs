//! The `imdm-engine` command line. Each subcommand is a thin layer over the library; its doc
//! comments are the `--help` text.

use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

use crate::cuda::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::{Algo, DitConfig, NoiseType, Preset};

pub mod bench;
pub mod data;
pub mod demo;
pub mod distill;
pub mod eval;
pub mod eval_gen;
pub mod forward;
pub mod info;
pub mod init;
pub mod plot;
pub mod probe;
pub mod sample;
pub mod sample_baselines;
pub mod sdtt;
pub mod train;
mod train_resolve;

/// Masked diffusion language models (MDLM, IMDM) with hand-written CUDA kernels.
///
/// Model initialisation and inspection, the reference forward pass, data preparation (text to
/// token shards), training, evaluation, sampling, distillation and the synthetic experiment
/// (`demo`); training, evaluation, sampling, distillation and the demo run on the CPU or the GPU
/// (`--device cpu|cuda|auto`).
#[derive(Parser, Debug)]
#[command(name = "imdm-engine", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The paper's synthetic experiment: MDM versus IMDM (IM-ReDi) at 1-16 steps.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::DemoArgs),
    /// Distillation stages: SDTT / IM-SDTT rounds, IM-ReDi coupling generation and training.
    Distill(distill::DistillArgs),
    /// Write a randomly initialised model, initialised as the reference does (spec 2.3).
    Init(init::InitArgs),
    /// Print a checkpoint's configuration, parameter counts and dtypes.
    Info(info::InfoArgs),
    /// Run the denoiser on token ids from a safetensors file; write logits and SUBS log-probs.
    Forward(forward::ForwardArgs),
    /// Check the GPU: load the embedded PTX, run each kernel, compare with its CPU twin.
    Probe(probe::ProbeArgs),
    /// GPU benchmarks: kernels, whole forward, sampler steps.
    Bench(bench::BenchArgs),
    /// Train MDLM or IMDM (NELBO), or an AR, SEDD or D3PM baseline, into a resumable run
    /// directory.
    #[command(long_about = train::LONG_ABOUT)]
    Train(Box<train::TrainArgs>),
    /// Text data: tokenize a corpus into token shards, inspect prepared shards.
    Data(data::DataArgs),
    /// Generate token ids (unconditional, prefix or infill) with the IMDM or MDLM sampler, or
    /// from an AR, SEDD or D3PM baseline with its own sampler.
    Sample(sample::SampleArgs),
    /// Evaluate: held-out NELBO and perplexity on prepared shards; generative evaluation
    /// under a judge LM.
    Eval(eval::EvalArgs),
    /// Plot training loss and validation NELBO of run directories as a PNG.
    Plot(plot::PlotArgs),
}

/// Model configuration flags shared by the subcommands that build or check a config.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// Model size preset (spec 2.1).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Vocabulary size, mask token included (default: 50258 = GPT-2 + appended mask; 50001 for
    /// the synthetic presets).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Mask token id (default: vocab - 1, the appended mask; 103 for BERT).
    #[arg(long)]
    pub mask_index: Option<usize>,
    /// IMDM noise dimension (default: the hidden size; the OWT scripts use 2048).
    #[arg(long)]
    pub noise_dim: Option<usize>,
    /// Algorithm: imdm adds the eps MLP to mdlm; ar is the causal DiT without adaLN; sedd and
    /// d3pm are the absorbing-state baselines with per-row time conditioning.
    #[arg(long, value_enum)]
    pub algo: Option<Algo>,
    /// Distribution of eps at masked positions.
    #[arg(long, value_enum)]
    pub noise_type: Option<NoiseType>,
    /// Attention softcap (50 in the LM1B setting; 0 = off).
    #[arg(long)]
    pub softcap: Option<f64>,
    /// Sequence length (default: the preset's; 128 for LM1B).
    #[arg(long)]
    pub length: Option<usize>,
    /// The causal AR baseline (no adaLN, causal attention): the same as --algo ar.
    #[arg(long, conflicts_with = "algo")]
    pub ar: bool,
}

impl ConfigArgs {
    /// The preset with the overrides applied, or `None` when no preset was given (in which case
    /// overrides are an error: they need a base).
    pub fn resolve(&self) -> Result<Option<DitConfig>> {
        let Some(p) = self.preset else {
            if self.vocab.is_some() || self.noise_dim.is_some() || self.algo.is_some() {
                return Err(Error::Config(
                    "--vocab/--noise-dim/--algo need --preset to start from".into(),
                ));
            }
            return Ok(None);
        };
        let mut c = DitConfig::preset(p);
        self.apply(&mut c);
        c.validate()?;
        Ok(Some(c))
    }

    /// Applies the model flags that were given on top of `c` (a preset, or a configuration
    /// recorded in a file); the one place these overrides are interpreted. `--vocab` moves the
    /// mask to the last id unless `--mask-index` is given too.
    pub fn apply(&self, c: &mut DitConfig) {
        if let Some(v) = self.vocab {
            c.vocab_size = v;
            c.mask_index = v.saturating_sub(1);
        }
        if let Some(m) = self.mask_index {
            c.mask_index = m;
        }
        if let Some(n) = self.noise_dim {
            c.noise_dim = n;
        }
        if let Some(a) = self.algo {
            c.set_algo(a);
        }
        if let Some(t) = self.noise_type {
            c.noise_type = t;
        }
        if let Some(s) = self.softcap {
            c.softcap = s;
        }
        if let Some(l) = self.length {
            c.length = l;
        }
        if self.ar {
            c.set_algo(Algo::Ar);
        }
    }
}

/// Device flag shared by subcommands that compute.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to run: cpu (reference path), cuda, or auto (cuda when a device and kernels exist).
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Distill(a) => distill::run(a),
        Command::Init(a) => init::run(a),
        Command::Info(a) => info::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Train(a) => train::run(*a),
        Command::Data(a) => data::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Plot(a) => plot::run(a),
    }
}

/// Prints a line on stdout, ignoring a closed stdout: long work (training, sampling,
/// evaluation) goes on when the reader of a pipe has gone, its progress still reaching the
/// run's log and its results their files.
pub fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{args}");
}

/// `println!` through [`say`].
#[macro_export]
macro_rules! sayln {
    ($($t:tt)*) => { $crate::cli::say(format_args!($($t)*)) };
}

/// `eprintln!` that ignores a closed stderr, for notes and progress of long work.
#[macro_export]
macro_rules! noteln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Whether a command is short (inspection): such commands may simply end when stdout closes
/// (the conventional SIGPIPE exit), while long ones must not.
pub fn is_short(c: &Command) -> bool {
    match c {
        Command::Info(_) | Command::Probe(_) | Command::Plot(_) | Command::Init(_) => true,
        Command::Forward(_) => true,
        Command::Data(d) => matches!(d.command, data::DataCommand::Info(_)),
        _ => false,
    }
}

/// Checks an output file before the work (see [`crate::outputs::check_output`]): never one
/// of `inputs`, not an existing file unless `force`, a writable directory.
pub fn check_out(flag: &str, path: &Path, force: bool, inputs: &[(&str, &Path)]) -> Result<()> {
    crate::outputs::check_output(flag, path, force, inputs)
}

/// Checks an output path that may be replaced (a derived file such as a plot): its directory
/// exists and accepts files, and it is not a directory.
pub fn check_out_path(flag: &str, path: &PathBuf) -> Result<()> {
    crate::outputs::check_output(flag, path, true, &[])
}
