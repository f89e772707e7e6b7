//! Tests of the device rollout's loop without a GPU: [`rollout_twin`] (the loop with the two
//! kernels' CPU twins) against `distill::rollout::teacher_rollout` on the same CPU teacher.

use super::*;
use crate::cpu::CpuDenoiser;
use crate::diffusion::noising::nelbo_batch;
use crate::model::init::random_params;
use crate::model::{Algo, NoiseType};
use crate::train::data::SyntheticSource;
use crate::train::trainer::stream;
use crate::train::DataSource;

fn tiny(algo: Algo) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: 13,
        mask_index: 12,
        length: 9,
        hidden: 16,
        heads: 2,
        blocks: 1,
        cond_dim: 8,
        mlp_ratio: 4,
        dropout: 0.0,
        softcap: 0.0,
        algo,
        noise_dim: 4,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The twin loop gives `teacher_rollout`'s tokens, `unmasked_at`, times and target bit for
/// bit: IMDM and MDLM teachers, K = 1, 2, 4, both spacings, with rows where ts < dt (every
/// masked position unmasks at that step, quirk 4): t = 0.05 at step 0, and t = 0.25 whose
/// reference K = 2 step 1 starts at 0.05.
#[test]
fn twin_loop_equals_the_cpu_rollout() {
    let t = [1.0, 0.8, 0.55, 0.25, 0.05];
    let dt = 0.1;
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let c = tiny(algo);
        let (b, l) = (t.len(), c.length);
        let x0 = SyntheticSource::new(c.vocab_size, c.mask_index, l, 3)
            .unwrap()
            .next_batch(b)
            .unwrap();
        let mut rng = stream(5, 1, 0);
        let nb = nelbo_batch(&mut rng.clone(), &mut rng, &x0, &t, &c, 1.0).unwrap();
        let mut den = CpuDenoiser::new(random_params(&c, 8)).unwrap();
        let mask = c.mask_index as u32;
        let mut kinds = [false; 3];
        for k in [1, 2, 4] {
            for spacing in [Spacing::Reference, Spacing::Corrected] {
                let tag = format!("{algo:?} K {k} {spacing:?}");
                let spec = (k, dt, spacing);
                let key = 31 + k as u64;
                let eps = nb.eps.as_ref();
                let want = teacher_rollout_cpu(&mut den, &nb.xt, &t, eps, spec, key);
                let got = rollout_twin(&mut den, &nb.xt, &t, eps, spec, key).unwrap();
                assert_eq!(got.x, want.x, "{tag}: tokens");
                assert_eq!(got.unmasked_at, want.unmasked_at, "{tag}: unmasked_at");
                assert_eq!(got.times, want.times, "{tag}: times");
                assert_eq!(bits(&got.target), bits(&want.target), "{tag}: target");
                for (p, at) in got.unmasked_at.iter().enumerate() {
                    if nb.xt.ids[p] != mask {
                        continue;
                    }
                    match at {
                        Some(0) => kinds[0] = true,
                        Some(_) => kinds[1] = true,
                        None => kinds[2] = true,
                    }
                    // Row 4 (t = 0.05 < dt): everything unmasks at step 0.
                    if p / l == 4 {
                        assert_eq!(*at, Some(0), "{tag}: position {p}");
                    }
                    // Row 3 (t = 0.25), reference K = 2: step 1 starts at 0.05 < dt.
                    if p / l == 3 && k == 2 && spacing == Spacing::Reference {
                        assert!(at.is_some(), "{tag}: position {p} still masked");
                    }
                }
            }
        }
        assert_eq!(
            kinds, [true; 3],
            "{algo:?}: positions unmasked at step 0, at a later step, and never"
        );
    }
}

fn teacher_rollout_cpu(
    den: &mut CpuDenoiser,
    xt: &Tokens,
    t: &[f64],
    eps: Option<&Tensor>,
    spec: (usize, f64, Spacing),
    key: u64,
) -> Rollout {
    crate::distill::rollout::teacher_rollout(den, xt, t, eps, spec, key).unwrap()
}

/// A changed key changes the draws (so the equality above is not of two key-blind loops).
#[test]
fn twin_loop_draws_follow_the_key() {
    let c = tiny(Algo::Mdlm);
    let x0 = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, 4)
        .unwrap()
        .next_batch(4)
        .unwrap();
    let t = [0.9, 0.7, 0.5, 0.3];
    let mut rng = stream(6, 1, 0);
    let nb = nelbo_batch(&mut rng.clone(), &mut rng, &x0, &t, &c, 1.0).unwrap();
    let mut den = CpuDenoiser::new(random_params(&c, 9)).unwrap();
    let spec = (2, 0.1, Spacing::Reference);
    let a = rollout_twin(&mut den, &nb.xt, &t, None, spec, 1).unwrap();
    let b = rollout_twin(&mut den, &nb.xt, &t, None, spec, 2).unwrap();
    assert_ne!(a.unmasked_at, b.unmasked_at);
}

#[test]
fn bad_inputs_are_rejected() {
    let c = tiny(Algo::Mdlm);
    let mut den = CpuDenoiser::new(random_params(&c, 1)).unwrap();
    let xt = Tokens {
        batch: 2,
        len: 3,
        ids: vec![12; 6],
    };
    let spec = (2, 0.1, Spacing::Reference);
    assert!(rollout_twin(&mut den, &xt, &[0.5], None, spec, 0).is_err());
    assert!(rollout_twin(&mut den, &xt, &[0.5, 0.5], None, (0, 0.1, spec.2), 0).is_err());
    assert!(rollout_twin(&mut den, &xt, &[0.5, 0.5], None, (2, 0.0, spec.2), 0).is_err());
    let bad = Tokens {
        ids: vec![12, 12, 13, 0, 0, 0],
        ..xt.clone()
    };
    assert!(matches!(
        rollout_twin(&mut den, &bad, &[0.5, 0.5], None, spec, 0),
        Err(Error::Shape(m)) if m.contains("id 13")
    ));
    assert_eq!(target_ld(13), 16);
    assert_eq!(target_ld(50258), 50260);
    assert_eq!(target_ld(1032), 1032);
}
