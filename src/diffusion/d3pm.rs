//! D3PM with the absorbing state (`algo.D3PMAbsorb` on `trainer_base.AbsorbingState`): the
//! 'mean' parameterisation (x_θ = softmax over the whole vocabulary, mask included), the
//! discrete-time L_vb with T steps plus the reconstruction term at t = 0, and the ancestral
//! sampler. Time-conditioned: each row reads σ = −ln α(t) of its own (discretised) t.
//!
//! Times (`Diffusion.nll` with T > 0): `t ← ⌊t·T⌋/T + 1/T`, α_t = α(t) (spec 4.1).
//! Loss per position (`nll_per_token`), with `τ = clamp(1 − α_t, 0, 1 − 1e-4)`, dt = 1/T,
//! `x_m = x_θ[mask]` and `lp = log x_θ`:
//! ```text
//! A  = ln(α_t·x_m/τ + 1)
//! B  = ln(α_s·x_m/(τ − dt) + 1)
//! L_vb = (dt/τ)·(A − lp[x0]) + (1 − dt/τ)·(A − B)            at masked positions
//! ℓ  = −lp_0[x0] + T·L_vb                                   lp_0: the forward of x0 at σ = 0
//! ```
//! The reference writes **α_s = τ − dt** (so B = ln(x_m + 1)); the exact posterior needs
//! α_s = 1 − τ + dt. [`AlphaS`] keeps the written rule by default and offers the corrected
//! one (deviation 14.53). The batch loss is `Σ ℓ / norm`, norm = all tokens.
//!
//! Gradient through the log-softmax: with `g_m = dL/dlp_m = x_m·[(dt/τ + 1 − dt/τ)·α_t/τ /
//! (α_t x_m/τ + 1) − (1 − dt/τ)·(α_s/(τ−dt)) / (α_s x_m/(τ−dt) + 1)]` and `g_x0 = −dt/τ`,
//! `dL/dz_j = g_j − p_j·(g_m + g_x0)`; the reconstruction's is `p_j − [j = x0]`.
//! With `subs_masking` (off by default) the mask logit first gets −1e6 added.
//!
//! Sampler (`AbsorbingState._ancestral_update`, no cache under time conditioning): per masked
//! position, `q_j = x_θ[j]·(α_s − α_t)` for j ≠ mask and `q_mask = 1 − α_s` (α_s = 1 on the
//! last step), drawn by the float64 exponential race; unmasked positions are kept.

use serde::{Deserialize, Serialize};

use crate::cpu::Real;
use crate::diffusion::logits_model::LogitsModel;
use crate::diffusion::posterior::exp_race;
use crate::diffusion::schedule::alpha;
use crate::diffusion::stream::SamplerStream;
use crate::diffusion::SamplerConfig;
use crate::error::{Error, Result};
use crate::model::dit_ref::NEG_INF;
use crate::tensor::Tokens;

/// The reference's number of discrete steps (`algo.T` of its D3PM runs).
pub const DEFAULT_T: usize = 1000;

/// How α_s enters L_vb's second term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaS {
    /// `alpha_s = t − dt`, as the reference's code reads.
    #[default]
    AsWritten,
    /// `alpha_s = 1 − (t − dt)`, the signal level one step earlier (the exact posterior).
    Corrected,
}

/// The D3PM settings a loss needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct D3pmOptions {
    /// Discrete steps T.
    pub steps: usize,
    pub alpha_s: AlphaS,
    /// Add −1e6 to the mask logit before the softmax (`algo.subs_masking`).
    pub subs_masking: bool,
}

impl Default for D3pmOptions {
    fn default() -> Self {
        D3pmOptions {
            steps: DEFAULT_T,
            alpha_s: AlphaS::AsWritten,
            subs_masking: false,
        }
    }
}

/// `⌊t·T⌋/T + 1/T`: the discrete time in {2/T, …, 1} of a training time t ∈ [1e-3, 1).
pub fn discretize(t: f64, steps: usize) -> f64 {
    let n = steps as f64;
    (t * n).floor() / n + 1.0 / n
}

/// Log-softmax of one row (f64), the mask logit shifted by −1e6 with `subs_masking`.
fn log_softmax<T: Real>(z: &[T], mask: usize, subs_masking: bool) -> Vec<f64> {
    let mut zf: Vec<f64> = z.iter().map(|x| x.as_f64()).collect();
    if subs_masking {
        zf[mask] += NEG_INF as f64;
    }
    let m = zf.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + zf.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
    zf.iter_mut().for_each(|x| *x -= lse);
    zf
}

