//! AdamW over the f32 master weights, global-norm gradient clipping and the learning-rate
//! schedule, with the semantics of `torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_` and
//! `LambdaLR(get_constant_schedule_with_warmup)` (spec 9).
//!
//! Parameters are addressed by their reference names (`DitParams::named`, spec 2.5). A frozen
//! parameter (the [`Freeze`](super::Freeze) rule) has no optimizer state, is never updated and
//! is left out of the clip norm, as a `requires_grad=False` tensor is in PyTorch.

use crate::error::{Error, Result};
use crate::model::DitParams;
use crate::tensor::Tensor;

pub use crate::optim_coeffs::{adamw_elements, AdamWCoeffs, AdamWConfig};

/// First and second moments of one trainable tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW with torch's per-element arithmetic, in f32 like torch on f32 parameters:
/// `p ← p·(1 − lr·wd)`; `m ← m + (1−β1)(g − m)` (torch's `lerp_`);
/// `v ← v·β2 + (1−β2)·g·g`; `p ← p − (lr/(1−β1^t)) · m / (√v/√(1−β2^t) + eps)`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (torch's `state['step']`, shared by all tensors).
    pub step: u64,
    /// Reference names, in `DitParams::named` order.
    pub names: Vec<String>,
    /// Moments per name; `None` for frozen tensors.
    pub state: Vec<Option<Moments>>,
}

impl AdamW {
    /// Fresh state (zero moments, step 0) for `params`; `frozen(name)` marks fixed tensors.
    pub fn new(params: &DitParams, config: AdamWConfig, frozen: impl Fn(&str) -> bool) -> Self {
        let (names, state) = params
            .named()
            .into_iter()
            .map(|(n, t)| {
                let s = (!frozen(&n)).then(|| Moments {
                    exp_avg: Tensor::zeros(&t.shape),
                    exp_avg_sq: Tensor::zeros(&t.shape),
                });
                (n, s)
            })
            .unzip();
        AdamW {
            config,
            step: 0,
            names,
            state,
        }
    }

    /// Per-tensor trainable flags in `DitParams::named` order.
    pub fn trainable(&self) -> Vec<bool> {
        self.state.iter().map(Option::is_some).collect()
    }

    /// One update of every trainable tensor of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut DitParams, grads: &DitParams, lr: f64) -> Result<()> {
        self.step += 1;
        let k = AdamWCoeffs::new(&self.config, self.step, lr);
        let gs = grads.named();
        let ps = params.named_mut();
        if ps.len() != self.state.len() || gs.len() != ps.len() {
            return Err(Error::Shape(format!(
                "AdamW: {} parameters, {} gradients, state for {}",
                ps.len(),
                gs.len(),
                self.state.len()
            )));
        }
        for (((name, p), (_, g)), st) in ps.into_iter().zip(gs).zip(&mut self.state) {
            let Some(st) = st else { continue };
            if p.shape != g.shape || p.shape != st.exp_avg.shape {
                return Err(Error::Shape(format!(
                    "AdamW {name}: parameter {:?}, gradient {:?}, state {:?}",
                    p.shape, g.shape, st.exp_avg.shape
                )));
            }
            adamw_elements(
                &mut p.data,
                &g.data,
                &mut st.exp_avg.data,
                &mut st.exp_avg_sq.data,
                &k,
                None,
            );
        }
        Ok(())
    }
}

/// The clip coefficient `clip_grad_norm` applies for a gradient norm `norm`: `Some(c)` with
/// `c = min(1, max_norm / (norm + 1e-6))` rounded to f32 when it is below 1 and `max_norm > 0`,
/// else `None` (gradients left as they are).
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f32> {
    if max_norm <= 0.0 {
        return None;
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
    (coef < 1.0).then_some(coef)
}

/// `get_constant_schedule_with_warmup` under `LambdaLR`: optimizer step n (0-based) runs at
/// `peak·n/warmup` for n < warmup, then at `peak`. The very first step therefore runs at
/// lr 0, as in the reference (its moments still move).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
}

impl LrSchedule {
    /// Learning rate of optimizer step `n` (0-based: the step that makes `AdamW::step` n+1).
    pub fn at(&self, n: u64) -> f64 {
        if n < self.warmup {
            self.peak * n as f64 / self.warmup as f64
        } else {
            self.peak
        }
    }
}

