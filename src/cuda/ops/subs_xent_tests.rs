//! Tests of the fused SUBS cross-entropy and its backward: the twin against finite
//! differences and the forward, the GPU kernel against the twin, determinism, shape errors.

use super::*;

/// One fused-loss problem on the host: logits (rows, ld) as f32 (garbage in the padding and
/// a large mask-column logit, both of which must be ignored), xt, x0, w.
struct XentCase {
    shape: SubsShape,
    logits: Vec<f32>,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    weight: Vec<f32>,
}

/// About half the rows masked; targets are real non-mask ids at masked rows and equal the
/// input at carry-over rows; some masked rows get w = 0; carry-over rows get w != 0 (it
/// must be ignored). `lo..hi` is the logit range; `bf16_exact` rounds the logits.
#[allow(clippy::too_many_arguments)]
fn xent_case(
    seed: u64,
    rows: usize,
    vocab: usize,
    ld: usize,
    mask: usize,
    lo: f32,
    hi: f32,
    bf16_exact: bool,
) -> XentCase {
    let mut logits = rand_logits(seed, rows * ld, lo, hi, bf16_exact);
    for r in 0..rows {
        for j in vocab..ld {
            logits[r * ld + j] = if j % 2 == 0 { f32::NAN } else { 1e4 };
        }
        logits[r * ld + mask] = 50.0;
    }
    let tokens = tokens(seed + 1, rows, vocab, mask);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 2);
    let targets: Vec<u32> = tokens
        .iter()
        .map(|&t| {
            if t as usize != mask {
                return t;
            }
            let x = rng.random_range(0..vocab - 1);
            (x + (x >= mask) as usize) as u32
        })
        .collect();
    let weight: Vec<f32> = (0..rows)
        .map(|r| {
            if r % 5 == 3 {
                0.0
            } else {
                rng.random_range(0.5f32..4.0)
            }
        })
        .collect();
    XentCase {
        shape: SubsShape {
            rows,
            vocab,
            ld,
            mask_index: mask,
        },
        logits,
        tokens,
        targets,
        weight,
    }
}

fn twin_xent(c: &XentCase, norm: f32) -> (Vec<f64>, Vec<f64>) {
    let sh = c.shape;
    cpu::subs_xent(
        &c.logits,
        &c.tokens,
        &c.targets,
        &c.weight,
        sh.mask_index,
        sh.vocab,
        sh.ld,
        norm,
    )
}

#[test]
fn twin_xent_matches_finite_differences() {
    // F = Σ loss, as a function of every logit (padding and mask columns included: their
    // finite differences are 0 because the loss ignores them).
    for &(rows, vocab, ld, mask) in &[(6, 7, 8, 6), (5, 5, 5, 0), (4, 9, 12, 4), (3, 2, 4, 1)] {
        let mut c = xent_case(rows as u64, rows, vocab, ld, mask, -3.0, 3.0, false);
        // Finite padding values (the FD perturbs them; NaN would poison F itself).
        for r in 0..rows {
            for j in vocab..ld {
                c.logits[r * ld + j] = 7.0;
            }
        }
        let norm = 3.0;
        let (_, grad) = twin_xent(&c, norm);
        let x64 = f64s(&c.logits);
        let f = |x: &[f64]| -> f64 {
            let (l, _) = cpu::subs_xent(x, &c.tokens, &c.targets, &c.weight, mask, vocab, ld, norm);
            l.iter().sum()
        };
        let fd = fd_grad(f, &x64, 1e-5, None);
        let tol = Tol {
            abs: 1e-7,
            rel: 1e-6,
        };
        assert_grad(
            &format!("subs xent rows {rows} V {vocab} ld {ld}"),
            &grad,
            &fd,
            tol,
        );
    }
    // Target = the mask id: x[t] is the constant -1e6, so the gradient is c·softmax.
    let (v, mask) = (5, 2);
    let logits = [0.5f64, -1.0, 3.0, 2.0, 0.0];
    let f = |x: &[f64]| cpu::subs_xent(x, &[2], &[2], &[1.5], mask, v, v, 0.5).0[0];
    let (loss, grad) = cpu::subs_xent(&logits, &[2], &[2], &[1.5], mask, v, v, 0.5);
    let fd = fd_grad(f, &logits, 1e-3, None);
    assert_grad(
        "subs xent target = mask",
        &grad,
        &fd,
        Tol {
            abs: 1e-6,
            rel: 1e-6,
        },
    );
    assert!(loss[0] > 3e6 - 10.0, "loss {}", loss[0]);
}

