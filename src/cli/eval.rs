//! `imdm-engine eval ppl`: held-out NELBO and perplexity of a checkpoint on prepared shards
//! (spec 8.1); see `eval::ppl` for the protocol.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::cli::{check_out, ConfigArgs, DeviceArgs};
use crate::cpu::CpuDenoiser;
use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::Backend;
use crate::cuda::DeviceChoice;
use crate::data::VALID;
use crate::diffusion::d3pm::{AlphaS, D3pmOptions};
use crate::diffusion::Denoiser;
use crate::error::{Error, Result};
use crate::eval::baseline_ppl::heldout_bound;
use crate::eval::ppl::{heldout_ppl, PplOptions};
use crate::model::{checkpoint, Algo};
use crate::train::trainer::VALIDATION_SEED;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Held-out NELBO per token and PPL = exp(NELBO) on prepared shards (spec 8.1); for the
    /// baselines their own bound (AR: the exact NLL; SEDD: score entropy; D3PM: L_vb), on the
    /// CPU.
    ///
    /// Every sequence of the split once, in stored order; per batch, antithetic times over its
    /// rows, random masks and (IMDM) random eps from --seed. The file is evaluated as given:
    /// pass a run's ema.safetensors for the EMA weights (the reference's protocol) or
    /// model.safetensors for the raw ones. Without --seed the noise is that of `train`'s
    /// validation, so with --batch equal to the run's --micro-batch and a split no larger
    /// than its --eval-size the CPU number equals the run's last val_nelbo.
    Ppl(PplArgs),
    /// Generative evaluation under a judge LM: Gen PPL, unigram entropy, TC and MAUVE of
    /// samples at several step counts, of a sample file, or of held-out text (spec 8.2-8.4).
    Gen(crate::cli::eval_gen::GenArgs),
}

#[derive(Args, Debug)]
pub struct PplArgs {
    /// Model checkpoint (.safetensors), e.g. RUN/checkpoints/step-N/ema.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A folder prepared by `data prepare` (its vocabulary, mask and length must match the
    /// model's).
    #[arg(long)]
    pub data: PathBuf,
    /// Split to evaluate.
    #[arg(long, default_value = VALID)]
    pub split: String,
    /// Sequences per batch (the antithetic group; the reference's zero-shot runs use 16).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Seed of times, masks and eps [default: train's validation seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate only the first N sequences of the split.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Also write the result as JSON to this file ("-" = stdout only JSON).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub force: bool,
    /// D3PM models: the number of discrete steps T of the bound [default: 1000, the
    /// reference's].
    #[arg(long)]
    pub d3pm_steps: Option<usize>,
    /// D3PM models: α_s in the second L_vb term (as-written or corrected; see `train`).
    #[arg(long, value_enum)]
    pub d3pm_alpha_s: Option<AlphaS>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Configuration to assume when the checkpoint carries none.
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    match a.command {
        EvalCommand::Ppl(p) => run_ppl(p),
        EvalCommand::Gen(g) => crate::cli::eval_gen::run(g),
    }
}

