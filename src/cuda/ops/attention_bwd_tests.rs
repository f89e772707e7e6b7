//! Tests of the attention backward: the twin against finite differences, the GPU kernels
//! (tensor-core and SIMT reference) against the twin, determinism.

use super::*;

/// Seeded d o, uniform in [-1, 1], rounded to bf16.
fn rand_dout(s: &AttentionShape, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..s.rows() * s.width())
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
        .collect()
}

#[test]
fn twin_bwd_matches_finite_differences() {
    // F = Σ G ⊙ o(qkv) (exact forward, no bf16 rounding): dF/dqkv is the backward.
    for (k, (s, amp)) in [
        (shape(1, 5, 2, 32, false, 0.0), 1.0),
        (shape(1, 6, 1, 32, true, 2.0), 2.0),
        (shape(2, 3, 1, 64, false, 50.0), 2.0),
        (shape(1, 1, 1, 32, true, 0.0), 1.0),
        (shape(1, 4, 1, 96, true, 0.0), 1.0),
    ]
    .into_iter()
    .enumerate()
    {
        let qkv = rand_qkv(&s, amp, 300 + k as u64);
        let dout = rand_dout(&s, 400 + k as u64);
        let (o, lse) = cpu::attention_fwd_f64(&qkv, &s, false);
        let got = cpu::attention_bwd(&qkv, &o, &lse, &dout, &s, false);
        let f = |x: &[f64]| -> f64 {
            let (o, _) = cpu::attention_fwd_f64(x, &s, false);
            o.iter().zip(&dout).map(|(a, &b)| a * b as f64).sum()
        };
        let fd = fd_grad(f, &f64s(&qkv), 1e-4, None);
        let tol = Tol {
            abs: 1e-6,
            rel: 1e-5,
        };
        assert_grad(&format!("attention twin bwd {s:?}"), &got, &fd, tol);
    }
}

#[test]
fn twin_bwd_structured() {
    // Bidirectional with q = 0: every query attends uniformly, so dv_j = mean_i dO_i over all
    // queries i (each P_ij = 1/L), for every key j.
    let s = shape(1, 6, 2, 32, false, 0.0);
    let mut qkv = rand_qkv(&s, 2.0, 5);
    let d = s.width();
    (0..s.rows()).for_each(|r| qkv[r * 3 * d..][..d].fill(0.0));
    let dout = rand_dout(&s, 6);
    let (o, lse) = cpu::attention_fwd_f64(&qkv, &s, false);
    let g = cpu::attention_bwd(&qkv, &o, &lse, &dout, &s, false);
    for j in 0..s.len {
        for c in 0..d {
            let mean = (0..s.len).map(|i| dout[i * d + c] as f64).sum::<f64>() / s.len as f64;
            let got = g[j * 3 * d + 2 * d + c];
            assert!((got - mean).abs() < 1e-12, "dv[{j}][{c}] {got} vs {mean}");
        }
    }
    // dO = 0: all gradients vanish.
    let zero = vec![0f32; s.rows() * d];
    let g = cpu::attention_bwd(&qkv, &o, &lse, &zero, &s, false);
    assert!(g.iter().all(|&x| x == 0.0));
}

/// Which GPU backward a test runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bwd {
    /// [`attention_bwd`]: the tensor-core kernels.
    Fast,
    /// [`attention_bwd_reference`]: the fp32 SIMT kernels.
    Reference,
}

/// What one GPU forward + backward returns, read back to the host.
struct GpuBwd {
    dqkv: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    /// The backward's recomputed rotated q', k' ((B, H, L, hd)).
    qr: Vec<f32>,
    kr: Vec<f32>,
}

