//! Exponential moving average of the weights with the reference's warm-up (spec 9,
//! `models/ema.py` of MDLM): update n (1-based) uses `decay_n = min(decay, (1+n)/(10+n))` and
//! `s ← s − (1 − decay_n)·(s − p)`, after every optimizer step. Validation and sampling use
//! the EMA weights.
//!
//! The shadow covers every tensor (reference names), so it saves as a loadable model. A frozen
//! tensor never moves and its shadow starts equal to it, so `s − (1−d)·(s − p)` keeps it
//! exactly equal: the same result as the reference's trainable-only list.

use crate::error::{Error, Result};
use crate::model::DitParams;

pub use crate::optim_coeffs::ema_elements;

/// EMA state: decay, number of updates so far, shadow weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Ema {
    /// Target decay; 0 disables the average (the shadow then tracks the weights exactly).
    pub decay: f64,
    pub num_updates: u64,
    pub shadow: DitParams,
}

impl Ema {
    /// A shadow initialised to `params` with no updates.
    pub fn new(params: &DitParams, decay: f64) -> Self {
        Ema {
            decay,
            num_updates: 0,
            shadow: params.clone(),
        }
    }

    /// The decay that update `n` (1-based) uses.
    pub fn decay_at(&self, n: u64) -> f64 {
        self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
    }

    /// The smallest update count n with `decay_at(n + 1) == decay`: an average whose count
    /// starts there uses the full decay from its first update (no warm-up).
    pub fn warmup_end(decay: f64) -> u64 {
        let at = |n: u64| decay.min((1.0 + n as f64) / (10.0 + n as f64));
        if decay <= 0.1 || decay >= 1.0 {
            return 0;
        }
        // (1+n)/(10+n) >= d  <=>  n >= (10d - 1)/(1 - d); then step past f64 rounding.
        let mut n = ((10.0 * decay - 1.0) / (1.0 - decay)).floor() as u64;
        while at(n + 1) < decay {
            n += 1;
        }
        while n > 0 && at(n) >= decay {
            n -= 1;
        }
        n
    }

    /// One update towards `params` (call after each optimizer step).
    pub fn update(&mut self, params: &DitParams) -> Result<()> {
        self.num_updates += 1;
        let d = self.decay_at(self.num_updates);
        let omd = (1.0 - d) as f32;
        for ((name, s), (_, p)) in self.shadow.named_mut().into_iter().zip(params.named()) {
            if s.shape != p.shape {
                return Err(Error::Shape(format!(
                    "EMA {name}: shadow {:?}, parameter {:?}",
                    s.shape, p.shape
                )));
            }
            if self.decay == 0.0 {
                s.data.copy_from_slice(&p.data);
                continue;
            }
            ema_elements(&mut s.data, &p.data, omd);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DitConfig;

    #[test]
    fn warm_up_decays_and_values() {
        let c = DitConfig::minimini();
        let mut p = DitParams::zeros(&c);
        p.embedding.data[0] = 1.0;
        let mut ema = Ema::new(&p, 0.9999);
        // (1+n)/(10+n): 2/11, 3/12, ..., capped at 0.9999 from n = 89990 on.
        assert!((ema.decay_at(1) - 2.0 / 11.0).abs() < 1e-15);
        assert!((ema.decay_at(2) - 0.25).abs() < 1e-15);
        assert_eq!(ema.decay_at(1_000_000), 0.9999);
        assert!(ema.decay_at(89_989) < 0.9999 && ema.decay_at(89_991) == 0.9999);
        // Move the weight to 0 and update twice: s = 1·d1, then s = d1·d2.
        p.embedding.data[0] = 0.0;
        ema.update(&p).unwrap();
        let s1 = ema.shadow.embedding.data[0] as f64;
        assert!((s1 - 2.0 / 11.0).abs() < 1e-7, "{s1}");
        ema.update(&p).unwrap();
        let s2 = ema.shadow.embedding.data[0] as f64;
        assert!((s2 - 2.0 / 11.0 * 0.25).abs() < 1e-7, "{s2}");
        assert_eq!(ema.num_updates, 2);
        // Tensors equal to the weights stay bit-equal (frozen tensors).
        assert_eq!(ema.shadow.blocks, p.blocks);
    }

    #[test]
    fn decay_zero_tracks_the_weights() {
        let c = DitConfig::minimini();
        let mut p = DitParams::zeros(&c);
        let mut ema = Ema::new(&p, 0.0);
        p.embedding.data[5] = 0.3;
        ema.update(&p).unwrap();
        assert_eq!(ema.shadow, p);
    }
}
