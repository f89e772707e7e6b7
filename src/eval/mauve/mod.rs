//! MAUVE (spec 8.4) as the `mauve-text` package computes it from precomputed features:
//!
//! 1. stack the rows as `[q; p]` and l2-normalise each row;
//! 2. PCA on the union, keeping the fewest leading components that explain at least 0.9 of the
//!    variance ([`pca`]);
//! 3. k-means in that space with `num_buckets` clusters, `'auto'` meaning
//!    `max(2, round(min(|p|, |q|) / 10))`, 5 restarts of at most 500 iterations ([`kmeans`]);
//! 4. the histograms of p's and q's labels over the buckets;
//! 5. the divergence frontier: for 25 mixture weights `w = linspace(1e-6, 1 − 1e-6, 25)` and
//!    `r = w·p + (1 − w)·q`, the points `(exp(−c·KL(q‖r)), exp(−c·KL(p‖r)))` with scaling
//!    `c = 5`, plus the extreme points `(1, 0)` and `(0, 1)`;
//! 6. MAUVE = the mean of the two trapezoid areas, x sorted against y and y sorted against x.
//!
//! Ties in the sort (only when p = q, where every frontier point is (1, 1)) are ordered as the
//! curve is traced, the larger other coordinate first, so p = q gives exactly 1; numpy's
//! unstable argsort leaves that order unspecified.
//!
//! The reference (eval_mauve.py) runs mauve-text with p = 256 human references, q = 1280
//! generations, features from gpt2-large's last hidden state at the final token, seeds 42..46,
//! and reports the mean. Here the features come from the judge ([`crate::eval::lm::Judge`]), so
//! a number is comparable only under the same judge; the report names it.
//!
//! Checked against mauve-text 0.4.0 (`tools/reference/mauve_fixture.py`,
//! `tests/fixtures/mauve/`): from its own histograms the frontier and MAUVE agree within 1e-6;
//! end to end (own PCA and k-means) the mean over five seeds within 0.02.

pub mod kmeans;
pub mod pca;

use crate::error::{Error, Result};
use kmeans::KmeansConfig;

/// Bucket count of the histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buckets {
    /// `max(2, round(min(|p|, |q|) / 10))` (mauve-text's default).
    Auto,
    Fixed(usize),
}

/// Settings, with mauve-text's defaults from [`MauveConfig::default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MauveConfig {
    pub buckets: Buckets,
    /// Share of the variance the PCA keeps (0.9).
    pub explained_variance: f64,
    /// k-means restarts (5).
    pub kmeans_redo: usize,
    /// k-means iterations per restart at most (500).
    pub kmeans_max_iter: usize,
    /// Points on the frontier between the two extremes (25).
    pub discretization: usize,
    /// The constant c of the frontier (5).
    pub scaling: f64,
}

impl Default for MauveConfig {
    fn default() -> Self {
        MauveConfig {
            buckets: Buckets::Auto,
            explained_variance: 0.9,
            kmeans_redo: 5,
            kmeans_max_iter: 500,
            discretization: 25,
            scaling: 5.0,
        }
    }
}

/// One MAUVE computation.
#[derive(Clone, Debug)]
pub struct MauveResult {
    pub mauve: f64,
    pub p_hist: Vec<f64>,
    pub q_hist: Vec<f64>,
    /// The frontier points, extremes included (`discretization + 2` points).
    pub curve: Vec<(f64, f64)>,
    pub buckets: usize,
    /// PCA components kept.
    pub pca_dims: usize,
}

/// `numpy.linspace(start, stop, num)`: `start + i·step`, the last point exactly `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// KL(p‖q) of two histograms: +inf when p has mass where q has none.
pub fn kl(p: &[f64], q: &[f64]) -> f64 {
    let mut s = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        if a != 0.0 && b == 0.0 {
            return f64::INFINITY;
        }
        if a != 0.0 {
            s += a * (a / b).ln();
        }
    }
    s
}

