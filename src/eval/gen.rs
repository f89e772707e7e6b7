//! Generative evaluation (spec 8.2-8.4, 5.9): sample texts from a model (unconditionally or
//! from held-out prefixes), or take them from a sample file or from held-out data, and score
//! them under a [`Judge`]: Gen PPL ([`super::gen_ppl`]), unigram entropy over the model's own
//! ids (spec 8.3), conditional total correlation from duplicated sampling (spec 5.9) and MAUVE
//! against held-out references ([`super::mauve`]).
//!
//! Sampling follows spec 8.2: the sampler driver with `ancestral_cache`, ancestral noise
//! removal, T = 1, no nucleus, float64 draws. Seeds follow the `sample` subcommand, so the same
//! `--seed` and `--batch` give the same samples: sample k starts from the seeded eps of
//! `seed + k` (spec 5.8) and batch j draws from the stream keyed by
//! [`batch_stream_seed`]`(seed, j)`. Unlike the reference, whose eps is unseeded in these
//! runs, every draw is seeded. With duplication k, batch j holds B/k distinct eps seeds, each
//! repeated k times (rows tiled as the reference's `record_tc` ids), and the duplicates differ
//! by their categorical draws only.
//!
//! Conditional generation (spec 5.6, 8.4): each call takes `batch` held-out prefixes, repeats
//! them `continuations` times in blocks, fixes their first `prefix_len` tokens, samples the
//! rest and keeps the first `keep` tokens. Gen PPL and entropy are measured on those texts
//! (with the model's length as max_length, as the reference), MAUVE against the true first
//! `keep` tokens of the same held-out sequences.
//!
//! Held-out rows are picked by a seeded permutation of the split (ChaCha8 keyed by the seed;
//! the reference uses numpy's permutation after seeding 42, so the rows differ from its rows).

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::{ShardSet, Tokenizer};
use crate::diffusion::metrics::{conditional_total_correlation, unigram_entropy};
use crate::diffusion::stream::batch_stream_seed;
use crate::diffusion::{NoiseRemoval, SampleOutput, SamplerConfig, SamplerKind};
use crate::error::{Error, Result};
use crate::eval::gen_ppl::{judge_ids, GenPplAccumulator, GenPplConfig};
use crate::eval::lm::Judge;
use crate::eval::mauve::{mean_mauve, MauveConfig};
use crate::model::DitConfig;
use crate::tensor::Tokens;

/// Texts to score, with what the metrics other than Gen PPL need.
#[derive(Clone, Debug, Default)]
pub struct Texts {
    pub texts: Vec<String>,
    /// The model's own ids of every text (entropy, spec 8.3).
    pub ids: Vec<Vec<u32>>,
    /// Rows of each sampling batch: one Gen PPL call each (padding and the drop rule apply
    /// per call).
    pub calls: Vec<Range<usize>>,
    /// Eps seed of every row, when rows were sampled with duplication (TC).
    pub noise_ids: Option<Vec<i64>>,
    /// Mean denoiser calls per sample.
    pub nfe: Option<f64>,
    /// Wall time of the sampling.
    pub sample_seconds: Option<f64>,
}

/// One row of the report: the fields of `--json` per step count, the same for every source.
#[derive(Clone, Debug, Serialize)]
pub struct GenRow {
    /// "checkpoint", "samples" or "text".
    pub source: String,
    /// The checkpoint, file or data folder.
    pub label: String,
    pub steps: Option<usize>,
    pub nfe: Option<f64>,
    pub gen_ppl: f64,
    /// Mean unigram entropy, nats.
    pub entropy: f64,
    /// Conditional total correlation, bits (with duplication).
    pub tc: Option<f64>,
    pub mauve: Option<f64>,
    /// Texts in the row, and those the Gen PPL batches scored.
    pub samples: usize,
    pub scored: usize,
    /// Judge tokens in the Gen PPL pool.
    pub judge_tokens: u64,
    pub samples_per_s: Option<f64>,
    pub sample_seconds: Option<f64>,
    pub score_seconds: f64,
}

/// The held-out side of MAUVE: the references' features and how to featurise the others.
pub struct MauveReference {
    pub features: Vec<Vec<f32>>,
    /// Judge tokens kept per text (mauve-text's `max_text_length`; 100 in the reference).
    pub max_text_length: usize,
    pub config: MauveConfig,
    /// k-means seeds (the reference: 42..46); the mean over them is reported.
    pub seeds: Vec<u64>,
}

