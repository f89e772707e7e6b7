//! Inputs and the GPU-vs-twin comparison for the distillation-loss tests: seeded cases, the
//! tolerance check (with its reasoning), and an f32 emulation of the kernel that the check must
//! accept.

use crate::cuda::ops::distill_kl::{cpu, DistillKlShape, DistillMode};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// One problem on the host: student logits (rows, ld) as f32 (NaN padding, a large mask-column
/// logit), teacher log-probs (rows, ldt) (NaN padding, the mask column -1e6 or -inf), xt.
pub(super) struct Case {
    pub(super) shape: DistillKlShape,
    pub(super) logits: Vec<f32>,
    pub(super) teacher: Vec<f32>,
    pub(super) tokens: Vec<u32>,
}

pub(super) fn uniform(seed: u64, n: usize, lo: f32, hi: f32, bf16_exact: bool) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        for x in ch.iter_mut() {
            let a = rng.random_range(lo..hi);
            *x = if bf16_exact {
                bf16::from_f32(a).to_f32()
            } else {
                a
            };
        }
    });
    v
}

/// f64 SUBS log-softmax of a row's real non-mask columns (others left as they are).
pub(super) fn log_softmax_row(x: &[f64], mask: usize) -> Vec<f64> {
    let real = || (0..x.len()).filter(|&j| j != mask);
    let m = real().map(|j| x[j]).fold(f64::NEG_INFINITY, f64::max);
    let lse = m + real().map(|j| (x[j] - m).exp()).sum::<f64>().ln();
    let mut out = x.to_vec();
    for j in real() {
        out[j] = x[j] - lse;
    }
    out
}

/// Logits in [lo, hi) (bf16-exact when asked), the teacher the log-softmax of other logits in
/// [lo, hi); rows r % 3 == 1 are unmasked (one row: masked). Teacher columns within 1e-3 of the
/// student's log-prob are moved 1e-3 away, so no sign(d) is decided by rounding (tvd).
#[allow(clippy::too_many_arguments)]
pub(super) fn case(
    seed: u64,
    rows: usize,
    vocab: usize,
    ld: usize,
    ldt: usize,
    mask: usize,
    lo: f32,
    hi: f32,
    bf16_exact: bool,
) -> Case {
    let mut logits = uniform(seed, rows * ld, lo, hi, bf16_exact);
    let raw_t = uniform(seed + 1, rows * vocab, lo, hi, false);
    let tokens: Vec<u32> = (0..rows)
        .map(|r| {
            if rows > 1 && r % 3 == 1 {
                let t = (r * 7919) % (vocab - 1);
                (t + (t >= mask) as usize) as u32
            } else {
                mask as u32
            }
        })
        .collect();
    let mut teacher = vec![f32::NAN; rows * ldt];
    teacher
        .par_chunks_mut(ldt)
        .zip(logits.par_chunks_mut(ld))
        .enumerate()
        .for_each(|(r, (t, z))| {
            for v in z[vocab..].iter_mut() {
                *v = f32::NAN;
            }
            z[mask] = 50.0;
            let tx: Vec<f64> = raw_t[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&a| a as f64)
                .collect();
            let lt = log_softmax_row(&tx, mask);
            let zx: Vec<f64> = z[..vocab].iter().map(|&a| a as f64).collect();
            let ls = log_softmax_row(&zx, mask);
            for j in (0..vocab).filter(|&j| j != mask) {
                let mut v = lt[j];
                if (ls[j] - v).abs() < 1e-3 {
                    v = ls[j] - 1e-3 * if ls[j] >= v { 1.0 } else { -1.0 };
                }
                t[j] = v as f32;
            }
            t[mask] = if r % 2 == 0 { -1e6 } else { f32::NEG_INFINITY };
        });
    Case {
        shape: DistillKlShape {
            rows,
            vocab,
            ld,
            ldt,
            mask_index: mask,
        },
        logits,
        teacher,
        tokens,
    }
}

pub(super) fn twin(c: &Case, mode: DistillMode, scale: f32) -> (Vec<f64>, Vec<f64>) {
    cpu::distill_kl(&c.logits, &c.teacher, &c.tokens, c.shape, mode, scale)
}

/// f32 rounding unit.
pub(super) const EPS32: f64 = 1.0 / (1u64 << 24) as f64;

