//! GPU distillation (`distill sdtt --device cuda`) against the CPU backend: the loss and every
//! parameter gradient of one distillation micro-batch (`GpuTrainer::distill_loss_and_grad`,
//! the fused `distill_kl` kernel between the recorded forward and the tape backward) vs
//! `cpu::distill_loss_and_grad::<f64>` for an IMDM and an MDLM student in several modes; a few
//! resident `Sdtt` steps on the GPU (teacher forwards on the device, the host posterior)
//! tracking the CPU run; and `imdm-engine distill sdtt --device cuda` stopped and resumed
//! across a round boundary ending bit-identical to a straight run. Every test skips without a
//! GPU ("skipped: no CUDA device") unless IMDM_REQUIRE_GPU=1, where a skip fails.
//!
//! Tolerances are tests/gpu_train.rs's for the NELBO step (bf16 GEMM operands and activations,
//! f32 accumulation, against f64), first estimates written before these tests ran on a GPU; a
//! failure prints the measured errors of every tensor so far.

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use imdm_engine::cpu::{self, CpuDenoiser, TrainOpts};
use imdm_engine::cuda::gpu_for_tests;
use imdm_engine::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use imdm_engine::diffusion::noising::{nelbo_batch, NoisedBatch};
use imdm_engine::diffusion::{DistillBatch, DistillMode};
use imdm_engine::distill::rollout::{teacher_rollout, Spacing};
use imdm_engine::distill::sdtt::{Sdtt, SdttConfig};
use imdm_engine::model::init::random_params;
use imdm_engine::model::{checkpoint, Algo, DitConfig, DitParams, NoiseType};
use imdm_engine::tensor::Tokens;
use imdm_engine::train::data::SyntheticSource;
use imdm_engine::train::{DataSource, TrainConfig};

/// Relative L2 error ‖g_gpu − g_cpu‖ / ‖g_cpu‖ allowed for each parameter gradient tensor.
const GRAD_REL_L2: f64 = 5e-2;
/// Relative error of the micro-batch loss.
const LOSS_REL: f64 = 1e-2;
/// Relative error of each step's loss and gradient norm over a few resident steps vs the CPU
/// run (gpu_train.rs's curve tolerance).
const CURVE_REL: f64 = 3e-2;

fn tiny(algo: Algo) -> DitConfig {
    let mut c = DitConfig::tiny();
    c.vocab_size = 1031;
    c.mask_index = 1030;
    c.length = 33;
    c.algo = algo;
    c.dropout = 0.0;
    c
}

/// A noised batch of `batch` random non-mask sequences at times spread over (0.15, 0.95).
fn noised(c: &DitConfig, batch: usize, seed: u64) -> NoisedBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (l, v, mask) = (c.length, c.vocab_size, c.mask_index as u32);
    let ids: Vec<u32> = (0..batch * l)
        .map(|_| loop {
            let t = rng.random_range(0..v as u32);
            if t != mask {
                break t;
            }
        })
        .collect();
    let x0 = Tokens::new(batch, l, ids, v).unwrap();
    let t: Vec<f64> = (0..batch)
        .map(|i| 0.15 + 0.8 * (i as f64 + 0.5) / batch as f64)
        .collect();
    let mut eps = ChaCha8Rng::seed_from_u64(seed ^ 0xE95);
    nelbo_batch(&mut rng, &mut eps, &x0, &t, c, 1.0).unwrap()
}

fn rel_l2(got: &[f32], want: &[f32]) -> (f64, f64) {
    let (mut d2, mut w2) = (0f64, 0f64);
    for (&a, &b) in got.iter().zip(want) {
        d2 += (a as f64 - b as f64).powi(2);
        w2 += (b as f64).powi(2);
    }
    let rel = if w2 > 0.0 {
        (d2 / w2).sqrt()
    } else {
        d2.sqrt()
    };
    (rel, w2.sqrt())
}

