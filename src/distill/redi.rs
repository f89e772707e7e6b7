//! IM-ReDi coupling generation (spec 6.2) and few-step evaluation of a generator.
//!
//! Datagen: for clean rows x0, draw t per row (`perturbed`: t ~ U(0, 1], else t = 1), mask each
//! token with probability 1 − α(t), draw a seed per row, and let the source model complete x_T
//! with the sampler started from the seeded ε of that seed. The pair ((x_T, seed), x0_gen) is
//! what the student learns to reproduce in one step.
//!
//! Deliberate deviations from the reference, each so the coupling is a function of what the
//! student sees:
//! - Masking uses the training schedule α(t) = 1 − 0.999t (the reference masks with α = 1 − t,
//!   quirk 9), so the stored t means the same thing in datagen and in IM-ReDi training.
//! - Reset redraws come from the sampler's seeded stream (quirk 8 fixed in `diffusion::sampler`),
//!   and `fix_eps` is offered: with it, x0_gen depends on ε(seed) alone, never on a redraw the
//!   student cannot see.
//! - Seeds are drawn from [0, 2^31) and evaluation uses seeds from a disjoint range
//!   ([`EVAL_SEED_BASE`] up), so a memorised (ε, sequence) pair can never make a model look
//!   coherent at evaluation.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::diffusion::metrics::{
    conditional_total_correlation, distinct_sequences, exact_match_rate,
};
use crate::diffusion::schedule::alpha;
use crate::diffusion::{generate, Denoiser, SamplerConfig, SamplerKind};
use crate::distill::Couplings;
use crate::error::{Error, Result};
use crate::model::Algo;
use crate::tensor::Tokens;

/// Evaluation seeds start here; coupling seeds stay below 2^31.
pub const EVAL_SEED_BASE: i64 = 1 << 40;

/// How couplings are generated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatagenConfig {
    /// Sampler steps of the source model (the reference uses 1024).
    pub steps: usize,
    /// t ~ U(0, 1] per row (`reflow.perturbed_rect`); else every x_T is all-mask (t = 1).
    pub perturbed: bool,
    /// Keep ε through resets (see the module doc).
    pub fix_eps: bool,
    /// Sampler temperature of the source (1 = the reference).
    pub temperature: f64,
    /// Nucleus mass of the source's token distribution (≥ 1 = off, the reference). A tiny
    /// value keeps only the top token: the unmask times stay random, the token chosen is
    /// p_θ's argmax, so x0_gen becomes (nearly) a function of ε.
    pub top_p: f64,
    /// Rows per sampler call.
    pub batch: usize,
    pub seed: u64,
}

/// The sampler a model of `algo` uses: the IMDM posterior, or MDLM's for MDLM models (the
/// reference's `as_mdlm` + `mdlm_posterior`).
pub fn sampler_for(algo: Algo, steps: usize) -> SamplerConfig {
    let mut s = SamplerConfig::new(steps);
    s.kind = match algo {
        Algo::Imdm => SamplerKind::ImdmPosterior,
        Algo::Mdlm => SamplerKind::MdlmPosterior,
    };
    s
}

