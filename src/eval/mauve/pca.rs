//! Principal component analysis as MAUVE uses it: centre the rows, keep the leading components
//! until their share of the variance reaches a threshold, and project onto them.
//!
//! The components come from the symmetric eigendecomposition of the smaller of the two Gram
//! matrices (`XᵀX`, d×d, when d ≤ n; `XXᵀ`, n×n, otherwise), which gives the same explained
//! variances and the same projections (up to each component's sign, which distances ignore) as
//! scikit-learn's SVD-based `PCA`.

use nalgebra::{DMatrix, SymmetricEigen};

use crate::error::{Error, Result};

/// Rows projected onto the leading principal components.
#[derive(Clone, Debug)]
pub struct Projection {
    /// (n, dims) row-major.
    pub data: Vec<f64>,
    pub n: usize,
    /// Components kept.
    pub dims: usize,
    /// Explained-variance ratio of every component, in decreasing order.
    pub explained_ratio: Vec<f64>,
}

/// Projects the (n, d) row-major `rows` onto the fewest leading components whose cumulative
/// explained-variance ratio reaches `explained` (scikit-learn's `explained_variance_ratio_`
/// cumulated, first index where it is `>= explained`, that component included).
pub fn project(rows: &[f64], n: usize, d: usize, explained: f64) -> Result<Projection> {
    if rows.len() != n * d || n < 2 || d == 0 {
        return Err(Error::Shape(format!(
            "PCA: {} values for {n} rows of {d} (needs at least 2 rows and 1 column)",
            rows.len()
        )));
    }
    if !(explained > 0.0 && explained < 1.0) {
        return Err(Error::Config(format!(
            "PCA: explained variance must be in (0, 1), got {explained}"
        )));
    }
    let mut mean = vec![0.0; d];
    for r in rows.chunks(d) {
        for (m, &x) in mean.iter_mut().zip(r) {
            *m += x;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let xc = DMatrix::from_fn(n, d, |i, j| rows[i * d + j] - mean[j]);
    // Eigenvalues by decreasing size, and the projection of every row on component c.
    type ProjectOn = Box<dyn Fn(usize) -> Vec<f64>>;
    let (values, proj): (Vec<f64>, ProjectOn) = if d <= n {
        let eig = SymmetricEigen::new(xc.transpose() * &xc);
        let order = descending(eig.eigenvalues.as_slice());
        let vals = order.iter().map(|&i| eig.eigenvalues[i].max(0.0)).collect();
        let vecs = eig.eigenvectors;
        let f = move |c: usize| {
            let v = vecs.column(order[c]);
            (0..n).map(|i| xc.row(i).dot(&v.transpose())).collect()
        };
        (vals, Box::new(f))
    } else {
        let eig = SymmetricEigen::new(&xc * xc.transpose());
        let order = descending(eig.eigenvalues.as_slice());
        let vals: Vec<f64> = order.iter().map(|&i| eig.eigenvalues[i].max(0.0)).collect();
        let vecs = eig.eigenvectors;
        let sv: Vec<f64> = vals.iter().map(|v| v.sqrt()).collect();
        let f = move |c: usize| {
            let u = vecs.column(order[c]);
            (0..n).map(|i| u[i] * sv[c]).collect()
        };
        (vals, Box::new(f))
    };
    let total: f64 = values.iter().sum();
    if total <= 0.0 {
        return Err(Error::Shape(
            "PCA: the rows have no variance (all features equal after normalisation)".into(),
        ));
    }
    let explained_ratio: Vec<f64> = values.iter().map(|v| v / total).collect();
    let mut cum = 0.0;
    let mut dims = explained_ratio.len();
    for (i, r) in explained_ratio.iter().enumerate() {
        cum += r;
        if cum >= explained {
            dims = i + 1;
            break;
        }
    }
    let cols: Vec<Vec<f64>> = (0..dims).map(proj).collect();
    let mut data = vec![0.0; n * dims];
    for (c, col) in cols.iter().enumerate() {
        for (i, &v) in col.iter().enumerate() {
            data[i * dims + c] = v;
        }
    }
    Ok(Projection {
        data,
        n,
        dims,
        explained_ratio,
    })
}

/// Indices of `v` by decreasing value (ties by index).
fn descending(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_axes_of_an_anisotropic_cloud_by_both_routes() {
        // Points spread 10, 3 and 0.1 along three axes: the first two hold 99.9% of the variance.
        let mut rows = Vec::new();
        let mut s = 1u64;
        let mut u = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for _ in 0..50 {
            rows.extend([10.0 * u() + 1.0, 3.0 * u() - 2.0, 0.1 * u()]);
        }
        let p = project(&rows, 50, 3, 0.99).unwrap();
        assert_eq!(p.dims, 2);
        assert!(p.explained_ratio[0] > 0.85 && p.explained_ratio[2] < 1e-3);
        // The projection keeps the centred first coordinate up to sign.
        let mean0 = rows.chunks(3).map(|r| r[0]).sum::<f64>() / 50.0;
        let sign = (p.data[0] / (rows[0] - mean0)).signum();
        for i in 0..50 {
            let want = rows[i * 3] - mean0;
            assert!(
                (p.data[i * 2] * sign - want).abs() < 0.2,
                "row {i}: {} vs {want}",
                p.data[i * 2]
            );
        }
        // d > n: the Gram route gives the same ratios and pairwise distances.
        let few = &rows[..4 * 3];
        let a = project(few, 4, 3, 0.999_999).unwrap();
        let wide: Vec<f64> = few
            .chunks(3)
            .flat_map(|r| [r[0], r[1], r[2], 0.0, 0.0])
            .collect();
        let b = project(&wide, 4, 5, 0.999_999).unwrap();
        assert_eq!(a.dims, b.dims);
        for (x, y) in a.explained_ratio.iter().zip(&b.explained_ratio) {
            assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        }
        let dist = |p: &Projection, i: usize, j: usize| -> f64 {
            (0..p.dims)
                .map(|c| (p.data[i * p.dims + c] - p.data[j * p.dims + c]).powi(2))
                .sum()
        };
        for (i, j) in [(0, 1), (1, 3), (0, 2)] {
            assert!((dist(&a, i, j) - dist(&b, i, j)).abs() < 1e-9);
        }
    }

    #[test]
    fn rejects_degenerate_input() {
        assert!(project(&[1.0, 2.0], 1, 2, 0.9).is_err());
        assert!(project(&[1.0, 1.0, 1.0, 1.0], 2, 2, 0.9)
            .unwrap_err()
            .to_string()
            .contains("no variance"));
        assert!(project(&[1.0, 2.0, 3.0, 4.0], 2, 2, 1.0).is_err());
    }
}
