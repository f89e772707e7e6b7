//! The per-position update of the samplers (spec 5.2-5.5), in f64, one masked position at a
//! time. Nothing here allocates a (B, L, V+1) tensor: a fused GPU kernel mirrors
//! [`sample_masked`] with one thread block per masked position, computing each category's
//! weight on the fly and reducing the exponential race with an argmax (ties to the lowest
//! index).
//!
//! For a masked position with SUBS probabilities p over V (p[mask] = 0), times t > s and
//! r = α_t/α_s:
//! - **IMDM** (`mdlm_posterior=False`, spec 5.3), V+1 categories, the last one "reset":
//!   `w[v] = ((r − α_t)·[v = mask] + (α_s − α_t)·p_v) / (1 − α_t)` for v < V and
//!   `w[V] = (1 − r)(1 − α_s) / (1 − α_t)`; they sum to 1 (unmask v, stay masked with the same
//!   eps, reset = stay masked with a fresh eps).
//! - **MDLM** (`mdlm_posterior=True`, spec 5.2), V categories, unnormalised:
//!   `q[v] = p_v·(α_s − α_t)` and `q[mask] = 1 − α_s`.
//! - The noise-removal step uses α_s = 1: the mask and reset weights are then exactly 0.
//! - Nucleus (spec 5.4) filters p before the posterior; temperature T raises every weight to
//!   1/T (the reference's `sample_categorical(q, T)`), reset weight included.
//! - The draw (spec 5.5): `E_c = 1e-10 − ln(U_c + 1e-10)`, `argmax_c w_c / E_c`, which needs no
//!   normalisation.
//!
//! Deliberate differences from the reference, all below the resolution of any statistic:
//! - p = exp(log p) is computed in f64 from the f32 log-probs (the reference exponentiates in
//!   the model dtype, then casts); the MDLM weights are f64 too (the reference builds them in
//!   f32 and casts for the draw).
//! - Nucleus: the sort is stable (ties keep index order; `torch.sort` leaves tie order
//!   unspecified) and the cumulative softmax is f64 (the reference's is f32).
//! - A NaN score never wins the race (`torch.argmax` would pick it); NaN only arises from
//!   negative weights under T ≠ 1, i.e. the α_s > 1 edge case of quirk 4 combined with a
//!   temperature, which no script uses.

use serde::{Deserialize, Serialize};

/// Which posterior a sampler step draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// IMDM posterior with the reset category (the default; spec 5.3).
    ImdmPosterior,
    /// MDLM ancestral update (`sampling.mdlm_posterior=True`; the MDLM baselines; spec 5.2).
    MdlmPosterior,
}

/// α at the two ends of one step: t (current, noisier) and s (target). The noise-removal step
/// has α_s = 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepAlphas {
    pub alpha_t: f64,
    pub alpha_s: f64,
}

/// Nucleus and temperature, applied exactly as the reference does (spec 5.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenFilter {
    /// Keep the smallest top set whose mass exceeds `nucleus_p`; off when ≥ 1.
    pub nucleus_p: f64,
    /// Weights become w^(1/T); off when exactly 1.
    pub temperature: f64,
}

impl TokenFilter {
    /// No nucleus, T = 1 (every reference script).
    pub const NONE: TokenFilter = TokenFilter {
        nucleus_p: 1.0,
        temperature: 1.0,
    };

    pub fn nucleus_on(&self) -> bool {
        self.nucleus_p < 1.0
    }
}

/// What one masked position does in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Unmask to this token.
    Token(u32),
    /// Stay masked, keep eps.
    Stay,
    /// Stay masked, draw a fresh eps (IMDM only; acts as `Stay` under `fix_eps`).
    Reset,
}

/// Number of categories of the draw: V+1 for IMDM (reset last), V for MDLM.
pub fn num_categories(kind: SamplerKind, vocab: usize) -> usize {
    match kind {
        SamplerKind::ImdmPosterior => vocab + 1,
        SamplerKind::MdlmPosterior => vocab,
    }
}

/// Weight of category `c` at a masked position whose (filtered) model probability for `c` is
/// `p_c` (ignored for the reset category `c = vocab`).
#[inline]
pub fn category_weight(
    kind: SamplerKind,
    a: StepAlphas,
    c: usize,
    p_c: f64,
    mask_index: usize,
    vocab: usize,
) -> f64 {
    let StepAlphas { alpha_t, alpha_s } = a;
    match kind {
        SamplerKind::ImdmPosterior => {
            let r = alpha_t / alpha_s;
            if c == vocab {
                (1.0 - r) * (1.0 - alpha_s) / (1.0 - alpha_t)
            } else {
                let onehot = if c == mask_index { r - alpha_t } else { 0.0 };
                (onehot + (alpha_s - alpha_t) * p_c) / (1.0 - alpha_t)
            }
        }
        SamplerKind::MdlmPosterior => {
            if c == mask_index {
                1.0 - alpha_s
            } else {
                p_c * (alpha_s - alpha_t)
            }
        }
    }
}

