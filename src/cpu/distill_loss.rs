//! The SDTT / IM-SDTT distillation loss (spec 6.1 step 4) fused with the SUBS log-softmax of
//! the student: forward and backward in one pass over each logit row, the gradient written
//! in place.
//!
//! At a row r masked in x_t, with student logits z (V wide, the mask column m included) and
//! the teacher's log-probs lt (f32, V wide; its mask column is about −1e6 or −inf):
//! `ls = z − logsumexp_{j ≠ m} z` (SUBS with the mask excluded), `d = ls − lt`, `p = exp(ls)`,
//! `q = exp(lt)`, every sum over the V − 1 columns j ≠ m:
//!
//! | mode | row loss L_r | dL_r/dz_j |
//! |---|---|---|
//! | `kl-bwd` (KL(student ‖ teacher)) | Σ p·d | p_j·(d_j − L_r) |
//! | `kl-fwd` (KL(teacher ‖ student)) | Σ q·(lt − ls) | p_j·Σq − q_j |
//! | `mse` | Σ d² | 2·d_j − 2·p_j·Σd |
//! | `tvd` (on log-probs, quirk 6) | Σ abs(d) | sign(d_j) − p_j·Σ sign(d) |
//!
//! The mask column contributes nothing and gets gradient 0. (The reference sums over all V
//! columns with both mask entries near −1e6; that adds a rounding artefact to `mse` and
//! `tvd` and nothing to the KLs. Excluding the column is the exact value.) The batch loss is
//! `Σ_r L_r / norm` with norm = the masked positions of the global batch: a mean over masked
//! positions (quirk 5), not over tokens. Unmasked rows contribute 0 and get gradient 0.
//! `Σq` is kept (not taken as 1) so that a teacher row that does not sum to one exactly still
//! gets the exact gradient of the loss as written.

use rayon::prelude::*;

use crate::cpu::Real;
pub use crate::diffusion::DistillMode;

/// Loss of one masked row from its logits, and (when `grad`) `dL_r/dz` in place of the logits,
/// scaled by `scale`. Returns L_r (unscaled) in f64.
fn row<T: Real>(
    z: &mut [T],
    lt: &[f32],
    mode: DistillMode,
    mask: usize,
    scale: T,
    grad: bool,
) -> f64 {
    let mx = z
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != mask)
        .fold(T::neg_infinity(), |a, (_, &x)| a.max(x));
    let zsum = z
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != mask)
        .map(|(_, &x)| (x - mx).exp_fast())
        .sum::<T>();
    let lse = mx + zsum.ln();
    // ls in place; the reductions the gradient needs.
    let (mut loss, mut red) = (0f64, T::zero());
    for (j, x) in z.iter_mut().enumerate() {
        if j == mask {
            continue;
        }
        let ls = *x - lse;
        let t = T::of_f32(lt[j]);
        let d = ls - t;
        *x = ls;
        match mode {
            DistillMode::KlBwd => loss += (ls.exp_fast() * d).as_f64(),
            DistillMode::KlFwd => {
                // A teacher column at -inf has q = 0 and contributes 0 (not 0·inf = NaN), as
                // in the kernel and its twin.
                let q = t.exp_fast();
                if lt[j] != f32::NEG_INFINITY {
                    loss += (q * (t - ls)).as_f64();
                }
                red += q;
            }
            DistillMode::Mse => {
                loss += (d * d).as_f64();
                red += d;
            }
            DistillMode::Tvd => {
                loss += d.abs().as_f64();
                red += sign(d);
            }
        }
    }
    if !grad {
        return loss;
    }
    let lr = T::lit(loss);
    let two = T::lit(2.0);
    for (j, x) in z.iter_mut().enumerate() {
        if j == mask {
            *x = T::zero();
            continue;
        }
        let ls = *x;
        let t = T::of_f32(lt[j]);
        let (p, d) = (ls.exp_fast(), ls - t);
        let g = match mode {
            DistillMode::KlBwd => p * (d - lr),
            DistillMode::KlFwd => p * red - t.exp_fast(),
            DistillMode::Mse => two * d - two * p * red,
            DistillMode::Tvd => sign(d) - p * red,
        };
        *x = g * scale;
    }
    loss
}

/// sign(x) with sign(0) = 0 (torch's `abs` backward).
fn sign<T: Real>(x: T) -> T {
    if x > T::zero() {
        T::one()
    } else if x < T::zero() {
        -T::one()
    } else {
        T::zero()
    }
}

/// The distillation loss `Σ_{r masked} L_r / norm` over `logits` (rows, V), whose rows are
/// replaced **in place** by `d loss / d logits` (0 at unmasked rows and at the mask column).
/// `target` holds the teacher's log-probs (rows, V), read only at rows where `xt` is the
/// mask. Row losses are summed in f64 in row order, so the result does not depend on the
/// thread count.
#[allow(clippy::too_many_arguments)]
pub fn distill_loss_in_place<T: Real>(
    logits: &mut [T],
    target: &[f32],
    xt: &[u32],
    mode: DistillMode,
    norm: f64,
    mask_index: usize,
    v: usize,
) -> f64 {
    let scale = T::lit(1.0 / norm);
    let mut per_row = vec![0f64; xt.len()];
    logits
        .par_chunks_mut(v)
        .zip(target.par_chunks(v))
        .zip(per_row.par_iter_mut())
        .enumerate()
        .for_each(|(r, ((z, lt), loss))| {
            if xt[r] as usize != mask_index {
                z.fill(T::zero());
                return;
            }
            *loss = row(z, lt, mode, mask_index, scale, true);
        });
    per_row.iter().sum::<f64>() / norm
}

/// The per-row losses L_r (0 at unmasked rows) without a gradient; `logits` is left
/// unchanged.
pub fn distill_row_losses<T: Real>(
    logits: &[T],
    target: &[f32],
    xt: &[u32],
    mode: DistillMode,
    mask_index: usize,
    v: usize,
) -> Vec<f64> {
    logits
        .par_chunks(v)
        .zip(target.par_chunks(v))
        .enumerate()
        .map(|(r, (z, lt))| {
            if xt[r] as usize != mask_index {
                return 0.0;
            }
            let mut z = z.to_vec();
            row(&mut z, lt, mode, mask_index, T::one(), false)
        })
        .collect()
}

#[cfg(test)]
#[path = "distill_loss_tests.rs"]
mod tests;