/// GPU forward then the `which` backward on `qkv`, `dout`.
fn run_gpu_bwd(gpu: &Gpu, qkv: &[f32], dout: &[f32], s: &AttentionShape, which: Bwd) -> GpuBwd {
    let st = &gpu.stream;
    let up16 = |v: &[f32]| {
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        st.clone_htod(&b).unwrap()
    };
    let (dq, dg) = (up16(qkv), up16(dout));
    let mut o = st
        .clone_htod(&vec![bf16::NAN; s.rows() * s.width()])
        .unwrap();
    let mut lse = st
        .clone_htod(&vec![f32::NAN; s.batch * s.heads * s.len])
        .unwrap();
    attention_fwd(gpu, &mut o, &mut lse, &dq, s).unwrap();
    // NaN-filled output: an element the backward forgets to write fails the comparison.
    let mut dqkv = st.clone_htod(&vec![bf16::NAN; qkv.len()]).unwrap();
    let mut ws = AttentionBwdWorkspace::new(gpu, s).unwrap();
    let (qr, kr) = match which {
        Bwd::Fast => {
            attention_bwd(gpu, &mut dqkv, &mut ws, &lse, &o, &dq, &dg, s).unwrap();
            ws.rotated_qk(gpu).unwrap()
        }
        Bwd::Reference => {
            attention_bwd_reference(gpu, &mut dqkv, &mut ws, &lse, &o, &dq, &dg, s).unwrap();
            ws.reference_rotated_qk(gpu).unwrap().unwrap()
        }
    };
    let f = |v: Vec<bf16>| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    GpuBwd {
        dqkv: f(st.clone_dtoh(&dqkv).unwrap()),
        o: f(st.clone_dtoh(&o).unwrap()),
        lse: st.clone_dtoh(&lse).unwrap(),
        qr,
        kr,
    }
}

/// The forward's lse is consistent with the backward's recomputed q', k' (else P would not
/// sum to 1): lse from q', k' in f64 vs the forward kernel's.
fn assert_lse_consistent(tag: &str, r: &GpuBwd, s: &AttentionShape) {
    let (q64, k64) = (f64s(&r.qr), f64s(&r.kr));
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    for (idx, &z) in r.lse.iter().enumerate() {
        let (bh, i) = (idx / s.len, idx % s.len);
        let n = if s.causal { i + 1 } else { s.len };
        let sc: Vec<f64> = (0..n)
            .map(|j| {
                let x = (0..s.head_dim)
                    .map(|e| {
                        q64[(bh * s.len + i) * s.head_dim + e]
                            * k64[(bh * s.len + j) * s.head_dim + e]
                    })
                    .sum::<f64>()
                    * scale;
                let c = s.softcap as f64;
                if c > 0.0 {
                    c * (x / c).tanh()
                } else {
                    x
                }
            })
            .collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let want = m + sc.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        assert!(
            (z as f64 - want).abs() <= 1e-4 + 1e-5 * want.abs(),
            "{tag}: forward lse[{idx}] {z} vs {want} from the backward's q', k'"
        );
    }
}

/// The f64 twin (`round_ps`: with the fast kernel's bf16 roundings of P and dS) on the GPU's
/// own q', k', o and lse, so only the kernel's arithmetic differs.
fn twin_of(
    r: &GpuBwd,
    qkv: &[f32],
    dout: &[f32],
    s: &AttentionShape,
    round_ps: bool,
) -> cpu::BwdTwin {
    cpu::attention_bwd_rotated_ext(
        &f64s(&r.qr),
        &f64s(&r.kr),
        qkv,
        &f64s(&r.o),
        &f64s(&r.lse),
        dout,
        s,
        round_ps,
    )
}

/// GPU backward (SIMT reference) against the f64 twin run on the GPU's own rotated q', k', o
/// and lse (so only fp32 arithmetic and the final bf16 rounding differ): max |got - exact| <=
/// max(2 max |bf16(exact) - exact|, 2e-3 max |exact|). Also: the forward's lse is consistent
/// with the backward's recomputed q', k'.
fn check_bwd_reference(gpu: &Gpu, s: AttentionShape, amp: f32, zero_q: bool) {
    let (qkv, dout) = bwd_inputs(&s, amp, zero_q);
    let r = run_gpu_bwd(gpu, &qkv, &dout, &s, Bwd::Reference);
    let tag = format!("reference {s:?} amp {amp} zero_q {zero_q}");
    assert_lse_consistent(&tag, &r, &s);
    let exact = twin_of(&r, &qkv, &dout, &s, false).grad;
    let exact32: Vec<f32> = exact.iter().map(|&x| x as f32).collect();
    let twin16: Vec<f32> = exact.iter().map(|&x| bf16::from_f64(x).to_f32()).collect();
    let max_abs = exact.iter().fold(0f64, |a, &x| a.max(x.abs()));
    assert_twice(
        &format!("attention dqkv {tag}"),
        &r.dqkv,
        &twin16,
        &exact32,
        2e-3 * max_abs,
    );
}