/// One distillation micro-batch: the GPU's loss and gradients against the CPU's in f64, with
/// a target from a K = 2 rollout of an independent random teacher (so the student is far from
/// it and every mode has a non-trivial gradient).
fn distill_grads_match(algo: Algo, modes: &[DistillMode]) {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut obj = GpuTrainer::new(gpu, GpuTrainOptions::default());
    let c = tiny(algo);
    let student = random_params(&c, 5);
    let teacher = random_params(&c, 6);
    let nb = noised(&c, 2, 9);
    let masked = nb.masked();
    assert!(masked > 4, "{algo:?}: {masked} masked positions");
    let ro = teacher_rollout(
        &mut CpuDenoiser::new(teacher).unwrap(),
        &nb.xt,
        &nb.t,
        nb.eps.as_ref(),
        (2, 0.05, Spacing::Reference),
        17,
    )
    .unwrap();
    for &mode in modes {
        let tag = format!("{algo:?} {mode:?}");
        let batch = DistillBatch {
            xt: &nb.xt,
            eps: nb.eps.as_ref(),
            target: &ro.target,
            mode,
            // As the step divides: the masked positions of the (here single) micro-batch.
            norm: masked as f64,
            sigma: None,
        };
        let opts = TrainOpts::default();
        let mut want = DitParams::zeros(&c);
        let lw = cpu::distill_loss_and_grad::<f64>(&student, &batch, &opts, &mut want).unwrap();
        let mut got = DitParams::zeros(&c);
        let lg = obj
            .distill_loss_and_grad(&student, &batch, &opts, &mut got)
            .unwrap();
        assert!(lw > 0.0 && lw.is_finite(), "{tag}: CPU loss {lw}");
        assert!(
            (lg - lw).abs() <= LOSS_REL * lw.abs(),
            "{tag}: loss {lg} vs CPU {lw}"
        );
        let mut report = Vec::new();
        let mut nonzero = 0;
        for ((name, g), (_, w)) in got.named().into_iter().zip(want.named()) {
            assert!(
                g.data.iter().all(|x| x.is_finite()),
                "{tag} {name}: non-finite gradient"
            );
            let (rel, norm) = rel_l2(&g.data, &w.data);
            nonzero += (norm > 0.0) as usize;
            report.push(format!("{name}: {rel:.2e}"));
            assert!(
                rel <= GRAD_REL_L2,
                "{tag} {name}: relative L2 error {rel:.3e} > {GRAD_REL_L2:e} (|ref| {norm:.3e}); \
                 all so far: {report:?}"
            );
        }
        assert!(
            nonzero > 10,
            "{tag}: only {nonzero} non-zero gradient tensors"
        );
        // The evaluation form computes the same loss without a gradient.
        let le = obj.distill_eval_loss(&student, &batch).unwrap();
        assert!(
            (le - lw).abs() <= LOSS_REL * lw.abs(),
            "{tag}: eval loss {le} vs CPU {lw}"
        );
        eprintln!("{tag}: loss {lg} (CPU {lw}); relative L2 errors: {report:?}");
    }
}

#[test]
fn imdm_distillation_gradients_match_cpu() {
    distill_grads_match(
        Algo::Imdm,
        &[DistillMode::KlBwd, DistillMode::KlFwd, DistillMode::Mse],
    );
}

#[test]
fn mdlm_distillation_gradients_match_cpu() {
    distill_grads_match(Algo::Mdlm, &[DistillMode::KlBwd, DistillMode::Tvd]);
}

/// An in-library SDTT run of `steps` steps (two micro-batches per step), student and teacher
/// independent random weights.
fn sdtt_run(c: &DitConfig, steps: u64) -> Sdtt {
    sdtt_run_with(c, steps, |_| {})
}

