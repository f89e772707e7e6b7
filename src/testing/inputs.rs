//! Seeded test inputs (test builds only): the same seed gives the same values on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Seeded uniform f64 values in [lo, hi) from one ChaCha8 stream.
pub fn rand_vec(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `n` uniform f32 values in [lo, hi) drawn from `rng` (which moves on).
pub fn rand_f32_from(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Seeded uniform f32 values in [lo, hi), generated in parallel chunks of 2^16 (one ChaCha8
/// stream per chunk), for inputs of real model sizes.
pub fn rand_f32(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        ch.iter_mut().for_each(|x| *x = rng.random_range(lo..hi));
    });
    v
}