/// Seeded qkv (uniform in [-amp, amp], q = 0 with `zero_q`) and d o, bf16 values.
fn bwd_inputs(s: &AttentionShape, amp: f32, zero_q: bool) -> (Vec<f32>, Vec<f32>) {
    let seed = (s.batch * 7_000_003 + s.len * 131 + s.heads * 17 + s.head_dim) as u64;
    let seed = seed + s.causal as u64 + 2 * s.softcap.to_bits() as u64;
    let mut qkv = rand_qkv(s, amp, seed);
    if zero_q {
        let d = s.width();
        (0..s.rows()).for_each(|r| qkv[r * 3 * d..][..d].fill(0.0));
    }
    (qkv, rand_dout(s, seed + 99))
}

/// bf16 unit roundoff: |bf16(x) - x| <= 2^-8 |x| (8 significant bits, round to nearest).
const BF16_U: f64 = 1.0 / 256.0;
/// Weight of `fp32_mag` in [`fast_tol`]: fp32 errors of the hd-term dot products dP and D
/// (at most hd 2^-24 <= 7.6e-6 of their absolute sums) and of the approximate softcap's
/// derivative (~4e-7 absolute) enter dS unscaled by dS itself; they dominate where dS ~ 0
/// (L = 1: dS = 0 exactly, the twin's dq = dk = 0).
const FAST_FP: f64 = 1e-5;

/// Per-element tolerance of the fast backward against the exact twin (`exact`, with its error
/// scales): |got - exact| <= U |exact| + 2 U round_mag + FAST_FP fp32_mag + 1e-7, U = 2^-8.
/// Why: the kernel rounds P (for dV += P^T dO) and dS (for dK' += dS^T Q', dQ' += dS K') to
/// bf16 before the tensor-core matmuls, as FlashAttention does. Each rounding moves one term
/// by at most U of its size, and round_mag is the sum of the term sizes (through the rotary
/// backward), so the roundings move an element by at most U round_mag; the second U round_mag
/// covers what is left at that scale: fp32 accumulation over <= L terms (<= 3e-5 relative at
/// L = 512), the fp32 P (S, exp2 and lse2 errors ~1e-5 relative) and the sincos of the rotary
/// backward (6e-7). U |exact| is the final bf16 store (rounding the fp32 result, so U also of
/// its error, again within the margin). 1e-7: exp2 flush-to-zero. A bound, not a statistical
/// estimate: a correct kernel cannot exceed it whatever the seed.
fn fast_tol(t: &cpu::BwdTwin) -> Vec<f64> {
    (0..t.grad.len())
        .map(|e| {
            BF16_U * t.grad[e].abs()
                + 2.0 * BF16_U * t.round_mag[e]
                + FAST_FP * t.fp32_mag[e]
                + 1e-7
        })
        .collect()
}

/// Panics unless |got - want| <= tol elementwise, naming the worst element (largest
/// error/tolerance ratio) with got, want and tolerance, and the max abs and rel errors.
fn assert_within(name: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let (mut max_abs, mut max_rel, mut worst, mut ratio) = (0f64, 0f64, 0usize, 0f64);
    for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = if g.is_finite() {
            (g as f64 - w).abs()
        } else {
            f64::INFINITY
        };
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / w.abs().max(1e-30));
        if err / tol[e] > ratio || (e == 0 && err.is_infinite()) {
            (ratio, worst) = (err / tol[e], e);
        }
    }
    assert!(
        ratio <= 1.0,
        "{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}; worst at index \
         {worst}: got {} want {} tolerance {:.3e} (ratio {ratio:.2})",
        got[worst],
        want[worst],
        tol[worst]
    );
}

/// Elements of part `part` (0 q, 1 k, 2 v) of a (rows, 3*H*hd) tensor.
fn part_of<T: Copy>(x: &[T], s: &AttentionShape, part: usize) -> Vec<T> {
    let d = s.width();
    x.chunks(3 * d)
        .flat_map(|row| row[part * d..][..d].iter().copied())
        .collect()
}

