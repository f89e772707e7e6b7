//! k-means as MAUVE runs it (faiss `Kmeans` with `nredo` restarts, the lowest objective kept):
//! each restart starts from `k` distinct data points drawn at random, alternates assignment
//! (nearest centroid, squared Euclidean) and centroid means, and re-seeds an empty cluster by
//! splitting the largest one (faiss's rule: a copy of its centroid, both perturbed by a relative
//! 1/1024 in opposite directions per coordinate).
//!
//! One difference from faiss, which always runs `max_iter` iterations: a restart stops as soon
//! as an assignment repeats the previous one. Lloyd's iteration is then at a fixed point, so the
//! result is the one the remaining iterations would return. The random initial points come from
//! ChaCha8 keyed by the seed, not faiss's generator, so the clusters are of the same algorithm
//! but not the same draws; MAUVE averages over seeds for that reason.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Settings of one clustering.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KmeansConfig {
    pub clusters: usize,
    /// Restarts; the one with the lowest objective is kept (mauve-text: 5).
    pub redo: usize,
    /// Iterations per restart at most (mauve-text: 500).
    pub max_iter: usize,
    pub seed: u64,
}

/// The kept clustering.
#[derive(Clone, Debug)]
pub struct Clustering {
    /// Cluster of every row.
    pub labels: Vec<usize>,
    /// Sum of squared distances of the rows to their centroids.
    pub objective: f64,
    /// Iterations the kept restart ran.
    pub iterations: usize,
}

const SPLIT_EPS: f64 = 1.0 / 1024.0;

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Nearest centroid of every row (ties to the lower index) and the objective.
fn assign(data: &[f64], dim: usize, centroids: &[f64]) -> (Vec<usize>, f64) {
    let best: Vec<(usize, f64)> = data
        .par_chunks(dim)
        .map(|row| {
            let mut best = (0, f64::INFINITY);
            for (c, cen) in centroids.chunks(dim).enumerate() {
                let d = sq_dist(row, cen);
                if d < best.1 {
                    best = (c, d);
                }
            }
            best
        })
        .collect();
    let obj = best.iter().map(|b| b.1).sum();
    (best.into_iter().map(|b| b.0).collect(), obj)
}

/// Centroid means of `labels`; empty clusters split the largest cluster.
fn update(data: &[f64], dim: usize, labels: &[usize], k: usize) -> Vec<f64> {
    let mut sums = vec![0.0; k * dim];
    let mut counts = vec![0usize; k];
    for (row, &l) in data.chunks(dim).zip(labels) {
        counts[l] += 1;
        for (s, &x) in sums[l * dim..(l + 1) * dim].iter_mut().zip(row) {
            *s += x;
        }
    }
    for c in 0..k {
        if counts[c] > 0 {
            let n = counts[c] as f64;
            sums[c * dim..(c + 1) * dim]
                .iter_mut()
                .for_each(|s| *s /= n);
        }
    }
    for c in 0..k {
        if counts[c] > 0 {
            continue;
        }
        let big = (0..k)
            .max_by(|&a, &b| counts[a].cmp(&counts[b]).then(b.cmp(&a)))
            .expect("k >= 1");
        for j in 0..dim {
            let v = sums[big * dim + j];
            let (mine, theirs) = if j % 2 == 0 {
                (1.0 + SPLIT_EPS, 1.0 - SPLIT_EPS)
            } else {
                (1.0 - SPLIT_EPS, 1.0 + SPLIT_EPS)
            };
            sums[c * dim + j] = v * mine;
            sums[big * dim + j] = v * theirs;
        }
        let half = counts[big] / 2;
        counts[c] = half;
        counts[big] -= half;
    }
    sums
}

/// k distinct row indices (a partial Fisher-Yates shuffle).
fn initial_rows(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = rng.random_range(i..n);
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

/// Clusters the (n, dim) row-major `data`.
pub fn kmeans(data: &[f64], n: usize, dim: usize, cfg: KmeansConfig) -> Result<Clustering> {
    let k = cfg.clusters;
    if data.len() != n * dim || dim == 0 {
        return Err(Error::Shape(format!(
            "k-means: {} values for {n} rows of {dim}",
            data.len()
        )));
    }
    if k == 0 || k > n || cfg.redo == 0 || cfg.max_iter == 0 {
        return Err(Error::Config(format!(
            "k-means: {k} clusters for {n} rows, {} restarts, {} iterations (need 1 <= \
             clusters <= rows and at least one restart and iteration)",
            cfg.redo, cfg.max_iter
        )));
    }
    let mut best: Option<Clustering> = None;
    for r in 0..cfg.redo {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(r as u64);
        let mut centroids: Vec<f64> = initial_rows(n, k, &mut rng)
            .into_iter()
            .flat_map(|i| data[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let (mut labels, mut obj) = assign(data, dim, &centroids);
        let mut iterations = 1;
        while iterations < cfg.max_iter {
            centroids = update(data, dim, &labels, k);
            let (next, o) = assign(data, dim, &centroids);
            iterations += 1;
            let same = next == labels;
            labels = next;
            obj = o;
            if same {
                break;
            }
        }
        if best.as_ref().is_none_or(|b| obj < b.objective) {
            best = Some(Clustering {
                labels,
                objective: obj,
                iterations,
            });
        }
    }
    Ok(best.expect("redo >= 1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (Vec<f64>, Vec<usize>) {
        // Three tight, well separated groups of 20 points in 2-d.
        let centres = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut data, mut truth) = (Vec::new(), Vec::new());
        for i in 0..60 {
            let (cx, cy) = centres[i % 3];
            data.extend([
                cx + rng.random::<f64>() - 0.5,
                cy + rng.random::<f64>() - 0.5,
            ]);
            truth.push(i % 3);
        }
        (data, truth)
    }

    #[test]
    fn finds_separated_groups_and_is_deterministic() {
        let (data, truth) = blobs();
        let cfg = KmeansConfig {
            clusters: 3,
            redo: 5,
            max_iter: 500,
            seed: 42,
        };
        let a = kmeans(&data, 60, 2, cfg).unwrap();
        // Same partition as the truth, up to relabelling.
        for i in 0..60 {
            for j in 0..60 {
                assert_eq!(a.labels[i] == a.labels[j], truth[i] == truth[j], "{i} {j}");
            }
        }
        assert!(a.objective < 60.0 * 0.5, "objective {}", a.objective);
        let b = kmeans(&data, 60, 2, cfg).unwrap();
        assert_eq!(a.labels, b.labels);
    }

    #[test]
    fn empty_clusters_are_split_and_bad_sizes_rejected() {
        // Four copies of two points and four clusters: two starts coincide, so a cluster
        // empties and must be re-seeded; every cluster ends with a centroid.
        let data = [0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0];
        let c = kmeans(
            &data,
            5,
            2,
            KmeansConfig {
                clusters: 4,
                redo: 3,
                max_iter: 50,
                seed: 1,
            },
        )
        .unwrap();
        assert_eq!(c.labels.len(), 5);
        assert!(c.labels.iter().all(|&l| l < 4));
        let bad = KmeansConfig {
            clusters: 6,
            redo: 1,
            max_iter: 1,
            seed: 0,
        };
        assert!(kmeans(&data, 5, 2, bad).is_err());
    }
}
