//! Loops that vectorise: fixed-order sums and dot products with 8 partial sums (any [`Real`]),
//! and branch-free f32 tanh, erf and exp for the elementwise loops of the f32 instantiation. The
//! libm functions are calls, so loops over them stay scalar: tanhf (through expm1f) alone took a
//! quarter of a training step, erff made the eps-MLP GELU ten times dearer than the tanh one.
//! These are plain mul/add/div/min/max (no `mul_add`: the baseline x86-64 target has no FMA and
//! it would become a libm call), so LLVM vectorises the loops. Accuracy (tested against f64 in
//! `layers_tests`): a few ulp. The f64 instantiation keeps the library functions.

use crate::cpu::Real;

/// `Σ x` in a fixed order with 8 interleaved partial sums: LLVM vectorises it (a serial float
/// sum cannot be reordered), and it is no less accurate.
#[inline]
pub fn sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rest {
        s += v;
    }
    s
}

/// `Σ a ⊙ b` in the order of [`sum`].
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// tanh as the odd rational minimax p(x)/q(x) of degrees 13/6 (Eigen's and XLA's), clamped
/// where tanh rounds to ±1 in f32.
#[inline]
pub fn tanh(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = -2.7607684e-16f32;
    for c in [
        2.000188e-13,
        -8.604672e-11,
        5.1222973e-08,
        1.48572235e-05,
        6.3726195e-04,
        4.8935246e-03,
    ] {
        p = p * x2 + c;
    }
    let mut q = 1.1982584e-06f32;
    for c in [1.1853471e-04, 2.2684347e-03, 4.893525e-03] {
        q = q * x2 + c;
    }
    x * p / q
}

/// erf as the odd rational p(x)/q(x) of degrees 13/8 (Eigen's), clamped at ±4 where erf rounds
/// to ±1 in f32.
#[inline]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.7261424e-10f32;
    for c in [
        2.7706815e-08,
        -2.101024e-06,
        -5.6925062e-05,
        -7.3499064e-04,
        -2.9546e-03,
        -1.6096033e-02,
    ] {
        p = p * x2 + c;
    }
    let mut q = -1.45660715e-05f32;
    for c in [
        -2.1337405e-04,
        -1.682827e-03,
        -7.3733293e-03,
        -1.4264739e-02,
    ] {
        q = q * x2 + c;
    }
    x * p / q
}

/// e^x as 2^n · e^r with n = round(x / ln 2) and Cephes' degree-6 polynomial for e^r on
/// |r| <= ln 2 / 2. Inputs are clamped to [-87, 88], where the result is a normal f32; below
/// that it returns about 1.6e-38 instead of a denormal or 0, which the softmax and the GELU
/// derivative cannot tell apart.
#[inline]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer that lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // r = x − n·ln 2 with ln 2 = 355/512 − 2.12e-4 (Cody-Waite): n·355/512 is exact.
    let r = x - n * (355.0 / 512.0) + n * 2.1219444e-04;
    let mut p = 1.9875691e-04f32;
    for c in [
        1.3981999e-03,
        8.333452e-03,
        4.1665796e-02,
        1.6666666e-01,
        0.5,
    ] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    let n_int = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    e_r * f32::from_bits(((n_int + 127) << 23) as u32)
}
