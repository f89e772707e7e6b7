//! The SUBS parameterisation (spec 4.3) fused with the weighted cross-entropy of
//! [`crate::diffusion::LossBatch`] (spec 4.6-4.7), forward and backward in one pass over the
//! logits.
//!
//! At a masked row r (xt = mask): the mask logit is excluded (the reference writes −1e6, so its
//! probability is exactly 0), `log p(x0) = logit[x0] − logsumexp_{j ≠ mask} logit[j]`, the row
//! contributes `w_r·(−log p(x0))/norm`, and `dlogit[j] = w_r/norm·(softmax_j − [j = x0])`
//! (0 at the mask column). Unmasked rows carry their token over (log p = 0) and have no
//! gradient.

use rayon::prelude::*;

use crate::cpu::layers::sum;
use crate::cpu::Real;
use crate::model::dit_ref::NEG_INF;

/// Max and log-sum-exp of a row, the mask column excluded.
fn row_lse<T: Real>(row: &[T], mask: usize) -> T {
    let m = row
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != mask)
        .fold(T::neg_infinity(), |m, (_, &x)| m.max(x));
    let z = row
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != mask)
        .map(|(_, &x)| (x - m).exp())
        .sum::<T>();
    m + z.ln()
}

/// Weighted SUBS cross-entropy over `logits` (rows, V), replaced **in place** by their gradient
/// `d loss / d logits`. Returns the loss `Σ_masked w·(−log p(x0)) / norm`, summed in f64 in
/// row order. `xt`, `x0` and `weight` have one entry per row; the caller has checked that `x0`
/// equals `xt` at unmasked rows and is never the mask token.
pub fn subs_ce_in_place<T: Real>(
    logits: &mut [T],
    xt: &[u32],
    x0: &[u32],
    weight: &[f32],
    norm: f64,
    mask_index: usize,
    v: usize,
) -> f64 {
    let mut per_row = vec![0f64; xt.len()];
    logits
        .par_chunks_mut(v)
        .zip(per_row.par_iter_mut())
        .enumerate()
        .for_each(|(r, (row, loss))| {
            if xt[r] as usize != mask_index {
                row.fill(T::zero());
                return;
            }
            let target = x0[r] as usize;
            let w = weight[r] as f64 / norm;
            let logit = row[target];
            // exp(l − max) in place with the mask column excluded: the softmax up to 1/z.
            row[mask_index] = T::neg_infinity();
            let m = row.iter().copied().fold(T::neg_infinity(), T::max);
            row.iter_mut().for_each(|x| *x = (*x - m).exp_fast());
            row[mask_index] = T::zero();
            let z = sum(row);
            *loss = w * (m + z.ln() - logit).as_f64();
            let wt = T::lit(w);
            let scale = wt / z;
            row.iter_mut().for_each(|x| *x *= scale);
            row[target] -= wt;
        });
    per_row.iter().sum()
}

/// SUBS log-probabilities (rows, V) as f32 from `logits`, exactly the rule of
/// `dit_ref::subs_log_probs`: masked rows get the log-softmax with the mask logit set to −1e6
/// (so that column reads −1e6 − lse), unmasked rows 0 at their token and −1e6 elsewhere.
pub fn subs_log_probs<T: Real>(logits: &[T], xt: &[u32], mask_index: usize, v: usize) -> Vec<f32> {
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(xt.par_iter())
        .for_each(|((o, row), &tok)| {
            if tok as usize != mask_index {
                o.fill(NEG_INF);
                o[tok as usize] = 0.0;
                return;
            }
            let lse = row_lse(row, mask_index);
            for (o, &x) in o.iter_mut().zip(row) {
                *o = (x - lse).as_f32();
            }
            o[mask_index] = (T::of_f32(NEG_INF) - lse).as_f32();
        });
    out
}