/// The divergence frontier of two histograms (module doc, step 5).
pub fn divergence_curve(
    p: &[f64],
    q: &[f64],
    discretization: usize,
    scaling: f64,
) -> Vec<(f64, f64)> {
    let mut curve = Vec::with_capacity(discretization + 2);
    curve.push((1.0, 0.0));
    for w in linspace(1e-6, 1.0 - 1e-6, discretization) {
        let r: Vec<f64> = p
            .iter()
            .zip(q)
            .map(|(a, b)| w * a + (1.0 - w) * b)
            .collect();
        curve.push(((-scaling * kl(q, &r)).exp(), (-scaling * kl(p, &r)).exp()));
    }
    curve.push((0.0, 1.0));
    curve
}

/// Trapezoid area under `pts` sorted by x (ties: larger y first).
fn sorted_trapezoid(pts: impl Iterator<Item = (f64, f64)>) -> f64 {
    let mut v: Vec<(f64, f64)> = pts.collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    v.windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
        .sum()
}

/// MAUVE of a frontier (module doc, step 6).
pub fn area_under_frontier(curve: &[(f64, f64)]) -> f64 {
    0.5 * (sorted_trapezoid(curve.iter().copied())
        + sorted_trapezoid(curve.iter().map(|&(x, y)| (y, x))))
}

/// MAUVE and frontier of two histograms.
pub fn mauve_from_histograms(
    p: &[f64],
    q: &[f64],
    cfg: &MauveConfig,
) -> Result<(f64, Vec<(f64, f64)>)> {
    if p.len() != q.len() || p.is_empty() {
        return Err(Error::Shape(format!(
            "MAUVE: histograms of {} and {} buckets",
            p.len(),
            q.len()
        )));
    }
    let curve = divergence_curve(p, q, cfg.discretization, cfg.scaling);
    Ok((area_under_frontier(&curve), curve))
}

/// The bucket count for sets of `np` and `nq` rows.
pub fn bucket_count(b: Buckets, np: usize, nq: usize) -> usize {
    match b {
        // f64::round rounds halves away from zero, Python's round to even: equal except at
        // exact halves, which min/10 reaches for min = 5, 15, 25, ...
        Buckets::Auto => {
            let x = np.min(nq) as f64 / 10.0;
            let r = x.round();
            let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
                r - 1.0
            } else {
                r
            };
            (r as usize).max(2)
        }
        Buckets::Fixed(k) => k,
    }
}

/// l2-normalised rows `[q; p]` projected by the PCA of step 2 (independent of the seed).
fn project_union(p: &[Vec<f32>], q: &[Vec<f32>], cfg: &MauveConfig) -> Result<pca::Projection> {
    if p.is_empty() || q.is_empty() {
        return Err(Error::Shape(format!(
            "MAUVE: {} reference and {} generated feature rows (both must be non-empty)",
            p.len(),
            q.len()
        )));
    }
    let d = p[0].len();
    if let Some(r) = p.iter().chain(q).find(|r| r.len() != d) {
        return Err(Error::Shape(format!(
            "MAUVE: feature rows of {} and {d} values",
            r.len()
        )));
    }
    let n = p.len() + q.len();
    let mut rows = Vec::with_capacity(n * d);
    for r in q.iter().chain(p) {
        let norm = r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        rows.extend(r.iter().map(|&x| x as f64 * inv));
    }
    pca::project(&rows, n, d, cfg.explained_variance)
}

