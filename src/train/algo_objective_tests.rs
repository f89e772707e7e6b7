//! The baselines' objective through the time-conditioned DiT: SEDD's and D3PM's (two forwards)
//! parameter gradients equal f64 finite differences of their losses, the sigma map and an adaLN
//! layer included, with σ varying across the batch; f32 training agrees with f64.

use super::*;
use crate::diffusion::algo_batch::{algo_batch, scored_tokens};
use crate::diffusion::d3pm::AlphaS;
use crate::model::init::random_params;
use crate::model::DitConfig;
use crate::tensor::Tokens;
use crate::testing::grad::{assert_grad, fd_grad};
use crate::testing::Tol;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn cfg(algo: Algo) -> DitConfig {
    let mut c = DitConfig::minimini();
    (c.vocab_size, c.mask_index, c.length) = (13, 12, 5);
    (c.hidden, c.heads, c.blocks, c.cond_dim) = (8, 2, 1, 6);
    c.set_algo(algo);
    c.validate().unwrap();
    c
}

#[test]
fn time_conditioned_baselines_match_finite_differences() {
    let o = D3pmOptions {
        steps: 10,
        alpha_s: AlphaS::Corrected,
        subs_masking: false,
    };
    for algo in [Algo::Sedd, Algo::D3pm] {
        let c = cfg(algo);
        let p = random_params(&c, 5);
        let x0 = Tokens {
            batch: 3,
            len: 5,
            ids: (0..15).map(|i| (i * 7 % 12) as u32).collect(),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let t = [0.25, 0.6, 0.9];
        let norm = scored_tokens(&c, 3) as f64;
        let nb = algo_batch(&mut rng.clone(), &mut rng, &x0, &t, &c, &o, norm).unwrap();
        let s = nb.sigma.as_ref().unwrap();
        assert!(
            s[0] != s[1] && nb.scored() > 3,
            "{algo:?}: sigma varies, positions masked"
        );
        let obj = BaselineObjective { d3pm: o };
        let mut g = DitParams::zeros(&c);
        let loss = obj.loss_f64(&p, &nb.as_loss(), Some(&mut g)).unwrap();
        assert!((obj.loss_f64(&p, &nb.as_loss(), None).unwrap() - loss).abs() < 1e-12);
        let mut g32 = DitParams::zeros(&c);
        let l32 = BaselineObjective { d3pm: o }
            .loss_and_grad(&p, &nb.as_loss(), &TrainOpts::default(), &mut g32)
            .unwrap();
        assert!(
            (l32 - loss).abs() <= 1e-4 * loss.abs(),
            "{algo:?}: f32 {l32} vs f64 {loss}"
        );
        for name in [
            "sigma_map.mlp.0.weight",
            "sigma_map.mlp.2.bias",
            "blocks.0.adaLN_modulation.weight",
            "blocks.0.attn_qkv.weight",
            "output_layer.adaLN_modulation.bias",
            "output_layer.linear.weight",
        ] {
            let ti = p.named().iter().position(|(n, _)| n == name).unwrap();
            let x: Vec<f64> = p.named()[ti].1.data.iter().map(|&a| a as f64).collect();
            let only: Vec<usize> = (0..x.len()).step_by(x.len().div_ceil(10)).collect();
            let fd = fd_grad(
                |xs| {
                    let mut q = p.clone();
                    for (d, &v) in q.named_mut()[ti].1.data.iter_mut().zip(xs) {
                        *d = v as f32;
                    }
                    obj.loss_f64(&q, &nb.as_loss(), None).unwrap()
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
            assert!(
                an.iter().any(|&a| a != 0.0),
                "{algo:?} {name}: zero gradient"
            );
            assert_grad(
                &format!("{algo:?} {name}"),
                &an,
                &fdv,
                Tol {
                    abs: 1e-5,
                    rel: 2e-3,
                },
            );
        }
    }
}
