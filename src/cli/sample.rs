//! `imdm-engine sample`: unconditional, prefix or infill generation from a checkpoint (the
//! baselines AR, SEDD and D3PM: `cli::sample_baselines`), written
//! as JSONL token ids (one object per sample: `id`, `tokens`, `nfe`, `seed`; with `--decode`
//! also `text`, the tokens decoded with special tokens kept, as the reference's `batch_decode`,
//! spec 8.2). The run reports the mean unigram entropy of the samples (spec 8.3: over the
//! model's own ids, nats; conditional samples on their first 100 tokens).
//!
//! Reproducibility: sample k (0-based) starts from the reference's seeded eps with seed
//! `--seed + k` (spec 5.8), and batch j (samples j·B .. j·B+B−1) draws its categorical and
//! reset numbers from the sampler stream keyed by `splitmix64(splitmix64(--seed) ^ j)`. The
//! same flags (`--batch` included) give the same file on the CPU and on the GPU: the fused GPU
//! step reproduces the CPU posterior draw for draw, and only the denoiser's arithmetic differs
//! (f32/f64 CPU reference against bf16 GEMMs on the GPU), so CPU and GPU files agree in
//! distribution, not token for token.
//!
//! Devices: `cpu` runs the CPU DiT and driver; `cuda` runs the device-resident driver (the
//! forward and the fused step kernel per step), or, with `--nucleus`, the CPU driver on the GPU
//! denoiser (nucleus filtering is CPU-only); `auto` picks cuda when a device and kernels exist.

use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cli::{check_out, ConfigArgs, DeviceArgs};
use crate::cpu::CpuDenoiser;
use crate::cuda::denoiser::GpuDenoiser;
use crate::cuda::Backend;
use crate::data::shards::MANIFEST;
use crate::data::{Conventions, Manifest, Tokenizer, TokenizerKind};
use crate::diffusion::metrics::mean_unigram_entropy;
use crate::diffusion::stream::batch_stream_seed;
use crate::diffusion::Denoiser;
use crate::diffusion::{generate, NoiseRemoval, SampleOutput, SamplerConfig, SamplerKind};
use crate::error::{Error, Result};
use crate::model::{checkpoint, Algo, DitConfig};
use crate::rng::seeded_eps;
use crate::tensor::Tokens;

