//! Gradient checks for every backward (test builds only): f64 central finite differences of a
//! forward, the comparison of an analytic gradient with them, and comparisons whose tolerance
//! follows the size of what was summed.

use crate::testing::Tol;

/// Central differences `(f(x + h e_i) - f(x - h e_i)) / 2h` for every i (or only the indices in
/// `only`, the others left 0), in f64.
pub fn fd_grad(
    mut f: impl FnMut(&[f64]) -> f64,
    x: &[f64],
    h: f64,
    only: Option<&[usize]>,
) -> Vec<f64> {
    let mut g = vec![0f64; x.len()];
    let mut xp = x.to_vec();
    let all: Vec<usize> = (0..x.len()).collect();
    for &i in only.unwrap_or(&all) {
        let x0 = xp[i];
        xp[i] = x0 + h;
        let fp = f(&xp);
        xp[i] = x0 - h;
        let fm = f(&xp);
        xp[i] = x0;
        g[i] = (fp - fm) / (2.0 * h);
    }
    g
}

/// Widens f32 values to f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// `got` (an analytic gradient, f64 or widened f32) against finite differences `want`: panics
/// with name, max abs and rel error and the worst index (got/want) unless every
/// `|got − want| <= tol.abs + tol.rel·|want|` (see [`crate::testing::assert_close`]).
pub fn assert_grad(name: &str, got: &[f64], want: &[f64], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{name}: length mismatch");
    let (abs, rel) = (tol.abs, tol.rel);
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
        "{name}: analytic vs finite differences: max abs err {max_abs:.3e}, max rel err \
         {max_rel:.3e}; worst at index {worst}: got {:.9e} want {:.9e} (tolerance abs {abs:e} + \
         rel {rel:e})",
        got[worst],
        want[worst]
    );
}

/// `Σ r ⊙ y`: projecting an output onto fixed weights `r` turns a vector op into a scalar
/// whose gradient with respect to the output is exactly `r`.
pub fn dot(r: &[f64], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// For sums computed in f32 in some fixed order: `|got - want| <= rel * scale[i] + 1e-30`, where
/// `scale[i]` is the sum of the absolute values of the terms that were added (so cancellation
/// does not make the check fail, and an order-of-magnitude error does).
pub fn assert_close_scaled(name: &str, got: &[f32], want: &[f32], scale: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    assert_eq!(got.len(), scale.len(), "{name}: scale length");
    let mut worst = (0usize, 0f64);
    for i in 0..got.len() {
        let (g, w) = (got[i] as f64, want[i] as f64);
        let err = if g.is_nan() || w.is_nan() {
            f64::INFINITY
        } else {
            (g - w).abs()
        };
        let ratio = err / (rel * scale[i] + 1e-30);
        if ratio > worst.1 {
            worst = (i, ratio);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 1.0,
        "{name}: worst at index {i}: got {} want {} (error {:e}, allowed {rel:e} x sum of |terms| \
         {:e})",
        got[i],
        want[i],
        (got[i] as f64 - want[i] as f64).abs(),
        scale[i]
    );
}

/// Bitwise equality (NaN equal to NaN), e.g. for two runs of a deterministic kernel.
pub fn assert_bits_eq(name: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{name}: length");
    if let Some(i) = a
        .iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
    {
        panic!("{name}: first bit difference at {i}: {} vs {}", a[i], b[i]);
    }
}
