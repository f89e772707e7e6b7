//! The element-wise arithmetic of AdamW and the EMA, below both backends: the CPU optimizer
//! ([`crate::train::optim`], [`crate::train::ema`]) runs these functions, and the GPU kernel's
//! twin (`cuda::ops::adamw`) calls the same ones, so the two cannot drift.

/// AdamW hyper-parameters (the learning rate comes per step from [`crate::train::LrSchedule`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The reference's: betas (0.9, 0.999), eps 1e-8, weight decay 0.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The f32 scalars of one AdamW step (torch's, computed in f64 and rounded once), shared by
/// [`crate::train::AdamW::step`] and the GPU kernel's twin (`cuda::ops::adamw`), which passes them to the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWCoeffs {
    /// `-(lr / (1 - beta1^t))`
    pub neg_step_size: f32,
    /// `sqrt(1 - beta2^t)`
    pub bc2_sqrt: f32,
    /// `1 - lr * weight_decay`, applied only when `weight_decay != 0`
    pub decay: f32,
    pub use_decay: bool,
    /// `1 - beta1`
    pub omb1: f32,
    pub beta2: f32,
    /// `1 - beta2`
    pub omb2: f32,
    pub eps: f32,
}

impl AdamWCoeffs {
    /// The scalars of optimizer step `step` (1-based, torch's `state['step']` after the
    /// increment) at learning rate `lr`.
    pub fn new(c: &AdamWConfig, step: u64, lr: f64) -> Self {
        let t = step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        AdamWCoeffs {
            neg_step_size: (-(lr / bc1)) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            use_decay: c.weight_decay != 0.0,
            omb1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            omb2: (1.0 - c.beta2) as f32,
            eps: c.eps as f32,
        }
    }
}

/// The per-element AdamW update of one tensor, torch's sequence of f32 operations (each one
/// rounded; no fused multiply-add): with `clip = Some(c)` the gradient is first multiplied by
/// `c` (what `clip_grad_norm` does to the gradient buffer when it scales);
/// `p ← p·decay` (weight decay on); `m ← m + omb1·(g − m)`; `v ← v·β2 + (omb2·g)·g`;
/// `p ← p + (neg_step_size·m) / (√v / bc2_sqrt + eps)`. The GPU kernel (`kernels/adamw.cu`)
/// performs exactly these operations with round-to-nearest intrinsics.
pub fn adamw_elements(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &AdamWCoeffs,
    clip: Option<f32>,
) {
    let it = p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut()));
    for ((p, &g), (m, v)) in it {
        let g = match clip {
            Some(c) => g * c,
            None => g,
        };
        if k.use_decay {
            *p *= k.decay;
        }
        *m += k.omb1 * (g - *m);
        *v = *v * k.beta2 + k.omb2 * g * g;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p += k.neg_step_size * *m / denom;
    }
}

/// `s ← s − omd·(s − p)` element by element in f32 (`omd` = 1 − decay_n), the update
/// [`crate::train::Ema::update`] applies and the GPU kernel (`kernels/adamw.cu`, `ema_f32`) reproduces bit
/// for bit.
pub fn ema_elements(s: &mut [f32], p: &[f32], omd: f32) {
    for (s, &p) in s.iter_mut().zip(p) {
        *s -= omd * (*s - p);
    }
}
