//! Test helpers: central finite differences in f64, seeded inputs, and a gradient comparison
//! that reports the worst entry.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Seeded uniform values in [lo, hi).
pub fn rand_vec(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `(f(x + h e_i) − f(x − h e_i)) / 2h` for every i, `f` evaluated on a scratch copy of `x`.
pub fn fd_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            xs[i] = x[i] + h;
            let up = f(&xs);
            xs[i] = x[i] - h;
            let down = f(&xs);
            xs[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `Σ r ⊙ y`: projecting an output onto fixed weights `r` turns a vector op into a scalar
/// whose gradient with respect to the output is exactly `r`.
pub fn dot(r: &[f64], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Panics with name, max abs and rel error and the worst index (got/want) unless every
/// `|got − want| <= abs + rel·|want|`.
pub fn assert_grad(name: &str, got: &[f64], want: &[f64], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length mismatch");
    let (mut max_abs, mut max_rel, mut worst, mut worst_ratio) = (0f64, 0f64, 0usize, -1f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = if g.is_finite() && w.is_finite() {
            (g - w).abs()
        } else {
            f64::INFINITY
        };
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / w.abs().max(1e-300));
        let ratio = err / (abs + rel * w.abs());
        if ratio > worst_ratio {
            worst_ratio = ratio;
            worst = i;
        }
    }
    assert!(
        worst_ratio <= 1.0,
        "{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}; worst at index {worst}: \
         got {:.9e} want {:.9e} (tolerance abs {abs:e} + rel {rel:e})",
        got[worst],
        want[worst]
    );
}