#[test]
fn twin_xent_agrees_with_subs_forward() {
    // loss_r = -c log p_r(x0) with log p from the forward twin on the unpadded logits, and
    // each masked row's gradient sums to 0 with exact zeros at mask/padding columns.
    let (rows, vocab, ld, mask) = (40, 1001, 1024, 500);
    let c = xent_case(3, rows, vocab, ld, mask, -8.0, 8.0, false);
    let norm = 2.5;
    let (loss, grad) = twin_xent(&c, norm);
    let dense: Vec<f32> = (0..rows)
        .flat_map(|r| c.logits[r * ld..r * ld + vocab].to_vec())
        .collect();
    let (lp, _) = cpu::subs_fwd(&dense, &c.tokens, mask, vocab);
    for r in 0..rows {
        let g = &grad[r * ld..(r + 1) * ld];
        if c.tokens[r] as usize != mask || c.weight[r] == 0.0 {
            assert_eq!(loss[r], 0.0);
            assert!(
                g.iter().all(|&x| x == 0.0),
                "row {r}: carry-over gradient 0"
            );
            continue;
        }
        let cw = (c.weight[r] / norm) as f64;
        let want = -cw * lp[r * vocab + c.targets[r] as usize] as f64;
        assert!(
            (loss[r] - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "row {r}"
        );
        assert!(g.iter().sum::<f64>().abs() < 1e-12, "row {r}: Σ grad = 0");
        assert!(g[mask] == 0.0 && g[vocab..].iter().all(|&x| x == 0.0));
        assert!(g[c.targets[r] as usize] < 0.0);
    }
    // A target >= V: NaN loss and NaN real-column gradients.
    let (l, g) = cpu::subs_xent(&[0f32, 1.0, 2.0, 3.0], &[3], &[9], &[1.0], 3, 3, 4, 1.0);
    assert!(l[0].is_nan() && g[0].is_nan() && g[2].is_nan() && g[3] == 0.0);
}

/// GPU run of the fused loss on `c` (bf16 or f32 logits, cache or not): (loss, d logits as
/// f32 in (rows, ld), dense).
fn gpu_xent(
    gpu: &Gpu,
    c: &XentCase,
    norm: f32,
    bf16_in: bool,
    cache: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (s, sh) = (&gpu.stream, c.shape);
    let (rows, ld) = (sh.rows, sh.ld);
    let mut loss = s.alloc_zeros::<f32>(rows).unwrap();
    let (dtok, dtgt, dw) = (
        s.clone_htod(&c.tokens).unwrap(),
        s.clone_htod(&c.targets).unwrap(),
        s.clone_htod(&c.weight).unwrap(),
    );
    let grad: Vec<f32> = if bf16_in {
        let b: Vec<bf16> = c.logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut dl = s.clone_htod(&b).unwrap();
        launch_bwd(gpu, &mut dl, &mut loss, &dtok, &dtgt, &dw, sh, norm, cache).unwrap();
        s.clone_dtoh(&dl)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect()
    } else {
        let mut dl = s.clone_htod(&c.logits).unwrap();
        launch_bwd(gpu, &mut dl, &mut loss, &dtok, &dtgt, &dw, sh, norm, cache).unwrap();
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

/// Checks a GPU result against the f64 twin: exact zeros where the twin has them; the loss
/// within 2e-6 of c (2 max|x| + ln V + 25), i.e. fp32 accuracy of lse and x[t]; the
/// gradient's worst relative error (in units of c, floored at 3e-5 c) at most twice that of
/// the twin's own gradient rounded to bf16 (the error-ratio rule of docs/testing.md 2), plus 1e-5
/// for the fp32 softmax.
fn check_xent(
    name: &str,
    c: &XentCase,
    norm: f32,
    got: &(Vec<f32>, Vec<f32>),
    want: &(Vec<f64>, Vec<f64>),
) {
    let sh = c.shape;
    let (rows, ld) = (sh.rows, sh.ld);
    let (mut err_gpu, mut err_bf16) = (0f64, 0f64);
    for r in 0..rows {
        let g = &got.1[r * ld..(r + 1) * ld];
        let w = &want.1[r * ld..(r + 1) * ld];
        let live = c.tokens[r] as usize == sh.mask_index && c.weight[r] != 0.0;
        if !live {
            assert_eq!(got.0[r], 0.0, "{name}: row {r} loss must be 0");
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{name}: row {r} gradient must be 0"
            );
            continue;
        }
        let cw = (c.weight[r] / norm) as f64;
        let xmax = c.logits[r * ld..r * ld + sh.vocab]
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != sh.mask_index)
            .map(|(_, x)| x.abs() as f64)
            .fold(0f64, f64::max);
        let scale = cw * (2.0 * xmax + (sh.vocab as f64).ln() + 25.0);
        let le = (got.0[r] as f64 - want.0[r]).abs();
        assert!(
            le <= 2e-6 * scale,
            "{name}: row {r} loss {} vs {} (error {le:e}, allowed {:e})",
            got.0[r],
            want.0[r],
            2e-6 * scale
        );
        for j in 0..ld {
            if w[j] == 0.0 {
                assert_eq!(g[j], 0.0, "{name}: row {r} column {j} must be 0");
                continue;
            }
            // Relative to max(|want|, 3e-5 c): the target column's c (p - 1) is computed
            // as a difference near 1 in fp32 (absolute error ~6e-8 c), which must not count
            // as a large relative error where |p - 1| is tiny; 3e-5 keeps that below 2^-9.
            let floor = 3e-5;
            let rel = |v: f64| (v / cw - w[j] / cw).abs() / (w[j] / cw).abs().max(floor);
            let eg = rel(g[j] as f64);
            let eb = rel(bf16::from_f64(w[j]).to_f64());
            assert!(!eg.is_nan(), "{name}: row {r} column {j}: got {}", g[j]);
            err_gpu = err_gpu.max(eg);
            err_bf16 = err_bf16.max(eb);
        }
    }
    assert!(
        err_gpu <= 2.0 * err_bf16 + 1e-5,
        "{name}: gradient max rel error {err_gpu:e} > 2 x bf16-rounded twin's {err_bf16:e}"
    );
}

#[test]
fn gpu_xent_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (rows, V, ld, mask): OWT (V 50258 padded to 50304) and LM1B vocabularies, awkward row
    // counts (1, 7, 129), mask at 0 / inside / last, unpadded rows, ld % 4 != 0 (scalar path),
    // and tiny vocabularies.
    for &(rows, vocab, ld, mask) in &[
        (1024, 50258, 50304, 50257),
        (7, 50258, 50304, 0),
        (1, 30522, 30528, 15001),
        (129, 1001, 1024, 500),
        (129, 1001, 1001, 3),
        (5, 2, 2, 1),
        (3, 13, 13, 12),
        (3, 13, 16, 12),
    ] {
        for bf16_in in [true, false] {
            let c = xent_case(rows as u64, rows, vocab, ld, mask, -8.0, 8.0, bf16_in);
            let norm = 2.0;
            let want = twin_xent(&c, norm);
            for cache in [true, false] {
                let got = gpu_xent(&gpu, &c, norm, bf16_in, cache);
                let name = format!(
                    "subs xent rows {rows} V {vocab} ld {ld} mask {mask} bf16 {bf16_in} \
                     cache {cache}"
                );
                check_xent(&name, &c, norm, &got, &want);
            }
        }
    }
    // The real normaliser (a tiny c), zero logits, and large-magnitude bf16 logits.
    let (rows, vocab, ld) = (64, 50258, 50304);
    let mut c = xent_case(9, rows, vocab, ld, vocab - 1, -8.0, 8.0, true);
    let norm = (32 * 1024) as f32;
    check_xent(
        "subs xent norm 32768",
        &c,
        norm,
        &gpu_xent(&gpu, &c, norm, true, true),
        &twin_xent(&c, norm),
    );
    for r in 0..rows {
        c.logits[r * ld..r * ld + vocab].fill(0.0);
    }
    check_xent(
        "subs xent zeros",
        &c,
        2.0,
        &gpu_xent(&gpu, &c, 2.0, false, true),
        &twin_xent(&c, 2.0),
    );
    let mut c = xent_case(10, rows, vocab, ld, vocab - 1, -3e3, 3e3, true);
    c.logits
        .iter_mut()
        .for_each(|x| *x = bf16::from_f32(*x).to_f32());
    for bf16_in in [true, false] {
        let name = format!("subs xent large bf16 {bf16_in}");
        check_xent(
            &name,
            &c,
            2.0,
            &gpu_xent(&gpu, &c, 2.0, bf16_in, true),
            &twin_xent(&c, 2.0),
        );
    }
}

