//! The conditioning path of the CPU backend (spec 2.2 step 2): the sinusoidal time feature,
//! the sigma map `c = SiLU(fc2(SiLU(fc1(feat(σ)))))` with its backward, and the layout of the
//! adaLN modulations computed from `c`.
//!
//! There are G conditioning rows: G = 1 for the constant conditioning (σ = 0, MDLM and IMDM,
//! spec 4.2), G = B under time conditioning (row b from sequence b's σ). A modulation
//! `adaLN(c)` comes out row-major (G, n·D) and is stored component-major (n, G, D), so that each
//! of its n components (shift, scale, gate, ...) is one contiguous block of G vectors for
//! `layers` ([`crate::cpu::layers::rows_per_vector`]); for G = 1 both layouts coincide.

use crate::cpu::layers::{linear_bwd, linear_fwd, silu, silu_grad};
use crate::cpu::weights::Lin;
use crate::cpu::Real;
use crate::model::params::TIME_FEATURES;

/// The sigma map's activations for the G conditioning rows.
pub(super) struct CondActs<T> {
    /// (G, 256) time feature
    feat: Vec<T>,
    /// (G, cond) fc1 output
    c1: Vec<T>,
    /// (G, cond) SiLU(c1)
    s1: Vec<T>,
    /// (G, cond) fc2 output
    c2: Vec<T>,
    /// (G, cond) c = SiLU(c2)
    pub c: Vec<T>,
}

impl<T: Real> CondActs<T> {
    /// The sigma map at σ = 0 (`sigma` = None: one row) or at each sequence's σ (B rows).
    pub fn forward(fc1: &Lin<T>, fc2: &Lin<T>, sigma: Option<&[f64]>) -> Self {
        let feat = sigma.map_or_else(time_feature_at_zero::<T>, time_features::<T>);
        let c1 = linear_rows(fc1, &feat);
        let s1: Vec<T> = c1.iter().map(|&x| silu(x)).collect();
        let c2 = linear_rows(fc2, &s1);
        let c = c2.iter().map(|&x| silu(x)).collect();
        CondActs {
            feat,
            c1,
            s1,
            c2,
            c,
        }
    }

    /// Backward from `dc` (G, cond) through SiLU, fc2, SiLU and fc1, row by row; the weight
    /// gradients (into `g1`, `g2`) sum over the rows. The feature needs no gradient.
    pub fn backward(&self, fc1: &Lin<T>, fc2: &Lin<T>, g1: &mut Lin<T>, g2: &mut Lin<T>, dc: &[T]) {
        let dc2: Vec<T> = dc
            .iter()
            .zip(&self.c2)
            .map(|(&g, &x)| g * silu_grad(x))
            .collect();
        let mut ds1 = vec![T::zero(); self.s1.len()];
        linear_rows_bwd(fc2, g2, &self.s1, &dc2, Some(&mut ds1));
        let dc1: Vec<T> = ds1
            .iter()
            .zip(&self.c1)
            .map(|(&g, &x)| g * silu_grad(x))
            .collect();
        linear_rows_bwd(fc1, g1, &self.feat, &dc1, None);
    }
}

/// The sinusoidal time feature at sigma = 0: `[cos 0]·128 ++ [sin 0]·128` (spec 2.2 step 2).
fn time_feature_at_zero<T: Real>() -> Vec<T> {
    let half = TIME_FEATURES / 2;
    (0..TIME_FEATURES)
        .map(|i| if i < half { T::one() } else { T::zero() })
        .collect()
}

/// The time features of each sigma, (G, 256): `[cos(σf), sin(σf)]` with
/// f_k = exp(−ln(10000)·k/128), computed in f64 and rounded to `T` (deviation 14.42).
fn time_features<T: Real>(sigma: &[f64]) -> Vec<T> {
    let half = TIME_FEATURES / 2;
    let freq: Vec<f64> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / half as f64).exp())
        .collect();
    let mut out = Vec::with_capacity(sigma.len() * TIME_FEATURES);
    for &s in sigma {
        out.extend(freq.iter().map(|f| T::lit((s * f).cos())));
        out.extend(freq.iter().map(|f| T::lit((s * f).sin())));
    }
    out
}

/// `y = x W^T + b` for the few conditioning rows: x (G, inp) -> y (G, out).
pub(super) fn linear_rows<T: Real>(l: &Lin<T>, x: &[T]) -> Vec<T> {
    let g = x.len() / l.inp;
    let mut y = vec![T::zero(); g * l.out];
    let (w, b) = l.wb();
    linear_fwd(x, w, b, (g, l.out, l.inp), &mut y);
    y
}

/// Backward of [`linear_rows`]: parameter gradients (summed over the rows) into `g`, and
/// `dx += dy·W` when `dx` is given.
pub(super) fn linear_rows_bwd<T: Real>(
    l: &Lin<T>,
    g: &mut Lin<T>,
    x: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
) {
    let rows = x.len() / l.inp;
    let mut tmp = dx.as_ref().map(|_| vec![T::zero(); x.len()]);
    let (gw, gb) = g.wb_mut();
    linear_bwd(
        dy,
        x,
        &l.w,
        (rows, l.out, l.inp),
        tmp.as_deref_mut(),
        gw,
        gb,
    );
    if let (Some(dx), Some(t)) = (dx, tmp) {
        dx.iter_mut().zip(t).for_each(|(a, b)| *a += b);
    }
}

/// (G, n·D) row-major -> (n, G, D) component-major.
pub(super) fn component_major<T: Copy>(m: &[T], n: usize, d: usize) -> Vec<T> {
    let g = m.len() / (n * d);
    let mut out = Vec::with_capacity(m.len());
    for k in 0..n {
        for r in 0..g {
            out.extend_from_slice(&m[(r * n + k) * d..][..d]);
        }
    }
    out
}

/// Inverse of [`component_major`]: (n, G, D) -> (G, n·D).
pub(super) fn row_major<T: Copy>(m: &[T], n: usize, d: usize) -> Vec<T> {
    let g = m.len() / (n * d);
    let mut out = Vec::with_capacity(m.len());
    for r in 0..g {
        for k in 0..n {
            out.extend_from_slice(&m[(k * g + r) * d..][..d]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_modulation_layouts_are_inverse_transposes() {
        let (n, g, d) = (6, 3, 4);
        let m: Vec<u32> = (0..(n * g * d) as u32).collect();
        let cm = component_major(&m, n, d);
        // component k, vector r, column j sits at (k·G + r)·D + j
        for (r, k, j) in [(0, 0, 0), (2, 5, 3), (1, 2, 1)] {
            assert_eq!(cm[(k * g + r) * d + j], m[r * n * d + k * d + j]);
        }
        assert_eq!(row_major(&cm, n, d), m);
        assert_eq!(
            component_major(&m[..n * d], n, d),
            &m[..n * d],
            "G = 1: same layout"
        );
    }

    #[test]
    fn time_features_at_zero_are_the_constant_feature() {
        let at_zero = time_features::<f64>(&[0.0, 0.0]);
        let constant = time_feature_at_zero::<f64>();
        assert_eq!(&at_zero[..TIME_FEATURES], &constant[..]);
        assert_eq!(&at_zero[TIME_FEATURES..], &constant[..]);
        // k = 0 has frequency 1; k = 64 has 10000^(-1/2) = 0.01.
        let f = time_features::<f64>(&[2.0]);
        assert_eq!(f[0], 2f64.cos());
        assert!(
            (f[128 + 64] - (0.02f64).sin()).abs() < 1e-15,
            "{}",
            f[128 + 64]
        );
    }
}