/// Checks a GPU result against the f64 twin.
/// Loss: within 128 f32 rounding units of the magnitude of what the kernel adds (Σ|term| plus
/// each term's sensitivity to its inputs times their size, |z| + |lse| + |lt| + 1).
/// Gradient, per element: at most twice the error of the twin's value rounded to bf16 (the
/// kernel's only bf16 rounding; the error-ratio rule of docs/testing.md 2), plus 128 f32 rounding units
/// of the element's own magnitude bound (the terms it combines before cancelling), so a wrong
/// element fails and a cancelling one does not. Exact zeros where the twin has them. Rows with a
/// teacher column at -inf in the modes where that makes the divergence infinite: both losses
/// non-finite, the gradient not compared.
pub(super) fn check(
    name: &str,
    c: &Case,
    mode: DistillMode,
    scale: f32,
    got: &(Vec<f32>, Vec<f32>),
    want: &(Vec<f64>, Vec<f64>),
) {
    let sh = c.shape;
    let (ld, ldt, vocab, mask) = (sh.ld, sh.ldt, sh.vocab, sh.mask_index);
    let sc = scale as f64;
    let (mut worst_g, mut worst_b) = (0f64, 0f64);
    for r in 0..sh.rows {
        let g = &got.1[r * ld..(r + 1) * ld];
        let w = &want.1[r * ld..(r + 1) * ld];
        if c.tokens[r] as usize != mask {
            assert_eq!(got.0[r], 0.0, "{name}: row {r} (unmasked) loss");
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{name}: row {r} (unmasked) gradient"
            );
            continue;
        }
        let z = |j: usize| c.logits[r * ld + j] as f64;
        let lt = |j: usize| c.teacher[r * ldt + j] as f64;
        let real: Vec<usize> = (0..vocab).filter(|&j| j != mask).collect();
        let infinite = real.iter().any(|&j| lt(j) == f64::NEG_INFINITY);
        if infinite && mode != DistillMode::KlFwd {
            assert!(
                !got.0[r].is_finite() && !want.0[r].is_finite(),
                "{name}: row {r}: a teacher column at -inf: loss {} (twin {})",
                got.0[r],
                want.0[r]
            );
            continue;
        }
        let zm = real.iter().map(|&j| z(j)).fold(f64::NEG_INFINITY, f64::max);
        let lse = zm + real.iter().map(|&j| (z(j) - zm).exp()).sum::<f64>().ln();
        // Per column: p, d, q, and A = |z| + |lse| + |lt| + 1 (lt = -inf counts as 0: it only
        // enters through q = 0).
        let col = |j: usize| {
            let ls = z(j) - lse;
            let fin = lt(j).is_finite();
            let (ltf, q) = if fin {
                (lt(j), lt(j).exp())
            } else {
                (0.0, 0.0)
            };
            let d = ls - ltf;
            (
                ls.exp(),
                d,
                q,
                z(j).abs() + lse.abs() + ltf.abs() + 1.0,
                fin,
            )
        };
        let sum = |f: &dyn Fn(usize) -> f64| real.iter().map(|&j| f(j)).sum::<f64>();
        // Magnitudes of the row sums R and L.
        let (r_val, r_mag, l_mag) = match mode {
            DistillMode::KlBwd => {
                let m = sum(&|j| {
                    let (p, d, _, a, _) = col(j);
                    p * d.abs() + p * (d + 1.0).abs() * a
                });
                (want.0[r], m, m)
            }
            DistillMode::KlFwd => (
                sum(&|j| col(j).2),
                sum(&|j| {
                    let (_, _, q, a, _) = col(j);
                    q * a
                }),
                sum(&|j| {
                    let (_, d, q, a, _) = col(j);
                    q * (d.abs() + 1.0) * (a + 1.0)
                }),
            ),
            DistillMode::Mse => {
                let rv = sum(&|j| col(j).1);
                (
                    rv,
                    sum(&|j| col(j).1.abs() + col(j).3),
                    sum(&|j| {
                        let (_, d, _, a, _) = col(j);
                        d * d + 2.0 * d.abs() * a
                    }),
                )
            }
            DistillMode::Tvd => (
                sum(&|j| col(j).1.signum()),
                0.0,
                sum(&|j| col(j).1.abs() + col(j).3),
            ),
        };
        let le = (got.0[r] as f64 - want.0[r]).abs();
        let allowed = 128.0 * EPS32 * l_mag + 1e-30;
        assert!(
            le <= allowed,
            "{name}: row {r} loss {} vs twin {} (error {le:e}, allowed {allowed:e})",
            got.0[r],
            want.0[r]
        );
        for j in 0..ld {
            if w[j] == 0.0 {
                assert_eq!(g[j], 0.0, "{name}: row {r} column {j} must be 0");
                continue;
            }
            let (p, d, q, a, fin) = col(j);
            let m = match mode {
                DistillMode::KlBwd => p * (d.abs() + r_val.abs() + a + r_mag),
                DistillMode::KlFwd => {
                    p * r_val.abs() * a
                        + q * (1.0 + if fin { lt(j).abs() } else { 0.0 })
                        + p * r_mag
                }
                DistillMode::Mse => 2.0 * (a + p * r_val.abs() * a + p * r_mag),
                DistillMode::Tvd => p * r_val.abs() * a + p * r_mag,
            };
            let err = (g[j] as f64 - w[j]).abs();
            let err_b = (bf16::from_f64(w[j]).to_f64() - w[j]).abs();
            let allowed = 2.0 * err_b + 128.0 * EPS32 * sc * m + 1e-30 * sc;
            assert!(
                err <= allowed,
                "{name}: row {r} column {j}: got {} want {} (error {err:e}, allowed {allowed:e}: \
                 2 x bf16 rounding {err_b:e} + f32 bound)",
                g[j],
                w[j]
            );
            worst_g = worst_g.max(err / w[j].abs());
            worst_b = worst_b.max(err_b / w[j].abs());
        }
    }
    eprintln!(
        "{name}: worst relative gradient error {worst_g:.2e} (bf16-rounded twin {worst_b:.2e})"
    );
}

