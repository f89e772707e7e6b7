//! `imdm-engine eval gen`: generative evaluation under a judge LM (spec 8.2-8.4, 5.9); the
//! protocol is `eval::gen`, `eval::gen_ppl` and `eval::mauve`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::cli::sample::{decode_tokenizer, SamplerChoice};
use crate::cli::{check_out_path, DeviceArgs};
use crate::cpu::CpuDenoiser;
use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::Backend;
use crate::data::shards::MANIFEST;
use crate::data::{Check, ShardSet, Tokenizer, VALID};
use crate::diffusion::{generate, SampleOutput, SamplerConfig, SamplerKind};
use crate::error::{Error, Result};
use crate::eval::gen::{
    heldout_rows, mauve_features, read_samples, sample_conditional, sample_unconditional, score,
    text_rows, CondPlan, GenRow, MauveReference, SamplePlan, Texts,
};
use crate::eval::gen_ppl::GenPplConfig;
use crate::eval::lm::Judge;
use crate::eval::mauve::MauveConfig;
use crate::model::{checkpoint, Algo, DitConfig, DitParams};
use crate::plot::{line_plot_png, LinePlot, Scale, Series};
use crate::tensor::Tokens;
use crate::train::run::{Latest, EMA_FILE, LATEST_FILE};

#[derive(Args, Debug)]
pub struct GenArgs {
    /// The judge LM: a GGUF file, or the name of a judge fetched by scripts/fetch-judge.sh
    /// (smollm2, qwen-0.5b, qwen-1.5b; looked up in data/judges/). Numbers from different
    /// judges are not comparable.
    #[arg(long)]
    pub judge: String,
    /// Model to sample from: a .safetensors file or a run directory (its latest checkpoint's
    /// EMA weights). Repeat for several models (one line each in the plot).
    #[arg(long)]
    pub checkpoint: Vec<PathBuf>,
    /// Step counts to sample with, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub steps: Vec<usize>,
    /// Samples per step count (reference: 1024); with --prefix-len, prefixes (reference: 256).
    #[arg(long, default_value_t = 1024)]
    pub num_samples: usize,
    /// Samples per sampling batch (reference: 32 for OWT, 64 for LM1B); with --prefix-len,
    /// prefixes per batch (reference: 8). A batch is one Gen PPL call: its texts are padded
    /// together and scored in judge batches of --judge-batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Score the samples of a `sample` output (JSONL) as one more row.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Engine tokenizer for decoding samples: a prepared folder, gpt2 or bert (`gpt2:clean`,
    /// `bert:clean`) [default: the --text folder's, else gpt2 for V = 50258 and bert for
    /// V = 30522].
    #[arg(long)]
    pub decode: Option<String>,
    /// Held-out text: a folder prepared by `data prepare` (`DIR` or `shards:DIR`). Scored as
    /// the data's own row (the anchor of the table) and the source of prefixes and MAUVE
    /// references with --prefix-len.
    #[arg(long)]
    pub text: Option<String>,
    /// Split of --text.
    #[arg(long, default_value = VALID)]
    pub split: String,
    /// Conditional generation (spec 8.4): keep the first N tokens of held-out rows and
    /// generate the rest (reference: 50). Needs --text.
    #[arg(long)]
    pub prefix_len: Option<usize>,
    /// Continuations per prefix.
    #[arg(long, default_value_t = 5)]
    pub continuations: usize,
    /// Tokens kept of every conditional sample, prefix included (Gen PPL, entropy, MAUVE).
    #[arg(long, default_value_t = 100)]
    pub keep: usize,
    /// Skip MAUVE in conditional runs.
    #[arg(long)]
    pub no_mauve: bool,
    /// Copies of each eps seed per batch, for the conditional total correlation (spec 5.9);
    /// 1 = off (every reference script).
    #[arg(long, default_value_t = 1)]
    pub duplicate: usize,
    /// Seed of the eps (sample k: seed + k), the sampler streams, the held-out order and the
    /// MAUVE k-means (seeds seed..seed+4).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Posterior: imdm or mdlm [default: the checkpoint's algorithm].
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerChoice>,
    /// Texts per judge batch; texts beyond a multiple of it in a sampling batch are dropped
    /// (the reference's eval.perplexity_batch_size = 8).
    #[arg(long, default_value_t = 8)]
    pub judge_batch: usize,
    /// Score the texts the multiple-of-judge-batch rule drops (not the reference protocol).
    #[arg(long)]
    pub keep_remainder: bool,
    /// Write the rows as JSON (fields gen_ppl, entropy, nfe, tc, mauve per row).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write Gen PPL against steps to FILE.png and Gen PPL against entropy to
    /// FILE_entropy.png, one line per checkpoint, the data's row as reference.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Overwrite existing --json / --plot files.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn cfg_err(m: String) -> Error {
    Error::Config(m)
}

