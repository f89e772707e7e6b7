//! The device-resident SDTT teacher rollout (`cuda::rollout::DeviceTeacher`) against the host
//! rollout (`distill::rollout::teacher_rollout`) on the same GPU teacher (`GpuDenoiser`, whose
//! forwards are the same kernels on the same inputs): identical tokens, `unmasked_at`, times and
//! targets bit for bit, for IMDM and MDLM teachers, K = 1, 2, 4, both spacings, with rows where
//! a step starts below dt (every masked position unmasks there, quirk 4). Then the student's
//! fused loss against the device target equals its loss against the same target uploaded from
//! the host. Every test skips without a GPU ("skipped: no CUDA device") unless
//! IMDM_REQUIRE_GPU=1, where a skip fails.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use imdm_engine::cpu::TrainOpts;
use imdm_engine::cuda::denoiser::GpuDenoiser;
use imdm_engine::cuda::gpu_for_tests;
use imdm_engine::cuda::rollout::{target_ld, DeviceTeacher};
use imdm_engine::cuda::trainer::GpuTrainOptions;
use imdm_engine::diffusion::noising::{nelbo_batch, NoisedBatch};
use imdm_engine::diffusion::{DistillBatch, DistillMode};
use imdm_engine::distill::rollout::{teacher_rollout, Spacing};
use imdm_engine::distill::sdtt::SdttGpu;
use imdm_engine::model::init::random_params;
use imdm_engine::model::{Algo, DitConfig};
use imdm_engine::tensor::Tokens;
use imdm_engine::train::optim::{AdamW, AdamWConfig};
use imdm_engine::train::{Ema, LossInput, Resident};

/// Times of the batch rows: the last two start a step below dt = 0.1 (t = 0.05 at step 0;
/// t = 0.25, whose reference K = 2 step 1 starts at 0.05).
const T: [f64; 6] = [0.95, 0.8, 0.6, 0.4, 0.25, 0.05];
const DT: f64 = 0.1;

fn tiny(algo: Algo) -> DitConfig {
    let mut c = DitConfig::tiny();
    c.vocab_size = 1031;
    c.mask_index = 1030;
    c.length = 33;
    c.algo = algo;
    c.dropout = 0.0;
    c
}