/// Judge features (final hidden state at the last token) of `texts`, each truncated to
/// `max_len` judge tokens; texts that encode to nothing are left out, as mauve-text drops
/// empty strings.
pub fn mauve_features(
    judge: &dyn Judge,
    texts: &[String],
    max_len: usize,
) -> Result<Vec<Vec<f32>>> {
    let seqs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| judge_ids(judge, t, max_len.min(judge.context_len())))
        .filter(|r| !r.as_ref().is_ok_and(Vec::is_empty))
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(8) {
        out.extend(judge.final_hidden(chunk)?);
    }
    Ok(out)
}

/// Scores `t` under `judge`: Gen PPL per call, entropy over the model ids, TC when rows carry
/// noise ids, MAUVE against `reference` when given.
pub fn score(
    judge: &dyn Judge,
    t: &Texts,
    ppl: &GenPplConfig,
    reference: Option<&MauveReference>,
) -> Result<GenRow> {
    let t0 = Instant::now();
    let mut acc = GenPplAccumulator::default();
    for call in &t.calls {
        acc.record(judge, &t.texts[call.clone()], ppl)?;
    }
    let n = t.ids.len();
    let entropy = if n == 0 {
        0.0
    } else {
        t.ids.iter().map(|r| unigram_entropy(r)).sum::<f64>() / n as f64
    };
    let tc = match &t.noise_ids {
        Some(ids) => {
            let len = t.ids.first().map_or(0, Vec::len);
            if t.ids.iter().any(|r| r.len() != len) {
                return Err(Error::Shape("TC: rows of unequal length".into()));
            }
            let toks = Tokens {
                batch: n,
                len,
                ids: t.ids.concat(),
            };
            Some(conditional_total_correlation(&toks, ids)?.tc_bits)
        }
        None => None,
    };
    let mauve = match reference {
        Some(r) => {
            let q = mauve_features(judge, &t.texts, r.max_text_length)?;
            Some(mean_mauve(&r.features, &q, &r.config, &r.seeds)?.0)
        }
        None => None,
    };
    Ok(GenRow {
        source: String::new(),
        label: String::new(),
        steps: None,
        nfe: t.nfe,
        gen_ppl: acc.gen_ppl(),
        entropy,
        tc,
        mauve,
        samples: t.texts.len(),
        scored: acc.scored,
        judge_tokens: acc.tokens,
        samples_per_s: t.sample_seconds.map(|s| t.texts.len() as f64 / s.max(1e-9)),
        sample_seconds: t.sample_seconds,
        score_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Draws one batch: (sampler settings, x_t with masks where to generate, eps seed per row).
pub type SampleFn<'a> = dyn FnMut(&SamplerConfig, &Tokens, &[i64]) -> Result<SampleOutput> + 'a;

/// What to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplePlan {
    pub steps: usize,
    /// Unconditional: samples; conditional: prefixes.
    pub num_samples: usize,
    /// Unconditional: rows per batch; conditional: prefixes per batch.
    pub batch: usize,
    pub seed: u64,
    /// Copies of each eps seed per batch (1: no duplication).
    pub duplicate: usize,
    pub kind: SamplerKind,
}

impl SamplePlan {
    fn sampler(&self, j: usize) -> SamplerConfig {
        SamplerConfig {
            kind: self.kind,
            noise_removal: NoiseRemoval::Ancestral,
            seed: batch_stream_seed(self.seed, j),
            ..SamplerConfig::new(self.steps)
        }
    }

    /// Checks the counts (shared by the CLI before any work).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.steps == 0 || self.num_samples == 0 || self.batch == 0 || self.duplicate == 0 {
            return bad(format!(
                "--steps ({}), --num-samples ({}), --batch ({}) and --duplicate ({}) must be \
                 at least 1",
                self.steps, self.num_samples, self.batch, self.duplicate
            ));
        }
        if self.duplicate > 1
            && (self.batch % self.duplicate != 0 || self.num_samples % self.duplicate != 0)
        {
            return bad(format!(
                "--duplicate {} must divide --batch ({}) and --num-samples ({})",
                self.duplicate, self.batch, self.num_samples
            ));
        }
        Ok(())
    }
}

/// Progress callback: (done, total) after each batch.
pub type Progress<'a> = dyn FnMut(usize, usize) + 'a;