/// The second plot's path: `gen.png` -> `gen_entropy.png`.
pub fn entropy_plot_path(p: &Path) -> PathBuf {
    let stem = p.file_stem().map_or("plot".into(), |s| s.to_string_lossy());
    p.with_file_name(format!("{stem}_entropy.png"))
}

fn check_output(flag: &str, p: &Path, force: bool) -> Result<()> {
    check_out_path(flag, &p.to_path_buf())?;
    if p.exists() && !force {
        return Err(cfg_err(format!(
            "{flag} {}: exists; pass --force to overwrite it",
            p.display()
        )));
    }
    Ok(())
}

/// Flag checks that need no file (run before the judge is opened).
pub fn check_flags(a: &GenArgs) -> Result<()> {
    if a.checkpoint.is_empty() && a.samples.is_none() && a.text.is_none() {
        return Err(cfg_err(
            "eval gen needs something to score: --checkpoint, --samples or --text".into(),
        ));
    }
    if a.steps.is_empty() || a.steps.contains(&0) {
        return Err(cfg_err(format!(
            "--steps {:?}: every step count must be at least 1",
            a.steps
        )));
    }
    if a.judge_batch == 0 {
        return Err(cfg_err("--judge-batch must be at least 1".into()));
    }
    if a.prefix_len.is_some() && (a.text.is_none() || a.checkpoint.is_empty()) {
        return Err(cfg_err(
            "--prefix-len needs --text (the held-out prefixes) and --checkpoint".into(),
        ));
    }
    if a.prefix_len.is_some() && a.duplicate > 1 {
        return Err(cfg_err(
            "--duplicate applies to unconditional sampling only".into(),
        ));
    }
    SamplePlan {
        steps: 1,
        num_samples: a.num_samples,
        batch: a.batch,
        seed: a.seed,
        duplicate: a.duplicate,
        kind: SamplerKind::ImdmPosterior,
    }
    .validate()?;
    if a.num_samples as u64 > i64::MAX as u64 / 8 - a.seed.min(i64::MAX as u64 / 8) {
        return Err(cfg_err(
            "--seed + --num-samples overflows an i64 eps seed".into(),
        ));
    }
    if let Some(p) = &a.json {
        check_output("--json", p, a.force)?;
    }
    if let Some(p) = &a.plot {
        if p.extension().and_then(|e| e.to_str()) != Some("png") {
            return Err(cfg_err(format!(
                "--plot {}: expected a .png file",
                p.display()
            )));
        }
        check_output("--plot", p, a.force)?;
        check_output("--plot", &entropy_plot_path(p), a.force)?;
    }
    Ok(())
}

/// A --checkpoint: a file, or a run directory's latest EMA weights.
pub fn resolve_checkpoint(p: &Path) -> Result<PathBuf> {
    if !p.is_dir() {
        if !p.is_file() {
            return Err(cfg_err(format!(
                "--checkpoint {}: no such file",
                p.display()
            )));
        }
        return Ok(p.to_path_buf());
    }
    let latest = p.join(LATEST_FILE);
    let s = std::fs::read_to_string(&latest).map_err(|_| {
        cfg_err(format!(
            "--checkpoint {}: a directory without {LATEST_FILE} (not a run with a checkpoint)",
            p.display()
        ))
    })?;
    let l: Latest = serde_json::from_str(&s)
        .map_err(|e| Error::checkpoint(&latest, format!("invalid JSON: {e}")))?;
    Ok(p.join(l.dir).join(EMA_FILE))
}