/// The fast backward on one shape: (1) elementwise within [`fast_tol`] of the exact twin;
/// (2) the error-ratio rule of docs/testing.md 2, per part (dq, dk, dv): max |got - exact| <=
/// max(2 max |twin_r - exact|, floor), twin_r = the twin with the kernel's bf16 roundings of P
/// and dS and a bf16 store; floor = 1e-3 max |exact| + FAST_FP max fp32_mag + 1e-7 (matters
/// only where the rounded twin is exact, e.g. L = 1). Also the lse consistency check.
fn check_bwd_fast(gpu: &Gpu, s: AttentionShape, amp: f32, zero_q: bool) {
    let (qkv, dout) = bwd_inputs(&s, amp, zero_q);
    let r = run_gpu_bwd(gpu, &qkv, &dout, &s, Bwd::Fast);
    let tag = format!("fast {s:?} amp {amp} zero_q {zero_q}");
    assert_lse_consistent(&tag, &r, &s);
    let exact = twin_of(&r, &qkv, &dout, &s, false);
    assert_within(
        &format!("attention dqkv {tag}"),
        &r.dqkv,
        &exact.grad,
        &fast_tol(&exact),
    );
    let rounded = twin_of(&r, &qkv, &dout, &s, true).grad;
    let twin_r: Vec<f32> = rounded
        .iter()
        .map(|&x| bf16::from_f64(x).to_f32())
        .collect();
    let exact32: Vec<f32> = exact.grad.iter().map(|&x| x as f32).collect();
    for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let ex = part_of(&exact.grad, &s, part);
        let max_abs = ex.iter().fold(0f64, |a, &x| a.max(x.abs()));
        let max_fp = part_of(&exact.fp32_mag, &s, part)
            .iter()
            .fold(0f64, |a, &x| a.max(x));
        assert_twice(
            &format!("attention {name} {tag}"),
            &part_of(&r.dqkv, &s, part),
            &part_of(&twin_r, &s, part),
            &part_of(&exact32, &s, part),
            1e-3 * max_abs + FAST_FP * max_fp + 1e-7,
        );
    }
}

#[test]
fn gpu_bwd_fast_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // Every head dim, both masks, softcap off / 50 / 2, lengths not a multiple of 64.
    for l in [1, 77, 200] {
        for hd in HEAD_DIMS {
            for causal in [false, true] {
                for cap in [0.0, 50.0, 2.0] {
                    check_bwd_fast(&gpu, shape(2, l, 2, hd, causal, cap), 2.0, false);
                }
            }
        }
    }
    // Whole tiles.
    let caps = [0.0, 50.0, 2.0];
    let mut k = 0;
    for l in [128, 512] {
        for hd in HEAD_DIMS {
            for causal in [false, true] {
                check_bwd_fast(&gpu, shape(1, l, 2, hd, causal, caps[k % 3]), 2.0, false);
                k += 1;
            }
        }
    }
}

#[test]
fn gpu_bwd_fast_real_and_structured_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    check_bwd_fast(&gpu, shape(2, 128, 12, 64, false, 50.0), 2.0, false);
    check_bwd_fast(&gpu, shape(1, 1024, 12, 64, false, 0.0), 2.0, false);
    check_bwd_fast(&gpu, shape(1, 1024, 4, 64, true, 0.0), 2.0, false);
    check_bwd_fast(&gpu, shape(1, 256, 4, 96, true, 2.0), 2.0, false);
    // Structured: q = 0 (uniform attention) and a large magnitude (saturating softcap 2).
    check_bwd_fast(&gpu, shape(2, 64, 4, 64, false, 0.0), 2.0, true);
    check_bwd_fast(&gpu, shape(1, 200, 3, 96, true, 0.0), 2.0, true);
    check_bwd_fast(&gpu, shape(1, 200, 2, 64, false, 0.0), 8.0, false);
    check_bwd_fast(&gpu, shape(1, 150, 2, 128, true, 2.0), 8.0, false);
    check_bwd_fast(&gpu, shape(2, 77, 2, 32, false, 50.0), 8.0, false);
}

