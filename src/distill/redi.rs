//! IM-ReDi coupling generation (spec 6.2) and few-step evaluation of a generator.
//!
//! Datagen: for clean rows x0, draw t per row (a `perturbed_frac` share with t ~ U(0, 1], the rest t = 1), mask each
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
use crate::diffusion::{generate, Denoiser, NoiseRemoval, SamplerConfig, SamplerKind};
pub use crate::distill::redi_train::{
    train_on_couplings, train_on_couplings_with, RediEvent, RediTrainConfig, RediValidation,
};
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
    /// Fraction of rows with t ~ U(0, 1] (`reflow.perturbed_rect` = 1); the others are
    /// all-mask (t = 1).
    pub perturbed_frac: f64,
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
    // Only MDLM/IMDM models reach the distillation (the commands refuse the others).
    s.kind = match algo {
        Algo::Imdm => SamplerKind::ImdmPosterior,
        Algo::Mdlm | Algo::Ar | Algo::Sedd | Algo::D3pm => SamplerKind::MdlmPosterior,
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
            let t = if rng.random::<f64>() < cfg.perturbed_frac {
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
    /// Distinct sequences among the exact-match samples (at most V here): how much of the
    /// data distribution the coherent samples cover.
    pub distinct_exact: usize,
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
/// steps with the given noise removal (the reference's ancestral, or greedy = argmax): exact-match rate and distinct count over `samples` rows, and the conditional total
/// correlation over `tc_groups` ε draws repeated `tc_dup` times each.
pub fn evaluate<D: Denoiser + ?Sized>(
    den: &mut D,
    steps: usize,
    removal: NoiseRemoval,
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
            s.noise_removal = removal;
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
        distinct_exact: {
            let l = toks.len;
            let rows: std::collections::BTreeSet<&[u32]> = toks
                .ids
                .chunks(l)
                .filter(|r| r[0] != mask && r.iter().all(|&x| x == r[0]))
                .collect();
            rows.len()
        },
        distinct: distinct_sequences(&toks),
        samples: cfg.samples,
        tc,
        nfe: nfe as f64 / calls as f64,
    })
}