/// Steps 3-6 on a projection of `np` reference rows after `nq` generated ones.
fn cluster_and_score(
    proj: &pca::Projection,
    np: usize,
    nq: usize,
    cfg: &MauveConfig,
    seed: u64,
) -> Result<MauveResult> {
    let buckets = bucket_count(cfg.buckets, np, nq);
    let cl = kmeans::kmeans(
        &proj.data,
        proj.n,
        proj.dims,
        KmeansConfig {
            clusters: buckets,
            redo: cfg.kmeans_redo,
            max_iter: cfg.kmeans_max_iter,
            seed,
        },
    )?;
    let hist = |labels: &[usize]| -> Vec<f64> {
        let mut h = vec![0.0; buckets];
        labels.iter().for_each(|&l| h[l] += 1.0);
        let total = labels.len() as f64;
        h.iter_mut().for_each(|x| *x /= total);
        h
    };
    let q_hist = hist(&cl.labels[..nq]);
    let p_hist = hist(&cl.labels[nq..]);
    let (mauve, curve) = mauve_from_histograms(&p_hist, &q_hist, cfg)?;
    Ok(MauveResult {
        mauve,
        p_hist,
        q_hist,
        curve,
        buckets,
        pca_dims: proj.dims,
    })
}

/// MAUVE of feature sets `p` (references) and `q` (generations), one row per text, with the
/// k-means seeded by `seed`.
pub fn compute_mauve(
    p: &[Vec<f32>],
    q: &[Vec<f32>],
    cfg: &MauveConfig,
    seed: u64,
) -> Result<MauveResult> {
    let proj = project_union(p, q, cfg)?;
    cluster_and_score(&proj, p.len(), q.len(), cfg, seed)
}

/// The mean MAUVE over `seeds` (the reference: 42..46) and every run. The PCA does not depend
/// on the seed and is computed once.
pub fn mean_mauve(
    p: &[Vec<f32>],
    q: &[Vec<f32>],
    cfg: &MauveConfig,
    seeds: &[u64],
) -> Result<(f64, Vec<MauveResult>)> {
    if seeds.is_empty() {
        return Err(Error::Config("MAUVE: no seeds".into()));
    }
    let proj = project_union(p, q, cfg)?;
    let runs: Vec<MauveResult> = seeds
        .iter()
        .map(|&s| cluster_and_score(&proj, p.len(), q.len(), cfg, s))
        .collect::<Result<_>>()?;
    let mean = runs.iter().map(|r| r.mauve).sum::<f64>() / runs.len() as f64;
    Ok((mean, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_and_kl_match_their_definitions() {
        let w = linspace(1e-6, 1.0 - 1e-6, 25);
        assert_eq!(w.len(), 25);
        assert_eq!(w[0], 1e-6);
        assert_eq!(w[24], 1.0 - 1e-6);
        assert!((w[12] - 0.5).abs() < 1e-15);
        assert_eq!(kl(&[0.5, 0.5], &[1.0, 0.0]), f64::INFINITY);
        assert_eq!(kl(&[0.0, 1.0], &[0.5, 0.5]), 2f64.ln());
    }

    #[test]
    fn equal_histograms_score_one_and_disjoint_ones_about_zero() {
        let cfg = MauveConfig::default();
        let p = [0.25, 0.25, 0.5];
        let (m, curve) = mauve_from_histograms(&p, &p, &cfg).unwrap();
        assert_eq!(curve.len(), 27);
        assert!((m - 1.0).abs() < 1e-12, "{m}");
        let (m, _) =
            mauve_from_histograms(&[0.5, 0.5, 0.0, 0.0], &[0.0, 0.0, 0.5, 0.5], &cfg).unwrap();
        assert!(m < 0.01, "{m}");
    }

    #[test]
    fn auto_buckets_round_as_python() {
        assert_eq!(bucket_count(Buckets::Auto, 256, 1280), 26);
        assert_eq!(bucket_count(Buckets::Auto, 200, 600), 20);
        assert_eq!(bucket_count(Buckets::Auto, 15, 600), 2); // round(1.5) = 2
        assert_eq!(bucket_count(Buckets::Auto, 25, 600), 2); // round(2.5) = 2 (to even)
        assert_eq!(bucket_count(Buckets::Auto, 35, 600), 4); // round(3.5) = 4
        assert_eq!(bucket_count(Buckets::Auto, 3, 600), 2);
        assert_eq!(bucket_count(Buckets::Fixed(7), 3, 600), 7);
    }
}
