//! Tests of `gemm`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::model::dit_ref::{gelu_exact, gelu_tanh};
use crate::testing::{assert_close, compare, Tol};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random values already rounded to bf16, so the twin sees exactly the GPU's inputs.
fn rand_bf16(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

fn to_dev(gpu: &Gpu, v: &[f32]) -> CudaSlice<bf16> {
    let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    gpu.stream.clone_htod(&h).unwrap()
}

#[test]
fn twin_transposes_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (m, n, k) = (3, 5, 4);
    let a = rand_bf16(&mut rng, m * k, 1.0);
    let b = rand_bf16(&mut rng, k * n, 1.0);
    let c = cpu::matmul(&a, false, &b, false, m, n, k);
    // Transposed storage of the same matrices gives the same product.
    let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
    let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
    assert_eq!(c, cpu::matmul(&at, true, &bt, true, m, n, k));
    // Identity.
    let eye: Vec<f32> = (0..k * k)
        .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(cpu::matmul(&a, false, &eye, false, m, k, k), a);
}

#[test]
fn gpu_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    let g = Gemm::new(&gpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // (M, N, K): DiT-small qkv / MLP / logits-like and awkward shapes.
    for &(m, n, k) in &[
        (256, 2304, 768),
        (128, 768, 3072),
        (77, 1000, 768),
        (7, 24, 40),
        (1, 8, 16),
    ] {
        for (ta, tb) in [(false, true), (false, false), (true, false)] {
            let a = rand_bf16(&mut rng, m * k, 1.0);
            let b = rand_bf16(&mut rng, k * n, 1.0);
            let want = cpu::matmul(&a, ta, &b, tb, m, n, k);
            let mut c32 = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
            g.matmul(
                &gpu,
                &mut c32,
                &to_dev(&gpu, &a),
                ta,
                &to_dev(&gpu, &b),
                tb,
                (m, n, k),
                0.0,
                Epilogue::None,
            )
            .unwrap();
            let got = gpu.stream.clone_dtoh(&c32).unwrap();
            // Exact bf16 inputs: only fp32 accumulation order differs.
            let tol = Tol {
                abs: 1e-4 * (k as f64).sqrt(),
                rel: 1e-4,
            };
            assert_close(
                &format!("gemm f32 {m}x{n}x{k} ta={ta} tb={tb}"),
                &got,
                &want,
                tol,
            );
            // beta = 1 accumulates into C.
            g.matmul(
                &gpu,
                &mut c32,
                &to_dev(&gpu, &a),
                ta,
                &to_dev(&gpu, &b),
                tb,
                (m, n, k),
                1.0,
                Epilogue::None,
            )
            .unwrap();
            let twice: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
            assert_close(
                "gemm beta=1",
                &gpu.stream.clone_dtoh(&c32).unwrap(),
                &twice,
                Tol {
                    abs: 2.0 * tol.abs,
                    rel: tol.rel,
                },
            );
            // bf16 output with bias.
            let bias = rand_bf16(&mut rng, n, 1.0);
            let mut c16 = gpu.stream.alloc_zeros::<bf16>(m * n).unwrap();
            let db = to_dev(&gpu, &bias);
            g.matmul(
                &gpu,
                &mut c16,
                &to_dev(&gpu, &a),
                ta,
                &to_dev(&gpu, &b),
                tb,
                (m, n, k),
                0.0,
                Epilogue::Bias(&db),
            )
            .unwrap();
            let got: Vec<f32> = gpu
                .stream
                .clone_dtoh(&c16)
                .unwrap()
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let want_b: Vec<f32> = want
                .iter()
                .enumerate()
                .map(|(i, x)| x + bias[i % n])
                .collect();
            assert_close(
                &format!("gemm bf16+bias {m}x{n}x{k}"),
                &got,
                &want_b,
                Tol::BF16,
            );
        }
    }
}