/// A noised batch of random non-mask sequences at the times `T`.
fn noised(c: &DitConfig, seed: u64) -> NoisedBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (b, l, v, mask) = (T.len(), c.length, c.vocab_size, c.mask_index as u32);
    let ids: Vec<u32> = (0..b * l)
        .map(|_| loop {
            let t = rng.random_range(0..v as u32);
            if t != mask {
                break t;
            }
        })
        .collect();
    let x0 = Tokens::new(b, l, ids, v).unwrap();
    let mut eps = ChaCha8Rng::seed_from_u64(seed ^ 0xE95);
    nelbo_batch(&mut rng, &mut eps, &x0, &T, c, 1.0).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn device_rollout_equals_the_host_rollout_on_the_same_teacher() {
    let Some(gpu) = gpu_for_tests() else { return };
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let c = tiny(algo);
        let nb = noised(&c, 3);
        let (l, mask) = (c.length, c.mask_index as u32);
        let mut den = GpuDenoiser::new(&gpu, &random_params(&c, 21)).unwrap();
        let mut later = false;
        for k in [1, 2, 4] {
            for spacing in [Spacing::Reference, Spacing::Corrected] {
                let tag = format!("{algo:?} K {k} {spacing:?}");
                let (spec, key, eps) = ((k, DT, spacing), 1000 + k as u64, nb.eps.as_ref());
                let want = teacher_rollout(&mut den, &nb.xt, &T, eps, spec, key).unwrap();
                // The same uploaded model, now driven by the device rollout.
                let (model, ws) = den.into_parts();
                let mut dev = DeviceTeacher::from_model(model);
                let target = dev.rollout(&gpu, &nb.xt, &T, eps, spec, key).unwrap();
                assert_eq!(target.ldt, target_ld(c.vocab_size), "{tag}");
                assert_eq!(target.ldt % 4, 0, "{tag}: distill_kl's vector path");
                let got = dev.download(&gpu).unwrap();
                den = GpuDenoiser::from_parts(&gpu, dev.into_model(), ws);
                assert_eq!(got.x, want.x, "{tag}: tokens");
                assert_eq!(got.unmasked_at, want.unmasked_at, "{tag}: unmasked_at");
                assert_eq!(got.times, want.times, "{tag}: times");
                assert!(
                    bits(&got.target) == bits(&want.target),
                    "{tag}: targets differ at {} values",
                    bits(&got.target)
                        .iter()
                        .zip(bits(&want.target))
                        .filter(|(a, b)| **a != *b)
                        .count()
                );
                let masked: Vec<usize> = (0..nb.xt.ids.len())
                    .filter(|&p| nb.xt.ids[p] == mask)
                    .collect();
                for &p in &masked {
                    if p / l == 5 {
                        assert_eq!(got.unmasked_at[p], Some(0), "{tag}: t < dt, position {p}");
                    }
                    if p / l == 4 && k == 2 && spacing == Spacing::Reference {
                        assert!(got.unmasked_at[p].is_some(), "{tag}: position {p}");
                    }
                    later |= matches!(got.unmasked_at[p], Some(s) if s > 0);
                }
                assert!(
                    masked.iter().any(|&p| got.unmasked_at[p].is_none()) || k == 4,
                    "{tag}: some position stays masked"
                );
            }
        }
        assert!(later, "{algo:?}: some position unmasks after step 0");
    }
}

/// The student's fused loss against the device target equals its loss against the downloaded
/// target uploaded again (the host path; row stride V instead of V rounded up to 4, so
/// distill_kl's scalar path there: equal within f32 rounding of the row sums).
#[test]
fn loss_on_the_device_target_equals_the_host_targets() {
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let Some(gpu) = gpu_for_tests() else { return };
        let c = tiny(algo);
        let nb = noised(&c, 4);
        let (student, teacher) = (random_params(&c, 5), random_params(&c, 6));
        let mut dev = SdttGpu::new(gpu, GpuTrainOptions::default());
        let opt = AdamW::new(&student, AdamWConfig::default(), |_| false);
        dev.trainer()
            .load(&student, &Ema::new(&student, 0.9), &opt)
            .unwrap();
        let spec = (2, DT, Spacing::Reference);
        dev.rollout(&teacher, &nb.xt, &T, nb.eps.as_ref(), spec, 7)
            .unwrap();
        let norm = nb.masked() as f64;
        let eps = nb.eps.as_ref();
        let opts = TrainOpts::default();
        dev.trainer().zero_grads().unwrap();
        let on_device = dev
            .accumulate(&nb.xt, eps, (DistillMode::KlBwd, norm), &opts)
            .unwrap();
        let ro = dev.last_rollout().unwrap();
        let batch = DistillBatch {
            xt: &nb.xt,
            eps,
            target: &ro.target,
            mode: DistillMode::KlBwd,
            norm,
            sigma: None,
        };
        dev.trainer().zero_grads().unwrap();
        let on_host = dev
            .trainer()
            .accumulate(LossInput::Distill(batch), &opts)
            .unwrap();
        assert!(
            on_host > 0.0 && (on_device - on_host).abs() <= 1e-5 * on_host,
            "{algo:?}: loss {on_device} on the device target, {on_host} on the host's"
        );
        // The rollout on the host teacher path gives the target the loss saw.
        let mut den = GpuDenoiser::new(dev.gpu(), &teacher).unwrap();
        let host = teacher_rollout(&mut den, &nb.xt, &T, eps, spec, 7).unwrap();
        assert!(bits(&host.target) == bits(&ro.target), "{algo:?}: target");
    }
}