#[test]
fn gpu_bwd_fast_matches_reference() {
    let Some(gpu) = gpu_for_tests() else { return };
    for s in [
        shape(2, 128, 12, 64, false, 0.0),
        shape(1, 200, 3, 96, true, 50.0),
        shape(2, 77, 2, 32, true, 2.0),
        shape(1, 256, 4, 128, false, 0.0),
        shape(2, 1, 2, 64, false, 0.0),
    ] {
        let (qkv, dout) = bwd_inputs(&s, 2.0, false);
        let fast = run_gpu_bwd(&gpu, &qkv, &dout, &s, Bwd::Fast);
        let simt = run_gpu_bwd(&gpu, &qkv, &dout, &s, Bwd::Reference);
        // Both preps rotate with att_rope8 and the forward's frequencies: identical q', k'.
        assert_bits_eq(&format!("q' fast vs reference {s:?}"), &fast.qr, &simt.qr);
        assert_bits_eq(&format!("k' fast vs reference {s:?}"), &fast.kr, &simt.kr);
        // |fast - simt| <= |fast - exact| + |simt - exact|: fast_tol plus the reference's
        // own bound (bf16 store U |exact|, fp32 P and sums within U round_mag and
        // FAST_FP fp32_mag).
        let exact = twin_of(&fast, &qkv, &dout, &s, false);
        let tol: Vec<f64> = fast_tol(&exact)
            .iter()
            .enumerate()
            .map(|(e, t)| {
                t + BF16_U * (exact.grad[e].abs() + exact.round_mag[e])
                    + FAST_FP * exact.fp32_mag[e]
                    + 1e-7
            })
            .collect();
        assert_within(
            &format!("attention dqkv fast vs reference {s:?}"),
            &fast.dqkv,
            &f64s(&simt.dqkv),
            &tol,
        );
    }
}

#[test]
fn gpu_bwd_reference_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    for s in [
        shape(2, 128, 12, 64, false, 0.0),
        shape(2, 128, 12, 64, false, 50.0),
        shape(2, 128, 12, 64, true, 0.0),
        shape(1, 512, 12, 64, false, 0.0),
        shape(1, 256, 16, 96, true, 2.0),
        shape(2, 128, 4, 32, false, 50.0),
        shape(1, 192, 4, 128, true, 0.0),
        shape(1, 192, 4, 128, false, 2.0),
    ] {
        check_bwd_reference(&gpu, s, 2.0, false);
    }
    check_bwd_reference(&gpu, shape(2, 64, 4, 64, false, 0.0), 2.0, true);
    check_bwd_reference(&gpu, shape(1, 150, 2, 64, false, 0.0), 4.0, false);
    // Awkward lengths for every head dim, both masks, all softcap settings.
    let caps = [0.0, 50.0, 2.0];
    let mut k = 0;
    for l in [1, 7, 129] {
        for hd in HEAD_DIMS {
            for causal in [false, true] {
                check_bwd_reference(&gpu, shape(2, l, 3, hd, causal, caps[k % 3]), 2.0, false);
                k += 1;
            }
        }
    }
}

#[test]
fn gpu_bwd_is_bitwise_deterministic() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = shape(2, 256, 12, 64, true, 50.0);
    let qkv = rand_qkv(&s, 2.0, 1);
    let dout = rand_dout(&s, 2);
    for which in [Bwd::Fast, Bwd::Reference] {
        let a = run_gpu_bwd(&gpu, &qkv, &dout, &s, which).dqkv;
        let b = run_gpu_bwd(&gpu, &qkv, &dout, &s, which).dqkv;
        assert_bits_eq(&format!("attention dqkv run-to-run {which:?}"), &a, &b);
    }
}

#[test]
fn gpu_bwd_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let st = &gpu.stream;
    let s = shape(1, 8, 2, 32, false, 0.0);
    let (rows, d) = (s.rows(), s.width());
    let qkv = st.alloc_zeros::<bf16>(rows * 3 * d).unwrap();
    let o = st.alloc_zeros::<bf16>(rows * d).unwrap();
    let lse = st.alloc_zeros::<f32>(s.batch * s.heads * s.len).unwrap();
    let mut ws = AttentionBwdWorkspace::new(&gpu, &s).unwrap();
    let mut small = st.alloc_zeros::<bf16>(rows * 3 * d - 1).unwrap();
    let mut dqkv = st.alloc_zeros::<bf16>(rows * 3 * d).unwrap();
    let other = AttentionShape { causal: true, ..s };
    for f in [attention_bwd, attention_bwd_reference] {
        let r = f(&gpu, &mut small, &mut ws, &lse, &o, &qkv, &o, &s);
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        let r = f(&gpu, &mut dqkv, &mut ws, &lse, &o, &qkv, &o, &other);
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        f(&gpu, &mut dqkv, &mut ws, &lse, &o, &qkv, &o, &s).unwrap();
    }
}