/// All weights of a masked position (V+1 or V values) for probabilities `probs` over V.
/// For inspection and tests; the sampler computes them on the fly.
pub fn masked_weights(
    kind: SamplerKind,
    a: StepAlphas,
    probs: &[f64],
    mask_index: usize,
) -> Vec<f64> {
    let vocab = probs.len();
    (0..num_categories(kind, vocab))
        .map(|c| {
            let p = probs.get(c).copied().unwrap_or(0.0);
            category_weight(kind, a, c, p, mask_index, vocab)
        })
        .collect()
}

/// p = exp(log p) in f64.
pub fn probs_from_log(log_p: &[f32]) -> Vec<f64> {
    log_p.iter().map(|&l| (l as f64).exp()).collect()
}

/// The reference's `top_k_top_p_filtering(log p, top_p)` followed by exp and renormalisation:
/// sort descending, cumulative softmax, mark entries whose cumulative mass exceeds `top_p`,
/// shift the marks right by one (the first entry past the threshold is kept) and always keep
/// the top entry; removed entries get probability 0.
pub fn nucleus_probs(log_p: &[f32], top_p: f64) -> Vec<f64> {
    let v = log_p.len();
    let mut order: Vec<usize> = (0..v).collect();
    // Stable sort, descending; NaN (never produced by SUBS) sorts last.
    order.sort_by(|&i, &j| {
        log_p[j]
            .partial_cmp(&log_p[i])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let max = log_p[order[0]] as f64;
    let z: f64 = log_p.iter().map(|&l| (l as f64 - max).exp()).sum();
    let mut keep = vec![false; v];
    let mut cum = 0.0;
    let mut prev_over = false; // the mark of the previous sorted entry, i.e. the shifted mark
    for (rank, &i) in order.iter().enumerate() {
        cum += (log_p[i] as f64 - max).exp() / z;
        keep[i] = rank == 0 || !prev_over;
        prev_over = cum > top_p;
    }
    let mut p: Vec<f64> = (0..v)
        .map(|i| {
            if keep[i] {
                (log_p[i] as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let s: f64 = p.iter().sum();
    if s > 0.0 {
        p.iter_mut().for_each(|x| *x /= s);
    }
    p
}

/// w^(1/T), skipped when T = 1 exactly (as the reference does).
#[inline]
pub fn temper(w: f64, temperature: f64) -> f64 {
    if temperature == 1.0 {
        w
    } else {
        w.powf(1.0 / temperature)
    }
}

/// The float64 exponential race over `n` categories: `argmax_c weight(c) / E_c` with
/// `E_c = 1e-10 − ln(U_c + 1e-10)` and `U_c = uniform(c)` in [0, 1); ties go to the first index.
pub fn exp_race(
    n: usize,
    mut weight: impl FnMut(usize) -> f64,
    mut uniform: impl FnMut(usize) -> f64,
) -> usize {
    let (mut best, mut best_score) = (0usize, f64::NEG_INFINITY);
    for c in 0..n {
        let e = 1e-10 - (uniform(c) + 1e-10).ln();
        let score = weight(c) / e;
        if score > best_score {
            best = c;
            best_score = score;
        }
    }
    best
}

/// One masked position of one step: draws from the posterior of `kind` built from the SUBS
/// log-probs `log_p` (length V) of this position, after `filter`. `uniform(c)` supplies the
/// race uniform of category c (categories are visited in increasing order).
pub fn sample_masked(
    kind: SamplerKind,
    a: StepAlphas,
    log_p: &[f32],
    mask_index: usize,
    filter: TokenFilter,
    uniform: impl FnMut(usize) -> f64,
) -> Outcome {
    let vocab = log_p.len();
    let filtered = filter
        .nucleus_on()
        .then(|| nucleus_probs(log_p, filter.nucleus_p));
    let prob = |c: usize| match &filtered {
        Some(p) => p[c],
        None => (log_p[c] as f64).exp(),
    };
    let c = exp_race(
        num_categories(kind, vocab),
        |c| {
            let p_c = if c < vocab { prob(c) } else { 0.0 };
            temper(
                category_weight(kind, a, c, p_c, mask_index, vocab),
                filter.temperature,
            )
        },
        uniform,
    );
    if c == vocab {
        Outcome::Reset
    } else if c == mask_index {
        Outcome::Stay
    } else {
        Outcome::Token(c as u32)
    }
}

/// Greedy noise removal: argmax of the log-probs (first index on ties).
pub fn greedy_token(log_p: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in log_p.iter().enumerate() {
        if l > log_p[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
#[path = "posterior_tests.rs"]
mod tests;
