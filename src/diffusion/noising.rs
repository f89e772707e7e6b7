//! The forward process and the NELBO batch (spec 4.4-4.7): masking `q(x_t | x_0)`, fresh ε at
//! masked positions for IMDM, the `1/t` weights, and the chunking of the global antithetic
//! times over micro-batches.
//!
//! Every function takes its RNG explicitly, so a caller that derives one stream per
//! (seed, step) gets the same batch after a resume as in an uninterrupted run.
//!
//! Differences from the reference that change no distribution:
//! - ε is drawn only at masked positions (the reference draws it everywhere, twice, and
//!   multiplies the unmasked ones by zero; quirk 10). Unmasked rows of `eps` are 0.
//! - The random streams are ours (ChaCha), so values differ from PyTorch's.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::diffusion::schedule::{alpha, nelbo_weight};
use crate::diffusion::LossBatch;
use crate::error::{Error, Result};
use crate::model::{Algo, DitConfig, NoiseType};
use crate::tensor::{Tensor, Tokens};

/// One noised (micro-)batch with owned buffers; [`NoisedBatch::as_loss`] borrows it as the
/// [`LossBatch`] a DiT implementation consumes.
#[derive(Clone, Debug, PartialEq)]
pub struct NoisedBatch {
    /// (B, L) input with masked positions set to the mask id.
    pub xt: Tokens,
    /// (B, L) clean targets.
    pub x0: Tokens,
    /// (B, L, noise_dim) ε for IMDM (zero at unmasked positions); `None` for MDLM.
    pub eps: Option<Tensor>,
    /// (B·L) NELBO weight: `−α'(t)/(1−α(t)) = 1/t` at masked positions, 0 elsewhere.
    pub weight: Vec<f32>,
    /// (B) diffusion time of each row.
    pub t: Vec<f64>,
    /// Divisor of the weighted sum (tokens of the whole global batch).
    pub norm: f64,
}

impl NoisedBatch {
    /// The borrowed view a loss implementation takes.
    pub fn as_loss(&self) -> LossBatch<'_> {
        LossBatch {
            xt: &self.xt,
            x0: &self.x0,
            eps: self.eps.as_ref(),
            weight: &self.weight,
            norm: self.norm,
            sigma: None,
        }
    }

    /// Number of masked positions.
    pub fn masked(&self) -> usize {
        self.weight.iter().filter(|&&w| w != 0.0).count()
    }
}

/// Masks each token of `row` independently with probability `p_mask` (one uniform per
/// position, in order).
fn mask_row<R: Rng>(rng: &mut R, row: &mut [u32], p_mask: f64, mask_id: u32) {
    for id in row.iter_mut() {
        if rng.random::<f64>() < p_mask {
            *id = mask_id;
        }
    }
}

/// `q(x_t | x_0)` (spec 4.4): each token of row b is replaced by `mask_id` independently with
/// probability `1 − α(t_b)`. One uniform is drawn per position, row-major.
pub fn q_xt<R: Rng>(rng: &mut R, x0: &Tokens, t: &[f64], mask_id: u32) -> Result<Tokens> {
    if t.len() != x0.batch {
        return Err(Error::Shape(format!(
            "q_xt: {} times for a batch of {}",
            t.len(),
            x0.batch
        )));
    }
    let mut ids = x0.ids.clone();
    for (row, &tb) in ids.chunks_mut(x0.len.max(1)).zip(t) {
        mask_row(rng, row, 1.0 - alpha(tb), mask_id);
    }
    Ok(Tokens {
        batch: x0.batch,
        len: x0.len,
        ids,
    })
}

/// One ε vector (spec 3.1): `rand` gives `(U[0,1)·2 − 1)·scale`, `randn` gives `N(0,1)·scale`.
pub fn draw_eps_into<R: Rng>(rng: &mut R, out: &mut [f32], kind: NoiseType, scale: f32) {
    match kind {
        NoiseType::Rand => out
            .iter_mut()
            .for_each(|x| *x = (rng.random::<f32>() * 2.0 - 1.0) * scale),
        NoiseType::Randn => out.iter_mut().for_each(|x| {
            let z: f32 = StandardNormal.sample(rng);
            *x = z * scale
        }),
    }
}

/// The NELBO batch of MDLM (spec 4.6) or IMDM (4.7) for clean rows `x0` at times `t`: masks
/// as in [`q_xt`], (IMDM only) a fresh ε at every masked position, weights `1/t` at masked
/// positions, and `norm` as given (global batch tokens).
///
/// Masks come from `masks` and ε from `eps`, two separate streams: the same seed then masks
/// an MDLM batch and an IMDM batch identically (the IMDM's ε draws do not shift the masks), so
/// an IMDM fine-tuned from an MDLM checkpoint (zero last eps-MLP layer) starts at exactly the
/// MDLM's loss. Each stream is drawn row by row, so a batch equals its micro-batches drawn in
/// order from the same two streams: the micro-batch size never changes the noise.
pub fn nelbo_batch<R: Rng, E: Rng>(
    masks: &mut R,
    eps_rng: &mut E,
    x0: &Tokens,
    t: &[f64],
    config: &DitConfig,
    norm: f64,
) -> Result<NoisedBatch> {
    if x0.len != config.length {
        return Err(Error::Shape(format!(
            "batch length {} differs from the model's length {}",
            x0.len, config.length
        )));
    }
    if t.len() != x0.batch {
        return Err(Error::Shape(format!(
            "nelbo_batch: {} times for a batch of {}",
            t.len(),
            x0.batch
        )));
    }
    let (mask, l, nd) = (config.mask_index as u32, x0.len, config.noise_dim);
    let mut xt = x0.clone();
    let mut weight = vec![0f32; x0.batch * l];
    let mut eps = (config.algo == Algo::Imdm).then(|| Tensor::zeros(&[x0.batch, l, nd]));
    for (b, &tb) in t.iter().enumerate() {
        let row = &mut xt.ids[b * l..(b + 1) * l];
        mask_row(masks, row, 1.0 - alpha(tb), mask);
        let w = nelbo_weight(tb) as f32;
        for (i, &id) in row.iter().enumerate() {
            if id != mask {
                continue;
            }
            let flat = b * l + i;
            weight[flat] = w;
            if let Some(e) = &mut eps {
                let slot = &mut e.data[flat * nd..(flat + 1) * nd];
                draw_eps_into(eps_rng, slot, config.noise_type, config.noise_scale as f32);
            }
        }
    }
    Ok(NoisedBatch {
        xt,
        x0: x0.clone(),
        eps,
        weight,
        t: t.to_vec(),
        norm,
    })
}

/// Rows `[k·m, (k+1)·m)` of `x` and of the global times `t`: micro-batch k of size m. The
/// antithetic times are drawn over the global batch and chunked in order (spec 4.5), so each
/// micro-batch sees a contiguous band of t (quirk 19, kept on purpose).
pub fn micro_batch<'a>(
    x: &Tokens,
    t: &'a [f64],
    m: usize,
    k: usize,
) -> Result<(Tokens, &'a [f64])> {
    let (lo, hi) = (k * m, (k + 1) * m);
    if m == 0 || hi > x.batch || t.len() != x.batch {
        return Err(Error::Shape(format!(
            "micro-batch {k} of size {m} does not fit a batch of {} rows with {} times",
            x.batch,
            t.len()
        )));
    }
    let ids = x.ids[lo * x.len..hi * x.len].to_vec();
    Ok((
        Tokens {
            batch: m,
            len: x.len,
            ids,
        },
        &t[lo..hi],
    ))
}

#[cfg(test)]
#[path = "noising_tests.rs"]
mod tests;
