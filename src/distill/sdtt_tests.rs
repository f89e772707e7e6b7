use super::*;
use crate::cpu::CpuDenoiser;
use crate::diffusion::noising::nelbo_batch;
use crate::diffusion::posterior::{
    exp_race, masked_weights, probs_from_log, SamplerKind, StepAlphas,
};
use crate::diffusion::schedule::alpha;
use crate::diffusion::{Denoiser, SamplerStream};
use crate::distill::rollout::teacher_rollout;
use crate::distill::rollout::teacher_times;
use crate::model::init::{init_params, random_params};
use crate::model::NoiseType;
use crate::tensor::Tensor;
use crate::train::data::SyntheticSource;
use crate::train::trainer::stream;

fn tiny(algo: Algo) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: 12,
        mask_index: 11,
        length: 8,
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

/// IMDM weights computing exactly `mdlm` (zero last eps-MLP layer), as the CLI builds them.
fn graft(mdlm: &DitParams, seed: u64) -> DitParams {
    let mut p = init_params(&tiny(Algo::Imdm), seed);
    let src: std::collections::HashMap<String, &Tensor> = mdlm.named().into_iter().collect();
    for (name, t) in p.named_mut() {
        if let Some(s) = src.get(&name) {
            t.data.copy_from_slice(&s.data);
        }
    }
    p
}

#[test]
fn teacher_times_follow_the_reference_and_the_corrected_spacing() {
    let dt = 0.1;
    assert_eq!(
        teacher_times(0.9, dt, 2, Spacing::Reference),
        vec![0.9, 0.9 - 0.2]
    );
    assert_eq!(
        teacher_times(0.9, dt, 2, Spacing::Corrected),
        vec![0.9, 0.9 - 0.1]
    );
    assert_eq!(teacher_times(0.9, dt, 1, Spacing::Reference), vec![0.9]);
    // K = 3: linspace over [t, t − 3dt] in thirds of 1.5·dt.
    let t3 = teacher_times(0.9, dt, 3, Spacing::Reference);
    for (got, want) in t3.iter().zip([0.9, 0.75, 0.6]) {
        assert!((got - want).abs() < 1e-12, "{t3:?}");
    }
    // Clamped to the training eps.
    assert_eq!(
        teacher_times(0.15, dt, 2, Spacing::Reference),
        vec![0.15, 1e-3]
    );
}

/// A denoiser that records what it was given.
struct Recorder {
    inner: CpuDenoiser,
    calls: Vec<(Vec<u32>, Option<Tensor>)>,
}

impl Denoiser for Recorder {
    fn config(&self) -> &DitConfig {
        self.inner.config()
    }
    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        self.calls.push((xt.ids.clone(), eps.cloned()));
        self.inner.log_probs(xt, eps)
    }
}

/// The rollout equals a direct transcription of spec 6.1 step 2: K teacher steps from ts_k to
/// ts_k − dt with the IMDM posterior weights and the race uniforms of (step, position); a
/// position that unmasks takes that step's log-probs, a still-masked one the last step's; the
/// eps the teacher sees is the given one at every step.
#[test]
fn rollout_equals_a_transcription_of_the_rule() {
    let c = tiny(Algo::Imdm);
    let teacher = random_params(&c, 4);
    let (b, l, v, mask) = (6, c.length, c.vocab_size, c.mask_index);
    let mut rng = stream(9, 1, 0);
    let x0 = SyntheticSource::new(v, mask, l, 3)
        .unwrap()
        .next_batch(b)
        .unwrap();
    let t = vec![1.0, 0.9, 0.7, 0.5, 0.3, 0.05];
    let nb = nelbo_batch(&mut rng.clone(), &mut rng, &x0, &t, &c, 1.0).unwrap();
    let eps = nb.eps.clone().unwrap();
    let (k, dt, key) = (2, 0.15, 77);
    let mut rec = Recorder {
        inner: CpuDenoiser::new(teacher.clone()).unwrap(),
        calls: vec![],
    };
    let ro = teacher_rollout(
        &mut rec,
        &nb.xt,
        &t,
        Some(&eps),
        (k, dt, Spacing::Reference),
        key,
    )
    .unwrap();
    assert_eq!(rec.calls.len(), k);
    for (_, e) in &rec.calls {
        assert_eq!(
            e.as_ref().unwrap().data,
            eps.data,
            "eps changed between steps"
        );
    }

    // The transcription.
    let mut den = CpuDenoiser::new(teacher).unwrap();
    let st = SamplerStream::new(key);
    let mut x = nb.xt.ids.clone();
    let mut target = vec![f32::NAN; b * l * v];
    let mut step_of = vec![None; b * l];
    let mut lp = None;
    for step in 0..k {
        let out = den
            .log_probs(
                &Tokens {
                    batch: b,
                    len: l,
                    ids: x.clone(),
                },
                Some(&eps),
            )
            .unwrap();
        assert_eq!(rec.calls[step].0, x, "the teacher's input at step {step}");
        for pos in 0..b * l {
            if x[pos] as usize != mask {
                continue;
            }
            let tb = t[pos / l];
            let ts = if step == 0 {
                tb
            } else {
                (tb - 2.0 * dt).max(1e-3)
            };
            assert_eq!(ro.times[pos / l][step], ts);
            let a = StepAlphas {
                alpha_t: alpha(ts),
                alpha_s: alpha(ts - dt),
            };
            let row = &out.data[pos * v..(pos + 1) * v];
            let w = masked_weights(SamplerKind::ImdmPosterior, a, &probs_from_log(row), mask);
            let cat = exp_race(
                w.len(),
                |c| w[c],
                |c| st.race_uniform(step as u32, pos as u32, c as u32),
            );
            if cat < v && cat != mask {
                x[pos] = cat as u32;
                step_of[pos] = Some(step);
                target[pos * v..(pos + 1) * v].copy_from_slice(row);
            }
        }
        lp = Some(out);
    }
    let lp = lp.unwrap();
    for pos in 0..b * l {
        if step_of[pos].is_none() {
            target[pos * v..(pos + 1) * v].copy_from_slice(&lp.data[pos * v..(pos + 1) * v]);
        }
    }
    assert_eq!(ro.x.ids, x);
    assert_eq!(ro.unmasked_at, step_of);
    assert_eq!(ro.target, target);
    // Every kind of position occurs: unmasked at step 0, at step 1, still masked.
    let masked: Vec<usize> = (0..b * l)
        .filter(|&p| nb.xt.ids[p] as usize == mask)
        .collect();
    assert!(masked.iter().any(|&p| step_of[p] == Some(0)));
    assert!(masked.iter().any(|&p| step_of[p] == Some(1)));
    assert!(masked.iter().any(|&p| step_of[p].is_none()));
    // t = 0.05 < dt: α_s > 1 forces every masked position of that row to unmask at step 0.
    for p in 5 * l..6 * l {
        if nb.xt.ids[p] as usize == mask {
            assert_eq!(step_of[p], Some(0), "position {p}");
        }
    }
}

