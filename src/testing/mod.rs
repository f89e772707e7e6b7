//! The one home of test helpers. Here: the comparison shared by unit and integration tests, a
//! named tolerance `|got - want| <= abs + rel * |want|` with a failure message naming the worst
//! index. For unit tests only: [`grad`] (finite differences and gradient checks) and [`inputs`]
//! (seeded inputs). Integration tests share theirs in `tests/common`.

#[cfg(test)]
pub mod algos_fixture;
#[cfg(test)]
pub mod grad;
#[cfg(test)]
pub mod inputs;

/// Absolute and relative tolerance (docs/testing.md 2).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub abs: f64,
    pub rel: f64,
}

impl Tol {
    /// f32 kernels against their f64-accumulating twin.
    pub const F32: Tol = Tol {
        abs: 1e-5,
        rel: 1e-5,
    };
    /// bf16 outputs against an f32 twin.
    pub const BF16: Tol = Tol {
        abs: 1e-2,
        rel: 1.6e-2,
    };
}

/// Max abs and rel error and the worst index (by tolerance ratio) of `got` against `want`.
pub fn compare(got: &[f32], want: &[f32], tol: Tol) -> (f64, f64, usize, f64) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut max_abs, mut max_rel, mut worst, mut worst_ratio) = (0f64, 0f64, 0usize, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let err = if g.is_nan() || w.is_nan() {
            f64::INFINITY
        } else {
            (g - w).abs()
        };
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / w.abs().max(1e-30));
        let ratio = err / (tol.abs + tol.rel * w.abs());
        if ratio > worst_ratio || (i == 0 && ratio.is_nan()) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    (max_abs, max_rel, worst, worst_ratio)
}

/// Panics with name, max abs and rel error, and the worst index with got/want unless every
/// element is within `tol`.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], tol: Tol) {
    let (max_abs, max_rel, worst, ratio) = compare(got, want, tol);
    assert!(
        ratio <= 1.0,
        "{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}; worst at index {worst}: \
         got {} want {} (tolerance abs {:e} + rel {:e})",
        got[worst],
        want[worst],
        tol.abs,
        tol.rel
    );
}
