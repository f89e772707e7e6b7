//! `imdm-engine sample` for the baselines (CPU only): AR from BOS with the KV-cached decoder
//! (`--uncached`: the reference's sampler, same tokens), SEDD with the analytic sampler and
//! D3PM with the ancestral sampler, both from the all-mask start over `--steps` steps. The
//! output has the JSONL form of MDLM/IMDM samples (`id`, `tokens`, `nfe`, `seed`, `text`).
//! Batch j draws from the sampler stream keyed by `splitmix64(splitmix64(--seed) ^ j)`.

use std::time::Instant;

use crate::cli::sample::{decode_tokenizer, SampleArgs};
use crate::cuda::DeviceChoice;
use crate::diffusion::logits_model::CpuLogits;
use crate::diffusion::metrics::mean_unigram_entropy;
use crate::diffusion::stream::batch_stream_seed;
use crate::diffusion::{ar, d3pm, sedd, NoiseRemoval};
use crate::error::{Error, Result};
use crate::model::{Algo, DitParams};
use crate::tensor::Tokens;

/// Refuses the MDLM/IMDM sampler flags, which the baselines' samplers do not have.
fn check_flags(a: &SampleArgs, algo: Algo) -> Result<()> {
    let what = |flag: &str| {
        Err(Error::Config(format!(
            "{flag}: --checkpoint {} holds a {} model, whose sampler has no such option \
             (the MDLM/IMDM samplers do)",
            a.checkpoint.display(),
            algo.name()
        )))
    };
    if a.prefix.is_some() || a.template.is_some() {
        return what("--prefix/--template");
    }
    if a.sampler.is_some() {
        return what("--sampler");
    }
    if a.fix_eps {
        return what("--fix-eps");
    }
    if a.temperature != 1.0 || a.nucleus != 1.0 {
        return what("--temperature/--nucleus");
    }
    if a.noise_removal != NoiseRemoval::Ancestral {
        return what("--noise-removal");
    }
    if a.device.device == DeviceChoice::Cuda {
        return Err(Error::Config(format!(
            "--device cuda: the {} sampler runs on the CPU only (--device cpu)",
            algo.name()
        )));
    }
    if algo != Algo::Ar && (a.bos.is_some() || a.uncached) {
        return what("--bos/--uncached");
    }
    Ok(())
}

/// Samples `a.num_samples` sequences of `len` tokens from the baseline `params` into `a.out`.
pub fn run(a: &SampleArgs, params: DitParams, len: usize) -> Result<()> {
    let c = params.config.clone();
    check_flags(a, c.algo)?;
    let bos = match (c.algo, a.bos) {
        (Algo::Ar, None) => {
            return Err(Error::Config(format!(
                "--bos: --checkpoint {} is an ar model, which starts every sample with a BOS \
                 token; give its id (GPT-2 text: 50256)",
                a.checkpoint.display()
            )))
        }
        (_, b) => b.unwrap_or(0),
    };
    let tokenizer = a
        .decode
        .as_deref()
        .map(|d| decode_tokenizer(d, &c))
        .transpose()?;
    let batches = a.num_samples.div_ceil(a.batch);
    let nfe = if c.algo == Algo::Ar { len - 1 } else { a.steps };
    crate::noteln!(
        "sampling {} x {len} tokens ({batches} batch(es) of up to {}) from a {} model{}, on cpu",
        a.num_samples,
        a.batch,
        c.algo.name(),
        match c.algo {
            Algo::Ar if a.uncached => " (reference sampler, no cache; --steps unused)".into(),
            Algo::Ar => " (KV cache; --steps unused)".to_string(),
            _ => format!(", {} steps", a.steps),
        }
    );
    let t0 = Instant::now();
    let mut model = CpuLogits {
        params: params.clone(),
    };
    let (mut lines, mut all) = (String::new(), Vec::with_capacity(a.num_samples * len));
    for j in 0..batches {
        let (k0, k1) = (j * a.batch, ((j + 1) * a.batch).min(a.num_samples));
        let seed = batch_stream_seed(a.seed, j);
        let n = k1 - k0;
        let out = match c.algo {
            Algo::Ar if a.uncached => ar::sample_uncached::<f32>(&params, n, len, bos, seed)?,
            Algo::Ar => ar::sample_cached::<f32>(&params, n, len, bos, seed)?,
            Algo::Sedd => sedd::sample(&mut model, a.steps, n, len, seed)?,
            Algo::D3pm => d3pm::sample(&mut model, a.steps, n, len, seed, false)?,
            Algo::Mdlm | Algo::Imdm => unreachable!("the MDLM/IMDM path samples these"),
        };
        for (r, k) in (k0..k1).enumerate() {
            let tokens = &out.ids[r * len..(r + 1) * len];
            if let Some(p) = tokens.iter().position(|&t| t as usize == c.mask_index) {
                return Err(Error::Config(format!(
                    "--checkpoint {}: sample {k} still holds the mask id at position {p} after \
                     the last step (the model's scores are not usable); {} not written",
                    a.checkpoint.display(),
                    a.out.display()
                )));
            }
            all.extend_from_slice(tokens);
            let mut line = serde_json::json!({
                "id": k, "tokens": tokens, "nfe": nfe, "seed": (a.seed + k as u64) as i64,
            });
            if let Some(t) = &tokenizer {
                line["text"] = t.decode(tokens, false)?.into();
            }
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        crate::noteln!("batch {}/{batches}: {n} samples; {k1} done", j + 1);
    }
    crate::outputs::write_bytes(&a.out, lines.as_bytes())?;
    let entropy = mean_unigram_entropy(&Tokens {
        batch: a.num_samples,
        len,
        ids: all,
    });
    crate::sayln!(
        "wrote {} ({} samples of {len} tokens from a {} model) in {:.1}s; mean unigram entropy \
         {entropy:.4} nats",
        a.out.display(),
        a.num_samples,
        c.algo.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
