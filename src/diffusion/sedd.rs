//! SEDD with the absorbing state (`algo.SEDDAbsorb` on `trainer_base.AbsorbingState`): the
//! score parameterisation, the score-entropy loss and the analytic sampler. The network is
//! time-conditioned: each row reads σ(t) = −ln α(t) of its own t (log-linear schedule,
//! spec 4.1).
//!
//! Score (`_process_model_output`): `log s_j = z_j − ln(e^σ − 1) − ln(V − 1)`, then
//! `log s[xt] = 0` (at a masked position that is the mask column). `e^σ − 1` is `expm1(σ)`
//! below σ = 0.5 and `exp(σ) − 1` above, as the reference writes it.
//!
//! Loss (`nll_per_token`), at masked positions only, with `q = 1/expm1(σ)` and
//! `dσ = −α'(t)/α(t) = (1 − ε_s)·e^σ`:
//! ```text
//! ℓ = dσ · ( Σ_{j≠mask} s_j − q·log s_{x0} + q·(ln q − 1) )
//! dℓ/dz_j = dσ · (s_j − q·[j = x0])   for j ≠ mask;   0 at the mask column
//! ```
//! (log s_j depends on z_j alone, with slope 1.) The batch loss is `Σ ℓ / norm`, norm = all
//! tokens, masked or not (spec 4.6's convention); this is SEDD's continuous-time bound.
//!
//! Analytic sampler (`_analytic_update`, last step `_denoiser_update`), per masked position,
//! in f64, with the score `s` of this step (s[mask] = 1):
//! ```text
//! staggered: s'_j = e^{dσ}·s_j (j ≠ mask),  s'_mask = e^{dσ}·s_mask + (1 − e^{dσ})·Σ_k s_k
//! transition from the mask: e_j = 1 − e^{−dσ} (j ≠ mask),  e_mask = 1
//! p_j = s'_j · e_j, drawn by the float64 exponential race (spec 5.5)
//! ```
//! with `dσ = σ(t) − σ(t − dt)` on steps before the last and `dσ = σ(t)` with `p_mask = 0` on
//! the last. Unmasked positions keep their token (the transition puts all their mass there).

use crate::cpu::Real;
use crate::diffusion::logits_model::LogitsModel;
use crate::diffusion::posterior::exp_race;
use crate::diffusion::schedule::{alpha, SAMPLING_EPS};
use crate::diffusion::stream::SamplerStream;
use crate::diffusion::SamplerConfig;
use crate::error::{Error, Result};
use crate::tensor::Tokens;

/// `ln(e^σ − 1)` as the reference computes it (expm1 below 0.5).
pub fn log_expm1(sigma: f64) -> f64 {
    if sigma < 0.5 {
        sigma.exp_m1().ln()
    } else {
        (sigma.exp() - 1.0).ln()
    }
}

/// The offset added to every logit: `−ln(e^σ − 1) − ln(V − 1)`.
pub fn score_offset(sigma: f64, v: usize) -> f64 {
    -log_expm1(sigma) - ((v - 1) as f64).ln()
}

/// `dσ/dt = −α'(t)/α(t)` from σ = −ln α(t): `(1 − ε_s)·e^σ`.
pub fn dsigma(sigma: f64) -> f64 {
    (1.0 - SAMPLING_EPS) * sigma.exp()
}

/// The score-entropy loss `Σ_masked ℓ / norm` over `logits` (B·L, V), replaced in place by
/// its gradient. `sigma` has one entry per sequence (B), `xt` and `x0` one per row.
#[allow(clippy::too_many_arguments)]
pub fn loss_in_place<T: Real>(
    logits: &mut [T],
    xt: &[u32],
    x0: &[u32],
    sigma: &[f64],
    len: usize,
    norm: f64,
    mask: usize,
    v: usize,
) -> f64 {
    let mut total = 0.0f64;
    for (r, row) in logits.chunks_exact_mut(v).enumerate() {
        if xt[r] as usize != mask {
            row.fill(T::zero());
            continue;
        }
        let s = sigma[r / len];
        let (off, q, ds) = (score_offset(s, v), 1.0 / s.exp_m1(), dsigma(s));
        let target = x0[r] as usize;
        let mut pos = 0.0f64;
        let mut log_s_x0 = 0.0f64;
        for (j, z) in row.iter_mut().enumerate() {
            if j == mask {
                *z = T::zero();
                continue;
            }
            let ls = z.as_f64() + off;
            let sj = ls.exp();
            pos += sj;
            if j == target {
                log_s_x0 = ls;
            }
            *z = T::lit(ds * sj / norm);
        }
        row[target] -= T::lit(ds * q / norm);
        total += ds * (pos - q * log_s_x0 + q * (q.ln() - 1.0)) / norm;
    }
    total
}

/// The score row `s_j = exp(log s_j)` (f64) of one position with input token `tok`.
pub fn score_row<T: Real>(z: &[T], tok: u32, sigma: f64) -> Vec<f64> {
    let off = score_offset(sigma, z.len());
    let mut s: Vec<f64> = z.iter().map(|&x| (x.as_f64() + off).exp()).collect();
    s[tok as usize] = 1.0;
    s
}

/// The analytic step's unnormalised probabilities at a masked position (see the module doc):
/// `dsig` is σ(t) − σ(s), or σ(t) with `last` (the denoiser step, which zeroes the mask).
pub fn step_probs(score: &[f64], dsig: f64, mask: usize, last: bool) -> Vec<f64> {
    let total: f64 = score.iter().sum();
    let (up, down) = (dsig.exp(), (-dsig).exp());
    let mut p: Vec<f64> = score.iter().map(|&s| up * s * (1.0 - down)).collect();
    // The reference's transition adds (1 − e^{−dσ}) to every column and e^{−dσ} to the mask.
    p[mask] = if last {
        0.0
    } else {
        (up * score[mask] + (1.0 - up) * total) * (down + (1.0 - down))
    };
    p
}

/// σ(t) = −ln α(t).
pub fn sigma_at(t: f64) -> f64 {
    -alpha(t).ln()
}

/// Samples `batch` sequences of `len` tokens from an all-mask start with `steps` analytic
/// steps (the reference's time grid: `SamplerConfig::step_times`, time eps 1e-5). Draws come
/// from the sampler stream keyed by `seed` (step, flat position, token).
pub fn sample(
    model: &mut dyn LogitsModel,
    steps: usize,
    batch: usize,
    len: usize,
    seed: u64,
) -> Result<Tokens> {
    let c = model.config().clone();
    if c.algo != crate::model::Algo::Sedd {
        return Err(Error::Config(format!(
            "SEDD sampler: needs a sedd model, got {}",
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
        let (st, ss) = (sigma_at(t), sigma_at(s));
        let xt = Tokens {
            batch,
            len,
            ids: x.clone(),
        };
        let z = model.logits(&xt, Some(&vec![st; batch]))?;
        let dsig = if last { st } else { st - ss };
        for (pos, tok) in x.iter_mut().enumerate() {
            if *tok as usize != mask {
                continue;
            }
            let score = score_row(&z[pos * v..(pos + 1) * v], *tok, st);
            let p = step_probs(&score, dsig, mask, last);
            let mut u = stream.race_uniforms(i as u32, pos as u32);
            *tok = exp_race(v, |j| p[j], &mut u) as u32;
        }
    }
    Ok(Tokens { batch, len, ids: x })
}

#[cfg(test)]
#[path = "sedd_tests.rs"]
mod tests;