/// `sdtt_run` with the SDTT settings edited by `edit` (rounds, growth options).
fn sdtt_run_with(c: &DitConfig, steps: u64, edit: impl FnOnce(&mut SdttConfig)) -> Sdtt {
    let cfg = TrainConfig {
        batch: 8,
        micro_batch: 4,
        steps,
        lr: 1e-3,
        warmup: 0,
        ema: 0.9,
        eval_size: 8,
        log_every: 1,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    };
    let mut sd = SdttConfig {
        orig_steps: 16,
        grow_dt_every: 1000,
        student: c.algo,
        ..SdttConfig::default()
    };
    edit(&mut sd);
    let src = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, 5).unwrap();
    let val = SyntheticSource::new(c.vocab_size, c.mask_index, c.length, 6)
        .unwrap()
        .next_batch(8)
        .unwrap();
    let (student, teacher) = (random_params(c, 11), random_params(c, 12));
    Sdtt::new(cfg, sd, student, teacher, Box::new(src), Some(val), None).unwrap()
}

/// Resident GPU steps (teacher rollout on the device, fused KL, device update) follow the CPU
/// run step by step; the weights read back have moved; the validation KL on the device EMA is
/// the CPU's.
#[test]
fn resident_sdtt_steps_track_the_cpu_run() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut gpu = Some(gpu);
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let c = tiny(algo);
        let mut a = sdtt_run(&c, 4);
        let mut b = sdtt_run(&c, 4);
        b.use_gpu(gpu.take().unwrap_or_else(|| gpu_for_tests().unwrap()));
        let init = b.params.clone();
        for _ in 0..4 {
            let (x, y) = (a.step().unwrap(), b.step().unwrap());
            assert_eq!(
                x.masked, y.masked,
                "{algo:?}: the same masks on both devices"
            );
            assert!(
                (x.loss - y.loss).abs() <= CURVE_REL * x.loss.abs()
                    && (x.grad_norm - y.grad_norm).abs() <= CURVE_REL * x.grad_norm.abs() + 1e-6,
                "{algo:?} step {}: CPU loss {} / grad norm {}, GPU {} / {}",
                x.step,
                x.loss,
                x.grad_norm,
                y.loss,
                y.grad_norm
            );
        }
        let ka = a.validation_kl_ema().unwrap().unwrap();
        let kb = b.validation_kl_ema().unwrap().unwrap();
        assert!(
            (ka - kb).abs() <= CURVE_REL * ka.abs(),
            "{algo:?}: validation KL CPU {ka} vs GPU {kb}"
        );
        b.sync_from_device().unwrap();
        assert_ne!(b.params, init, "{algo:?}: the device weights moved");
        assert_eq!(b.opt.step, 4, "{algo:?}: the device optimizer's step count");
    }
}

/// Across round boundaries (every 2 steps, the EMA becoming teacher and student, AdamW
/// restarting) the resident GPU run still follows the CPU run: a wrong teacher swap or a
/// missing reload of the device state would move the GPU losses away from the CPU's after
/// step 2 (a GPU-only comparison, as the CLI resume test makes, would not see it).
#[test]
fn resident_sdtt_tracks_the_cpu_run_across_round_boundaries() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = tiny(Algo::Imdm);
    let edit = |sd: &mut SdttConfig| {
        sd.grow_dt_every = 2;
        sd.ema_on_growth = true;
        sd.reset_optimizer_on_growth = true;
    };
    let mut a = sdtt_run_with(&c, 6, edit);
    let mut b = sdtt_run_with(&c, 6, edit);
    b.use_gpu(gpu);
    for _ in 0..6 {
        let (x, y) = (a.step().unwrap(), b.step().unwrap());
        assert_eq!((x.round, x.masked), (y.round, y.masked), "step {}", x.step);
        assert!(
            (x.loss - y.loss).abs() <= CURVE_REL * x.loss.abs(),
            "step {} (round {}): CPU loss {}, GPU {}",
            x.step,
            x.round,
            x.loss,
            y.loss
        );
    }
    assert_eq!(a.teacher_round, 2, "the CPU run crossed two boundaries");
    b.sync_from_device().unwrap();
    assert_eq!(
        b.opt.step, a.opt.step,
        "AdamW restarted on both devices alike"
    );
}

