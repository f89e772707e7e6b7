//! AR: the loss against the torch fixture and finite differences, the sampling step against
//! the fixture, the KV-cached decoder against the full forward, and the two samplers' tokens.

use super::*;
use crate::model::init::random_params;
use crate::model::DitConfig;
use crate::testing::algos_fixture::{assert_rel, f64s, int, num, section, u32s};
use crate::testing::grad::{assert_grad, fd_grad};
use crate::testing::Tol;

fn ar_config() -> DitConfig {
    let mut c = DitConfig::minimini();
    (c.vocab_size, c.mask_index, c.length) = (23, 22, 9);
    (c.hidden, c.heads, c.blocks, c.cond_dim) = (16, 2, 2, 8);
    c.set_algo(Algo::Ar);
    c.validate().unwrap();
    c
}

/// The loss and its logit gradient equal the torch fixture (1e-6 relative), and the gradient
/// equals central finite differences of the loss.
#[test]
fn ar_ce_matches_fixture_and_finite_differences() {
    let fx = section("ar");
    let (v, mask, norm) = (int(&fx, "v"), int(&fx, "mask"), num(&fx, "norm"));
    let z = f64s(&fx, "logits");
    let targets = u32s(&fx, "targets");
    let mut g = z.clone();
    let loss = ar_ce_in_place(&mut g, &targets, norm, mask, v);
    assert_rel("AR loss", &[loss], &[num(&fx, "loss")]);
    assert_rel("AR grad", &g, &f64s(&fx, "grad"));
    let fd = fd_grad(
        |x| ar_ce_in_place(&mut x.to_vec(), &targets, norm, mask, v),
        &z,
        1e-5,
        None,
    );
    assert_grad(
        "AR grad vs FD",
        &g,
        &fd,
        Tol {
            abs: 1e-8,
            rel: 1e-6,
        },
    );
    assert!(
        g.chunks(v).all(|r| r[mask] == 0.0),
        "the mask column has no gradient"
    );
}

/// The sampling step (log-softmax with the mask at −inf, plus Gumbel, argmax) picks the
/// fixture's tokens from its logits and draws.
#[test]
fn ar_step_matches_fixture() {
    let fx = section("ar");
    let (v, mask) = (int(&fx, "v"), int(&fx, "mask"));
    let z = f64s(&fx, "logits");
    let gum = f64s(&fx["step"], "gumbel");
    let want = u32s(&fx["step"], "tokens");
    for (r, &w) in want.iter().enumerate() {
        let row = &z[r * v..(r + 1) * v];
        let got = next_token(row, mask, |j| gum[r * v + j]);
        assert_eq!(got, w, "row {r}");
    }
    // A huge mask logit never wins.
    let mut row = vec![0.0f64; v];
    row[mask] = 1e9;
    assert_ne!(next_token(&row, mask, |_| 0.0) as usize, mask);
}

/// The KV cache's logits at every position equal the full causal forward's (f64: to
/// rounding), so decoding position by position is the same model.
#[test]
fn kv_cache_logits_match_full_forward() {
    let c = ar_config();
    let p = random_params(&c, 7);
    let (b, l, v) = (3, c.length, c.vocab_size);
    let ids: Vec<u32> = (0..b * l).map(|i| ((i * 7 + 3) % (v - 1)) as u32).collect();
    let x = Tokens {
        batch: b,
        len: l,
        ids: ids.clone(),
    };
    let full = logits::<f64>(&p, &x, None, None).unwrap();
    let mut cache = KvCache::<f64>::new(&p, b, l).unwrap();
    for i in 0..l {
        let col: Vec<u32> = (0..b).map(|s| ids[s * l + i]).collect();
        let z = cache.step(&col).unwrap();
        for s in 0..b {
            let want = &full[(s * l + i) * v..(s * l + i + 1) * v];
            let got = &z[s * v..(s + 1) * v];
            for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                    "row {s} position {i} token {j}: cached {g}, full {w}"
                );
            }
        }
    }
    assert!(
        cache.step(&vec![0; b]).is_err(),
        "a full cache refuses a step"
    );
}

/// The KV-cached sampler and the reference's uncached one give identical tokens for the same
/// seed, in f32 (the training and sampling type) and f64; other seeds give other samples.
#[test]
fn cached_and_uncached_samplers_agree() {
    let c = ar_config();
    let p = random_params(&c, 3);
    let (b, l, bos) = (4, c.length, 5);
    for seed in [1u64, 2, 99] {
        let a = sample_uncached::<f32>(&p, b, l, bos, seed).unwrap();
        let k = sample_cached::<f32>(&p, b, l, bos, seed).unwrap();
        assert_eq!(a, k, "f32, seed {seed}");
        let a64 = sample_uncached::<f64>(&p, b, l, bos, seed).unwrap();
        let k64 = sample_cached::<f64>(&p, b, l, bos, seed).unwrap();
        assert_eq!(a64, k64, "f64, seed {seed}");
        assert!(a.ids.chunks(l).all(|r| r[0] == bos));
        assert!(a.ids.iter().all(|&t| t as usize != c.mask_index));
    }
    let s1 = sample_cached::<f32>(&p, b, l, bos, 1).unwrap();
    let s2 = sample_cached::<f32>(&p, b, l, bos, 2).unwrap();
    assert_ne!(s1, s2);
    let e = sample_cached::<f32>(&p, b, l, c.mask_index as u32, 1).unwrap_err();
    assert!(e.to_string().contains("--bos"), "{e}");
}

/// Through the DiT: the loss hook's parameter gradient equals finite differences of the AR
/// loss (f64), on the embedding, a block weight and the output bias, and the evaluation NLL
/// equals the training loss times the norm.
#[test]
fn ar_loss_through_the_dit_matches_finite_differences() {
    let c = ar_config();
    let p = random_params(&c, 11);
    let (b, l, v) = (2, c.length, c.vocab_size);
    let x0 = Tokens {
        batch: b,
        len: l,
        ids: (0..b * l).map(|i| ((i * 5 + 1) % (v - 1)) as u32).collect(),
    };
    let norm = (b * (l - 1)) as f64;
    let mut g = DitParams::zeros(&c);
    let loss = loss_and_grad::<f64>(&p, &x0, norm, &TrainOpts::default(), &mut g).unwrap();
    let nll = nll_sum::<f64>(&p, &x0).unwrap();
    assert!((nll / norm - loss).abs() <= 1e-12 * loss.abs());
    for name in [
        "vocab_embed.embedding",
        "blocks.1.mlp.0.weight",
        "output_layer.linear.bias",
    ] {
        let ti = p.named().iter().position(|(n, _)| n == name).unwrap();
        let x: Vec<f64> = p.named()[ti].1.data.iter().map(|&a| a as f64).collect();
        let only: Vec<usize> = (0..x.len()).step_by(x.len().div_ceil(12)).collect();
        let fd = fd_grad(
            |xs| {
                let mut q = p.clone();
                for (d, &s) in q.named_mut()[ti].1.data.iter_mut().zip(xs) {
                    *d = s as f32;
                }
                nll_sum::<f64>(&q, &x0).unwrap() / norm
            },
            &x,
            1e-3,
            Some(&only),
        );
        let an: Vec<f64> = only
            .iter()
            .map(|&k| g.named()[ti].1.data[k] as f64)
            .collect();
        let fdv: Vec<f64> = only.iter().map(|&k| fd[k]).collect();
        assert_grad(
            name,
            &an,
            &fdv,
            Tol {
                abs: 1e-5,
                rel: 1e-3,
            },
        );
    }
}