fn run_ppl(a: PplArgs) -> Result<()> {
    if a.batch == 0 {
        return Err(Error::Config("--batch must be at least 1".into()));
    }
    let json_stdout = a.json.as_ref().is_some_and(|p| p.as_os_str() == "-");
    if let Some(p) = a.json.as_ref().filter(|_| !json_stdout) {
        check_out("--json", p, a.force, &[("--checkpoint", &a.checkpoint)])?;
    }
    let chosen = a.config.resolve()?;
    let params = checkpoint::load(&a.checkpoint, chosen.as_ref())?;
    let c = params.config.clone();
    crate::sizes::check(
        &format!(
            "--batch {} x L {} x V {}: the denoiser's probabilities",
            a.batch, c.length, c.vocab_size
        ),
        &[a.batch, c.length, c.vocab_size, 3],
        4,
    )?;
    let baseline = !c.algo.is_subs();
    if baseline && a.device.device == DeviceChoice::Cuda {
        return Err(Error::Config(format!(
            "--device cuda: the {} bound is computed on the CPU only (--device cpu)",
            c.algo.name()
        )));
    }
    if c.algo != Algo::D3pm && (a.d3pm_steps.is_some() || a.d3pm_alpha_s.is_some()) {
        return Err(Error::Config(format!(
            "--d3pm-steps/--d3pm-alpha-s: --checkpoint {} holds a {} model, not d3pm",
            a.checkpoint.display(),
            c.algo.name()
        )));
    }
    let d = D3pmOptions::default();
    let d3pm = D3pmOptions {
        steps: a.d3pm_steps.unwrap_or(d.steps),
        alpha_s: a.d3pm_alpha_s.unwrap_or(d.alpha_s),
        ..d
    };
    if d3pm.steps < 2 {
        return Err(Error::Config(format!(
            "--d3pm-steps {}: needs at least 2 steps",
            d3pm.steps
        )));
    }
    let backend = if baseline {
        Backend::Cpu
    } else {
        Backend::resolve(a.device.device)?
    };
    let (den, device): (Option<Box<dyn Denoiser + '_>>, &str) = match &backend {
        _ if baseline => (None, "cpu"),
        Backend::Cpu => (Some(Box::new(CpuDenoiser::new(params.clone())?)), "cpu"),
        Backend::Cuda(gpu) => (Some(Box::new(GpuDenoiser::new(gpu, &params)?)), "cuda"),
    };
    let opts = PplOptions {
        batch: a.batch,
        seed: a.seed.unwrap_or(VALIDATION_SEED),
        limit: a.limit,
    };
    crate::noteln!(
        "eval ppl: {} ({} {:?}, V {}, L {}) on {} split {:?}, batch {}, seed {}, {device}",
        a.checkpoint.display(),
        c.preset,
        c.algo,
        c.vocab_size,
        c.length,
        a.data.display(),
        a.split,
        opts.batch,
        a.seed
            .map_or("train's validation seed".to_string(), |s| s.to_string())
    );
    let mut last = std::time::Instant::now();
    let t0 = last;
    let mut progress = |done: u64, total: u64| {
        if last.elapsed().as_secs_f64() >= 5.0 {
            let s = t0.elapsed().as_secs_f64();
            crate::noteln!(
                "  {done}/{total} sequences, {:.1} seq/s, ETA {:.0}s",
                done as f64 / s,
                s / done as f64 * (total - done) as f64
            );
            last = std::time::Instant::now();
        }
    };
    let r = match den {
        Some(mut den) => heldout_ppl(den.as_mut(), &a.data, &a.split, opts, &mut progress)?,
        None => heldout_bound(&params, d3pm, &a.data, &a.split, opts, &mut progress)?,
    };
    let bound = match c.algo {
        Algo::Ar => "exact NLL",
        Algo::Sedd => "score-entropy bound",
        Algo::D3pm => "discrete-time L_vb bound",
        Algo::Mdlm | Algo::Imdm => "NELBO",
    };
    if !r.nelbo.is_finite() {
        return Err(Error::Config(format!(
            "--checkpoint {}: the held-out NELBO is {} (the model's probabilities are not \
             finite; `forward` names the first bad value); no result written",
            a.checkpoint.display(),
            r.nelbo
        )));
    }
    let value = serde_json::json!({
        "checkpoint": a.checkpoint.display().to_string(),
        "data": a.data.display().to_string(),
        "split": a.split,
        "preset": c.preset,
        "algo": c.algo.name(),
        "bound": bound,
        "length": c.length,
        "batch": opts.batch,
        "seed": opts.seed,
        "device": device,
        "nelbo": r.nelbo,
        "ppl": r.ppl,
        "sequences": r.sequences,
        "tokens": r.tokens,
        "masked": r.masked,
        "seconds": r.seconds,
    });
    if json_stdout {
        crate::sayln!("{value}");
        return Ok(());
    }
    crate::sayln!(
        "{} ({bound}) {:.4} nats/token, PPL {:.3} ({} sequences, {} tokens, {} scored; \
         {:.1}s, {:.0} tok/s)",
        c.algo.name(),
        r.nelbo,
        r.ppl,
        r.sequences,
        r.tokens,
        r.masked,
        r.seconds,
        r.tokens as f64 / r.seconds.max(1e-9)
    );
    if let Some(p) = &a.json {
        crate::outputs::write_bytes(p, format!("{value:#}\n").as_bytes())?;
        crate::sayln!("wrote {}", p.display());
    }
    Ok(())
}
