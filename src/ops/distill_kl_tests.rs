//! Tests of the fused distillation loss: the twin against f64 finite differences and a case
//! worked by hand, then the GPU kernels against the twin.

use super::*;
use crate::gpu::gpu_for_tests;
use crate::ops::grad_check::{assert_bits_eq, assert_grad, fd_grad};
use crate::testing::Tol;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// One problem on the host: student logits (rows, ld) as f32 (NaN padding, a large mask-column
/// logit), teacher log-probs (rows, ldt) (NaN padding, the mask column -1e6 or -inf), xt.
struct Case {
    shape: DistillKlShape,
    logits: Vec<f32>,
    teacher: Vec<f32>,
    tokens: Vec<u32>,
}

fn uniform(seed: u64, n: usize, lo: f32, hi: f32, bf16_exact: bool) -> Vec<f32> {
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
fn log_softmax_row(x: &[f64], mask: usize) -> Vec<f64> {
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
fn case(
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

fn twin(c: &Case, mode: DistillMode, scale: f32) -> (Vec<f64>, Vec<f64>) {
    cpu::distill_kl(&c.logits, &c.teacher, &c.tokens, c.shape, mode, scale)
}

// ---- the twin ----------------------------------------------------------------------------

#[test]
fn twin_matches_finite_differences() {
    // F = scale · Σ loss as a function of every logit (padding and mask columns included:
    // their finite differences are 0 because the loss ignores them).
    for mode in DistillMode::ALL {
        for &(rows, vocab, ld, ldt, mask) in &[
            (4, 7, 8, 7, 3),
            (3, 5, 5, 8, 0),
            (4, 9, 12, 12, 8),
            (2, 2, 4, 2, 1),
        ] {
            let mut c = case(rows as u64, rows, vocab, ld, ldt, mask, -3.0, 3.0, false);
            // Finite padding (the finite differences perturb it; NaN would poison F itself).
            for r in 0..rows {
                c.logits[r * ld + vocab..(r + 1) * ld].fill(7.0);
            }
            let scale = 0.37f32;
            let (_, grad) = twin(&c, mode, scale);
            let x: Vec<f64> = c.logits.iter().map(|&a| a as f64).collect();
            let f = |x: &[f64]| -> f64 {
                let (l, _) = cpu::distill_kl(x, &c.teacher, &c.tokens, c.shape, mode, scale);
                scale as f64 * l.iter().sum::<f64>()
            };
            let fd = fd_grad(f, &x, 1e-5, None);
            let name = format!("distill_kl {mode:?} rows {rows} V {vocab} ld {ld} ldt {ldt}");
            assert_grad(
                &name,
                &grad,
                &fd,
                Tol {
                    abs: 1e-8,
                    rel: 1e-6,
                },
            );
            // A masked row's gradient sums to 0 (the log-softmax is shift-invariant) and is
            // not identically 0; unmasked rows, the mask column and padding get exact zeros.
            for r in 0..rows {
                let g = &grad[r * ld..(r + 1) * ld];
                if c.tokens[r] as usize != mask {
                    assert!(g.iter().all(|&v| v == 0.0), "{name}: row {r} is unmasked");
                    continue;
                }
                assert!(
                    g.iter().sum::<f64>().abs() < 1e-12,
                    "{name}: row {r}: Σ grad"
                );
                assert!(g[mask] == 0.0 && g[vocab..].iter().all(|&v| v == 0.0));
                assert!(
                    vocab == 2 || g.iter().any(|&v| v.abs() > 1e-6),
                    "{name}: row {r}"
                );
            }
        }
    }
}

#[test]
fn twin_hand_case_v5() {
    // V = 5, mask 4, two masked positions. Row 0: the student's probabilities are exactly
    // (0.1, 0.2, 0.3, 0.4), the teacher's uniform; row 1 the other way round. The mask columns
    // (student 7 and -3, teacher NaN and -inf) must not matter. The teacher is f32, so the
    // hand values hold to its rounding (TOL).
    const TOL: f64 = 1e-7;
    let (v, mask) = (5, 4);
    let ln = f64::ln;
    let logits: Vec<f64> = vec![
        ln(1.0),
        ln(2.0),
        ln(3.0),
        ln(4.0),
        7.0,
        0.0,
        0.0,
        0.0,
        0.0,
        -3.0,
    ];
    let q = ln(0.25) as f32;
    let teacher = vec![
        q,
        q,
        q,
        q,
        f32::NAN,
        ln(0.1) as f32,
        ln(0.2) as f32,
        ln(0.3) as f32,
        ln(0.4) as f32,
        f32::NEG_INFINITY,
    ];
    let shape = DistillKlShape {
        rows: 2,
        vocab: v,
        ld: v,
        ldt: v,
        mask_index: mask,
    };
    let tokens = [4u32, 4];
    let run = |mode| cpu::distill_kl(&logits, &teacher, &tokens, shape, mode, 1.0);
    // Row 0 by hand, p = (0.1, 0.2, 0.3, 0.4), q = 0.25: log(p/q) = ln 0.4, ln 0.8, ln 1.2,
    // ln 1.6.
    let kl_pq = 0.1 * ln(0.4) + 0.2 * ln(0.8) + 0.3 * ln(1.2) + 0.4 * ln(1.6);
    let kl_qp = 0.25 * (ln(2.5) + ln(1.25) + ln(0.25 / 0.3) + ln(0.625));
    let mse = ln(0.4).powi(2) + ln(0.8).powi(2) + ln(1.2).powi(2) + ln(1.6).powi(2);
    let tvd = -ln(0.4) - ln(0.8) + ln(1.2) + ln(1.6);
    // Row 1 is row 0 with the roles exchanged: KL(s||t) of row 1 is KL(t||s) of row 0.
    let want = [
        (DistillMode::KlBwd, [kl_pq, kl_qp]),
        (DistillMode::KlFwd, [kl_qp, kl_pq]),
        (DistillMode::Mse, [mse, mse]),
        (DistillMode::Tvd, [tvd, tvd]),
    ];
    for (mode, w) in want {
        let (loss, grad) = run(mode);
        for r in 0..2 {
            assert!(
                (loss[r] - w[r]).abs() < TOL,
                "{mode:?} row {r}: {} vs {} by hand",
                loss[r],
                w[r]
            );
            assert_eq!(grad[r * v + mask], 0.0);
        }
        assert!(grad.iter().all(|g| g.is_finite()), "{mode:?}: {grad:?}");
    }
    // Gradients by hand. kl-fwd, row 0: p - q = (-0.15, -0.05, 0.05, 0.15).
    let (_, g) = run(DistillMode::KlFwd);
    for (j, want) in [-0.15, -0.05, 0.05, 0.15].iter().enumerate() {
        assert!((g[j] - want).abs() < TOL, "kl-fwd grad {j}: {}", g[j]);
    }
    // tvd, row 0: sign(d) = (-1, -1, 1, 1), Σ sign = 0, so the gradient is sign(d).
    let (_, g) = run(DistillMode::Tvd);
    for (j, want) in [-1.0, -1.0, 1.0, 1.0].iter().enumerate() {
        assert!((g[j] - want).abs() < TOL, "tvd grad {j}: {}", g[j]);
    }
    // kl-bwd, row 1: p = 0.25, d_j = ln(0.25 / q_j), L = KL(t||s) of row 0.
    let (_, g) = run(DistillMode::KlBwd);
    for (j, qj) in [0.1f64, 0.2, 0.3, 0.4].iter().enumerate() {
        let want = 0.25 * (ln(0.25 / qj) - kl_qp);
        assert!(
            (g[v + j] - want).abs() < TOL,
            "kl-bwd grad {j}: {}",
            g[v + j]
        );
    }
    // mse, row 0: 2 d_j - 2 p_j Σ d.
    let (_, g) = run(DistillMode::Mse);
    let d = [ln(0.4), ln(0.8), ln(1.2), ln(1.6)];
    let sd: f64 = d.iter().sum();
    for (j, pj) in [0.1f64, 0.2, 0.3, 0.4].iter().enumerate() {
        let want = 2.0 * d[j] - 2.0 * pj * sd;
        assert!((g[j] - want).abs() < TOL, "mse grad {j}: {}", g[j]);
    }
    // The student equal to the teacher: every divergence is 0, and so is every gradient but tvd's.
    let same: Vec<f32> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| if i % v == mask { 0.0 } else { x as f32 })
        .collect();
    let t_same: Vec<f32> = (0..2)
        .flat_map(|r| {
            let row: Vec<f64> = same[r * v..(r + 1) * v].iter().map(|&a| a as f64).collect();
            log_softmax_row(&row, mask)
                .into_iter()
                .map(|a| a as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    for mode in DistillMode::ALL {
        let (l, g) = cpu::distill_kl(&same, &t_same, &tokens, shape, mode, 1.0);
        assert!(l.iter().all(|x| x.abs() < 1e-6), "{mode:?}: {l:?}");
        // (tvd's gradient jumps at d = 0, where f32 rounding of the teacher decides sign(d).)
        if mode != DistillMode::Tvd {
            assert!(g.iter().all(|x| x.abs() < 1e-6), "{mode:?}: {g:?}");
        }
    }
}

#[test]
fn twin_kl_is_nonnegative_and_ignores_the_mask_column() {
    let c = case(11, 9, 33, 36, 33, 5, -6.0, 6.0, false);
    for mode in DistillMode::ALL {
        let (l, g) = twin(&c, mode, 0.5);
        assert!(l.iter().all(|&x| x >= 0.0), "{mode:?}: {l:?}");
        let mut c2 = Case {
            shape: c.shape,
            logits: c.logits.clone(),
            teacher: c.teacher.clone(),
            tokens: c.tokens.clone(),
        };
        for r in 0..c.shape.rows {
            c2.logits[r * c.shape.ld + 5] = -123.0;
            c2.teacher[r * c.shape.ldt + 5] = f32::NAN;
        }
        let (l2, g2) = twin(&c2, mode, 0.5);
        assert_eq!(l, l2, "{mode:?}");
        assert_eq!(g, g2, "{mode:?}");
    }
}

#[test]
fn params_layout() {
    assert_eq!(std::mem::offset_of!(DistillKlParams, mask_index), 12);
    assert_eq!(std::mem::offset_of!(DistillKlParams, scale), 20);
    assert_eq!(std::mem::offset_of!(DistillKlParams, cache_row), 24);
    let codes: Vec<u32> = DistillMode::ALL.iter().map(|m| m.code()).collect();
    assert_eq!(codes, [0, 1, 2, 3]);
}

#[test]
fn shape_checks() {
    let sh = |vocab, ld, ldt, mask_index| DistillKlShape {
        rows: 3,
        vocab,
        ld,
        ldt,
        mask_index,
    };
    sh(10, 12, 10, 9).check().unwrap();
    for bad in [
        sh(13, 12, 13, 0),
        sh(10, 12, 9, 0),
        sh(10, 12, 12, 10),
        sh(1, 4, 4, 0),
    ] {
        assert!(matches!(bad.check(), Err(Error::Shape(_))), "{bad:?}");
    }
}

// ---- GPU against the twin ------------------------------------------------------------------

/// GPU run on `c` (bf16 or f32 logits, cache allowed or not): (loss, gradient as f32 (rows, ld)).
fn gpu_run(
    gpu: &Gpu,
    c: &Case,
    mode: DistillMode,
    scale: f32,
    bf16_in: bool,
    cache: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (s, sh) = (&gpu.stream, c.shape);
    let (rows, ld) = (sh.rows, sh.ld);
    let mut loss = s.clone_htod(&vec![f32::NAN; rows]).unwrap();
    let teacher = s.clone_htod(&c.teacher).unwrap();
    let tokens = s.clone_htod(&c.tokens).unwrap();
    let grad: Vec<f32> = if bf16_in {
        let b: Vec<bf16> = c.logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut dl = s.clone_htod(&b).unwrap();
        launch(
            gpu, &mut dl, &mut loss, &teacher, &tokens, sh, mode, scale, cache,
        )
        .unwrap();
        s.clone_dtoh(&dl)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect()
    } else {
        let mut dl = s.clone_htod(&c.logits).unwrap();
        launch(
            gpu, &mut dl, &mut loss, &teacher, &tokens, sh, mode, scale, cache,
        )
        .unwrap();
        let raw = s.clone_dtoh(&dl).unwrap();
        // bf16 gradient rows in the first half of each f32 row: stride 2*ld.
        let as_bf16: &[bf16] = bytemuck::cast_slice(&raw);
        (0..rows)
            .flat_map(|r| {
                as_bf16[r * 2 * ld..r * 2 * ld + ld]
                    .iter()
                    .map(|v| v.to_f32())
            })
            .collect()
    };
    (s.clone_dtoh(&loss).unwrap(), grad)
}

/// f32 rounding unit.
const EPS32: f64 = 1.0 / (1u64 << 24) as f64;

/// Checks a GPU result against the f64 twin.
/// Loss: within 128 f32 rounding units of the magnitude of what the kernel adds (Σ|term| plus
/// each term's sensitivity to its inputs times their size, |z| + |lse| + |lt| + 1).
/// Gradient, per element: at most twice the error of the twin's value rounded to bf16 (the
/// kernel's only bf16 rounding; architecture.md section 4, item 2), plus 128 f32 rounding units
/// of the element's own magnitude bound (the terms it combines before cancelling), so a wrong
/// element fails and a cancelling one does not. Exact zeros where the twin has them. Rows with a
/// teacher column at -inf in the modes where that makes the divergence infinite: both losses
/// non-finite, the gradient not compared.
fn check(
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

#[test]
fn gpu_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (rows, V, ld, ldt, mask): OWT (V 50258, rows padded to 50304; an unpadded teacher puts the
    // row on the scalar path) and LM1B (V 30523 = BERT + mask, padded and unpadded), rows 1, 7,
    // 129, tiny vocabularies with a partial last unit, the mask at 0 / inside / last.
    for &(rows, vocab, ld, ldt, mask) in &[
        (129, 50258, 50304, 50304, 50257),
        (7, 50258, 50304, 50258, 0),
        (1, 30523, 30528, 30528, 30522),
        (7, 30523, 30523, 30523, 103),
        (129, 1001, 1024, 1024, 500),
        (7, 5, 8, 8, 2),
        (1, 5, 5, 5, 4),
        (7, 2, 4, 4, 1),
    ] {
        for bf16_in in [true, false] {
            let c = case(rows as u64, rows, vocab, ld, ldt, mask, -8.0, 8.0, bf16_in);
            let masked = c.tokens.iter().filter(|&&t| t as usize == mask).count();
            let scale = 1.0 / masked as f32;
            for mode in DistillMode::ALL {
                let want = twin(&c, mode, scale);
                for cache in [true, false] {
                    let got = gpu_run(&gpu, &c, mode, scale, bf16_in, cache);
                    let name = format!(
                        "distill_kl {mode:?} rows {rows} V {vocab} ld {ld} ldt {ldt} mask {mask} \
                         bf16 {bf16_in} cache {cache}"
                    );
                    check(&name, &c, mode, scale, &got, &want);
                }
            }
        }
    }
}

#[test]
fn gpu_structured_large_and_infinite_teacher() {
    let Some(gpu) = gpu_for_tests() else { return };
    let (rows, vocab, ld, mask) = (7, 50258, 50304, 50257);
    // Large-magnitude logits (bf16-exact, so both kernels see the same values) and teacher.
    let big = case(21, rows, vocab, ld, ld, mask, -3e3, 3e3, true);
    // Zero logits (a uniform student) against a random teacher.
    let mut zeros = case(22, rows, vocab, ld, ld, mask, -8.0, 8.0, true);
    for r in 0..rows {
        zeros.logits[r * ld..r * ld + vocab].fill(0.0);
        zeros.logits[r * ld + mask] = 50.0;
    }
    // Teacher columns at -inf (probability 0), every 97th real column of the masked rows.
    let mut inf = case(23, rows, vocab, ld, ld, mask, -8.0, 8.0, true);
    for r in 0..rows {
        for j in (3..vocab - 1).step_by(97) {
            inf.teacher[r * ld + j] = f32::NEG_INFINITY;
        }
    }
    for (tag, c) in [("large", &big), ("zeros", &zeros), ("-inf teacher", &inf)] {
        let masked = c.tokens.iter().filter(|&&t| t as usize == mask).count();
        let scale = 1.0 / masked as f32;
        for mode in DistillMode::ALL {
            let want = twin(c, mode, scale);
            for bf16_in in [true, false] {
                let got = gpu_run(&gpu, c, mode, scale, bf16_in, true);
                let name = format!("distill_kl {tag} {mode:?} bf16 {bf16_in}");
                check(&name, c, mode, scale, &got, &want);
                if tag == "-inf teacher" && mode == DistillMode::KlFwd {
                    assert!(got.0.iter().all(|x| x.is_finite()), "{name}: {:?}", got.0);
                    assert!(got.1.iter().all(|x| x.is_finite()), "{name}");
                }
            }
        }
    }
}

#[test]
fn gpu_is_deterministic() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = case(5, 64, 50258, 50304, 50304, 50257, -8.0, 8.0, false);
    for mode in DistillMode::ALL {
        let a = gpu_run(&gpu, &c, mode, 0.1, false, true);
        let b = gpu_run(&gpu, &c, mode, 0.1, false, true);
        assert_bits_eq(&format!("distill_kl {mode:?} loss run-to-run"), &a.0, &b.0);
        assert_bits_eq(&format!("distill_kl {mode:?} grad run-to-run"), &a.1, &b.1);
        // The cached and the re-read paths compute the same values in the same order.
        let n = gpu_run(&gpu, &c, mode, 0.1, false, false);
        assert_bits_eq(
            &format!("distill_kl {mode:?} loss cache vs none"),
            &a.0,
            &n.0,
        );
        assert_bits_eq(
            &format!("distill_kl {mode:?} grad cache vs none"),
            &a.1,
            &n.1,
        );
    }
}

#[test]
fn gpu_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let (rows, vocab, ld) = (3, 10, 12);
    let mut logits = s.alloc_zeros::<f32>(rows * ld).unwrap();
    let mut loss = s.alloc_zeros::<f32>(rows).unwrap();
    let teacher = s.alloc_zeros::<f32>(rows * ld).unwrap();
    let ids = s.alloc_zeros::<u32>(rows).unwrap();
    let sh = |rows, ld, ldt| DistillKlShape {
        rows,
        vocab,
        ld,
        ldt,
        mask_index: 0,
    };
    let mode = DistillMode::KlBwd;
    for bad in [
        sh(rows, 11, ld),
        sh(rows, ld, 11),
        sh(rows - 1, ld, ld),
        sh(rows, 10, 12),
    ] {
        let r =
            distill_kl_fwd_bwd_f32(&gpu, &mut logits, &mut loss, &teacher, &ids, bad, mode, 1.0);
        assert!(matches!(r, Err(Error::Shape(_))), "{bad:?}: {r:?}");
    }
    for scale in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let r = distill_kl_fwd_bwd_f32(
            &gpu,
            &mut logits,
            &mut loss,
            &teacher,
            &ids,
            sh(rows, ld, ld),
            mode,
            scale,
        );
        assert!(matches!(r, Err(Error::Config(_))), "scale {scale}: {r:?}");
    }
}

/// The kernel's arithmetic emulated on the host in f32 (sums in chunks of 64, then pairwise,
/// close to the kernel's per-thread runs and tree merge; `f32::exp` for `__expf`), the gradient
/// rounded to bf16: what `check` must accept from a correct kernel.
fn emulate_f32(c: &Case, mode: DistillMode, scale: f32) -> (Vec<f32>, Vec<f32>) {
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

#[test]
fn check_accepts_an_f32_kernel_and_rejects_a_wrong_element() {
    // The GPU tests' tolerances, run here on the f32 emulation of the kernel at the GPU tests'
    // shapes and inputs: a correct kernel passes, one wrong gradient element or loss does not.
    let (rows, vocab, ld, mask) = (7, 50258, 50304, 50257);
    let mut inf = case(23, rows, vocab, ld, ld, mask, -8.0, 8.0, true);
    for r in 0..rows {
        for j in (3..vocab - 1).step_by(97) {
            inf.teacher[r * ld + j] = f32::NEG_INFINITY;
        }
    }
    let mut zeros = case(22, rows, vocab, ld, ld, mask, -8.0, 8.0, true);
    for r in 0..rows {
        zeros.logits[r * ld..r * ld + vocab].fill(0.0);
        zeros.logits[r * ld + mask] = 50.0;
    }
    let cases = [
        ("owt", case(7, rows, vocab, ld, ld, mask, -8.0, 8.0, false)),
        (
            "lm1b",
            case(1, 1, 30523, 30528, 30528, 30522, -8.0, 8.0, true),
        ),
        ("tiny", case(7, 7, 5, 8, 8, 2, -8.0, 8.0, false)),
        (
            "large",
            case(21, rows, vocab, ld, ld, mask, -3e3, 3e3, true),
        ),
        ("zeros", zeros),
        ("-inf teacher", inf),
    ];
    for (tag, c) in &cases {
        let masked = c
            .tokens
            .iter()
            .filter(|&&t| t as usize == c.shape.mask_index)
            .count();
        let scale = 1.0 / masked as f32;
        for mode in DistillMode::ALL {
            let want = twin(c, mode, scale);
            let got = emulate_f32(c, mode, scale);
            let name = format!("emulated {tag} {mode:?}");
            check(&name, c, mode, scale, &got, &want);
            if *tag != "owt" {
                continue;
            }
            // The largest gradient element of row 0 moved by 4 bf16 ulps; the loss by 1e-3.
            let w = &want.1[..c.shape.ld];
            let j = (0..w.len())
                .max_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()))
                .unwrap();
            let mut bad = got.clone();
            bad.1[j] = bf16::from_f32(bad.1[j] * (1.0 + 4.0 / 128.0)).to_f32();
            let r = std::panic::catch_unwind(|| check(&name, c, mode, scale, &bad, &want));
            assert!(r.is_err(), "{name}: a wrong element at {j} passed");
            let mut bad = got.clone();
            bad.0[0] += 1e-3 * bad.0[0].abs().max(1.0);
            let r = std::panic::catch_unwind(|| check(&name, c, mode, scale, &bad, &want));
            assert!(r.is_err(), "{name}: a wrong loss passed");
        }
    }
}
