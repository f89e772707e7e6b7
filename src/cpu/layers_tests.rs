//! Every layer's backward against f64 central finite differences of its forward (chain of trust,
//! step 1), plus the forward rules that can be pinned independently: the dropout stream against
//! `rng::dropout_keep` and the GPU residual twin, attention against a naive loop, the SUBS rule
//! against `dit_ref`.

use crate::cpu::attention::*;
use crate::cpu::layers::*;
use crate::cpu::loss::{subs_ce_in_place, subs_log_probs};
use crate::model::dit_ref;
use crate::rng::dropout_keep;
use crate::testing::grad::{assert_grad, dot, fd_grad};
use crate::testing::inputs::rand_vec;
use crate::testing::{assert_close, Tol};

/// Step of the layer FDs: the f64 truncation error h² f'''/6 is ~1e-11 and the roundoff
/// ~1e-16/h ~ 1e-11, both far below the tolerances.
const H: f64 = 1e-5;
const TOL: Tol = Tol {
    abs: 1e-8,
    rel: 1e-6,
};

fn sub(a: &[f64], b: f64) -> Vec<f64> {
    a.iter().map(|x| x - b).collect()
}

#[test]
fn linear_backward_matches_fd() {
    let (rows, out, inp) = (3, 4, 5);
    let dims = (rows, out, inp);
    let (x, w, b) = (
        rand_vec(1, rows * inp, -1.0, 1.0),
        rand_vec(2, out * inp, -1.0, 1.0),
        rand_vec(3, out, -1.0, 1.0),
    );
    let r = rand_vec(4, rows * out, -1.0, 1.0);
    let f = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut y = vec![0.0; rows * out];
        linear_fwd(x, w, Some(b), dims, &mut y);
        dot(&r, &y)
    };
    // Parameter grads start at 0.5 to check that they accumulate.
    let (mut dx, mut dw, mut db) = (vec![9.0; rows * inp], vec![0.5; out * inp], vec![0.5; out]);
    linear_bwd(&r, &x, &w, dims, Some(&mut dx), &mut dw, Some(&mut db));
    assert_grad(
        "linear dx",
        &dx,
        &fd_grad(|x| f(x, &w, &b), &x, H, None),
        TOL,
    );
    assert_grad(
        "linear dW",
        &sub(&dw, 0.5),
        &fd_grad(|w| f(&x, w, &b), &w, H, None),
        TOL,
    );
    assert_grad(
        "linear db",
        &sub(&db, 0.5),
        &fd_grad(|b| f(&x, &w, b), &b, H, None),
        TOL,
    );
}

/// Modulated with one (shift, scale) for all rows and with one per pair of rows (G = 2: the
/// per-sequence conditioning, each vector's gradient summed over its own rows).
#[test]
fn ln_modulate_backward_matches_fd() {
    let (rows, d) = (4, 7);
    // An offset and a spread so that the mean and variance terms both matter.
    let x: Vec<f64> = rand_vec(5, rows * d, -2.0, 2.0)
        .iter()
        .map(|v| v + 0.7)
        .collect();
    let w = rand_vec(6, d, 0.5, 1.5);
    let r = rand_vec(9, rows * d, -1.0, 1.0);
    for (modulated, g) in [(true, 1), (true, 2), (false, 1)] {
        let (shift, scale) = (rand_vec(7, g * d, -0.5, 0.5), rand_vec(8, g * d, -0.5, 0.5));
        let f = |x: &[f64], w: &[f64], sh: &[f64], sc: &[f64]| {
            let mut y = vec![0.0; rows * d];
            ln_mod_fwd(x, w, modulated.then_some((sh, sc)), &mut y);
            dot(&r, &y)
        };
        let mut y = vec![0.0; rows * d];
        let mods = modulated.then_some((&shift[..], &scale[..]));
        let saved = ln_mod_fwd(&x, &w, mods, &mut y);
        let (mut dx, mut dw) = (vec![0.25; rows * d], vec![0.5; d]);
        let (mut dsh, mut dsc) = (vec![0.5; g * d], vec![0.5; g * d]);
        let dmods = modulated.then_some((&mut dsh[..], &mut dsc[..]));
        ln_mod_bwd(&r, &saved, &w, mods, &mut dx, &mut dw, dmods);
        let tag = if modulated {
            format!("modulated G={g}")
        } else {
            "plain".into()
        };
        let want = fd_grad(|x| f(x, &w, &shift, &scale), &x, H, None);
        assert_grad(&format!("ln {tag} dx (+=)"), &sub(&dx, 0.25), &want, TOL);
        let want = fd_grad(|w| f(&x, w, &shift, &scale), &w, H, None);
        assert_grad(&format!("ln {tag} dw"), &sub(&dw, 0.5), &want, TOL);
        if modulated {
            let want = fd_grad(|s| f(&x, &w, s, &scale), &shift, H, None);
            assert_grad(&format!("ln {tag} dshift"), &sub(&dsh, 0.5), &want, TOL);
            let want = fd_grad(|s| f(&x, &w, &shift, s), &scale, H, None);
            assert_grad(&format!("ln {tag} dscale"), &sub(&dsc, 0.5), &want, TOL);
        }
    }
}