fn cli_config() -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: 65,
        mask_index: 64,
        length: 32,
        hidden: 64,
        heads: 2,
        blocks: 2,
        cond_dim: 16,
        mlp_ratio: 4,
        dropout: 0.1,
        softcap: 0.0,
        algo: Algo::Mdlm,
        noise_dim: 8,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    }
}

fn cli(args: &[String]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args(["distill", "sdtt"])
        .args(args)
        .output()
        .expect("binary runs");
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `distill sdtt --device cuda`: a run stopped at step 4 (inside round 1) and resumed to 8
/// writes the same step-8 checkpoint (weights, EMA, optimizer) and the same per-step losses as
/// a straight 8-step run; the round boundaries (steps 3 and 6, with --ema-on-growth and
/// --reset-optimizer-on-growth, so the device state is reloaded there) and dropout included.
#[test]
fn cli_distills_on_the_gpu_and_resumes_bit_identically() {
    if gpu_for_tests().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("mdlm.safetensors");
    checkpoint::save(&teacher, &random_params(&cli_config(), 3)).unwrap();
    let flags = |dir: &Path, steps: &str| -> Vec<String> {
        [
            "--teacher",
            teacher.to_str().unwrap(),
            "--imdm",
            "--data",
            "synthetic",
            "--orig-steps",
            "16",
            "--grow-dt-every",
            "3",
            "--steps",
            steps,
            "--global-batch",
            "8",
            "--micro-batch",
            "4",
            "--lr",
            "3e-3",
            "--warmup",
            "2",
            "--ema",
            "0.9",
            "--ema-on-growth",
            "--reset-optimizer-on-growth",
            "--log-every",
            "1",
            "--eval-every",
            "0",
            "--eval-size",
            "8",
            "--save-every",
            "2",
            "--device",
            "cuda",
            "--quiet",
            "--run-dir",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let out = cli(&flags(&a, "8"));
    assert!(out.contains("done: 8 steps"), "{out}");
    cli(&flags(&b, "4"));
    let resume: Vec<String> = ["--resume", b.to_str().unwrap(), "--steps", "8"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--device".into(), "cuda".into(), "--quiet".into()])
        .collect();
    let out = cli(&resume);
    assert!(out.contains("done: 8 steps"), "{out}");
    let train_lines = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["kind"] == "train").then(|| {
                    ["step", "round", "loss", "grad_norm"]
                        .map(|k| v[k].to_string())
                        .join(" ")
                })
            })
            .collect()
    };
    let (ta, tb) = (train_lines(&a), train_lines(&b));
    assert_eq!(ta.len(), 8, "{ta:?}");
    assert_eq!(ta, tb);
    assert!(
        ta.iter().all(|l| l
            .split(' ')
            .nth(2)
            .unwrap()
            .parse::<f64>()
            .unwrap()
            .is_finite()),
        "{ta:?}"
    );
    // Tensors and metadata (metadata order in the file is a hash map's).
    let contents = |p: &Path| {
        let raw = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
        let mut t: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
            .collect();
        t.sort();
        let m: std::collections::BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        (t, m)
    };
    for f in ["model.safetensors", "ema.safetensors", "optim.safetensors"] {
        let p = format!("checkpoints/step-00000008/{f}");
        assert!(
            contents(&a.join(&p)) == contents(&b.join(&p)),
            "{f} differs after the resume"
        );
    }
    for r in 0..3 {
        let p = format!("rounds/round-{r:02}/ema.safetensors");
        assert!(
            contents(&a.join(&p)) == contents(&b.join(&p)),
            "{p} differs"
        );
    }
}
