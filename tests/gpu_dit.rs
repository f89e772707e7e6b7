//! The GPU DiT forward against `dit_ref` (tiny and synthetic presets, IMDM and MDLM, softcap on
//! and off), within bf16 tolerance on logits and log-probs. Skips without a GPU unless
//! IMDM_REQUIRE_GPU=1.

use imdm_engine::cuda::dit::{ForwardOpts, GpuDit, Keep, Workspace};
use imdm_engine::cuda::gpu_for_tests;
use imdm_engine::model::init::random_params;
use imdm_engine::model::{dit_ref, Algo, DitConfig};
use imdm_engine::rng::seeded_eps;
use imdm_engine::tensor::Tokens;
use imdm_engine::testing::{compare, Tol};

/// The GPU runs the blocks in bf16 (as the reference does) and `dit_ref` in f32/f64, so the
/// logits differ by bf16 rounding propagated through every block. The bound is relative to the
/// logits' scale: max |diff| <= 3% of max |logit| and a per-element bf16 tolerance scaled by it.
fn check(config: DitConfig, batch: usize, len: usize, tag: &str) {
    let Some(gpu) = gpu_for_tests() else { return };
    let p = random_params(&config, 42);
    let v = config.vocab_size;
    let ids: Vec<u32> = (0..batch * len)
        .map(|i| {
            if i % 3 != 1 {
                config.mask_index as u32
            } else {
                ((i * 7919) % v) as u32
            }
        })
        .collect();
    let tokens = Tokens::new(batch, len, ids.clone(), v).unwrap();
    let seeds: Vec<i64> = (0..batch as i64).map(|b| 100 + b).collect();
    let eps = config
        .has_eps_mlp()
        .then(|| seeded_eps(&seeds, len, config.noise_dim, config.noise_type, 1.0));
    let want = dit_ref::forward(&p, &tokens, eps.as_ref(), None).unwrap();
    let want_lp = dit_ref::subs_log_probs(&want, &tokens, config.mask_index);

    // The plain upload (training layout) and the inference upload (gates folded into the
    // output GEMMs, no saved GELU pre-activation) must both match.
    let plain = GpuDit::upload(&gpu, &p).unwrap();
    let folded = GpuDit::upload_inference(&gpu, &p).unwrap();
    assert!(folded.blocks.iter().all(|b| b.folded.is_some()));
    for (model, keep) in [
        (&plain, Keep::None),
        (&plain, Keep::All),
        (&folded, Keep::None),
        (&folded, Keep::All),
    ] {
        let mut ws = Workspace::new(&gpu, &config, batch, len, keep).unwrap();
        ws.load_inputs(&gpu, &ids, eps.as_ref()).unwrap();
        model.forward(&gpu, &mut ws, ForwardOpts::eval()).unwrap();
        let got = ws.logits_host(&gpu).unwrap();
        let got_lp = ws.log_probs_host(&gpu).unwrap();
        let scale = want.data.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let tol = Tol {
            abs: 0.03 * scale,
            rel: 1.6e-2,
        };
        for (name, g, w) in [
            ("logits", &got, &want.data),
            ("log_probs", &got_lp, &want_lp.data),
        ] {
            let (max_abs, _, worst, ratio) = compare(g, w, tol);
            assert!(
                ratio <= 1.0,
                "{tag} {keep:?} folded {} {name}: max abs err {max_abs:.3e} (logit scale {scale:.2}); \
                 worst [{worst}] got {} want {}",
                model.blocks[0].folded.is_some(),
                g[worst],
                w[worst]
            );
        }
    }
}

fn with(mut c: DitConfig, algo: Algo, softcap: f64) -> DitConfig {
    c.algo = algo;
    c.softcap = softcap;
    c
}

#[test]
fn tiny_imdm_and_mdlm_match_dit_ref() {
    for (algo, cap) in [(Algo::Imdm, 0.0), (Algo::Mdlm, 0.0), (Algo::Imdm, 5.0)] {
        let mut c = with(DitConfig::tiny(), algo, cap);
        c.vocab_size = 4099;
        c.mask_index = 4098;
        check(c, 2, 67, &format!("tiny {algo:?} softcap {cap}"));
    }
}

#[test]
fn synthetic_imdm_and_mdlm_match_dit_ref() {
    for (algo, cap) in [(Algo::Imdm, 0.0), (Algo::Mdlm, 2.0), (Algo::Imdm, 2.0)] {
        let c = with(DitConfig::synthetic(), algo, cap);
        check(c, 4, 10, &format!("synthetic {algo:?} softcap {cap}"));
    }
}