/// G modulation vectors act on their own rows only: the forward over all rows equals G
/// forwards over each vector's rows, bit for bit.
#[test]
fn per_vector_modulation_equals_separate_calls() {
    let (g, per, d) = (3, 5, 8);
    let x = rand_vec(30, g * per * d, -2.0, 2.0);
    let w = rand_vec(31, d, 0.5, 1.5);
    let (shift, scale) = (
        rand_vec(32, g * d, -1.0, 1.0),
        rand_vec(33, g * d, -1.0, 1.0),
    );
    let br = rand_vec(34, g * per * d, -1.0, 1.0);
    let mut y = vec![0.0; x.len()];
    ln_mod_fwd(&x, &w, Some((&shift, &scale)), &mut y);
    let (mut h, mut b) = (x.clone(), br.clone());
    residual_fwd(&mut h, &mut b, Some(&scale), None, d);
    for v in 0..g {
        let (rs, ms) = (v * per * d..(v + 1) * per * d, v * d..(v + 1) * d);
        let mut yv = vec![0.0; per * d];
        ln_mod_fwd(
            &x[rs.clone()],
            &w,
            Some((&shift[ms.clone()], &scale[ms.clone()])),
            &mut yv,
        );
        assert!(yv == y[rs.clone()], "ln_mod vector {v}");
        let (mut hv, mut bv) = (x[rs.clone()].to_vec(), br[rs.clone()].to_vec());
        residual_fwd(&mut hv, &mut bv, Some(&scale[ms]), None, d);
        assert!(hv == h[rs], "residual vector {v}");
    }
}

#[test]
fn activation_grads_match_fd_and_forwards_match_dit_ref() {
    let xs: Vec<f64> = (0..241).map(|i| -6.0 + 0.05 * i as f64 + 1e-3).collect();
    type Pair = (fn(f64) -> f64, fn(f64) -> f64);
    let cases: [(&str, Pair); 3] = [
        ("gelu_tanh", (gelu_tanh::<f64>, gelu_tanh_grad::<f64>)),
        ("gelu_exact", (gelu_exact::<f64>, gelu_exact_grad::<f64>)),
        ("silu", (silu::<f64>, silu_grad::<f64>)),
    ];
    for (name, (f, g)) in cases {
        let got: Vec<f64> = xs.iter().map(|&x| g(x)).collect();
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| (f(x + H) - f(x - H)) / (2.0 * H))
            .collect();
        assert_grad(&format!("{name}'"), &got, &want, TOL);
        // map_bwd multiplies the incoming gradient by f'(x).
        let mut d = vec![2.0; xs.len()];
        map_bwd(&xs, &mut d, g);
        let twice: Vec<f64> = got.iter().map(|v| 2.0 * v).collect();
        assert_grad(
            &format!("{name} map_bwd"),
            &d,
            &twice,
            Tol {
                abs: 0.0,
                rel: 1e-15,
            },
        );
    }
    for &x in &xs {
        assert!(
            (gelu_tanh(x) - dit_ref::gelu_tanh(x)).abs() < 1e-15,
            "gelu_tanh({x})"
        );
        assert!(
            (gelu_exact(x) - dit_ref::gelu_exact(x)).abs() < 1e-15,
            "gelu_exact({x})"
        );
        let (t, e) = (gelu_tanh(x as f32) as f64, gelu_exact(x as f32) as f64);
        assert!(
            (t - dit_ref::gelu_tanh(x as f32 as f64)).abs() < 2e-6,
            "f32 gelu_tanh({x})"
        );
        assert!(
            (e - dit_ref::gelu_exact(x as f32 as f64)).abs() < 2e-6,
            "f32 gelu_exact({x})"
        );
    }
}