#[test]
fn bwd_geometry() {
    // Padded positions of lse2 / D: whole 64-row tiles.
    assert_eq!(padded_len(1), 64);
    assert_eq!(padded_len(64), 64);
    assert_eq!(padded_len(65), 128);
    assert_eq!(padded_len(1024), 1024);
    // AttBwdSmem<HD>::BYTES: 6 tiles of 64 x (hd+8) bf16, 4 x 64 f32, hd/2 f32; all within
    // the H100's 227 KiB per block, above 48 KiB for hd >= 64 (the launcher raises the limit).
    let want = [(32, 31808), (64, 56448), (96, 81088), (128, 105728)];
    for (hd, bytes) in want {
        assert_eq!(bwd_smem_bytes(hd), bytes, "hd {hd}");
        assert!(bytes <= 227 * 1024);
    }
    let s = shape(32, 1024, 12, 64, false, 0.0);
    assert_eq!(bwd_flops(&s), 2.5 * flops(&s));
    assert_eq!(bwd_flops(&s), 10.0 * 32.0 * 12.0 * 1024.0 * 1024.0 * 64.0);
}

#[test]
fn twin_with_kernel_roundings_is_within_fast_tolerance() {
    // The CPU twin rounding P and dS to bf16 (the fast kernel's rounding points) and its
    // output to bf16 stays within fast_tol of the exact twin: the tolerance holds for the
    // roundings it is derived from. And it is not vacuous: the wrong mask or a 3% error fails.
    for (k, (s, amp)) in [
        (shape(2, 77, 2, 32, false, 0.0), 2.0),
        (shape(1, 130, 2, 64, true, 2.0), 2.0),
        (shape(1, 70, 3, 96, false, 50.0), 4.0),
        (shape(1, 65, 1, 128, true, 0.0), 8.0),
        (shape(2, 1, 2, 64, false, 0.0), 2.0),
    ]
    .into_iter()
    .enumerate()
    {
        let qkv = rand_qkv(&s, amp, 500 + k as u64);
        let dout = rand_dout(&s, 600 + k as u64);
        let (q, kr) = cpu::rotated_qk(&qkv, &s, true);
        let (o, lse) = cpu::attention_fwd_f64(&qkv, &s, true);
        let exact = cpu::attention_bwd_rotated_ext(&q, &kr, &qkv, &o, &lse, &dout, &s, false);
        let rounded = cpu::attention_bwd_rotated_ext(&q, &kr, &qkv, &o, &lse, &dout, &s, true);
        let got: Vec<f32> = rounded
            .grad
            .iter()
            .map(|&x| bf16::from_f64(x).to_f32())
            .collect();
        let tol = fast_tol(&exact);
        assert_within(&format!("rounded twin {s:?}"), &got, &exact.grad, &tol);
        assert_eq!(
            exact.grad,
            cpu::attention_bwd_rotated(&q, &kr, &qkv, &o, &lse, &dout, &s)
        );
        let off: Vec<f32> = exact.grad.iter().map(|&x| (x * 1.03) as f32).collect();
        let fails = |g: &[f32]| {
            g.iter()
                .zip(&exact.grad)
                .zip(&tol)
                .any(|((&g, &w), &t)| (g as f64 - w).abs() > t)
        };
        assert!(fails(&off), "{s:?}: a 3% error passes");
        if s.len > 1 {
            let flip = AttentionShape {
                causal: !s.causal,
                ..s
            };
            let (o2, lse2) = cpu::attention_fwd_f64(&qkv, &flip, true);
            let wrong = cpu::attention_bwd_rotated(&q, &kr, &qkv, &o2, &lse2, &dout, &flip);
            let wrong: Vec<f32> = wrong.iter().map(|&x| x as f32).collect();
            assert!(fails(&wrong), "{s:?}: the other mask passes");
        }
    }
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::define;
    let c = "attention_common.cuh";
    assert_eq!(BLOCK as u64, define(c, "ATT_BM"));
    assert_eq!(BLOCK as u64, define(c, "ATT_BN"));
    assert_eq!(
        THREADS as u64,
        define(c, "ATT_WARPS") * define("common.cuh", "IMDM_WARP")
    );
    assert_eq!(BWD_ROWS as u64, define(c, "ATT_BWD_WARPS"));
    assert_eq!(
        BWD_THREADS as u64,
        define(c, "ATT_BWD_WARPS") * define("common.cuh", "IMDM_WARP")
    );
    assert_eq!(
        PREP_ROWS as u64,
        define("attention_bwd.cu", "ATT_PREP_ROWS")
    );
}