/// Unconditional samples of `model`, decoded with `tok` (special tokens kept, spec 8.2).
pub fn sample_unconditional(
    sample: &mut SampleFn,
    model: &DitConfig,
    tok: &Tokenizer,
    plan: &SamplePlan,
    progress: &mut Progress,
) -> Result<Texts> {
    plan.validate()?;
    let (len, mask) = (model.length, model.mask_index as u32);
    let t0 = Instant::now();
    let mut out = Texts::default();
    let mut noise = Vec::new();
    let (mut distinct, mut nfe_sum) = (0u64, 0usize);
    let batches = plan.num_samples.div_ceil(plan.batch);
    for j in 0..batches {
        let b = plan.batch.min(plan.num_samples - j * plan.batch);
        let d = b / plan.duplicate;
        let seeds: Vec<i64> = (0..b)
            .map(|r| (plan.seed + distinct + (r % d) as u64) as i64)
            .collect();
        distinct += d as u64;
        let x = Tokens::new(b, len, vec![mask; b * len], model.vocab_size)?;
        let s = sample(&plan.sampler(j), &x, &seeds)?;
        nfe_sum += s.nfe * b;
        let start = out.texts.len();
        for row in s.tokens.ids.chunks(len) {
            out.texts.push(tok.decode(row, false)?);
            out.ids.push(row.to_vec());
        }
        out.calls.push(start..out.texts.len());
        noise.extend(seeds);
        progress(out.texts.len(), plan.num_samples);
    }
    out.nfe = Some(nfe_sum as f64 / plan.num_samples as f64);
    out.sample_seconds = Some(t0.elapsed().as_secs_f64());
    out.noise_ids = (plan.duplicate > 1).then_some(noise);
    Ok(out)
}

/// Conditional generation from held-out prefixes (spec 5.6, 8.4).
#[derive(Clone, Debug)]
pub struct CondPlan {
    /// Held-out rows of the model's length; their first `prefix_len` tokens are kept.
    pub prefixes: Vec<Vec<u32>>,
    pub prefix_len: usize,
    /// Samples per prefix (5 in the reference).
    pub continuations: usize,
    /// Tokens kept of every sample (prefix included; 100 in the reference).
    pub keep: usize,
}

impl CondPlan {
    /// Checks the lengths against the model's (shared by the CLI before any work).
    pub fn validate(&self, model: &DitConfig) -> Result<()> {
        if self.continuations == 0 || self.prefix_len == 0 || self.keep <= self.prefix_len {
            return Err(Error::Config(format!(
                "--continuations ({}) and --prefix-len ({}) must be at least 1 and --keep ({}) \
                 larger than --prefix-len",
                self.continuations, self.prefix_len, self.keep
            )));
        }
        if self.keep > model.length {
            return Err(Error::Config(format!(
                "--keep {} exceeds the model's length {}",
                self.keep, model.length
            )));
        }
        if let Some(r) = self.prefixes.iter().find(|r| r.len() != model.length) {
            return Err(Error::Config(format!(
                "conditional generation: a held-out row of {} tokens for a model of length {}",
                r.len(),
                model.length
            )));
        }
        Ok(())
    }
}

/// Samples `cond.continuations` continuations of every prefix (the plan's `num_samples` and
/// `batch` count prefixes) and keeps the first `cond.keep` tokens.
pub fn sample_conditional(
    sample: &mut SampleFn,
    model: &DitConfig,
    tok: &Tokenizer,
    plan: &SamplePlan,
    cond: &CondPlan,
    progress: &mut Progress,
) -> Result<Texts> {
    plan.validate()?;
    cond.validate(model)?;
    let (len, mask) = (model.length, model.mask_index as u32);
    let n = plan.num_samples.min(cond.prefixes.len());
    let t0 = Instant::now();
    let mut out = Texts::default();
    let mut nfe_sum = 0usize;
    let mut row_seed = plan.seed;
    let batches = n.div_ceil(plan.batch);
    for j in 0..batches {
        let group = &cond.prefixes[j * plan.batch..((j + 1) * plan.batch).min(n)];
        let b = group.len() * cond.continuations;
        let mut ids = Vec::with_capacity(b * len);
        for r in 0..b {
            let p = &group[r % group.len()];
            ids.extend_from_slice(&p[..cond.prefix_len]);
            ids.extend(std::iter::repeat_n(mask, len - cond.prefix_len));
        }
        let x = Tokens::new(b, len, ids, model.vocab_size)?;
        let seeds: Vec<i64> = (0..b as u64).map(|r| (row_seed + r) as i64).collect();
        row_seed += b as u64;
        let s = sample(&plan.sampler(j), &x, &seeds)?;
        nfe_sum += s.nfe * b;
        let start = out.texts.len();
        for row in s.tokens.ids.chunks(len) {
            let kept = &row[..cond.keep];
            out.texts.push(tok.decode(kept, false)?);
            out.ids.push(kept.to_vec());
        }
        out.calls.push(start..out.texts.len());
        progress(out.texts.len(), n * cond.continuations);
    }
    out.nfe = Some(nfe_sum as f64 / out.texts.len().max(1) as f64);
    out.sample_seconds = Some(t0.elapsed().as_secs_f64());
    Ok(out)
}