/// The posterior of each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SamplerChoice {
    /// IMDM posterior with the reset category (spec 5.3).
    Imdm,
    /// MDLM ancestral update (spec 5.2).
    Mdlm,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Model checkpoint (.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Sampler steps N (>= 1; the last one is the noise-removal step).
    #[arg(long)]
    pub steps: usize,
    /// Number of samples to write.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Samples per batch (the last batch may be smaller).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seed of the initial eps (sample k uses seed + k) and of the sampler stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Posterior: imdm or mdlm (default: the checkpoint's algorithm).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerChoice>,
    /// What the last step does with still-masked positions.
    #[arg(long, value_enum, default_value = "ancestral")]
    pub noise_removal: NoiseRemoval,
    /// Resets keep their eps (the reset category acts as "stay masked").
    #[arg(long)]
    pub fix_eps: bool,
    /// Temperature T > 0: the posterior weights become w^(1/T).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 is off. CPU posterior only (a GPU run falls back to it).
    #[arg(long, default_value_t = 1.0)]
    pub nucleus: f64,
    /// Fixed first tokens of every sample: ids separated by spaces or commas.
    #[arg(long, conflicts_with = "template")]
    pub prefix: Option<String>,
    /// Infill template: a JSON list of rows of length L, ids or null (null = generate). Sample
    /// k uses row k mod (number of rows).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Output JSONL, one object per sample; written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// The BOS id every AR sample starts with (ar models only; GPT-2 text: 50256).
    #[arg(long)]
    pub bos: Option<u32>,
    /// AR: the reference's sampler, rerunning the whole prefix every step, instead of the
    /// KV-cached decoder (the same tokens, much slower).
    #[arg(long)]
    pub uncached: bool,
    /// Decode each sample into a "text" field: a folder prepared by `data prepare` (its
    /// manifest names the tokenizer), or `gpt2` / `bert` (reference conventions; `gpt2:clean`,
    /// `bert:clean`). The tokenizer's V and mask must be the model's.
    #[arg(long)]
    pub decode: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Configuration to assume when the checkpoint carries none (and --length: the sequence
    /// length, default the checkpoint's).
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// One line of the output.
#[derive(serde::Serialize)]
struct Line<'a> {
    id: usize,
    tokens: &'a [u32],
    /// Denoiser calls of the sample's batch.
    nfe: usize,
    /// Seed of the sample's initial eps.
    seed: i64,
    /// The tokens as text (with `--decode`).
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

/// The tokenizer `--decode` names (see the flag), checked against the model's V and mask.
pub fn decode_tokenizer(spec: &str, c: &DitConfig) -> Result<Tokenizer> {
    let dir = Path::new(spec);
    let tok = if dir.join(MANIFEST).is_file() {
        Tokenizer::for_manifest(&Manifest::read(dir)?)?
    } else {
        let (name, conv) = spec.split_once(':').unwrap_or((spec, "reference"));
        let (Ok(kind), Some(conv)) = (
            name.parse::<TokenizerKind>(),
            Conventions::from_str(conv, true).ok(),
        ) else {
            return Err(config_err(format!(
                "--decode {spec}: neither a prepared folder (no {MANIFEST} there) nor a \
                 tokenizer (gpt2, bert, gpt2:clean, bert:clean)"
            )));
        };
        Tokenizer::new(kind, conv)?
    };
    if (tok.vocab_size(), tok.mask_index() as usize) != (c.vocab_size, c.mask_index) {
        return Err(config_err(format!(
            "--decode {spec}: the {} tokenizer has V={} mask={}, but the model has V={} mask={}",
            tok.kind().name(),
            tok.vocab_size(),
            tok.mask_index(),
            c.vocab_size,
            c.mask_index
        )));
    }
    Ok(tok)
}

fn config_err(m: String) -> Error {
    Error::Config(m)
}

/// Checks a token id given on the command line or in a template.
fn check_id(what: &str, id: i64, c: &DitConfig) -> Result<u32> {
    if id < 0 || id as u64 >= c.vocab_size as u64 {
        return Err(config_err(format!(
            "{what}: id {id} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    if id as usize == c.mask_index {
        return Err(config_err(format!(
            "{what}: id {id} is the mask token; leave the position out of --prefix or use null \
             in --template"
        )));
    }
    Ok(id as u32)
}

/// `--prefix "1 2 3"` as a template row of length `len`.
pub fn parse_prefix(s: &str, len: usize, c: &DitConfig) -> Result<Vec<Option<u32>>> {
    let mut row = vec![None; len];
    let ids: Vec<&str> = s
        .split(|ch: char| ch.is_whitespace() || ch == ',')
        .filter(|t| !t.is_empty())
        .collect();
    if ids.len() > len {
        return Err(config_err(format!(
            "--prefix has {} ids, more than the sequence length {len}",
            ids.len()
        )));
    }
    for (slot, t) in row.iter_mut().zip(&ids) {
        let id: i64 = t
            .parse()
            .map_err(|_| config_err(format!("--prefix: {t:?} is not an integer token id")))?;
        *slot = Some(check_id("--prefix", id, c)?);
    }
    Ok(row)
}

/// `--template FILE`: a JSON list of rows, each `len` entries of ids or null.
pub fn read_template(path: &Path, len: usize, c: &DitConfig) -> Result<Vec<Vec<Option<u32>>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let what = format!("--template {}", path.display());
    let rows: Vec<Vec<Option<i64>>> = serde_json::from_str(&text).map_err(|e| {
        config_err(format!(
            "{what}: expected a JSON list of rows of token ids or null ({e})"
        ))
    })?;
    if rows.is_empty() {
        return Err(config_err(format!("{what}: has no rows")));
    }
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            if row.len() != len {
                return Err(config_err(format!(
                    "{what}: row {r} has {} entries, expected the sequence length {len} \
                     (set it with --length)",
                    row.len()
                )));
            }
            row.iter()
                .map(|x| match x {
                    None => Ok(None),
                    Some(id) => check_id(&format!("{what} row {r}"), *id, c).map(Some),
                })
                .collect()
        })
        .collect()
}

/// The denoiser and driver a run uses.
enum Engine<'g> {
    Cpu(Box<CpuDenoiser>),
    /// The device-resident driver.
    Gpu(GpuDenoiser<'g>),
    /// The CPU driver on the GPU denoiser (nucleus).
    GpuViaCpu(GpuDenoiser<'g>),
}

impl Engine<'_> {
    fn name(&self) -> &'static str {
        match self {
            Engine::Cpu(_) => "cpu",
            Engine::Gpu(_) => "cuda (fused step kernel)",
            Engine::GpuViaCpu(_) => "cuda denoiser + CPU posterior (nucleus)",
        }
    }

    fn denoiser(&mut self) -> &mut dyn Denoiser {
        match self {
            Engine::Cpu(d) => d.as_mut(),
            Engine::Gpu(d) | Engine::GpuViaCpu(d) => d,
        }
    }

    fn generate(&mut self, cfg: &SamplerConfig, x: &Tokens, seeds: &[i64]) -> Result<SampleOutput> {
        // Every eps is seeded, so this RNG is never drawn from.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        match self {
            Engine::Cpu(d) => generate(d.as_mut(), cfg, x, None, Some(seeds), &mut rng),
            Engine::Gpu(d) => d.generate(cfg, x, None, Some(seeds), &mut rng),
            Engine::GpuViaCpu(d) => generate(d, cfg, x, None, Some(seeds), &mut rng),
        }
    }
}

