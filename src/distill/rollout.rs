//! The teacher rollout of SDTT / IM-SDTT (spec 6.1 step 2): from the student's input x_t at
//! time t, the teacher takes K sampler steps of size dt with the student's eps (reset = 0,
//! fix_eps), and each masked position's target is the teacher log-probs of the step that
//! unmasked it; positions still masked after K steps take the last step's log-probs.
//!
//! Times: the K steps start at `ts = linspace(1, 0, K)` interpolated between t and t − K·dt,
//! i.e. `ts_k = t − k·K·dt/(K−1)` (`[t]` for K = 1), each clamped to ≥ 1e-3, and step k goes
//! from ts_k to ts_k − dt. For K = 2 that is [t, t − 2dt]: the teacher covers [t, t − dt]
//! and [t − 2dt, t − 3dt], a gap of one dt (quirk 3, reproduced on purpose).
//! [`Spacing::Corrected`] starts step k at t − k·dt instead, so the K steps tile
//! [t, t − K·dt]. When ts_k < dt the step's α_s exceeds 1 and every position unmasks
//! (quirk 4, [`crate::diffusion::posterior`]).
//!
//! The posterior is the sampler's ([`sample_masked`], the IMDM posterior in float64); with
//! fix_eps the reset category acts as "stay masked, same eps", so eps is never changed here.
//! For an MDLM teacher the IMDM posterior under fix_eps is the MDLM posterior of spec 5.2
//! (token v with (α_s − α_t)p_v/(1 − α_t), stay with (1 − α_s)/(1 − α_t)). Race uniforms come
//! from a [`SamplerStream`] keyed by the caller, counter (step k, flat position), so a
//! rollout is a function of its inputs and key.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::diffusion::posterior::{sample_masked, Outcome, SamplerKind, StepAlphas, TokenFilter};
use crate::diffusion::schedule::{alpha, SAMPLING_EPS};
use crate::diffusion::{Denoiser, SamplerStream};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, Tokens};

/// Where the K teacher steps start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Spacing {
    /// The reference's `linspace` between t and t − K·dt (a one-dt gap for K = 2).
    #[default]
    Reference,
    /// Step k starts at t − k·dt: the steps tile [t, t − K·dt].
    Corrected,
}

/// Start times of the K teacher steps of a row at time `t` (see the module doc).
pub fn teacher_times(t: f64, dt: f64, k: usize, spacing: Spacing) -> Vec<f64> {
    (0..k)
        .map(|i| {
            let tau = match spacing {
                Spacing::Reference if k == 1 => t,
                Spacing::Reference => t - i as f64 * k as f64 * dt / (k - 1) as f64,
                Spacing::Corrected => t - i as f64 * dt,
            };
            tau.max(SAMPLING_EPS)
        })
        .collect()
}

/// What a rollout produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// (B·L·V) teacher log-probs per position: the step that unmasked it, else the last
    /// step's. Rows of positions unmasked in x_t hold the last step's carry-over row (unused).
    pub target: Vec<f32>,
    /// (B, L) the teacher's tokens after K steps.
    pub x: Tokens,
    /// Per position: the step (0-based) that unmasked it; `None` if it was unmasked in x_t or
    /// is still masked.
    pub unmasked_at: Vec<Option<usize>>,
    /// Per row: the K start times used.
    pub times: Vec<Vec<f64>>,
}

/// Runs the teacher from `xt` (rows at times `t`) for `k` steps of size `dt` with `eps`
/// (kept as given; `None` for a teacher without the eps MLP). `key` seeds the race uniforms.
pub fn teacher_rollout<D: Denoiser + ?Sized>(
    teacher: &mut D,
    xt: &Tokens,
    t: &[f64],
    eps: Option<&Tensor>,
    (k, dt, spacing): (usize, f64, Spacing),
    key: u64,
) -> Result<Rollout> {
    let c = teacher.config().clone();
    let (bsz, len, v, mask) = (xt.batch, xt.len, c.vocab_size, c.mask_index as u32);
    if t.len() != bsz || k == 0 || !(dt > 0.0) {
        return Err(Error::Shape(format!(
            "teacher rollout: {} times for {bsz} rows, {k} steps, dt {dt}",
            t.len()
        )));
    }
    let eps = eps.filter(|_| c.has_eps_mlp());
    let times: Vec<Vec<f64>> = t
        .iter()
        .map(|&tb| teacher_times(tb, dt, k, spacing))
        .collect();
    let stream = SamplerStream::new(key);
    let mut x = xt.ids.clone();
    let mut target = vec![0f32; bsz * len * v];
    let mut unmasked_at = vec![None; bsz * len];
    let mut last = None;
    for step in 0..k {
        let cur = Tokens {
            batch: bsz,
            len,
            ids: x.clone(),
        };
        let lp = teacher.log_probs(&cur, eps)?;
        lp.expect_shape("teacher log-probs", &[bsz, len, v])?;
        let alphas: Vec<StepAlphas> = times
            .iter()
            .map(|ts| StepAlphas {
                alpha_t: alpha(ts[step]),
                alpha_s: alpha(ts[step] - dt),
            })
            .collect();
        x.par_iter_mut()
            .zip(unmasked_at.par_iter_mut())
            .zip(target.par_chunks_mut(v))
            .enumerate()
            .filter(|(_, ((xp, _), _))| **xp == mask)
            .for_each(|(pos, ((xp, at), tgt))| {
                let row = &lp.data[pos * v..(pos + 1) * v];
                let u = stream.race_uniforms(step as u32, pos as u32);
                let a = alphas[pos / len];
                let o = sample_masked(
                    SamplerKind::ImdmPosterior,
                    a,
                    row,
                    mask as usize,
                    TokenFilter::NONE,
                    u,
                );
                if let Outcome::Token(tok) = o {
                    *xp = tok;
                    *at = Some(step);
                    tgt.copy_from_slice(row);
                }
            });
        last = Some(lp);
    }
    // Still-masked positions (and the unused rows of x_t's clean positions) take the last
    // step's log-probs.
    let last = last.expect("k >= 1");
    target
        .par_chunks_mut(v)
        .zip(last.data.par_chunks(v))
        .zip(unmasked_at.par_iter())
        .for_each(|((tgt, row), at)| {
            if at.is_none() {
                tgt.copy_from_slice(row);
            }
        });
    Ok(Rollout {
        target,
        x: Tokens {
            batch: bsz,
            len,
            ids: x,
        },
        unmasked_at,
        times,
    })
}