/// `n` rows of a held-out split in a seeded random order (fewer when the split is smaller).
pub fn heldout_rows(set: &ShardSet, n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut order: Vec<u64> = (0..set.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order.iter().take(n).map(|&i| set.get(i)).collect()
}

/// Held-out rows as texts (the data's own row of the report): each row cut to `keep` tokens
/// when given, decoded with special tokens kept, in calls of `call` rows.
pub fn text_rows(
    tok: &Tokenizer,
    rows: &[Vec<u32>],
    keep: Option<usize>,
    call: usize,
) -> Result<Texts> {
    let mut out = Texts::default();
    for r in rows {
        let kept = &r[..keep.unwrap_or(r.len()).min(r.len())];
        out.texts.push(tok.decode(kept, false)?);
        out.ids.push(kept.to_vec());
    }
    out.calls = calls_of(out.texts.len(), call);
    Ok(out)
}

fn calls_of(n: usize, call: usize) -> Vec<Range<usize>> {
    (0..n.div_ceil(call.max(1)))
        .map(|j| j * call..((j + 1) * call).min(n))
        .collect()
}

#[derive(serde::Deserialize)]
struct SampleLine {
    tokens: Vec<u32>,
    #[serde(default)]
    nfe: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    text: Option<String>,
}

/// Reads a `sample` output (JSONL: `tokens`, `nfe`, `seed`, optional `text`) in calls of
/// `call` lines. Texts come from the `text` field, or from decoding `tokens` with `tok`
/// (special tokens kept). Returns the texts and the longest row (the model's length). Rows
/// whose eps seed repeats are scored for TC.
pub fn read_samples(path: &Path, tok: Option<&Tokenizer>, call: usize) -> Result<(Texts, usize)> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::Data {
        path: path.to_path_buf(),
        msg: m,
    };
    let mut out = Texts::default();
    let (mut seeds, mut nfe) = (Vec::new(), Vec::new());
    for (i, line) in s.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let l: SampleLine = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "line {}: expected a `sample` object with \"tokens\" ({e})",
                i + 1
            ))
        })?;
        let text = match (l.text, tok) {
            (Some(t), _) => t,
            (None, Some(tok)) => tok.decode(&l.tokens, false)?,
            (None, None) => {
                return Err(bad(format!(
                    "line {} has no \"text\": pass --decode (a prepared folder, gpt2 or bert) \
                     to decode its tokens",
                    i + 1
                )))
            }
        };
        out.texts.push(text);
        out.ids.push(l.tokens);
        seeds.extend(l.seed);
        nfe.extend(l.nfe);
    }
    if out.texts.is_empty() {
        return Err(bad("holds no samples".into()));
    }
    let n = out.texts.len();
    out.calls = calls_of(n, call);
    if nfe.len() == n {
        out.nfe = Some(nfe.iter().sum::<f64>() / n as f64);
    }
    if seeds.len() == n {
        let distinct: std::collections::HashSet<_> = seeds.iter().collect();
        if distinct.len() < n {
            out.noise_ids = Some(seeds);
        }
    }
    let len = out.ids.iter().map(Vec::len).max().unwrap_or(0);
    Ok((out, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::toy::BigramJudge;

    #[test]
    fn calls_cover_every_row_once() {
        assert_eq!(calls_of(5, 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(calls_of(0, 2), Vec::<Range<usize>>::new());
    }

    #[test]
    fn score_pools_calls_and_averages_entropy() {
        let j = BigramJudge::new(1, 256);
        let t = Texts {
            texts: vec!["hello".into(), "world".into(), "abc".into()],
            ids: vec![vec![1, 1, 2, 2], vec![3, 3, 3, 3], vec![1, 2, 3, 4]],
            calls: vec![0..2, 2..3],
            noise_ids: Some(vec![7, 7, 8]),
            nfe: Some(4.0),
            sample_seconds: Some(2.0),
        };
        let cfg = GenPplConfig {
            max_length: 64,
            judge_batch: 2,
            keep_remainder: false,
        };
        let row = score(&j, &t, &cfg, None).unwrap();
        let mut acc = GenPplAccumulator::default();
        acc.record(&j, &t.texts[..2], &cfg).unwrap();
        acc.record(&j, &t.texts[2..], &cfg).unwrap();
        assert_eq!(row.gen_ppl, acc.gen_ppl());
        assert_eq!(row.scored, 3); // a call of one row is one batch of one (min(8, n))
        let want = (2f64.ln() + 0.0 + 4f64.ln()) / 3.0;
        assert!((row.entropy - want).abs() < 1e-12);
        // Group 7: rows [1,1,2,2] and [3,3,3,3]: each position has 2 values (1 bit each), the
        // rows are 2 distinct joint values (1 bit): TC = 4 - 1 = 3; group 8 alone: 0.
        assert_eq!(row.tc, Some(1.5));
        assert_eq!(row.samples_per_s, Some(1.5));
    }
}
