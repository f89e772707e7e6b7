//! The sampler driver of spec 5.1 (`IMDM.generate_samples` with `ancestral_cache`), on top of
//! the per-position maths of [`super::posterior`] and any [`Denoiser`].
//!
//! One call samples a batch. Positions holding the mask in `x_t` are generated; all others are
//! kept (prefix and infill templates, IM-ReDi's partially masked xT). Per step i of N:
//! - times `t = linspace(1, ε, N+1)[i]·given_t` and `s = t − dt` with
//!   `dt = (given_t + ε)/N` (quirk 2, reproduced on purpose);
//! - the denoiser runs only when no cached output exists; the cache is dropped after any step
//!   that changed x (an unmask, or a reset, which writes index V in the reference and therefore
//!   always counts as a change). NFE = number of denoiser calls;
//! - the last step is the noise-removal step: α_s = 1 (ancestral) or the argmax of p_θ
//!   (greedy), using the cached output when there is one;
//! - `_post_process_update`: a reset position goes back to the mask and is flagged so that its
//!   eps is redrawn before the next forward; with `fix_eps` no position is flagged (the reset
//!   category keeps its mass but acts as "stay masked, same eps").
//!
//! Eps: seeded rows use the reference's counter hash (`rng::seeded_eps`, spec 5.8), otherwise
//! the caller's RNG; models without the eps MLP get `None` and ignore seeds.
//!
//! Deliberate deviations from the reference (the quirks of spec 12; all deviations: spec 14):
//! - **Quirk 8 fixed**: reset redraws come from the sampler's own counter-based stream keyed by
//!   `SamplerConfig::seed` ([`SamplerStream`], purpose `ResetEps`), not from the unseeded
//!   framework RNG. A run is therefore a function of (x_t, given_t, initial eps, seed), so
//!   IM-ReDi couplings are reproducible. Use a different `seed` for every batch: two calls with
//!   equal inputs and seed return equal samples.
//! - The categorical draws also come from that stream (purpose `Race`), so a GPU kernel can
//!   reproduce them; the reference uses `torch.rand_like`.
//! - Times and α are f64 (the reference's `linspace`, `given_t`, `dt` and α are f32 tensors);
//!   the differences are ~1e-7 relative.
//! - Greedy noise removal reuses a cached output when one exists, as spec 5.1 describes; the
//!   reference code runs a fresh forward there. The output is identical (x and eps are
//!   unchanged since the cached forward, and the denoiser is deterministic); NFE is one lower.
//! - With nucleus on, the reference caches the *filtered* p_x0 and filters it again at every
//!   cache hit (top-p is not idempotent after renormalisation, so the kept set shrinks over
//!   cached steps). Here the cache holds the denoiser output and each step filters it once.
//!   Nucleus is off in every reference script.
//! - The `ancestral` (no cache) sampler and the time-conditioning cache drop are not offered:
//!   the reference asserts `ancestral_cache`, and the network is blind to t (spec 4.2).
//!
//! Reproduced on purpose: quirk 2 (dt), and quirk 4's behaviour when s < 0 (only for
//! given_t ≲ 1e-5 before the last step): α_s > 1 is not clamped, so the stay and reset weights
//! turn negative and can never win the race, which forces an unmask. Quirk 10 (eps drawn twice
//! when absent) only consumed framework RNG and has no counterpart here.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::posterior::{
    greedy_token, sample_masked, Outcome, SamplerKind, StepAlphas, TokenFilter,
};
use super::schedule::alpha;
use super::stream::SamplerStream;
use super::Denoiser;
use crate::error::{Error, Result};
use crate::model::NoiseType;
use crate::tensor::{Tensor, Tokens};

/// What the last step does with still-masked positions (`sampling.noise_removal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoiseRemoval {
    /// An ancestral update with α_s = 1: sample every masked position from p_θ (all scripts).
    Ancestral,
    /// argmax of p_θ.
    Greedy,
}

/// Sampler settings (the reference's `sampling.*`), reference defaults from [`Self::new`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Number of steps N ≥ 1 (the last one is the noise-removal step).
    pub steps: usize,
    /// The sampler's time eps: the grid ends at t = eps·given_t (1e-5; not the training 1e-3).
    pub time_eps: f64,
    pub kind: SamplerKind,
    pub noise_removal: NoiseRemoval,
    /// `sampling.fix_eps`: resets keep their eps.
    pub fix_eps: bool,
    /// Nucleus mass; ≥ 1 means off (the reference's `use_p_nucleus=False`).
    pub nucleus_p: f64,
    /// Temperature T > 0; weights become w^(1/T).
    pub temperature: f64,
    /// Key of the sampler's counter-based stream (categorical draws and reset eps).
    pub seed: u64,
}