fn sdtt_run(student: DitParams, teacher: DitParams, steps: u64, lr: f64, orig: u64) -> Sdtt {
    let c = student.config.clone();
    let cfg = TrainConfig {
        batch: 16,
        micro_batch: 8,
        steps,
        lr,
        warmup: 0,
        ema: 0.0,
        eval_size: 32,
        log_every: 1,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    };
    let sd = SdttConfig {
        orig_steps: orig,
        grow_dt_every: 1000,
        student: c.algo,
        ..SdttConfig::default()
    };
    let src = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, 5).unwrap();
    let val = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, 6)
        .unwrap()
        .next_batch(32)
        .unwrap();
    Sdtt::new(cfg, sd, student, teacher, Box::new(src), Some(val), None).unwrap()
}

/// SDTT (MDLM student) and IM-SDTT (IMDM student grafted from the same MDLM) see the same
/// batch, the same rollout and the same logits at the start (the eps MLP outputs zero): equal
/// first losses and equal validation KL.
#[test]
fn mdlm_and_imdm_students_start_at_the_same_kl() {
    let mdlm = random_params(&tiny(Algo::Mdlm), 8);
    let imdm = graft(&mdlm, 9);
    let mut a = sdtt_run(mdlm.clone(), mdlm.clone(), 1, 1e-3, 8);
    let mut b = sdtt_run(imdm.clone(), imdm, 1, 1e-3, 8);
    let ka = a.validation_kl(&a.params).unwrap().unwrap();
    let kb = b.validation_kl(&b.params).unwrap().unwrap();
    assert!(
        ka > 1e-4,
        "the two-step teacher differs from the one-step student: {ka}"
    );
    assert_eq!(ka, kb);
    let (la, lb) = (a.step().unwrap(), b.step().unwrap());
    assert!(la.masked > 0);
    assert_eq!(la.loss, lb.loss);
    assert_eq!(la.masked, lb.masked);
}

/// Within a round (fixed teacher) the held-out KL falls. The student starts from other
/// weights than the teacher: started from the teacher it sits near the optimum already (the
/// rollout's targets are random, so part of the KL cannot be removed).
#[test]
fn kl_falls_within_a_round() {
    let teacher = graft(&random_params(&tiny(Algo::Mdlm), 8), 9);
    let student = graft(&random_params(&tiny(Algo::Mdlm), 21), 9);
    let mut s = sdtt_run(student, teacher, 100, 3e-3, 2);
    let before = s.validation_kl(&s.params).unwrap().unwrap();
    s.run().unwrap();
    let after = s.validation_kl(&s.params).unwrap().unwrap();
    assert_eq!(s.teacher_round, 0);
    assert!(after < 0.5 * before, "validation KL {before} -> {after}");
}

#[test]
fn rounds_and_the_orig_steps_rule() {
    let c = SdttConfig::default();
    c.validate().unwrap();
    assert!((c.dt(0) - 0.999 / 1024.0).abs() < 1e-15);
    // Round 11 has dt ≈ 2.0 and round(1/dt) = round(0.5005) = 1; round 12 has round(0.25) = 0.
    assert_eq!(c.rounds(), 12);
    let c8 = SdttConfig {
        min_steps: 8,
        ..SdttConfig::default()
    };
    assert_eq!(c8.rounds(), 8); // 1024 -> 8 steps after round 6; round 7 has 1/dt ≈ 8.0
    assert_eq!(c8.round_of(19_999), 1);
    let bad = SdttConfig {
        orig_steps: 1000,
        ..SdttConfig::default()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("--orig-steps 1000") && e.contains("--min-steps 1"),
        "{e}"
    );
    let bad = SdttConfig {
        orig_steps: 96,
        min_steps: 4,
        ..SdttConfig::default()
    };
    assert!(bad.validate().is_err());
}