/// Couplings from `source` for the clean rows `x0` (spec 6.2).
pub fn generate_couplings<D: Denoiser + ?Sized>(
    source: &mut D,
    x0: &Tokens,
    cfg: &DatagenConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Couplings> {
    if cfg.batch == 0 || cfg.steps == 0 {
        return Err(Error::Config(
            "datagen: batch and steps must be positive".into(),
        ));
    }
    let model = source.config().clone();
    let (l, mask) = (x0.len, model.mask_index as u32);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut out: Option<Couplings> = None;
    let mut done = 0;
    for (call, lo) in (0..x0.batch).step_by(cfg.batch).enumerate() {
        let hi = (lo + cfg.batch).min(x0.batch);
        let n = hi - lo;
        let mut xt = Tokens {
            batch: n,
            len: l,
            ids: x0.ids[lo * l..hi * l].to_vec(),
        };
        let mut ts = Vec::with_capacity(n);
        for row in xt.ids.chunks_mut(l) {
            // U(0, 1]: t = 0 would leave nothing to generate and a zero NELBO weight.
            let t = if cfg.perturbed {
                1.0 - rng.random::<f64>()
            } else {
                1.0
            };
            let p = 1.0 - alpha(t);
            for id in row.iter_mut() {
                if rng.random::<f64>() < p {
                    *id = mask;
                }
            }
            ts.push(t);
        }
        let seeds: Vec<i64> = (0..n).map(|_| rng.random_range(0..1i64 << 31)).collect();
        let mut s = sampler_for(model.algo, cfg.steps);
        s.fix_eps = cfg.fix_eps;
        s.temperature = cfg.temperature;
        s.nucleus_p = cfg.top_p;
        s.seed = cfg.seed ^ (call as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let gen = generate(source, &s, &xt, Some(&ts), Some(&seeds), &mut rng)?;
        let part = Couplings {
            xt,
            x0: gen.tokens,
            t: ts.iter().map(|&t| t as f32).collect(),
            seeds,
        };
        match &mut out {
            None => out = Some(part),
            Some(o) => o.extend(&part)?,
        }
        done += n;
        progress(done, x0.batch);
    }
    out.ok_or_else(|| Error::Config("datagen: no rows to generate from".into()))
}

/// Few-step quality of a generator at one step count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Fraction of samples whose L tokens are all equal (the synthetic task's target).
    pub exact_match: f64,
    /// Distinct sequences among the samples (a collapsed generator has few).
    pub distinct: usize,
    pub samples: usize,
    /// Conditional total correlation given ε, bits (spec 5.9; 0 = factorised given ε).
    pub tc: f64,
    /// Mean denoiser calls per sample batch.
    pub nfe: f64,
}

/// What to measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalConfig {
    pub samples: usize,
    /// Noise groups of the total-correlation estimate, each sampled `tc_dup` times.
    pub tc_groups: usize,
    pub tc_dup: usize,
    pub batch: usize,
    pub seed: u64,
}

/// Samples `den` from all-mask with fresh seeded ε (seeds from [`EVAL_SEED_BASE`]) at `steps`
/// steps: exact-match rate and distinct count over `samples` rows, and the conditional total
/// correlation over `tc_groups` ε draws repeated `tc_dup` times each.
pub fn evaluate<D: Denoiser + ?Sized>(
    den: &mut D,
    steps: usize,
    cfg: &EvalConfig,
) -> Result<StepMetrics> {
    let model = den.config().clone();
    let (l, mask) = (model.length, model.mask_index as u32);
    let base = EVAL_SEED_BASE + (cfg.seed as i64 & 0xFFFF_FFFF) * (1 << 24);
    let mut sample = |seeds: &[i64], call: u64| -> Result<(Tokens, usize)> {
        let mut toks = Tokens {
            batch: 0,
            len: l,
            ids: vec![],
        };
        let mut nfe = 0;
        for (k, chunk) in seeds.chunks(cfg.batch.max(1)).enumerate() {
            let xt = Tokens {
                batch: chunk.len(),
                len: l,
                ids: vec![mask; chunk.len() * l],
            };
            let mut s = sampler_for(model.algo, steps);
            s.seed = cfg.seed ^ ((call << 32) + k as u64 + 1).wrapping_mul(0xD134_2543_DE82_EF95);
            let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
            let out = generate(den, &s, &xt, None, Some(chunk), &mut rng)?;
            toks.ids.extend_from_slice(&out.tokens.ids);
            toks.batch += chunk.len();
            nfe += out.nfe;
        }
        Ok((toks, nfe))
    };
    let seeds: Vec<i64> = (0..cfg.samples as i64).map(|i| base + i).collect();
    let (toks, nfe) = sample(&seeds, 1)?;
    let calls = cfg.samples.div_ceil(cfg.batch.max(1)).max(1);
    let groups: Vec<i64> = (0..cfg.tc_groups as i64)
        .flat_map(|g| std::iter::repeat_n(base + cfg.samples as i64 + g, cfg.tc_dup))
        .collect();
    let tc = if groups.is_empty() {
        0.0
    } else {
        let (gt, _) = sample(&groups, 2)?;
        conditional_total_correlation(&gt, &groups)?.tc_bits
    };
    Ok(StepMetrics {
        exact_match: exact_match_rate(&toks, mask),
        distinct: distinct_sequences(&toks),
        samples: cfg.samples,
        tc,
        nfe: nfe as f64 / calls as f64,
    })
}