fn check_flags(a: &SampleArgs) -> Result<()> {
    if a.steps == 0 {
        return Err(config_err("--steps must be at least 1".into()));
    }
    if a.num_samples == 0 || a.batch == 0 {
        return Err(config_err(format!(
            "--num-samples ({}) and --batch ({}) must be at least 1",
            a.num_samples, a.batch
        )));
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        return Err(config_err(format!(
            "--temperature must be positive and finite, got {}",
            a.temperature
        )));
    }
    if !(a.nucleus > 0.0 && a.nucleus <= 1.0) {
        return Err(config_err(format!(
            "--nucleus must be in (0, 1] (1 is off), got {}",
            a.nucleus
        )));
    }
    if a.num_samples as u64 > i64::MAX as u64 - a.seed.min(i64::MAX as u64) {
        return Err(config_err(
            "--seed + --num-samples overflows an i64 eps seed".into(),
        ));
    }
    Ok(())
}

pub fn run(a: SampleArgs) -> Result<()> {
    check_flags(&a)?;
    let mut inputs = vec![("--checkpoint", a.checkpoint.as_path())];
    if let Some(t) = &a.template {
        inputs.push(("--template", t.as_path()));
    }
    check_out("--out", &a.out, a.force, &inputs)?;
    let chosen = a.config.resolve()?;
    let params = checkpoint::load(&a.checkpoint, chosen.as_ref())?;
    let c = params.config.clone();
    let len = a.config.length.unwrap_or(c.length);
    if len == 0 {
        return Err(config_err("--length must be at least 1".into()));
    }
    if len > c.length {
        return Err(config_err(format!(
            "--length {len}: more than the model's length {} (rotary positions beyond it were \
             never trained)",
            c.length
        )));
    }
    if !c.algo.is_subs() {
        return crate::cli::sample_baselines::run(&a, params, len);
    }
    if a.bos.is_some() || a.uncached {
        return Err(config_err(format!(
            "--bos/--uncached: for ar models; --checkpoint {} holds a {} model",
            a.checkpoint.display(),
            c.algo.name()
        )));
    }
    crate::sizes::check(
        &format!(
            "--batch {} x length {len} x V {}: the sampler's probabilities",
            a.batch.min(a.num_samples),
            c.vocab_size
        ),
        &[a.batch.min(a.num_samples), len, c.vocab_size, 3],
        8,
    )?;
    let rows = match (&a.prefix, &a.template) {
        (Some(p), _) => vec![parse_prefix(p, len, &c)?],
        (None, Some(t)) => read_template(t, len, &c)?,
        (None, None) => vec![vec![None; len]],
    };
    let kind = match a.sampler.unwrap_or(match c.algo {
        Algo::Imdm => SamplerChoice::Imdm,
        _ => SamplerChoice::Mdlm,
    }) {
        SamplerChoice::Imdm => SamplerKind::ImdmPosterior,
        SamplerChoice::Mdlm => SamplerKind::MdlmPosterior,
    };
    let base = SamplerConfig {
        kind,
        noise_removal: a.noise_removal,
        fix_eps: a.fix_eps,
        nucleus_p: a.nucleus,
        temperature: a.temperature,
        ..SamplerConfig::new(a.steps)
    };
    base.validate()?;
    let tokenizer = a
        .decode
        .as_deref()
        .map(|d| decode_tokenizer(d, &c))
        .transpose()?;

    let backend = Backend::resolve(a.device.device)?;
    let mut engine = match &backend {
        Backend::Cpu => Engine::Cpu(Box::new(CpuDenoiser::new(params)?)),
        Backend::Cuda(gpu) if base.filter().nucleus_on() => {
            Engine::GpuViaCpu(GpuDenoiser::new(gpu, &params)?)
        }
        Backend::Cuda(gpu) => Engine::Gpu(GpuDenoiser::new(gpu, &params)?),
    };
    let batches = a.num_samples.div_ceil(a.batch);
    crate::noteln!(
        "sampling {} x {len} tokens ({batches} batch(es) of up to {}), {} steps, {} posterior, \
         on {}",
        a.num_samples,
        a.batch,
        a.steps,
        match kind {
            SamplerKind::ImdmPosterior => "imdm",
            SamplerKind::MdlmPosterior => "mdlm",
        },
        engine.name()
    );
    let mask = c.mask_index as u32;
    // One forward of the first batch's starting point: the samplers would turn NaN
    // probabilities into plausible-looking ids, so a model that gives them is refused first.
    {
        let n = a.batch.min(a.num_samples);
        let ids: Vec<u32> = (0..n)
            .flat_map(|k| rows[k % rows.len()].iter().map(|x| x.unwrap_or(mask)))
            .collect();
        let x = Tokens::new(n, len, ids, c.vocab_size)?;
        let seeds: Vec<i64> = (0..n).map(|k| (a.seed + k as u64) as i64).collect();
        let eps = c
            .has_eps_mlp()
            .then(|| seeded_eps(&seeds, len, c.noise_dim, c.noise_type, c.noise_scale as f32));
        let lp = engine.denoiser().log_probs(&x, eps.as_ref())?;
        if let Some(i) = lp
            .data
            .iter()
            .position(|v| v.is_nan() || *v == f32::INFINITY)
        {
            let row = i / c.vocab_size;
            return Err(config_err(format!(
                "--checkpoint {}: the model's probabilities are not finite (sample {}, \
                 position {}: {}); `forward` names the first bad value; {} not written",
                a.checkpoint.display(),
                row / len,
                row % len,
                lp.data[i],
                a.out.display()
            )));
        }
    }
    let t0 = Instant::now();
    let mut lines = String::new();
    // Spec 8.3: conditional samples are scored on their first 100 tokens.
    let scored = if a.prefix.is_some() || a.template.is_some() {
        len.min(100)
    } else {
        len
    };
    let mut entropy_rows = Vec::with_capacity(a.num_samples * scored);
    for j in 0..batches {
        let (k0, k1) = (j * a.batch, ((j + 1) * a.batch).min(a.num_samples));
        let ids: Vec<u32> = (k0..k1)
            .flat_map(|k| rows[k % rows.len()].iter().map(|x| x.unwrap_or(mask)))
            .collect();
        let x = Tokens::new(k1 - k0, len, ids, c.vocab_size)?;
        let seeds: Vec<i64> = (k0..k1).map(|k| (a.seed + k as u64) as i64).collect();
        let cfg = SamplerConfig {
            seed: batch_stream_seed(a.seed, j),
            ..base.clone()
        };
        let out = engine.generate(&cfg, &x, &seeds)?;
        for (r, k) in (k0..k1).enumerate() {
            let tokens = &out.tokens.ids[r * len..(r + 1) * len];
            if let Some(p) = tokens.iter().position(|&t| t == mask) {
                return Err(config_err(format!(
                    "--checkpoint {}: sample {k} still holds the mask id at position {p} after \
                     the last step, so the model's probabilities are not usable (NaN or \
                     infinite; `forward` names the first bad value); {} not written",
                    a.checkpoint.display(),
                    a.out.display()
                )));
            }
            entropy_rows.extend_from_slice(&tokens[..scored]);
            let line = Line {
                id: k,
                tokens,
                nfe: out.nfe,
                seed: seeds[r],
                text: tokenizer
                    .as_ref()
                    .map(|t| t.decode(tokens, false))
                    .transpose()?,
            };
            lines.push_str(&serde_json::to_string(&line).expect("plain data"));
            lines.push('\n');
        }
        let secs = t0.elapsed().as_secs_f64();
        let eta = secs / k1 as f64 * (a.num_samples - k1) as f64;
        crate::noteln!(
            "batch {}/{batches}: {} samples, nfe {}, resets {}; {k1} done, {:.2} samples/s, \
             ETA {eta:.1}s",
            j + 1,
            k1 - k0,
            out.nfe,
            out.resets,
            k1 as f64 / secs.max(1e-9)
        );
    }
    write_text_atomic(&a.out, &lines)?;
    let entropy = mean_unigram_entropy(&Tokens {
        batch: a.num_samples,
        len: scored,
        ids: entropy_rows,
    });
    crate::sayln!(
        "wrote {} ({} samples of {len} tokens, {} steps{}) in {:.1}s; mean unigram entropy \
         {entropy:.4} nats{}",
        a.out.display(),
        a.num_samples,
        a.steps,
        tokenizer.as_ref().map_or(String::new(), |t| format!(
            ", decoded with {}",
            t.kind().name()
        )),
        t0.elapsed().as_secs_f64(),
        if scored < len {
            " (first 100 tokens)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Writes `text` to `path` atomically (see [`crate::outputs`]).
fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    crate::outputs::write_bytes(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_template_parsing() {
        let c = DitConfig::minimini(); // V = 50001, mask 50000
        assert_eq!(
            parse_prefix(" 1, 2 3 ", 5, &c).unwrap(),
            vec![Some(1), Some(2), Some(3), None, None]
        );
        for (bad, want) in [
            ("1 2 3 4 5 6", "more than the sequence length"),
            ("1 x", "\"x\" is not an integer"),
            ("50001", "outside the vocabulary"),
            ("-1", "outside the vocabulary"),
            ("50000", "mask token"),
        ] {
            let e = parse_prefix(bad, 5, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        std::fs::write(&p, "[[1, null, 3], [null, null, 7]]").unwrap();
        assert_eq!(
            read_template(&p, 3, &c).unwrap(),
            vec![vec![Some(1), None, Some(3)], vec![None, None, Some(7)]]
        );
        for (text, want) in [
            ("[[1, null]]", "row 0 has 2 entries"),
            ("[]", "no rows"),
            ("{\"a\": 1}", "expected a JSON list"),
            ("[[1, 2, 99999]]", "outside the vocabulary"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_template(&p, 3, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn batch_stream_seeds_differ() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..20 {
            for j in 0..20 {
                assert!(seen.insert(batch_stream_seed(seed, j)), "{seed} {j}");
            }
        }
    }
}
