//! Random initialisation as the reference does it (spec 2.3 and 3.2). The streams are ours
//! (ChaCha8 seeded by `seed`), so values differ from PyTorch's, but the distributions match.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::model::config::DitConfig;
use crate::model::params::{DitParams, Linear};
use crate::tensor::Tensor;

fn normal(rng: &mut ChaCha8Rng, t: &mut Tensor, std: f32) {
    let n = Normal::new(0.0f32, std).expect("std > 0");
    t.data.iter_mut().for_each(|x| *x = n.sample(rng));
}

fn uniform(rng: &mut ChaCha8Rng, t: &mut Tensor, bound: f32) {
    t.data
        .iter_mut()
        .for_each(|x| *x = rng.random_range(-bound..bound));
}

/// PyTorch's `nn.Linear` bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn default_bias(rng: &mut ChaCha8Rng, l: &mut Linear) {
    let bound = 1.0 / (l.in_dim() as f32).sqrt();
    if let Some(b) = &mut l.bias {
        uniform(rng, b, bound);
    }
}

/// Truncated normal (std, clipped to ±2 std) by rejection, as `trunc_normal_(std, -2s, 2s)`.
fn trunc_normal(rng: &mut ChaCha8Rng, t: &mut Tensor, std: f32) {
    let n = Normal::new(0.0f32, std).expect("std > 0");
    for x in t.data.iter_mut() {
        *x = loop {
            let v = n.sample(rng);
            if v.abs() <= 2.0 * std {
                break v;
            }
        };
    }
}

/// A freshly initialised model: blocks are the identity (zero adaLN), logits are exactly 0
/// (zero final layer) and the eps MLP outputs 0 (zero last layer).
pub fn init_params(config: &DitConfig, seed: u64) -> DitParams {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = DitParams::zeros(config);
    // kaiming_uniform(a=sqrt 5) on a (V, D) parameter: bound = 1/sqrt(D).
    let bound = 1.0 / (config.hidden as f32).sqrt();
    uniform(&mut rng, &mut p.embedding, bound);
    if let Some(e) = &mut p.eps_mlp {
        trunc_normal(&mut rng, &mut e.fc1.weight, 0.02);
        // fc1 bias and fc2 weight stay zero.
    }
    if let Some(s) = &mut p.sigma_map {
        normal(&mut rng, &mut s.fc1.weight, 0.02);
        default_bias(&mut rng, &mut s.fc1);
        normal(&mut rng, &mut s.fc2.weight, 0.02);
        default_bias(&mut rng, &mut s.fc2);
    }
    for b in &mut p.blocks {
        b.norm1.data.fill(1.0);
        b.norm2.data.fill(1.0);
        normal(&mut rng, &mut b.attn_qkv.weight, 0.02);
        normal(&mut rng, &mut b.attn_out.weight, 0.02);
        normal(&mut rng, &mut b.mlp_fc1.weight, 0.02);
        default_bias(&mut rng, &mut b.mlp_fc1);
        normal(&mut rng, &mut b.mlp_fc2.weight, 0.02);
        default_bias(&mut rng, &mut b.mlp_fc2);
        // adaLN stays zero: every block starts as the identity.
    }
    p.final_layer.norm.data.fill(1.0);
    // Final linear and final adaLN stay zero: logits start at exactly 0.
    p
}

/// Fully random weights for tests and parity checks: every tensor non-zero (adaLN, final layer
/// and eps MLP included, unlike [`init_params`]), matrices N(0, 1/fan_in), vectors around
/// their natural values, so that every code path contributes to the logits.
pub fn random_params(config: &DitConfig, seed: u64) -> DitParams {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut p = DitParams::zeros(config);
    for (name, t) in p.named_mut() {
        let fan_in = *t.shape.last().unwrap_or(&1) as f32;
        if name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name.ends_with("norm_final.weight")
        {
            normal(&mut rng, t, 0.1);
            t.data.iter_mut().for_each(|x| *x += 1.0);
        } else if name == "vocab_embed.embedding" {
            normal(&mut rng, t, 1.0);
        } else if name.contains("adaLN") {
            normal(&mut rng, t, 0.2);
        } else if t.shape.len() == 2 {
            normal(&mut rng, t, 1.0 / fan_in.sqrt());
        } else {
            normal(&mut rng, t, 0.1);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_follows_the_reference_rules() {
        let c = DitConfig::minimini();
        let p = init_params(&c, 7);
        let bound = 1.0 / (c.hidden as f32).sqrt();
        assert!(p.embedding.data.iter().all(|x| x.abs() <= bound));
        assert!(p.embedding.data.iter().any(|&x| x != 0.0));
        let e = p.eps_mlp.as_ref().unwrap();
        assert!(e.fc1.weight.data.iter().all(|x| x.abs() <= 0.04));
        assert!(e.fc2.weight.data.iter().all(|&x| x == 0.0));
        for b in &p.blocks {
            assert!(b
                .adaln
                .as_ref()
                .unwrap()
                .weight
                .data
                .iter()
                .all(|&x| x == 0.0));
            assert!(b.norm1.data.iter().all(|&x| x == 1.0));
            let w = &b.attn_qkv.weight.data;
            let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
            assert!((std - 0.02).abs() < 0.002, "qkv std {std}");
        }
        assert!(p.final_layer.linear.weight.data.iter().all(|&x| x == 0.0));
        assert_eq!(init_params(&c, 7), p, "same seed, same weights");
        assert_ne!(init_params(&c, 8).embedding, p.embedding);
    }
}