/// Max abs and rel error of an f32 function against its f64 twin on a grid over [lo, hi].
fn f32_error(f: fn(f32) -> f32, want: fn(f64) -> f64, lo: f32, hi: f32) -> (f64, f64) {
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    let n = 400_000;
    for i in 0..=n {
        let x = lo + (hi - lo) * (i as f32 / n as f32);
        let (g, w) = (f(x) as f64, want(x as f64));
        max_abs = max_abs.max((g - w).abs());
        if w != 0.0 {
            max_rel = max_rel.max(((g - w) / w).abs());
        }
    }
    (max_abs, max_rel)
}

/// The branch-free f32 functions against f64: tanh and erf within a few ulp of 1 absolutely
/// and relatively near 0, odd, and never beyond ±1; exp within a few ulp relatively (measured:
/// tanh 3.3, erf 3.5, exp 0.7 ulp).
#[test]
fn fastmath_is_accurate() {
    use crate::cpu::fastmath;
    let ulp = f32::EPSILON as f64;
    let (a, r) = f32_error(fastmath::tanh, f64::tanh, -10.0, 10.0);
    assert!(a < 4.0 * ulp && r < 4.0 * ulp, "tanh: abs {a:e} rel {r:e}");
    let (a, r) = f32_error(fastmath::erf, libm::erf, -6.0, 6.0);
    assert!(a < 4.0 * ulp && r < 4.0 * ulp, "erf: abs {a:e} rel {r:e}");
    let (_, r) = f32_error(fastmath::exp, f64::exp, -87.0, 88.0);
    assert!(r < 4.0 * ulp, "exp: rel {r:e}");
    for x in [0.3f32, 2.0, 5.0, 30.0, 1e30, f32::INFINITY] {
        for (name, f) in [
            ("tanh", fastmath::tanh as fn(f32) -> f32),
            ("erf", fastmath::erf),
        ] {
            let y = f(x);
            assert_eq!(f(-x), -y, "{name} is odd at {x}");
            assert!(
                y <= 1.0 && (x < 10.0 || 1.0 - y <= 2.0 * f32::EPSILON),
                "{name}({x}) = {y}"
            );
        }
    }
    assert_eq!(fastmath::exp(0.0), 1.0);
    assert!(fastmath::exp(-1e4) < 2e-38 && fastmath::exp(-1e4) > 0.0);
}

#[test]
fn rope_backward_matches_fd() {
    let (batch, len, heads, hd) = (2, 3, 2, 4);
    let d = heads * hd;
    let rope = Rope::<f64>::new(len, hd);
    let x = rand_vec(10, batch * len * 3 * d, -1.0, 1.0);
    let r = rand_vec(11, x.len(), -1.0, 1.0);
    let f = |x: &[f64]| {
        let mut y = x.to_vec();
        rope_apply(&mut y, &rope, len, heads, false);
        dot(&r, &y)
    };
    let mut g = r.clone();
    rope_apply(&mut g, &rope, len, heads, true);
    assert_grad("rope", &g, &fd_grad(f, &x, H, None), TOL);
    // Position 0 is the identity; the v part is never touched.
    let mut y = x.clone();
    rope_apply(&mut y, &rope, len, heads, false);
    assert_eq!(&y[..2 * d], &x[..2 * d]);
    assert_eq!(&y[2 * d..3 * d], &x[2 * d..3 * d]);
}