/// `DIR` or `shards:DIR`, a prepared folder.
fn text_dir(spec: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(spec.strip_prefix("shards:").unwrap_or(spec));
    if !dir.join(MANIFEST).is_file() {
        return Err(cfg_err(format!(
            "--text {spec}: not a prepared folder (no {MANIFEST}); tokenize text with \
             `imdm-engine data prepare` first"
        )));
    }
    Ok(dir)
}

/// The engine tokenizer for a model: --decode, the --text folder's, or the reference one for
/// the model's vocabulary.
fn model_tokenizer(a: &GenArgs, c: &DitConfig, text: Option<&Path>) -> Result<Tokenizer> {
    let spec = match (&a.decode, text) {
        (Some(d), _) => d.clone(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => match c.vocab_size {
            50258 => "gpt2".into(),
            30522 => "bert".into(),
            v => {
                return Err(cfg_err(format!(
                    "no tokenizer for a model with V = {v}: pass --decode or --text"
                )))
            }
        },
    };
    decode_tokenizer(&spec, c)
}

/// Runs `body` with a sampler over `params` on the chosen device.
fn with_sampler<T>(
    backend: &Backend,
    params: DitParams,
    body: impl FnOnce(
        &mut dyn FnMut(&SamplerConfig, &Tokens, &[i64]) -> Result<SampleOutput>,
    ) -> Result<T>,
) -> Result<T> {
    // Every eps is seeded, so this RNG is never drawn from.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    match backend {
        Backend::Cpu => {
            let mut d = CpuDenoiser::new(params)?;
            body(&mut |cfg, x, seeds| generate(&mut d, cfg, x, None, Some(seeds), &mut rng))
        }
        Backend::Cuda(gpu) => {
            let mut d = GpuDenoiser::new(gpu, &params)?;
            body(&mut |cfg, x, seeds| d.generate(cfg, x, None, Some(seeds), &mut rng))
        }
    }
}

fn progress(what: String) -> impl FnMut(usize, usize) {
    let t0 = Instant::now();
    let mut last = t0;
    move |done, total| {
        if last.elapsed().as_secs_f64() >= 5.0 || done == total {
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "  {what}: {done}/{total} samples, {:.2} samples/s, ETA {:.0}s",
                done as f64 / s.max(1e-9),
                s / done.max(1) as f64 * (total - done) as f64
            );
            last = Instant::now();
        }
    }
}

/// Everything `eval gen` reports.
#[derive(Debug, serde::Serialize)]
pub struct GenReport {
    pub judge: String,
    /// What MAUVE's features are (they are not gpt2-large's).
    pub mauve_features: Option<String>,
    pub rows: Vec<GenRow>,
}

