//! The CPU reference DiT: exact properties of the spec (13.2-13.3) and structure checks.
//! Parity with the independent PyTorch implementation lives in `tests/fixtures_parity.rs`.

mod common;

use common::small_test_config;
use imdm_engine::model::dit_ref::{forward, subs_log_probs, NEG_INF};
use imdm_engine::model::init::{init_params, random_params};
use imdm_engine::model::{Algo, DitParams};
use imdm_engine::rng::seeded_eps;
use imdm_engine::tensor::{Tensor, Tokens};

fn tokens_with_masks(p: &DitParams, batch: usize) -> Tokens {
    let c = &p.config;
    let ids = (0..batch * c.length)
        .map(|i| if i % 2 == 0 { c.mask_index } else { (i * 7) % c.vocab_size } as u32)
        .collect();
    Tokens::new(batch, c.length, ids, c.vocab_size).unwrap()
}

fn eps_for(p: &DitParams, batch: usize, seed: i64) -> Tensor {
    let seeds: Vec<i64> = (0..batch as i64).map(|b| seed + b).collect();
    let c = &p.config;
    seeded_eps(&seeds, c.length, c.noise_dim, c.noise_type, 1.0)
}

/// Spec 13.2-13.3: with the last eps-MLP layer at zero, IMDM computes exactly MDLM, for any eps.
#[test]
fn imdm_with_zero_eps_mlp_equals_mdlm_exactly() {
    let mut imdm = random_params(&small_test_config(Algo::Imdm), 11);
    imdm.eps_mlp.as_mut().unwrap().fc2.weight.data.fill(0.0);
    let mut mdlm = imdm.clone();
    mdlm.config.algo = Algo::Mdlm;
    mdlm.eps_mlp = None;
    let toks = tokens_with_masks(&imdm, 3);
    let want = forward(&mdlm, &toks, None, None).unwrap();
    for seed in [0, 1, 99] {
        let got = forward(&imdm, &toks, Some(&eps_for(&imdm, 3, seed)), None).unwrap();
        let same = got
            .data
            .iter()
            .zip(&want.data)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "IMDM with zero imdm_mlp.2 differs from MDLM (eps seed {seed})"
        );
    }
    // And the eps path is live when the last layer is not zero.
    let live = random_params(&small_test_config(Algo::Imdm), 11);
    let a = forward(&live, &toks, Some(&eps_for(&live, 3, 0)), None).unwrap();
    let b = forward(&live, &toks, Some(&eps_for(&live, 3, 1)), None).unwrap();
    assert!(a
        .data
        .iter()
        .zip(&b.data)
        .any(|(x, y)| (x - y).abs() > 1e-3));
}

/// Spec 13.2: at the reference initialisation the logits are exactly 0 and SUBS gives the
/// uniform distribution over the V-1 non-mask tokens at masked positions.
#[test]
fn identity_at_init() {
    let p = init_params(&small_test_config(Algo::Imdm), 0);
    let toks = tokens_with_masks(&p, 2);
    let logits = forward(&p, &toks, Some(&eps_for(&p, 2, 0)), None).unwrap();
    assert!(logits.data.iter().all(|&x| x == 0.0));
    let lp = subs_log_probs(&logits, &toks, p.config.mask_index);
    let v = p.config.vocab_size;
    let uniform = -((v - 1) as f32).ln();
    for (row, &t) in lp.data.chunks(v).zip(&toks.ids) {
        if t as usize == p.config.mask_index {
            assert_eq!(row[t as usize], NEG_INF + uniform);
            assert!(row
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != t as usize)
                .all(|(_, &x)| (x - uniform).abs() < 1e-6));
        } else {
            // Carry-over: 0 at the input token, -1e6 elsewhere.
            assert!(row
                .iter()
                .enumerate()
                .all(|(j, &x)| x == if j == t as usize { 0.0 } else { NEG_INF }));
        }
    }
}

/// SUBS log-probs at masked positions are normalised over the vocabulary.
#[test]
fn subs_rows_are_normalised() {
    let p = random_params(&small_test_config(Algo::Imdm), 2);
    let toks = tokens_with_masks(&p, 2);
    let lp = subs_log_probs(
        &forward(&p, &toks, Some(&eps_for(&p, 2, 0)), None).unwrap(),
        &toks,
        p.config.mask_index,
    );
    for row in lp.data.chunks(p.config.vocab_size) {
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((z - 1.0).abs() < 1e-5, "row sums to {z}");
    }
}

/// Bidirectional attention: changing the last token changes the first position's logits;
/// with `causal` (the AR baseline) it cannot.
#[test]
fn attention_direction() {
    for causal in [false, true] {
        let mut c = small_test_config(Algo::Mdlm);
        c.causal = causal;
        let p = random_params(&c, 4);
        let mut toks = tokens_with_masks(&p, 1);
        let a = forward(&p, &toks, None, None).unwrap();
        let last = toks.ids.len() - 1;
        toks.ids[last] = (toks.ids[last] + 1) % c.mask_index as u32;
        let b = forward(&p, &toks, None, None).unwrap();
        let v = c.vocab_size;
        let moved = a.data[..v].iter().zip(&b.data[..v]).any(|(x, y)| x != y);
        assert_eq!(moved, !causal, "causal={causal}");
    }
}

/// Softcap bounds every attention score, so with a tiny cap the attention weights become nearly
/// uniform and the output differs from the uncapped model.
#[test]
fn softcap_changes_the_output() {
    let p = random_params(&small_test_config(Algo::Mdlm), 5);
    let mut q = p.clone();
    q.config.softcap = 0.5;
    let toks = tokens_with_masks(&p, 1);
    let a = forward(&p, &toks, None, None).unwrap();
    let b = forward(&q, &toks, None, None).unwrap();
    assert!(a
        .data
        .iter()
        .zip(&b.data)
        .any(|(x, y)| (x - y).abs() > 1e-3));
}

/// IMDM without eps is an error that says so.
#[test]
fn imdm_requires_eps() {
    let p = random_params(&small_test_config(Algo::Imdm), 1);
    let e = forward(&p, &tokens_with_masks(&p, 1), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs eps"), "{e}");
}