/// L_vb at one masked position and its gradient on the log-probs (g_m, g_x0).
fn vb(lp_x0: f64, lp_m: f64, alpha_t: f64, o: &D3pmOptions) -> (f64, f64, f64) {
    let dt = 1.0 / o.steps as f64;
    let tau = (1.0 - alpha_t).clamp(0.0, 1.0 - 1e-4);
    let alpha_s = match o.alpha_s {
        AlphaS::AsWritten => tau - dt,
        AlphaS::Corrected => 1.0 - tau + dt,
    };
    let xm = lp_m.exp();
    let (c1, c2) = (dt / tau, 1.0 - dt / tau);
    let (ka, kb) = (alpha_t / tau, alpha_s / (tau - dt));
    let a = (ka * xm + 1.0).ln();
    let b = (kb * xm + 1.0).ln();
    let l = c1 * (a - lp_x0) + c2 * (a - b);
    let g_m = xm * ((c1 + c2) * ka / (ka * xm + 1.0) - c2 * kb / (kb * xm + 1.0));
    (l, g_m, -c1)
}

/// `Σ_masked T·L_vb / norm` over `logits` (B·L, V) of the noisy batch, replaced in place by its
/// gradient. `alpha_t` has one entry per sequence.
#[allow(clippy::too_many_arguments)]
pub fn vb_in_place<T: Real>(
    logits: &mut [T],
    xt: &[u32],
    x0: &[u32],
    alpha_t: &[f64],
    len: usize,
    norm: f64,
    mask: usize,
    v: usize,
    o: &D3pmOptions,
) -> f64 {
    let big_t = o.steps as f64;
    let mut total = 0.0;
    for (r, row) in logits.chunks_exact_mut(v).enumerate() {
        if xt[r] as usize != mask {
            row.fill(T::zero());
            continue;
        }
        let lp = log_softmax(row, mask, o.subs_masking);
        let target = x0[r] as usize;
        let (l, g_m, g_x0) = vb(lp[target], lp[mask], alpha_t[r / len], o);
        total += big_t * l / norm;
        let k = big_t / norm;
        let gsum = g_m + g_x0;
        for (j, z) in row.iter_mut().enumerate() {
            *z = T::lit(-k * lp[j].exp() * gsum);
        }
        row[mask] += T::lit(k * g_m);
        row[target] += T::lit(k * g_x0);
    }
    total
}

/// The reconstruction term `Σ_rows −lp_0[x0] / norm` over the logits of the clean batch at
/// σ = 0, replaced in place by its gradient.
pub fn recon_in_place<T: Real>(
    logits: &mut [T],
    x0: &[u32],
    norm: f64,
    mask: usize,
    v: usize,
    subs_masking: bool,
) -> f64 {
    let mut total = 0.0;
    for (r, row) in logits.chunks_exact_mut(v).enumerate() {
        let lp = log_softmax(row, mask, subs_masking);
        let target = x0[r] as usize;
        total -= lp[target] / norm;
        for (z, &l) in row.iter_mut().zip(&lp) {
            *z = T::lit(l.exp() / norm);
        }
        row[target] -= T::lit(1.0 / norm);
    }
    total
}

/// The ancestral step's weights at a masked position from its logits (module doc).
pub fn step_weights<T: Real>(
    z: &[T],
    alpha_t: f64,
    alpha_s: f64,
    mask: usize,
    subs_masking: bool,
) -> Vec<f64> {
    let lp = log_softmax(z, mask, subs_masking);
    let mut q: Vec<f64> = lp.iter().map(|&l| l.exp() * (alpha_s - alpha_t)).collect();
    q[mask] = 1.0 - alpha_s;
    q
}

/// Samples `batch` sequences of `len` tokens from an all-mask start with `steps` ancestral
/// steps on the reference's time grid; draws from the sampler stream keyed by `seed`.
pub fn sample(
    model: &mut dyn LogitsModel,
    steps: usize,
    batch: usize,
    len: usize,
    seed: u64,
    subs_masking: bool,
) -> Result<Tokens> {
    let c = model.config().clone();
    if c.algo != crate::model::Algo::D3pm {
        return Err(Error::Config(format!(
            "D3PM sampler: needs a d3pm model, got {}",
            c.algo.name()
        )));
    }
    let grid = SamplerConfig::new(steps);
    grid.validate()?;
    let (mask, v) = (c.mask_index, c.vocab_size);
    let stream = SamplerStream::new(seed);
    let mut x = vec![mask as u32; batch * len];
    for i in 0..steps {
        let last = i + 1 == steps;
        let (t, s) = grid.step_times(i, 1.0);
        let (at, as_) = (alpha(t), if last { 1.0 } else { alpha(s) });
        let xt = Tokens {
            batch,
            len,
            ids: x.clone(),
        };
        let z = model.logits(&xt, Some(&vec![-at.ln(); batch]))?;
        for (pos, tok) in x.iter_mut().enumerate() {
            if *tok as usize != mask {
                continue;
            }
            let q = step_weights(&z[pos * v..(pos + 1) * v], at, as_, mask, subs_masking);
            let mut u = stream.race_uniforms(i as u32, pos as u32);
            *tok = exp_race(v, |j| q[j], &mut u) as u32;
        }
    }
    Ok(Tokens { batch, len, ids: x })
}

#[cfg(test)]
#[path = "d3pm_tests.rs"]
mod tests;