#[test]
fn gpu_xent_is_deterministic_and_sums() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = xent_case(4, 256, 50258, 50304, 50257, -8.0, 8.0, true);
    let a = gpu_xent(&gpu, &c, 2.0, true, true);
    let b = gpu_xent(&gpu, &c, 2.0, true, true);
    assert_bits_eq("subs xent loss run-to-run", &a.0, &b.0);
    assert_bits_eq("subs xent grad run-to-run", &a.1, &b.1);
    // The loss sum against the host's f64 sum, for several row counts.
    let s = &gpu.stream;
    for rows in [1usize, 7, 129, 1024, 32 * 1024, 100_003] {
        let v = rand_logits(rows as u64, rows, 0.0, 20.0, false);
        let dl = s.clone_htod(&v).unwrap();
        let mut out = s.alloc_zeros::<f32>(1).unwrap();
        subs_loss_sum(&gpu, &mut out, &dl, rows).unwrap();
        let got = s.clone_dtoh(&out).unwrap()[0] as f64;
        let want: f64 = v.iter().map(|&x| x as f64).sum();
        assert!(
            (got - want).abs() <= 1e-7 * want.abs() + 1e-12,
            "loss sum rows {rows}: {got} vs {want}"
        );
        let mut again = s.alloc_zeros::<f32>(1).unwrap();
        subs_loss_sum(&gpu, &mut again, &dl, rows).unwrap();
        assert_eq!(s.clone_dtoh(&again).unwrap()[0], got as f32);
    }
}