/// The kernel's arithmetic emulated on the host in f32 (sums in chunks of 64, then pairwise,
/// close to the kernel's per-thread runs and tree merge; `f32::exp` for `__expf`), the gradient
/// rounded to bf16: what `check` must accept from a correct kernel.
pub(super) fn emulate_f32(c: &Case, mode: DistillMode, scale: f32) -> (Vec<f32>, Vec<f32>) {
    fn tree(v: &[f32]) -> f32 {
        if v.len() <= 64 {
            return v.iter().fold(0f32, |a, &b| a + b);
        }
        let h = v.len().div_ceil(128) * 64;
        tree(&v[..h]) + tree(&v[h..])
    }
    let sh = c.shape;
    let (ld, ldt, mask) = (sh.ld, sh.ldt, sh.mask_index);
    let mut loss = vec![0f32; sh.rows];
    let mut grad = vec![0f32; sh.rows * ld];
    for r in 0..sh.rows {
        if c.tokens[r] as usize != mask {
            continue;
        }
        let real: Vec<usize> = (0..sh.vocab).filter(|&j| j != mask).collect();
        let z: Vec<f32> = real.iter().map(|&j| c.logits[r * ld + j]).collect();
        let t: Vec<f32> = real.iter().map(|&j| c.teacher[r * ldt + j]).collect();
        let m = z.iter().fold(f32::MIN, |a, &b| a.max(b));
        let s = tree(&z.iter().map(|&x| (x - m).exp()).collect::<Vec<_>>());
        let lse = m + s.ln();
        let ls: Vec<f32> = z.iter().map(|&x| x - lse).collect();
        let d: Vec<f32> = ls.iter().zip(&t).map(|(a, b)| a - b).collect();
        let p: Vec<f32> = ls.iter().map(|a| a.exp()).collect();
        let sign = |x: f32| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        };
        let n = real.len();
        let (rt, lt): (Vec<f32>, Vec<f32>) = (0..n)
            .map(|k| match mode {
                DistillMode::KlBwd => (p[k] * d[k], 0.0),
                DistillMode::KlFwd => {
                    let q = t[k].exp();
                    let l = if t[k] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        q * (t[k] - ls[k])
                    };
                    (q, l)
                }
                DistillMode::Mse => (d[k], d[k] * d[k]),
                DistillMode::Tvd => (sign(d[k]), d[k].abs()),
            })
            .unzip();
        let big_r = tree(&rt);
        loss[r] = if mode == DistillMode::KlBwd {
            big_r
        } else {
            tree(&lt)
        };
        for (k, &j) in real.iter().enumerate() {
            let g = match mode {
                DistillMode::KlBwd => p[k] * (d[k] - big_r),
                DistillMode::KlFwd => p[k] * big_r - t[k].exp(),
                DistillMode::Mse => 2.0 * (d[k] - p[k] * big_r),
                DistillMode::Tvd => sign(d[k]) - p[k] * big_r,
            };
            grad[r * ld + j] = bf16::from_f32(scale * g).to_f32();
        }
    }
    (loss, grad)
}
