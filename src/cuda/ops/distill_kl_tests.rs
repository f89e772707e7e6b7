//! Tests of the fused distillation loss: the twin against f64 finite differences and a case
//! worked by hand, then the GPU kernels against the twin.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::testing::grad::{assert_bits_eq, assert_grad, fd_grad};
use crate::testing::Tol;

#[path = "distill_kl_check.rs"]
mod check;
use check::*;

// ---- the twin ----------------------------------------------------------------------------

#[test]
fn twin_equals_the_cpu_backends_loss() {
    // The kernel's twin and the CPU training backend's loss (`cpu::distill_loss`) are two
    // implementations of one formula: same loss and gradient on dense rows.
    for mode in DistillMode::ALL {
        let (rows, vocab, mask) = (7, 13, 4);
        let c = case(
            40 + rows as u64,
            rows,
            vocab,
            vocab,
            vocab,
            mask,
            -4.0,
            4.0,
            false,
        );
        let masked = c.tokens.iter().filter(|&&t| t as usize == mask).count();
        let scale = 1.0 / masked as f32;
        let (loss, grad) = cpu::distill_kl(&c.logits, &c.teacher, &c.tokens, c.shape, mode, scale);
        let mut z: Vec<f64> = c.logits.iter().map(|&x| x as f64).collect();
        let want = crate::cpu::distill_loss::distill_loss_in_place(
            &mut z,
            &c.teacher,
            &c.tokens,
            mode,
            masked as f64,
            mask,
            vocab,
        );
        // The twin's per-row losses are unscaled; its gradient carries the f32 `scale`.
        let got = loss.iter().sum::<f64>() / masked as f64;
        assert!(
            (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
            "{mode:?}: twin loss {got} vs CPU backend {want}"
        );
        assert_grad(
            &format!("{mode:?} twin vs CPU backend gradient"),
            &grad,
            &z,
            Tol {
                abs: 1e-9,
                rel: 1e-6,
            },
        );
    }
}

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
    let codes: Vec<u32> = DistillMode::ALL.iter().map(|&m| code(m)).collect();
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