/// `eval gen` with an open judge: checks, samples, scores, prints the table and writes
/// --json / --plot. The library entry point of the subcommand (tests pass their own judge).
pub fn run_with_judge(a: &GenArgs, judge: &dyn Judge) -> Result<GenReport> {
    check_flags(a)?;
    let ckpts: Vec<PathBuf> = a
        .checkpoint
        .iter()
        .map(|p| resolve_checkpoint(p))
        .collect::<Result<_>>()?;
    let text = a.text.as_deref().map(text_dir).transpose()?;
    let set = text
        .as_deref()
        .map(|d| ShardSet::open(d, &a.split, Check::Size))
        .transpose()?;
    let data_tok = text
        .as_deref()
        .map(|d| crate::data::Manifest::read(d).and_then(|m| Tokenizer::for_manifest(&m)));
    let data_tok = data_tok.transpose()?;
    let backend = if ckpts.is_empty() {
        None
    } else {
        Some(Backend::resolve(a.device.device)?)
    };
    eprintln!("eval gen: judge {}", judge.describe());
    let mut rows = Vec::new();
    let reference_texts = match (&set, &data_tok) {
        (Some(set), Some(tok)) => {
            let held = heldout_rows(set, a.num_samples, a.seed);
            if held.is_empty() {
                return Err(cfg_err(format!("--text: split {:?} is empty", a.split)));
            }
            let keep = a.prefix_len.map(|_| a.keep);
            let t = text_rows(tok, &held, keep, a.batch)?;
            let mut r = score(judge, &t, &ppl_cfg(a, set.length()), None)?;
            r.source = "text".into();
            r.label = format!("{} ({})", a.text.as_deref().unwrap_or(""), a.split);
            rows.push(r);
            Some((held, t))
        }
        _ => None,
    };
    let mauve_ref = match (&reference_texts, a.prefix_len) {
        (Some((_, t)), Some(_)) if !a.no_mauve => Some(MauveReference {
            features: mauve_features(judge, &t.texts, a.keep)?,
            max_text_length: a.keep,
            config: MauveConfig::default(),
            seeds: (a.seed..a.seed + 5).collect(),
        }),
        _ => None,
    };
    for (path, arg) in ckpts.iter().zip(&a.checkpoint) {
        let params = checkpoint::load(path, None)?;
        let c = params.config.clone();
        let tok = model_tokenizer(a, &c, text.as_deref())?;
        c.algo.require_subs(
            &format!("--checkpoint {}", arg.display()),
            "eval gen's sampler",
        )?;
        let kind = match a.sampler.unwrap_or(match c.algo {
            Algo::Imdm => SamplerChoice::Imdm,
            _ => SamplerChoice::Mdlm,
        }) {
            SamplerChoice::Imdm => SamplerKind::ImdmPosterior,
            SamplerChoice::Mdlm => SamplerKind::MdlmPosterior,
        };
        let cond = match (a.prefix_len, &reference_texts) {
            (Some(prefix_len), Some((held, _))) => {
                let cp = CondPlan {
                    prefixes: held.clone(),
                    prefix_len,
                    continuations: a.continuations,
                    keep: a.keep,
                };
                cp.validate(&c)?;
                Some(cp)
            }
            _ => None,
        };
        let label = arg.display().to_string();
        let backend = backend
            .as_ref()
            .expect("resolved when checkpoints are given");
        with_sampler(backend, params, |sample| {
            for &steps in &a.steps {
                let plan = SamplePlan {
                    steps,
                    num_samples: a.num_samples,
                    batch: a.batch,
                    seed: a.seed,
                    duplicate: a.duplicate,
                    kind,
                };
                let mut prog = progress(format!("{label} at {steps} steps"));
                let t: Texts = match &cond {
                    Some(cp) => sample_conditional(sample, &c, &tok, &plan, cp, &mut prog)?,
                    None => sample_unconditional(sample, &c, &tok, &plan, &mut prog)?,
                };
                let mut r = score(judge, &t, &ppl_cfg(a, c.length), mauve_ref.as_ref())?;
                r.source = "checkpoint".into();
                r.label = label.clone();
                r.steps = Some(steps);
                eprintln!("  {}", table_line(&r));
                rows.push(r);
            }
            Ok(())
        })?;
    }
    if let Some(p) = &a.samples {
        let tok = match (&a.decode, &data_tok) {
            (Some(d), _) => Some(decode_any(d)?),
            (None, Some(_)) => text
                .as_deref()
                .map(|d| decode_any(&d.display().to_string()))
                .transpose()?,
            (None, None) => None,
        };
        let (t, len) = read_samples(p, tok.as_ref(), a.batch)?;
        let mut r = score(judge, &t, &ppl_cfg(a, len), None)?;
        r.source = "samples".into();
        r.label = p.display().to_string();
        rows.push(r);
    }
    let report = GenReport {
        judge: judge.describe(),
        mauve_features: mauve_ref.as_ref().map(|_| {
            format!(
                "final hidden state at the last token of {}",
                judge.describe()
            )
        }),
        rows,
    };
    print_table(&report);
    if let Some(p) = &a.json {
        write_json(p, &report)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.plot {
        write_plots(p, &report.rows)?;
        println!(
            "wrote {} and {}",
            p.display(),
            entropy_plot_path(p).display()
        );
    }
    Ok(report)
}

/// A tokenizer from a --decode spec without a model to check it against.
fn decode_any(spec: &str) -> Result<Tokenizer> {
    let dir = Path::new(spec);
    if dir.join(MANIFEST).is_file() {
        return Tokenizer::for_manifest(&crate::data::Manifest::read(dir)?);
    }
    let (name, conv) = spec.split_once(':').unwrap_or((spec, "reference"));
    let conv = match conv {
        "reference" => crate::data::Conventions::Reference,
        "clean" => crate::data::Conventions::Clean,
        o => {
            return Err(cfg_err(format!(
                "--decode {spec}: unknown conventions {o:?}"
            )))
        }
    };
    Tokenizer::new(name.parse()?, conv)
}

fn ppl_cfg(a: &GenArgs, max_length: usize) -> GenPplConfig {
    GenPplConfig {
        max_length: max_length.max(1),
        judge_batch: a.judge_batch,
        keep_remainder: a.keep_remainder,
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

fn table_line(r: &GenRow) -> String {
    format!(
        "{:<10} {:>6} {:>8} {:>10.2} {:>8.3} {:>7} {:>7} {:>10}  {}",
        r.source,
        r.steps.map_or("-".into(), |s| s.to_string()),
        opt(r.nfe, 1),
        r.gen_ppl,
        r.entropy,
        opt(r.tc, 3),
        opt(r.mauve, 3),
        opt(r.samples_per_s, 2),
        r.label
    )
}

fn print_table(r: &GenReport) {
    println!("judge: {}", r.judge);
    if let Some(f) = &r.mauve_features {
        println!("MAUVE features: {f} (not gpt2-large; compare only under the same judge)");
    }
    println!(
        "{:<10} {:>6} {:>8} {:>10} {:>8} {:>7} {:>7} {:>10}  source",
        "row", "steps", "NFE", "Gen PPL", "entropy", "TC", "MAUVE", "samples/s"
    );
    for row in &r.rows {
        println!("{}", table_line(row));
    }
}

fn write_json(p: &Path, r: &GenReport) -> Result<()> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string_pretty(r).expect("plain data");
    std::fs::File::create(&tmp)
        .and_then(|mut f| writeln!(f, "{text}"))
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io(p, e))
}

/// Gen PPL against steps and against entropy, one series per checkpoint, the data row as a
/// horizontal reference line (and a point in the entropy plot).
pub fn write_plots(p: &Path, rows: &[GenRow]) -> Result<()> {
    let mut labels: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.source == "checkpoint") {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    fn of<'a>(rows: &'a [GenRow], l: &'a str) -> impl Iterator<Item = &'a GenRow> + 'a {
        rows.iter()
            .filter(move |r| r.source == "checkpoint" && r.label == l)
    }
    let mut by_steps: Vec<Series> = labels
        .iter()
        .map(|l| Series {
            name: l.to_string(),
            points: of(rows, l)
                .map(|r| (r.steps.unwrap_or(0) as f64, r.gen_ppl))
                .collect(),
        })
        .collect();
    let mut by_entropy: Vec<Series> = labels
        .iter()
        .map(|l| Series {
            name: l.to_string(),
            points: of(rows, l).map(|r| (r.entropy, r.gen_ppl)).collect(),
        })
        .collect();
    let steps: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.steps)
        .map(|s| s as f64)
        .collect();
    for d in rows.iter().filter(|r| r.source != "checkpoint") {
        let name = format!("{} ({})", d.source, d.label);
        let (lo, hi) = steps
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), &s| (a.min(s), b.max(s)));
        if lo.is_finite() {
            by_steps.push(Series {
                name: name.clone(),
                points: vec![(lo, d.gen_ppl), (hi, d.gen_ppl)],
            });
        }
        by_entropy.push(Series {
            name,
            points: vec![(d.entropy, d.gen_ppl)],
        });
    }
    line_plot_png(
        p,
        &LinePlot {
            title: "Gen PPL against sampling steps",
            x_label: "steps",
            y_label: "Gen PPL",
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: &by_steps,
        },
    )?;
    line_plot_png(
        entropy_plot_path(p),
        &LinePlot {
            title: "Gen PPL against unigram entropy",
            x_label: "entropy (nats)",
            y_label: "Gen PPL",
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: &by_entropy,
        },
    )
}

/// `eval gen`: opens the judge and runs [`run_with_judge`].
pub fn run(a: GenArgs) -> Result<()> {
    check_flags(&a)?;
    let judge = crate::eval::judge::open(&a.judge)
        .map_err(|e| cfg_err(format!("--judge {}: {e}", a.judge)))?;
    run_with_judge(&a, judge.as_ref()).map(|_| ())
}