/// A padded output stride writes only the first N columns of each row.
#[test]
fn strided_output_leaves_padding_alone() {
    let Some(gpu) = gpu_for_tests() else { return };
    let g = Gemm::new(&gpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (m, n, k, ldc) = (33, 50, 64, 64);
    let a = rand_bf16(&mut rng, m * k, 1.0);
    let b = rand_bf16(&mut rng, n * k, 1.0);
    let bias = rand_bf16(&mut rng, n, 1.0);
    let want = cpu::matmul(&a, false, &b, true, m, n, k);
    let mut c = gpu.stream.clone_htod(&vec![7.0f32; m * ldc]).unwrap();
    let db = gpu.stream.clone_htod(&bias).unwrap();
    g.matmul_ld(
        &gpu,
        &mut c,
        &to_dev(&gpu, &a),
        false,
        &to_dev(&gpu, &b),
        true,
        (m, n, k),
        ldc,
        0.0,
        Epilogue::Bias(&db),
    )
    .unwrap();
    let got = gpu.stream.clone_dtoh(&c).unwrap();
    for r in 0..m {
        let row: Vec<f32> = (0..n).map(|j| want[r * n + j] + bias[j]).collect();
        assert_close(
            &format!("strided row {r}"),
            &got[r * ldc..r * ldc + n],
            &row,
            Tol {
                abs: 1e-3,
                rel: 1e-4,
            },
        );
        assert!(
            got[r * ldc + n..(r + 1) * ldc].iter().all(|&x| x == 7.0),
            "padding of row {r} was written"
        );
    }
}

/// Strided operands (padding columns that must be ignored) and a view of a bf16 matrix
/// living in an f32 buffer (the fused SUBS gradient's layout, lda = 2 ld) match the dense
/// twin, for every transpose combination the training backward uses.
#[test]
fn strided_operands_and_views_match_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    let g = Gemm::new(&gpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &(m, n, k) in &[(40, 24, 72), (1, 50, 33), (64, 8, 16)] {
        for (ta, tb) in [(false, false), (true, false), (false, true)] {
            let a = rand_bf16(&mut rng, m * k, 1.0);
            let b = rand_bf16(&mut rng, k * n, 1.0);
            let want = cpu::matmul(&a, ta, &b, tb, m, n, k);
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            // A padded to lda = ac + 5 with junk in the padding; B inside an f32 buffer with
            // row stride 2 * ldb bf16 elements (the first half of each f32 row).
            let lda = ac + 5;
            let mut ap = vec![bf16::from_f32(9.0); ar * lda];
            for r in 0..ar {
                for j in 0..ac {
                    ap[r * lda + j] = bf16::from_f32(a[r * ac + j]);
                }
            }
            let ldf = bc.next_multiple_of(4);
            let mut bf = vec![bf16::from_f32(-7.0); br * 2 * ldf];
            for r in 0..br {
                for j in 0..bc {
                    bf[r * 2 * ldf + j] = bf16::from_f32(b[r * bc + j]);
                }
            }
            let words: Vec<f32> = bf
                .chunks(2)
                .map(|p| f32::from_bits((p[1].to_bits() as u32) << 16 | p[0].to_bits() as u32))
                .collect();
            let da = gpu.stream.clone_htod(&ap).unwrap();
            let db32 = gpu.stream.clone_htod(&words).unwrap();
            // SAFETY: the f32 buffer holds br * ldf f32 = br * 2 * ldf bf16 elements.
            let dbv = unsafe { db32.transmute::<bf16>(br * 2 * ldf) }.unwrap();
            let mut c = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
            g.matmul_strided(
                &gpu,
                &mut c,
                &da,
                lda,
                ta,
                &dbv,
                2 * ldf,
                tb,
                (m, n, k),
                n,
                0.0,
                Epilogue::None,
            )
            .unwrap();
            assert_close(
                &format!("strided gemm {m}x{n}x{k} ta={ta} tb={tb}"),
                &gpu.stream.clone_dtoh(&c).unwrap(),
                &want,
                Tol {
                    abs: 1e-4 * (k as f64).sqrt(),
                    rel: 1e-4,
                },
            );
        }
    }
}

/// cuBLASLt's GELU epilogue must be the tanh form the block MLPs use (spec 2.3). With f32
/// output the two forms (up to 4.7e-4 apart) are far outside the accumulation error.
#[test]
fn gelu_epilogue_is_tanh_and_saves_the_pre_activation() {
    let Some(gpu) = gpu_for_tests() else { return };
    let g = Gemm::new(&gpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (m, n, k) = (64, 256, 64);
    let a = rand_bf16(&mut rng, m * k, 0.5);
    let b = rand_bf16(&mut rng, n * k, 0.5);
    let bias: Vec<f32> = rand_bf16(&mut rng, n, 1.0);
    let pre: Vec<f32> = cpu::matmul(&a, false, &b, true, m, n, k)
        .iter()
        .enumerate()
        .map(|(i, x)| x + bias[i % n])
        .collect();
    let mut c = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
    let mut aux = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
    let db = gpu.stream.clone_htod(&bias).unwrap();
    g.matmul(
        &gpu,
        &mut c,
        &to_dev(&gpu, &a),
        false,
        &to_dev(&gpu, &b),
        true,
        (m, n, k),
        0.0,
        Epilogue::GeluBias {
            bias: &db,
            aux: Some(&mut aux),
        },
    )
    .unwrap();
    let got = gpu.stream.clone_dtoh(&c).unwrap();
    let tanh: Vec<f32> = pre.iter().map(|&x| gelu_tanh(x as f64) as f32).collect();
    let exact: Vec<f32> = pre.iter().map(|&x| gelu_exact(x as f64) as f32).collect();
    let tol = Tol {
        abs: 2e-5,
        rel: 1e-4,
    };
    let (_, _, _, r_exact) = compare(&got, &exact, tol);
    assert_close("GELU epilogue vs tanh GELU", &got, &tanh, tol);
    assert!(
        r_exact > 1.0,
        "the epilogue also matches exact GELU: test inputs too small"
    );
    assert_close("GELU aux", &gpu.stream.clone_dtoh(&aux).unwrap(), &pre, tol);
}

/// The two forms the inference forward added: GELU + bias without saving the
/// pre-activation, and an f32 output accumulated in place with beta = 1 plus a bias (the
/// gate-folded residual `h += x W^T + b`).
#[test]
fn gelu_without_aux_and_accumulating_f32_output() {
    let Some(gpu) = gpu_for_tests() else { return };
    let g = Gemm::new(&gpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (m, n, k) = (96, 128, 192);
    let a = rand_bf16(&mut rng, m * k, 0.5);
    let b = rand_bf16(&mut rng, n * k, 0.5);
    let bias: Vec<f32> = rand_bf16(&mut rng, n, 1.0);
    let h0: Vec<f32> = rand_bf16(&mut rng, m * n, 3.0);
    let pre: Vec<f32> = cpu::matmul(&a, false, &b, true, m, n, k)
        .iter()
        .enumerate()
        .map(|(i, x)| x + bias[i % n])
        .collect();
    let tol = Tol {
        abs: 2e-5,
        rel: 1e-4,
    };
    let db = gpu.stream.clone_htod(&bias).unwrap();
    let (da, dw) = (to_dev(&gpu, &a), to_dev(&gpu, &b));
    let mut c = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
    let epi = Epilogue::GeluBias {
        bias: &db,
        aux: None,
    };
    g.matmul(&gpu, &mut c, &da, false, &dw, true, (m, n, k), 0.0, epi)
        .unwrap();
    let tanh: Vec<f32> = pre.iter().map(|&x| gelu_tanh(x as f64) as f32).collect();
    assert_close(
        "GELU epilogue without aux",
        &gpu.stream.clone_dtoh(&c).unwrap(),
        &tanh,
        tol,
    );
    let mut h = gpu.stream.clone_htod(&h0).unwrap();
    g.matmul(
        &gpu,
        &mut h,
        &da,
        false,
        &dw,
        true,
        (m, n, k),
        1.0,
        Epilogue::Bias(&db),
    )
    .unwrap();
    let want: Vec<f32> = h0.iter().zip(&pre).map(|(x, p)| x + p).collect();
    assert_close(
        "h += x W^T + b",
        &gpu.stream.clone_dtoh(&h).unwrap(),
        &want,
        tol,
    );
}

/// The split covers every row once, in order, each chunk's view fits, and it uses the fewest
/// chunks possible; small cases exhaustively, then the two reference shapes' logits gradients.
#[test]
fn row_chunks_cover_every_row_within_the_bound() {
    let check = |rows: usize, ld: usize, cols: usize, max: usize| {
        let ch = row_chunks(rows, ld, cols, max).unwrap();
        let mut next = 0;
        for &(start, len) in &ch {
            assert_eq!(
                start, next,
                "rows={rows} ld={ld} cols={cols} max={max}: {ch:?}"
            );
            assert!(len > 0);
            assert!(
                (len - 1) * ld + cols <= max,
                "chunk {start}+{len} spans past {max}"
            );
            next = start + len;
        }
        assert_eq!(
            next, rows,
            "rows={rows} ld={ld} cols={cols} max={max}: {ch:?}"
        );
        let most = (max - cols) / ld + 1;
        assert_eq!(
            ch.len(),
            rows.div_ceil(most),
            "not the fewest chunks: {ch:?}"
        );
        ch
    };
    for rows in 0..40 {
        for ld in 1..6 {
            for cols in 1..=ld {
                for max in cols..30 {
                    check(rows, ld, cols, max);
                }
            }
        }
    }
    // OWT (32 x 1024 rows, V = 50258) and LM1B (512 x 128 rows, V = 30522): the bf16 view of
    // the f32 logits has row stride 2 · ld, and the whole view is past 2^31 elements.
    for (rows, v) in [(32 * 1024, 50258usize), (512 * 128, 30522)] {
        let ld = 2 * v.next_multiple_of(64);
        assert!(rows * ld > MAX_VIEW_ELEMS);
        let ch = check(rows, ld, v, MAX_VIEW_ELEMS);
        assert_eq!(ch.len(), 2, "{rows} rows of stride {ld}: {ch:?}");
    }
    // A view that fits stays one GEMM.
    assert_eq!(
        row_chunks(1024, 100, 90, MAX_VIEW_ELEMS).unwrap(),
        vec![(0, 1024)]
    );
    assert!(row_chunks(4, 10, 11, 100).is_err());
    assert!(row_chunks(4, 200, 150, 100).is_err());
}