impl SamplerConfig {
    /// `steps` steps with the reference defaults: time eps 1e-5, IMDM posterior, ancestral
    /// noise removal, no fix_eps, no nucleus, T = 1, seed 0.
    pub fn new(steps: usize) -> Self {
        SamplerConfig {
            steps,
            time_eps: 1e-5,
            kind: SamplerKind::ImdmPosterior,
            noise_removal: NoiseRemoval::Ancestral,
            fix_eps: false,
            nucleus_p: 1.0,
            temperature: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("sampler: {m}")));
        if self.steps == 0 || self.steps > u32::MAX as usize {
            return bad(format!("steps must be in 1..2^32, got {}", self.steps));
        }
        if !(self.time_eps > 0.0 && self.time_eps < 1.0) {
            return bad(format!("time_eps must be in (0, 1), got {}", self.time_eps));
        }
        if !self.nucleus_p.is_finite() || self.nucleus_p <= 0.0 {
            return bad(format!(
                "nucleus_p must be positive (>= 1 is off), got {}",
                self.nucleus_p
            ));
        }
        if !self.temperature.is_finite() || self.temperature <= 0.0 {
            return bad(format!(
                "temperature must be positive and finite, got {}",
                self.temperature
            ));
        }
        Ok(())
    }

    pub fn filter(&self) -> TokenFilter {
        TokenFilter {
            nucleus_p: self.nucleus_p,
            temperature: self.temperature,
        }
    }

    /// (t, s) of step `i` for a row with `given_t = g`. s is meaningless for the last step,
    /// which uses α_s = 1.
    pub fn step_times(&self, i: usize, g: f64) -> (f64, f64) {
        let n = self.steps as f64;
        let t = (1.0 + i as f64 * (self.time_eps - 1.0) / n) * g;
        let dt = (g + self.time_eps) / n;
        (t, t - dt)
    }
}

/// What [`generate`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    /// (B, L) samples. After ancestral or greedy noise removal no mask remains.
    pub tokens: Tokens,
    /// Denoiser calls (N minus the cache hits).
    pub nfe: usize,
    /// Reset draws over the run (counted under `fix_eps` too).
    pub resets: usize,
    /// (B, L, noise_dim) eps as last given to the denoiser; `None` without the eps MLP.
    pub eps: Option<Tensor>,
}

/// Draws the initial eps (B, L, nd) from `rng`: `(2u − 1)·scale` (rand) or `N(0,1)·scale`.
fn unseeded_eps<R: Rng + ?Sized>(
    rng: &mut R,
    shape: [usize; 3],
    kind: NoiseType,
    scale: f32,
) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| match kind {
            NoiseType::Rand => (2.0 * rng.random::<f32>() - 1.0) * scale,
            NoiseType::Randn => {
                let z: f32 = StandardNormal.sample(rng);
                z * scale
            }
        })
        .collect();
    Tensor::from_vec(&shape, data).expect("sizes agree")
}

/// The driver's input checks, shared with the GPU driver (`cuda::denoiser`): x_t's shape
/// and ids, the stream's position limit and `given_t` (one per row, in (0, 1] for rows with
/// masked positions). Returns the per-row `given_t` (default 1).
pub fn check_inputs(
    model: &crate::model::DitConfig,
    x_t: &Tokens,
    given_t: Option<&[f64]>,
) -> Result<Vec<f64>> {
    let (bsz, len, vocab) = (x_t.batch, x_t.len, model.vocab_size);
    let mask = model.mask_index as u32;
    if x_t.ids.len() != bsz * len {
        return Err(Error::Shape(format!(
            "sampler: x_t has {} ids for shape {bsz}x{len}",
            x_t.ids.len()
        )));
    }
    if let Some((i, t)) = x_t
        .ids
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(Error::Shape(format!(
            "sampler: x_t id {t} at flat index {i} is outside the vocabulary of {vocab}"
        )));
    }
    if bsz * len > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "sampler: B·L = {} exceeds the stream's 2^32 positions",
            bsz * len
        )));
    }
    let g: Vec<f64> = match given_t {
        None => vec![1.0; bsz],
        Some(g) if g.len() != bsz => {
            return Err(Error::Shape(format!(
                "sampler: given_t has {} entries for a batch of {bsz}",
                g.len()
            )))
        }
        Some(g) => g.to_vec(),
    };
    for (b, &gb) in g.iter().enumerate() {
        let has_mask = x_t.ids[b * len..(b + 1) * len].contains(&mask);
        if !(0.0..=1.0).contains(&gb) || (has_mask && gb == 0.0) {
            return Err(Error::Config(format!(
                "sampler: given_t[{b}] = {gb} must be in (0, 1] for a row with masked positions"
            )));
        }
    }
    Ok(g)
}

