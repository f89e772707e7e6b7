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
mod tests {
    use super::*;
    use crate::diffusion::schedule::{antithetic_times, SAMPLING_EPS};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn cfg(algo: Algo) -> DitConfig {
        let mut c = DitConfig::minimini();
        c.algo = algo;
        c.length = 64;
        c.noise_dim = 5;
        c
    }

    fn x0(b: usize, l: usize) -> Tokens {
        Tokens {
            batch: b,
            len: l,
            ids: (0..b * l).map(|i| (i % 7) as u32).collect(),
        }
    }

    /// The masked count of n positions at mask probability p lies within 5 binomial standard
    /// deviations of n·p, at several t.
    #[test]
    fn q_xt_mask_frequency_within_binomial_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &t in &[SAMPLING_EPS, 0.1, 0.5, 0.9, 1.0] {
            let (b, l) = (50, 400);
            let x = x0(b, l);
            let xt = q_xt(&mut rng, &x, &vec![t; b], 999).unwrap();
            let n = (b * l) as f64;
            let p = 1.0 - alpha(t);
            let k = xt.ids.iter().filter(|&&id| id == 999).count() as f64;
            let sd = (n * p * (1.0 - p)).sqrt();
            assert!(
                (k - n * p).abs() <= 5.0 * sd + 1.0,
                "t {t}: {k} masked of {n}, expected {} ± {sd}",
                n * p
            );
            // Unmasked positions keep their token.
            for (a, c) in xt.ids.iter().zip(&x.ids) {
                assert!(*a == 999 || a == c);
            }
        }
    }

    #[test]
    fn nelbo_batch_weights_and_eps() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let c = cfg(Algo::Imdm);
        let x = x0(4, 64);
        let t = [0.2, 0.4, 0.6, 0.8];
        let mut erng = ChaCha8Rng::seed_from_u64(6);
        let nb = nelbo_batch(&mut rng, &mut erng, &x, &t, &c, 256.0).unwrap();
        let eps = nb.eps.as_ref().unwrap();
        assert_eq!(eps.shape, vec![4, 64, 5]);
        let mask = c.mask_index as u32;
        for (i, &id) in nb.xt.ids.iter().enumerate() {
            let row = &eps.data[i * 5..(i + 1) * 5];
            if id == mask {
                let want = 1.0 / t[i / 64];
                assert!((nb.weight[i] as f64 - want).abs() < 1e-5 * want);
                assert!(row.iter().all(|e| (-1.0..1.0).contains(e)));
                assert!(row.iter().any(|&e| e != 0.0));
            } else {
                assert_eq!(nb.weight[i], 0.0);
                assert!(row.iter().all(|&e| e == 0.0));
            }
        }
        assert!(nb.masked() > 0);
        let lb = nb.as_loss();
        assert_eq!(lb.norm, 256.0);
        // MDLM: no eps; its masks are those of q_xt on the mask stream, and equal the IMDM's
        // (the eps draws come from their own stream).
        let mut rng2 = ChaCha8Rng::seed_from_u64(5);
        let mut erng2 = ChaCha8Rng::seed_from_u64(6);
        let nb2 = nelbo_batch(&mut rng2, &mut erng2, &x, &t, &cfg(Algo::Mdlm), 256.0).unwrap();
        assert!(nb2.eps.is_none());
        assert_eq!(nb2.xt, nb.xt);
        assert_eq!(nb2.weight, nb.weight);
        let mut rng2 = ChaCha8Rng::seed_from_u64(5);
        assert_eq!(nb2.xt, q_xt(&mut rng2, &x, &t, mask).unwrap());
        // Same seeds, same batch; another eps seed changes only eps.
        let (mut rng3, mut erng3) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(6));
        assert_eq!(
            nelbo_batch(&mut rng3, &mut erng3, &x, &t, &c, 256.0).unwrap(),
            nb
        );
        let (mut rng4, mut erng4) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(7));
        let nb4 = nelbo_batch(&mut rng4, &mut erng4, &x, &t, &c, 256.0).unwrap();
        assert_eq!(nb4.xt, nb.xt);
        assert_ne!(nb4.eps, nb.eps);
    }

    #[test]
    fn randn_eps_is_scaled_normal() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut v = vec![0f32; 20000];
        draw_eps_into(&mut rng, &mut v, NoiseType::Randn, 2.0);
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            m.abs() < 0.07 && (var - 4.0).abs() < 0.2,
            "mean {m} var {var}"
        );
        draw_eps_into(&mut rng, &mut v, NoiseType::Rand, 0.5);
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
    }

    /// Global antithetic times chunked into 4 micro-batches: micro-batch k holds exactly the
    /// strata [k/4, (k+1)/4) and the rows of x0 in order.
    #[test]
    fn antithetic_chunking_gives_each_micro_batch_its_band() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, m) = (32, 8);
        let t = antithetic_times(&mut rng, n);
        let x = x0(n, 3);
        for k in 0..n / m {
            let (xk, tk) = micro_batch(&x, &t, m, k).unwrap();
            assert_eq!(xk.ids, x.ids[k * m * 3..(k + 1) * m * 3]);
            for &tt in tk {
                let u = (tt - SAMPLING_EPS) / (1.0 - SAMPLING_EPS);
                let (lo, hi) = (k as f64 / 4.0, (k + 1) as f64 / 4.0);
                assert!(u >= lo - 1e-12 && u < hi + 1e-12, "t {tt} outside band {k}");
            }
        }
        assert!(micro_batch(&x, &t, m, 4).is_err());
    }

    /// Micro-batches drawn in order from one stream reproduce the whole batch's noise.
    #[test]
    fn micro_batches_draw_the_same_noise_as_the_whole_batch() {
        let c = cfg(Algo::Imdm);
        let t = antithetic_times(&mut ChaCha8Rng::seed_from_u64(1), 8);
        let x = x0(8, 64);
        let seeded = ChaCha8Rng::seed_from_u64;
        let whole = nelbo_batch(&mut seeded(2), &mut seeded(3), &x, &t, &c, 512.0).unwrap();
        let (mut rng, mut erng) = (seeded(2), seeded(3));
        for k in 0..4 {
            let (xk, tk) = micro_batch(&x, &t, 2, k).unwrap();
            let nb = nelbo_batch(&mut rng, &mut erng, &xk, tk, &c, 512.0).unwrap();
            let (lo, hi) = (k * 2 * 64, (k + 1) * 2 * 64);
            assert_eq!(nb.xt.ids, whole.xt.ids[lo..hi]);
            assert_eq!(nb.weight, whole.weight[lo..hi]);
            let e = nb.eps.unwrap();
            assert_eq!(e.data, whole.eps.as_ref().unwrap().data[lo * 5..hi * 5]);
        }
    }
}