/// Minibatch optimal-transport couplings (an engine extension, not in the reference): within
/// each minibatch of `batch` clean rows and `batch` fresh seeded ε fields, pair ε_i with the row
/// x0_σ(i) that maximises Σ_i log p_θ(x0_σ(i) | all-mask, ε_i) under `source`'s one-step
/// prediction (a linear assignment, solved exactly by Kuhn-Munkres). The pairs keep the data's
/// marginal exactly (every x0 is a real row, used once), so rectifying on them cannot collapse
/// onto a few sequences, while each round makes x0 a sharper function of ε, which is what a
/// one-step IMDM needs. This is the discrete analogue of minibatch-OT couplings for flow
/// matching. A `perturbed_frac` share of the stored x_T masks the matched x0 at a random t (as IM-ReDi's
/// perturbed rectification does), so the student also keeps learning partially masked inputs.
pub fn ot_couplings<D: Denoiser + ?Sized>(
    source: &mut D,
    x0: &Tokens,
    batch: usize,
    perturbed_frac: f64,
    seed: u64,
) -> Result<Couplings> {
    use pathfinding::kuhn_munkres::kuhn_munkres_min;
    use pathfinding::matrix::Matrix;

    if batch == 0 {
        return Err(Error::Config("ot couplings: batch must be positive".into()));
    }
    let model = source.config().clone();
    let (l, mask, v) = (x0.len, model.mask_index as u32, model.vocab_size);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Couplings {
        xt: Tokens {
            batch: 0,
            len: l,
            ids: vec![],
        },
        x0: Tokens {
            batch: 0,
            len: l,
            ids: vec![],
        },
        t: vec![],
        seeds: vec![],
    };
    for lo in (0..x0.batch).step_by(batch) {
        let n = batch.min(x0.batch - lo);
        let rows = &x0.ids[lo * l..(lo + n) * l];
        let seeds: Vec<i64> = (0..n).map(|_| rng.random_range(0..1i64 << 31)).collect();
        let eps = model.has_eps_mlp().then(|| {
            crate::rng::seeded_eps(
                &seeds,
                l,
                model.noise_dim,
                model.noise_type,
                model.noise_scale as f32,
            )
        });
        let all_mask = Tokens {
            batch: n,
            len: l,
            ids: vec![mask; n * l],
        };
        let lp = source.log_probs(&all_mask, eps.as_ref())?;
        // cost[i][j] = −Σ_l log p(x0_j,l | ε_i), in micro-nats so the assignment is exact on
        // integers; log-probs are ≥ −1e6·L at worst, far inside i64.
        let cost = Matrix::from_fn(n, n, |(i, j)| {
            let s: f64 = (0..l)
                .map(|p| lp.data[(i * l + p) * v + rows[j * l + p] as usize] as f64)
                .sum();
            (-s * 1e6).round() as i64
        });
        let (_, sigma) = kuhn_munkres_min(&cost);
        for (i, &j) in sigma.iter().enumerate() {
            let target = &rows[j * l..(j + 1) * l];
            let t = if rng.random::<f64>() < perturbed_frac {
                1.0 - rng.random::<f64>()
            } else {
                1.0
            };
            let p = 1.0 - alpha(t);
            out.xt.ids.extend(
                target
                    .iter()
                    .map(|&x| if rng.random::<f64>() < p { mask } else { x }),
            );
            out.x0.ids.extend_from_slice(target);
            out.t.push(t as f32);
            out.seeds.push(seeds[i]);
        }
        out.xt.batch += n;
        out.x0.batch += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::toy::toy_config;
    use crate::tensor::Tensor;

    /// A denoiser whose one-step prediction at every position is token (⌊(ε_0 + 1)·V/2⌋),
    /// i.e. a deterministic function of the first eps coordinate of position 0.
    struct EpsArgmax(crate::model::DitConfig);
    impl Denoiser for EpsArgmax {
        fn config(&self) -> &crate::model::DitConfig {
            &self.0
        }
        fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
            let (v, l, nd) = (self.0.vocab_size, xt.len, self.0.noise_dim);
            let eps = eps.expect("imdm");
            let data_v = v - 1;
            let mut out = vec![-30f32; xt.batch * l * v];
            for b in 0..xt.batch {
                let e = eps.data[b * l * nd];
                let tok = (((e + 1.0) / 2.0 * data_v as f32) as usize).min(data_v - 1);
                for p in 0..l {
                    out[(b * l + p) * v + tok] = 0.0;
                }
            }
            Tensor::from_vec(&[xt.batch, l, v], out)
        }
    }

    #[test]
    fn ot_pairs_keep_the_data_marginal_and_follow_the_prediction() {
        let c = toy_config(5, 4, Algo::Imdm, 3);
        let data_v = c.vocab_size - 1;
        // 8 clean rows, each one token repeated: tokens 0,1,2,3,0,1,2,3.
        let n = 8;
        let ids: Vec<u32> = (0..n)
            .flat_map(|r| std::iter::repeat_n((r % data_v) as u32, c.length))
            .collect();
        let x0 = Tokens {
            batch: n,
            len: c.length,
            ids,
        };
        let mut den = EpsArgmax(c.clone());
        let pairs = ot_couplings(&mut den, &x0, n, 0.0, 3).unwrap();
        // Same multiset of rows as the data.
        let mut got: Vec<&[u32]> = pairs.x0.ids.chunks(c.length).collect();
        let mut want: Vec<&[u32]> = x0.ids.chunks(c.length).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert!(pairs.xt.ids.iter().all(|&x| x as usize == c.mask_index));
        // The assignment beats the identity pairing on the source's log-likelihood.
        let eps = crate::rng::seeded_eps(&pairs.seeds, c.length, 3, c.noise_type, 1.0);
        let lp = den
            .log_probs(
                &Tokens {
                    batch: n,
                    len: c.length,
                    ids: vec![0; n * c.length],
                },
                Some(&eps),
            )
            .unwrap();
        let score = |rows: &[u32]| -> f64 {
            (0..n * c.length)
                .map(|k| lp.data[k * c.vocab_size + rows[k] as usize] as f64)
                .sum()
        };
        assert!(score(&pairs.x0.ids) >= score(&x0.ids));
        // Each ε_i predicts one token; the optimum matches as many rows as the counts allow:
        // Σ_c min(#ε predicting c, #rows of c).
        let pred: Vec<usize> = (0..n)
            .map(|b| {
                (0..data_v)
                    .find(|&k| lp.data[(b * c.length) * c.vocab_size + k] == 0.0)
                    .unwrap()
            })
            .collect();
        let best: usize = (0..data_v)
            .map(|k| pred.iter().filter(|&&p| p == k).count().min(2))
            .sum();
        let hits = (0..n)
            .filter(|&b| pairs.x0.ids[b * c.length] as usize == pred[b])
            .count();
        assert_eq!(hits, best, "predictions {pred:?}");
    }
}