/// Samples a batch from `den`, starting at `x_t` (masked positions are generated, the others
/// kept). `given_t` (one per row, in [0, 1], default 1) scales the time grid as in IM-ReDi
/// datagen; a row with masked positions needs `given_t > 0`. `eps_seeds` (one per row) draws
/// the initial eps with the reference's seeded hash; without it, `rng` draws it.
pub fn generate<D: Denoiser + ?Sized, R: Rng + ?Sized>(
    den: &mut D,
    cfg: &SamplerConfig,
    x_t: &Tokens,
    given_t: Option<&[f64]>,
    eps_seeds: Option<&[i64]>,
    rng: &mut R,
) -> Result<SampleOutput> {
    cfg.validate()?;
    let model = den.config().clone();
    let (bsz, len, vocab) = (x_t.batch, x_t.len, model.vocab_size);
    let mask = model.mask_index as u32;
    let g = check_inputs(&model, x_t, given_t)?;
    let nd = model.noise_dim;
    let mut eps = if model.has_eps_mlp() {
        let scale = model.noise_scale as f32;
        Some(match eps_seeds {
            Some(s) if s.len() != bsz => {
                return Err(Error::Shape(format!(
                    "sampler: {} eps seeds for a batch of {bsz}",
                    s.len()
                )))
            }
            Some(s) => crate::rng::seeded_eps(s, len, nd, model.noise_type, scale),
            None => unseeded_eps(rng, [bsz, len, nd], model.noise_type, scale),
        })
    } else {
        None
    };

    let stream = SamplerStream::new(cfg.seed);
    let filter = cfg.filter();
    let mut x = x_t.ids.clone();
    let mut reset = vec![false; bsz * len];
    let mut cache: Option<Tensor> = None;
    let (mut nfe, mut resets) = (0usize, 0usize);
    for i in 0..cfg.steps {
        let last = i + 1 == cfg.steps;
        if cache.is_none() {
            if let Some(e) = eps.as_mut() {
                for (pos, _) in reset.iter().enumerate().filter(|(_, &r)| r) {
                    for d in 0..nd {
                        e.data[pos * nd + d] = stream.reset_eps(
                            i as u32,
                            pos as u32,
                            d as u32,
                            model.noise_type,
                            model.noise_scale as f32,
                        );
                    }
                }
            }
            reset.fill(false);
            let xt = Tokens {
                batch: bsz,
                len,
                ids: x.clone(),
            };
            let out = den.log_probs(&xt, eps.as_ref())?;
            out.expect_shape("sampler: denoiser log-probs", &[bsz, len, vocab])?;
            nfe += 1;
            cache = Some(out);
        }
        let lp = cache.as_ref().expect("filled above");
        let alphas: Vec<StepAlphas> = g
            .iter()
            .map(|&gb| {
                let (t, s) = cfg.step_times(i, gb);
                StepAlphas {
                    alpha_t: alpha(t),
                    alpha_s: if last { 1.0 } else { alpha(s) },
                }
            })
            .collect();
        let greedy = last && cfg.noise_removal == NoiseRemoval::Greedy;
        // Positions are independent given the cached output, and every draw is a function of
        // (seed, step, position), so the parallel result does not depend on scheduling.
        let (changes, step_resets) = x
            .par_iter_mut()
            .zip(reset.par_iter_mut())
            .enumerate()
            .filter(|(_, (xp, _))| **xp == mask)
            .map(|(pos, (xp, rp))| {
                let row = &lp.data[pos * vocab..(pos + 1) * vocab];
                let outcome = if greedy {
                    match greedy_token(row) {
                        tok if tok == mask => Outcome::Stay,
                        tok => Outcome::Token(tok),
                    }
                } else {
                    let u = stream.race_uniforms(i as u32, pos as u32);
                    sample_masked(cfg.kind, alphas[pos / len], row, mask as usize, filter, u)
                };
                match outcome {
                    Outcome::Stay => (0usize, 0usize),
                    Outcome::Token(tok) => {
                        *xp = tok;
                        (1, 0)
                    }
                    Outcome::Reset => {
                        *rp = !cfg.fix_eps;
                        (0, 1)
                    }
                }
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        resets += step_resets;
        let changed = changes + step_resets > 0;
        if changed {
            cache = None;
        }
    }
    Ok(SampleOutput {
        tokens: Tokens {
            batch: bsz,
            len,
            ids: x,
        },
        nfe,
        resets,
        eps,
    })
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