#[test]
fn gpu_xent_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let (rows, vocab, ld) = (3, 10, 12);
    let mut logits = s.alloc_zeros::<f32>(rows * ld).unwrap();
    let mut loss = s.alloc_zeros::<f32>(rows).unwrap();
    let ids = s.alloc_zeros::<u32>(rows).unwrap();
    let w = s.alloc_zeros::<f32>(rows).unwrap();
    let sh = |vocab, ld, mask_index| SubsShape {
        rows,
        vocab,
        ld,
        mask_index,
    };
    let bad = [
        subs_bwd_f32(
            &gpu,
            &mut logits,
            &mut loss,
            &ids,
            &ids,
            &w,
            sh(13, 12, 0),
            1.0,
        ),
        subs_bwd_f32(
            &gpu,
            &mut logits,
            &mut loss,
            &ids,
            &ids,
            &w,
            sh(vocab, 11, 0),
            1.0,
        ),
        subs_bwd_f32(
            &gpu,
            &mut logits,
            &mut loss,
            &ids,
            &ids,
            &w,
            sh(vocab, ld, 10),
            1.0,
        ),
        subs_bwd_f32(
            &gpu,
            &mut logits,
            &mut loss,
            &ids,
            &ids,
            &w,
            sh(1, ld, 0),
            1.0,
        ),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
    for norm in [0.0f32, -1.0, f32::NAN] {
        let r = subs_bwd_f32(
            &gpu,
            &mut logits,
            &mut loss,
            &ids,
            &ids,
            &w,
            sh(vocab, ld, 0),
            norm,
        );
        assert!(matches!(r, Err(Error::Config(_))), "norm {norm}: {r:?}");
    }
    let mut out = s.alloc_zeros::<f32>(2).unwrap();
    assert!(matches!(
        subs_loss_sum(&gpu, &mut out, &loss, rows),
        Err(Error::Shape(_))
    ));
}