/// L2 norm over all tensors flagged in `trainable` (torch: the norm of the per-tensor norms),
/// accumulated in f64.
pub fn global_norm(grads: &DitParams, trainable: &[bool]) -> f64 {
    grads
        .named()
        .iter()
        .zip(trainable)
        .filter(|(_, &on)| on)
        .map(|((_, t), _)| t.data.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// `clip_grad_norm_(max_norm)`: scales every trainable gradient by
/// `min(1, max_norm / (norm + 1e-6))` and returns the norm before clipping. `max_norm <= 0`
/// only measures.
pub fn clip_grad_norm(grads: &mut DitParams, trainable: &[bool], max_norm: f64) -> f64 {
    let norm = global_norm(grads, trainable);
    if let Some(coef) = clip_coef(norm, max_norm) {
        for ((_, t), _) in grads
            .named_mut()
            .into_iter()
            .zip(trainable)
            .filter(|(_, &on)| on)
        {
            t.data.iter_mut().for_each(|x| *x *= coef);
        }
    }
    norm
}

/// The first tensor (reference order) holding a NaN or ±Inf, with the flat index and value.
pub fn first_non_finite(p: &DitParams) -> Option<(String, usize, f32)> {
    p.named().into_iter().find_map(|(n, t)| {
        t.data
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| (n, i, t.data[i]))
    })
}

/// Sets every element of `p` to zero (gradient buffers between steps).
pub fn zero(p: &mut DitParams) {
    for (_, t) in p.named_mut() {
        t.data.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DitConfig;

    fn tiny() -> DitConfig {
        let mut c = DitConfig::minimini();
        c.vocab_size = 5;
        c.mask_index = 4;
        c.hidden = 4;
        c.heads = 2;
        c.blocks = 1;
        c.cond_dim = 2;
        c.noise_dim = 2;
        c
    }

    /// Writes `vals` into the embedding (V·D entries) of a zero model.
    fn with_embedding(c: &DitConfig, vals: &[f32]) -> DitParams {
        let mut p = DitParams::zeros(c);
        p.embedding.data[..vals.len()].copy_from_slice(vals);
        p
    }

    /// Two AdamW steps against the formulas of torch.optim.AdamW evaluated in f64.
    #[test]
    fn adamw_matches_torch_formulas() {
        let c = tiny();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let p0 = [1.0f32, -2.0, 0.5, 3.0];
        let g1 = [0.5f32, -0.1, 0.0, 2.0];
        let g2 = [-0.3f32, 0.2, 1e-3, 2.5];
        let mut p = with_embedding(&c, &p0);
        let mut opt = AdamW::new(&p, cfg, |_| false);
        let (lr1, lr2) = (0.1, 0.05);
        opt.step(&mut p, &with_embedding(&c, &g1), lr1).unwrap();
        // Step 1 by hand: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g², so the update is
        // lr·g/(|g| + eps): each parameter moves by about lr against the sign of g.
        let want1: Vec<f64> = p0
            .iter()
            .zip(&g1)
            .map(|(&p, &g)| {
                let (p, g) = (p as f64 * (1.0 - lr1 * 0.01), g as f64);
                p - lr1 * g / (g.abs() + 1e-8)
            })
            .collect();
        for (i, want) in want1.iter().enumerate() {
            let got = p.embedding.data[i] as f64;
            assert!((got - want).abs() < 1e-6, "step 1 [{i}]: {got} vs {want}");
        }
        assert!((p.embedding.data[0] - (1.0 * 0.999 - 0.1)).abs() < 1e-6);
        opt.step(&mut p, &with_embedding(&c, &g2), lr2).unwrap();
        // Step 2 in f64 with torch's sequence of operations.
        for i in 0..4 {
            let (g1, g2) = (g1[i] as f64, g2[i] as f64);
            let m = 0.1 * g1;
            let m = m + 0.1 * (g2 - m);
            let v = 0.001 * g1 * g1;
            let v = v * 0.999 + 0.001 * g2 * g2;
            let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
            let pp = want1[i] * (1.0 - lr2 * 0.01);
            let want = pp - (lr2 / bc1) * m / (v.sqrt() / bc2.sqrt() + 1e-8);
            let got = p.embedding.data[i] as f64;
            assert!((got - want).abs() < 2e-6, "step 2 [{i}]: {got} vs {want}");
            let st = opt.state[0].as_ref().unwrap();
            assert!((st.exp_avg.data[i] as f64 - m).abs() <= 1e-6 * m.abs() + 1e-12);
            assert!((st.exp_avg_sq.data[i] as f64 - v).abs() <= 1e-6 * v + 1e-15);
        }
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn frozen_tensors_have_no_state_and_do_not_move() {
        let c = tiny();
        let mut p = with_embedding(&c, &[1.0, 2.0]);
        p.final_layer.norm.data.fill(1.0);
        let before = p.clone();
        let mut g = with_embedding(&c, &[1.0, 1.0]);
        g.final_layer.norm.data.fill(0.5);
        let mut opt = AdamW::new(&p, AdamWConfig::default(), |n| n.starts_with("vocab"));
        assert!(opt.state[0].is_none());
        opt.step(&mut p, &g, 0.1).unwrap();
        assert_eq!(p.embedding, before.embedding);
        assert_ne!(p.final_layer.norm, before.final_layer.norm);
        // A zero gradient leaves an unfrozen tensor where it is (wd 0).
        assert_eq!(p.blocks[0].norm1, before.blocks[0].norm1);
    }

    #[test]
    fn clipping_follows_clip_grad_norm() {
        let c = tiny();
        let mut g = with_embedding(&c, &[3.0, 4.0]);
        g.final_layer.norm.data[0] = 12.0;
        let n = g.named().len();
        let all = vec![true; n];
        // Norm 13: scaled by 1/(13 + 1e-6).
        let mut g1 = g.clone();
        let norm = clip_grad_norm(&mut g1, &all, 1.0);
        assert!((norm - 13.0).abs() < 1e-12);
        let coef = (1.0 / (13.0 + 1e-6)) as f32;
        assert_eq!(g1.embedding.data[0], 3.0 * coef);
        assert_eq!(g1.final_layer.norm.data[0], 12.0 * coef);
        assert!((global_norm(&g1, &all) - 1.0).abs() < 1e-6);
        // Below the threshold nothing changes.
        let mut g2 = g.clone();
        assert!((clip_grad_norm(&mut g2, &all, 100.0) - 13.0).abs() < 1e-12);
        assert_eq!(g2, g);
        // Frozen tensors are neither counted nor scaled.
        let mut mask = all.clone();
        mask[0] = false;
        let mut g3 = g.clone();
        assert!((clip_grad_norm(&mut g3, &mask, 6.0) - 12.0).abs() < 1e-12);
        assert_eq!(g3.embedding, g.embedding);
        assert!((g3.final_layer.norm.data[0] - 6.0).abs() < 1e-5);
        // max_norm 0 only measures.
        let mut g4 = g.clone();
        clip_grad_norm(&mut g4, &all, 0.0);
        assert_eq!(g4, g);
    }

    #[test]
    fn lr_schedule_is_linear_warmup_then_constant() {
        let s = LrSchedule {
            peak: 3e-4,
            warmup: 4,
        };
        let got: Vec<f64> = (0..7).map(|n| s.at(n)).collect();
        assert_eq!(got[0], 0.0);
        assert!((got[1] - 0.75e-4).abs() < 1e-18);
        assert!((got[3] - 2.25e-4).abs() < 1e-18);
        assert_eq!(&got[4..], &[3e-4; 3]);
        let none = LrSchedule {
            peak: 1.0,
            warmup: 0,
        };
        assert_eq!(none.at(0), 1.0);
    }

    #[test]
    fn non_finite_is_found_by_name() {
        let c = tiny();
        let mut g = DitParams::zeros(&c);
        assert!(first_non_finite(&g).is_none());
        g.blocks[0].mlp_fc2.weight.data[3] = f32::NAN;
        g.final_layer.linear.weight.data[0] = f32::INFINITY;
        let (n, i, _) = first_non_finite(&g).unwrap();
        assert_eq!((n.as_str(), i), ("blocks.0.mlp.2.weight", 3));
    }
}
