//! The one matrix product of the CPU backend: `C = alpha·op(A)·op(B) + beta·C` on row-major
//! slices, through `matrixmultiply` (sgemm / dgemm via [`Real::gemm_raw`]). Transposes are
//! strides, never copies. matrixmultiply threads split only the m and n loops, so every output
//! element is one fixed-order dot product: results are the same run to run.

use crate::cpu::Real;

/// A read-only row-major operand with leading dimension `ld`, used as stored or transposed.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub trans: bool,
}

impl<'a, T> Mat<'a, T> {
    /// `data` as stored: row r, column c at `r·ld + c`.
    pub fn n(data: &'a [T], ld: usize) -> Self {
        Mat {
            data,
            ld,
            trans: false,
        }
    }
    /// The transpose of the stored row-major matrix.
    pub fn t(data: &'a [T], ld: usize) -> Self {
        Mat {
            data,
            ld,
            trans: true,
        }
    }
    /// (row stride, column stride) of op(self) and the element count a (rows, cols) op needs.
    fn strides(&self, rows: usize, cols: usize) -> (isize, isize, usize) {
        let (stored_rows, stored_cols) = if self.trans {
            (cols, rows)
        } else {
            (rows, cols)
        };
        assert!(
            self.ld >= stored_cols,
            "gemm operand: ld {} < stored columns {stored_cols}",
            self.ld
        );
        let need = (stored_rows - 1) * self.ld + stored_cols;
        if self.trans {
            (1, self.ld as isize, need)
        } else {
            (self.ld as isize, 1, need)
        }
    }
}

/// `C (m×n, leading dimension ldc) = alpha·op(A)·op(B) + beta·C` with op(A) m×k and op(B) k×n.
/// With `beta = 0`, C need not be initialised (NaNs in it are not propagated).
///
/// Panics if a slice is too short for its shape: every caller derives the shapes from
/// dimensions it has already checked, so a failure here is a bug in this module, not user error.
pub fn gemm<T: Real>(
    (m, n, k): (usize, usize, usize),
    alpha: T,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "gemm: ldc {ldc} < n {n}");
    let need_c = (m - 1) * ldc + n;
    assert!(
        c.len() >= need_c,
        "gemm: C has {} elements, (m {m}, n {n}, ldc {ldc}) needs {need_c}",
        c.len()
    );
    if k == 0 {
        // No products: C = beta·C (beta 0 overwrites, whatever C held).
        for r in 0..m {
            for x in &mut c[r * ldc..r * ldc + n] {
                *x = if beta == T::zero() {
                    T::zero()
                } else {
                    *x * beta
                };
            }
        }
        return;
    }
    let (rsa, csa, need_a) = a.strides(m, k);
    let (rsb, csb, need_b) = b.strides(k, n);
    assert!(
        a.data.len() >= need_a && b.data.len() >= need_b,
        "gemm: A has {} elements (needs {need_a}), B has {} (needs {need_b}) for m {m} n {n} k {k}",
        a.data.len(),
        b.data.len()
    );
    // SAFETY: the asserts above show that every index the product touches, (m-1)·rs + (k-1)·cs
    // for A, (k-1)·rs + (n-1)·cs for B and (m-1)·ldc + (n-1) for C, lies inside its slice; C is
    // a unique borrow, so it aliases neither A nor B.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loop in f64 over explicit index maps.
    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_for_every_transpose_and_beta() {
        // A tiny and a medium product (matrixmultiply switches kernels and threads by size).
        for (m, n, k) in [(7, 5, 9), (40, 36, 50)] {
            check_against_naive(m, n, k);
        }
        let mut c = vec![3.0f32; 4];
        gemm(
            (2, 2, 0),
            1.0,
            Mat::n(&[], 0),
            Mat::n(&[], 2),
            0.0,
            &mut c,
            2,
        );
        assert_eq!(c, [0.0; 4], "k = 0 with beta 0 clears C");
        let mut c = vec![f32::NAN; 4];
        let (a, b) = ([1.0, 2.0], [3.0, 4.0]);
        gemm((2, 2, 1), 1.0, Mat::n(&a, 1), Mat::n(&b, 2), 0.0, &mut c, 2);
        assert_eq!(c, [3.0, 4.0, 6.0, 8.0], "beta 0 ignores NaNs in C");
    }

    fn check_against_naive(m: usize, n: usize, k: usize) {
        let a: Vec<f64> = (0..m * k + 100).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n + 100).map(|i| (i as f64 * 0.11).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // Padded leading dimensions (+2) exercise the strides.
            let (lda, ldb) = (if ta { m } else { k } + 2, if tb { k } else { n } + 2);
            let am = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
            let bm = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
            let want = naive(m, n, k, am, bm);
            let ma = Mat {
                data: &a[..],
                ld: lda,
                trans: ta,
            };
            let mb = Mat {
                data: &b[..],
                ld: ldb,
                trans: tb,
            };
            for beta in [0.0, 1.0, 0.5] {
                let mut c = vec![1.0f64; m * n];
                gemm((m, n, k), 2.0, ma, mb, beta, &mut c, n);
                for i in 0..m * n {
                    let w = 2.0 * want[i] + beta;
                    assert!(
                        (c[i] - w).abs() < 1e-12,
                        "m {m} n {n} k {k} ta {ta} tb {tb} beta {beta} at {i}: {} vs {w}",
                        c[i]
                    );
                }
            }
        }
    }
}