/// Naive attention for one batch row set: loops over (b, h, i, j) in f64.
fn naive_attention(qkv: &[f64], s: &AttnShape) -> Vec<f64> {
    let (l, hd) = (s.len, s.head_dim);
    let d = s.heads * hd;
    let mut out = vec![0.0; s.batch * l * d];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..l {
                let q = &qkv[(b * l + i) * 3 * d + h * hd..][..hd];
                let n = if s.causal { i + 1 } else { l };
                let mut sc: Vec<f64> = (0..n)
                    .map(|j| {
                        let k = &qkv[(b * l + j) * 3 * d + d + h * hd..][..hd];
                        let v = dot(q, k) / (hd as f64).sqrt();
                        if s.softcap > 0.0 {
                            s.softcap * (v / s.softcap).tanh()
                        } else {
                            v
                        }
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                sc.iter_mut().for_each(|v| *v = (*v - m).exp());
                let z: f64 = sc.iter().sum();
                for e in 0..hd {
                    out[(b * l + i) * d + h * hd + e] = (0..n)
                        .map(|j| sc[j] / z * qkv[(b * l + j) * 3 * d + 2 * d + h * hd + e])
                        .sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_forward_matches_naive_and_backward_matches_fd() {
    // Short sequences in two batches, and one longer one with a wider head.
    let cases = [(0.0, false), (0.0, true), (0.7, false), (0.7, true)]
        .map(|(cap, causal)| (2, 5, 4, cap, causal))
        .into_iter()
        .chain([(1, 40, 16, 0.0, false), (1, 40, 16, 0.7, true)]);
    for (batch, len, head_dim, softcap, causal) in cases {
        let s = AttnShape {
            batch,
            len,
            heads: 2,
            head_dim,
            softcap,
            causal,
        };
        let d = s.heads * s.head_dim;
        let rows = s.batch * s.len;
        // Scores of order 1-3, so that the softcap of 0.7 bends them.
        let qkv = rand_vec(12, rows * 3 * d, -2.0, 2.0);
        let r = rand_vec(13, rows * d, -1.0, 1.0);
        let tag = format!("L {len} softcap {softcap} causal {causal}");
        let mut out = vec![0.0; rows * d];
        let saved = attention_fwd(&qkv, &s, &mut out);
        assert_grad(
            &format!("attention fwd {tag}"),
            &out,
            &naive_attention(&qkv, &s),
            Tol {
                abs: 1e-14,
                rel: 1e-12,
            },
        );
        let f = |x: &[f64]| {
            let mut o = vec![0.0; rows * d];
            attention_fwd(x, &s, &mut o);
            dot(&r, &o)
        };
        let mut dqkv = vec![7.0; qkv.len()];
        attention_bwd(&r, &qkv, &saved, &s, &mut dqkv);
        assert_grad(
            &format!("attention dqkv {tag}"),
            &dqkv,
            &fd_grad(f, &qkv, H, None),
            TOL,
        );
    }
}

#[test]
fn residual_backward_matches_fd() {
    let (rows, d) = (3, 6);
    let h = rand_vec(14, rows * d, -1.0, 1.0);
    let br = rand_vec(15, rows * d, -1.0, 1.0);
    let r = rand_vec(17, rows * d, -1.0, 1.0);
    // G = 3: one gate per row (the per-sequence conditioning at L = 1).
    for (p, gated, groups) in [
        (0.0f32, true, 1),
        (0.3, true, 1),
        (0.3, true, 3),
        (0.3, false, 1),
    ] {
        let gate = rand_vec(16, groups * d, -1.5, 1.5);
        let keep = (p > 0.0).then(|| dropout_factors::<f64>(3, 4, p, rows * d));
        let f = |h: &[f64], br: &[f64], g: &[f64]| {
            let (mut h, mut br) = (h.to_vec(), br.to_vec());
            residual_fwd(&mut h, &mut br, gated.then_some(g), keep.as_deref(), d);
            dot(&r, &h)
        };
        let (mut hh, mut dropped) = (h.clone(), br.clone());
        let g = gated.then_some(&gate[..]);
        residual_fwd(&mut hh, &mut dropped, g, keep.as_deref(), d);
        let (mut dbr, mut dg) = (vec![0.0; rows * d], vec![0.5; groups * d]);
        let dgate = gated.then_some(&mut dg[..]);
        residual_bwd(&r, &dropped, g, keep.as_deref(), d, &mut dbr, dgate);
        let tag = format!("p {p} gated {gated} G={groups}");
        assert_grad(
            &format!("residual dh {tag}"),
            &r,
            &fd_grad(|x| f(x, &br, &gate), &h, H, None),
            TOL,
        );
        let want = fd_grad(|x| f(&h, x, &gate), &br, H, None);
        assert_grad(&format!("residual dbranch {tag}"), &dbr, &want, TOL);
        if gated {
            let want = fd_grad(|x| f(&h, &br, x), &gate, H, None);
            assert_grad(&format!("residual dgate {tag}"), &sub(&dg, 0.5), &want, TOL);
        }
    }
}

/// The CPU mask is `rng::dropout_keep`'s, element for element (offsets with high bits set,
/// lengths that cross the fill chunk and are not multiples of 4), and a gated add with it
/// equals the GPU kernel's twin.
#[test]
fn dropout_factors_follow_the_philox_stream_and_the_gpu_twin() {
    for &(seed, offset, p, n) in &[
        (42u64, 0u64, 0.1f32, 10_003usize),
        (u64::MAX - 3, 1 << 40 | 9, 0.5, 4097),
        (7, 11, 0.9, 6),
    ] {
        let f = dropout_factors::<f32>(seed, offset, p, n);
        let scale = 1.0f32 / (1.0 - p);
        for (i, &x) in f.iter().enumerate() {
            let want = if dropout_keep(seed, offset, i as u64, p) {
                scale
            } else {
                0.0
            };
            assert_eq!(x, want, "seed {seed} offset {offset} p {p}: element {i}");
        }
    }
    let (rows, len, d, p, seed, offset) = (4, 2, 6, 0.25f32, 99, 5);
    let h0: Vec<f32> = rand_vec(18, rows * d, -2.0, 2.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let br: Vec<f32> = rand_vec(19, rows * d, -1.0, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let gate: Vec<f32> = rand_vec(20, d, -1.5, 1.5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let mut want = h0.clone();
    // The twin takes a (B, D) gate picked by row / rows_per_batch: the same gate for both rows.
    let gate2: Vec<f32> = gate.iter().chain(&gate).copied().collect();
    crate::cuda::ops::residual::cpu::residual_fwd(
        &mut want,
        &br,
        Some(&gate2),
        d,
        len,
        p,
        seed,
        offset,
    );
    let (mut got, mut b) = (h0, br);
    let keep = dropout_factors::<f32>(seed, offset, p, rows * d);
    residual_fwd(&mut got, &mut b, Some(&gate), Some(&keep), d);
    assert_close("residual vs GPU twin", &got, &want, Tol::F32);
}

/// Loss rows: (xt, x0) with mask id 2 (not the last id): two masked rows, two carried over.
fn ce_case() -> (usize, usize, Vec<u32>, Vec<u32>, Vec<f32>) {
    let (v, mask) = (6, 2);
    let xt = vec![2, 4, 2, 0];
    let x0 = vec![5, 4, 1, 0];
    let w = vec![1.5, 2.0, 0.5, 3.0];
    (v, mask, xt, x0, w)
}

#[test]
fn subs_cross_entropy_matches_explicit_loss_and_fd() {
    let (v, mask, xt, x0, w) = ce_case();
    let norm = 3.7;
    let logits = rand_vec(21, xt.len() * v, -3.0, 3.0);
    let loss_of = |l: &[f64]| subs_ce_in_place(&mut l.to_vec(), &xt, &x0, &w, norm, mask, v);
    // Explicit: −log softmax over the columns other than the mask, at masked rows only.
    let mut want = 0.0;
    for r in [0, 2] {
        let row = &logits[r * v..(r + 1) * v];
        let z: f64 = (0..v).filter(|&j| j != mask).map(|j| row[j].exp()).sum();
        want += w[r] as f64 * -(row[x0[r] as usize].exp() / z).ln() / norm;
    }
    let mut g = logits.clone();
    let loss = subs_ce_in_place(&mut g, &xt, &x0, &w, norm, mask, v);
    assert!((loss - want).abs() < 1e-13, "loss {loss} want {want}");
    assert_grad("subs dlogits", &g, &fd_grad(loss_of, &logits, H, None), TOL);
    for r in 0..xt.len() {
        assert_eq!(
            g[r * v + mask],
            0.0,
            "mask column has no gradient (row {r})"
        );
        if xt[r] as usize != mask {
            assert!(
                g[r * v..(r + 1) * v].iter().all(|&x| x == 0.0),
                "carry-over row {r}"
            );
        }
    }
}

#[test]
fn subs_log_probs_match_dit_ref() {
    let (v, mask, xt, _, _) = ce_case();
    let logits: Vec<f32> = rand_vec(22, xt.len() * v, -3.0, 3.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let t = crate::tensor::Tensor::from_vec(&[1, xt.len(), v], logits.clone()).unwrap();
    let toks = crate::tensor::Tokens::new(1, xt.len(), xt.clone(), v).unwrap();
    let want = dit_ref::subs_log_probs(&t, &toks, mask);
    let wide: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    assert_close(
        "subs f64",
        &subs_log_probs(&wide, &xt, mask, v),
        &want.data,
        Tol {
            abs: 1e-7,
            rel: 1e-7,
        },
    );
    assert_close(
        "subs f32",
        &subs_log_probs(&logits, &xt, mask, v),
        &want.data,
        Tol::F32,
    );
}

#[test]
fn embedding_backward_matches_fd() {
    let (vocab, d) = (5, 3);
    let ids = vec![4u32, 1, 4, 0];
    let table = rand_vec(23, vocab * d, -1.0, 1.0);
    let r = rand_vec(24, ids.len() * d, -1.0, 1.0);
    let f = |t: &[f64]| {
        let mut h = vec![0.0; ids.len() * d];
        embedding_fwd(t, &ids, d, &mut h);
        dot(&r, &h)
    };
    let mut g = vec![0.5; vocab * d];
    embedding_bwd(&r, &ids, d, &mut g);
    assert_grad(
        "embedding (repeated id 4)",
        &sub(&g, 0.5),
        &fd_grad(f, &table, H, None),
        TOL,
    );
}
