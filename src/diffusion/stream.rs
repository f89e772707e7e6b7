//! The sampler's counter-based random numbers: every uniform is a pure function of
//! (seed, purpose, step, flat position, index), computed with the Philox4x32-10 of `crate::rng`.
//! A fused GPU kernel that handles one position per thread block can therefore reproduce the
//! CPU sampler's draws bit for bit (the integer part; `ln`/`cos` may differ in the last ulp
//! between libm and CUDA), and the result does not depend on how positions are scheduled.
//!
//! Counter layout of one Philox call, `key = (seed low 32, seed high 32)`:
//!
//! | word | exponential race ([`Purpose::Race`]) | reset eps ([`Purpose::ResetEps`]) |
//! |---|---|---|
//! | c0 | category / 2 (two f64 uniforms per call) | dim / 4 (`rand`) or dim / 2 (`randn`) |
//! | c1 | flat position b·L + l | flat position b·L + l |
//! | c2 | sampler step i | sampler step i |
//! | c3 | 0 | 1 |
//!
//! The reference draws these numbers from the framework RNG (`torch.rand_like` over a
//! (B, L, V+1) tensor, and `rand_fn` inside the embedding for resets), so bit parity with
//! PyTorch is impossible by construction; only the distributions match.

use crate::model::NoiseType;
use crate::rng::philox4x32_10;

/// What a uniform is for; the value of the counter's last word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Purpose {
    /// U of the exponential race `E = 1e-10 − ln(U + 1e-10)` (spec 5.5).
    Race = 0,
    /// The fresh eps of a position that chose the reset category (spec 5.1, quirk 8).
    ResetEps = 1,
}

/// A keyed, counter-based stream of uniforms for one sampler run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplerStream {
    key: [u32; 2],
}

const TWO_POW_M53: f64 = 1.0 / 9_007_199_254_740_992.0;
const TWO_POW_M24: f64 = 1.0 / 16_777_216.0;

impl SamplerStream {
    pub fn new(seed: u64) -> Self {
        SamplerStream {
            key: [seed as u32, (seed >> 32) as u32],
        }
    }

    fn block(&self, c0: u32, pos: u32, step: u32, purpose: Purpose) -> [u32; 4] {
        philox4x32_10([c0, pos, step, purpose as u32], self.key)
    }

    /// Both race uniforms of the category pair `pair` (categories 2·pair and 2·pair + 1), each
    /// U[0, 1) with 53 random bits: `((w_hi << 32 | w_lo) >> 11) · 2^-53`.
    pub fn race_pair(&self, step: u32, pos: u32, pair: u32) -> [f64; 2] {
        let w = self.block(pair, pos, step, Purpose::Race);
        let u = |hi: u32, lo: u32| ((((hi as u64) << 32) | lo as u64) >> 11) as f64 * TWO_POW_M53;
        [u(w[0], w[1]), u(w[2], w[3])]
    }

    /// The race uniform of category `cat` at flat position `pos` of step `step`.
    pub fn race_uniform(&self, step: u32, pos: u32, cat: u32) -> f64 {
        self.race_pair(step, pos, cat / 2)[(cat % 2) as usize]
    }

    /// `cat -> race_uniform(step, pos, cat)` for one position, one Philox call per pair of
    /// categories when the categories are visited in order (as the race does).
    pub fn race_uniforms(&self, step: u32, pos: u32) -> impl FnMut(usize) -> f64 + '_ {
        let mut held: (u32, [f64; 2]) = (u32::MAX, [0.0; 2]);
        move |cat| {
            let pair = (cat / 2) as u32;
            if held.0 != pair {
                held = (pair, self.race_pair(step, pos, pair));
            }
            held.1[cat % 2]
        }
    }

    /// A reset eps component for dimension `dim`: `rand` gives `(2u − 1)·scale` with
    /// u = (w >> 8)·2^-24 in [0, 1) (four dims per Philox call); `randn` gives Box-Muller
    /// `sqrt(−2 ln u1)·{cos, sin}(2π u2)` with u1 in (0, 1] (two dims per call: cos for even
    /// dims, sin for odd ones), times `scale`.
    pub fn reset_eps(&self, step: u32, pos: u32, dim: u32, kind: NoiseType, scale: f32) -> f32 {
        match kind {
            NoiseType::Rand => {
                let w = self.block(dim / 4, pos, step, Purpose::ResetEps)[(dim % 4) as usize];
                let u = (w >> 8) as f64 * TWO_POW_M24;
                ((2.0 * u - 1.0) * scale as f64) as f32
            }
            NoiseType::Randn => {
                let w = self.block(dim / 2, pos, step, Purpose::ResetEps);
                let u1 = ((w[0] >> 8) as f64 + 1.0) * TWO_POW_M24;
                let u2 = (w[1] >> 8) as f64 * TWO_POW_M24;
                let r = (-2.0 * u1.ln()).sqrt();
                let a = 2.0 * std::f64::consts::PI * u2;
                let z = if dim % 2 == 0 {
                    r * a.cos()
                } else {
                    r * a.sin()
                };
                (z * scale as f64) as f32
            }
        }
    }
}

/// SplitMix64's finaliser: the stream key of a batch.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sampler-stream key of batch `j` of a run with `--seed seed`.
pub fn batch_stream_seed(seed: u64, j: usize) -> u64 {
    splitmix64(splitmix64(seed) ^ j as u64)
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
