//! GPU training (`cuda::trainer::GpuTrainer`) against the CPU backend: the loss and every
//! parameter gradient of the GPU DiT vs `cpu::loss_and_grad::<f64>` (tiny and synthetic
//! presets, IMDM and MDLM, softcap on and off, dropout on the shared Philox stream), 20
//! training steps tracking the CPU trainer's loss curve, bit-identical repeated and resumed
//! runs, frozen tensors, NaN naming, out-of-memory naming, and `imdm-engine train --device
//! cuda` with a resume. Every test skips without a GPU ("skipped: no CUDA device") unless
//! IMDM_REQUIRE_GPU=1, where a skip fails.
//!
//! Tolerances (named below) come from the GPU's numerics: bf16 GEMM operands and bf16
//! activations between ops (relative rounding 2^-9 per op), f32 accumulation, against an f64
//! reference. They are first estimates, written before the GPU ran these tests; if one is
//! too tight, the failure message gives the measured error to set it from.

mod common;

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use imdm_engine::cpu::{self, TrainOpts};
use imdm_engine::cuda::gpu_for_tests;
use imdm_engine::cuda::trainer::{GpuTrainOptions, GpuTrainer};
use imdm_engine::diffusion::noising::nelbo_batch;
use imdm_engine::model::init::{init_params, random_params};
use imdm_engine::model::{Algo, DitConfig, DitParams};
use imdm_engine::tensor::Tokens;
use imdm_engine::train::run::{RunConfig, RunDir, RUN_FORMAT};
use imdm_engine::train::{data, CpuDit, Freeze, Objective, StepLog, TrainConfig, Trainer};
use imdm_engine::Error;

use common::first_init_loss;

/// Relative L2 error ‖g_gpu − g_cpu‖ / ‖g_cpu‖ allowed for each parameter gradient tensor.
const GRAD_REL_L2: f64 = 5e-2;
/// Relative error of the micro-batch loss.
const LOSS_REL: f64 = 1e-2;
/// Relative error of each step's loss and gradient norm over 20 steps vs the CPU trainer.
const CURVE_REL: f64 = 3e-2;

fn trainer_obj() -> Option<GpuTrainer> {
    gpu_for_tests().map(|g| GpuTrainer::new(g, GpuTrainOptions::default()))
}

/// A noised batch of `batch` random non-mask sequences at times spread over (0.15, 0.95).
fn loss_batch(
    c: &DitConfig,
    batch: usize,
    seed: u64,
) -> imdm_engine::diffusion::noising::NoisedBatch {
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
    nelbo_batch(&mut rng, &mut eps, &x0, &t, c, (batch * l) as f64).unwrap()
}

/// Every gradient and the loss of the GPU against the CPU backend in f64.
fn grads_match(c: DitConfig, batch: usize, dropout: bool, tag: &str) {
    let Some(mut obj) = trainer_obj() else { return };
    let p = random_params(&c, 5);
    let nb = loss_batch(&c, batch, 9);
    assert!(nb.masked() > 0, "{tag}: nothing masked");
    let opts = TrainOpts {
        dropout: dropout.then_some((0xD0, 3 << 20)),
    };
    let mut want = DitParams::zeros(&c);
    let lw = cpu::loss_and_grad::<f64>(&p, &nb.as_loss(), &opts, &mut want).unwrap();
    let mut got = DitParams::zeros(&c);
    let lg = obj
        .loss_and_grad(&p, &nb.as_loss(), &opts, &mut got)
        .unwrap();
    assert!(
        (lg - lw).abs() <= LOSS_REL * lw.abs(),
        "{tag}: loss {lg} vs CPU {lw}"
    );
    let mut report = Vec::new();
    for ((name, g), (_, w)) in got.named().into_iter().zip(want.named()) {
        assert!(
            g.data.iter().all(|x| x.is_finite()),
            "{tag} {name}: non-finite gradient"
        );
        let (mut d2, mut w2) = (0f64, 0f64);
        for (&a, &b) in g.data.iter().zip(&w.data) {
            d2 += (a as f64 - b as f64).powi(2);
            w2 += (b as f64).powi(2);
        }
        let rel = if w2 > 0.0 {
            (d2 / w2).sqrt()
        } else {
            d2.sqrt()
        };
        report.push(format!("{name}: {rel:.2e}"));
        assert!(
            rel <= GRAD_REL_L2,
            "{tag} {name}: relative L2 error {rel:.3e} > {GRAD_REL_L2:e} (|ref| {:.3e}); all so \
             far: {report:?}",
            w2.sqrt()
        );
    }
    // A second call accumulates into the host buffers (+=) and gives the same loss.
    let lg2 = obj
        .loss_and_grad(&p, &nb.as_loss(), &opts, &mut got)
        .unwrap();
    assert_eq!(lg.to_bits(), lg2.to_bits(), "{tag}: repeated loss differs");
    eprintln!("{tag}: loss {lg} (CPU {lw}); relative L2 errors: {report:?}");
}

fn tiny(algo: Algo, softcap: f64) -> DitConfig {
    let mut c = DitConfig::tiny();
    c.vocab_size = 1031;
    c.mask_index = 1030;
    c.length = 33;
    c.algo = algo;
    c.softcap = softcap;
    c.dropout = 0.0;
    c
}

fn synthetic(algo: Algo, softcap: f64, dropout: f64) -> DitConfig {
    let mut c = DitConfig::synthetic();
    c.vocab_size = 2053;
    c.mask_index = 2052;
    c.algo = algo;
    c.softcap = softcap;
    c.dropout = dropout;
    c
}

#[test]
fn tiny_gradients_match_cpu() {
    grads_match(tiny(Algo::Imdm, 0.0), 2, false, "tiny imdm");
    grads_match(tiny(Algo::Mdlm, 5.0), 2, false, "tiny mdlm softcap 5");
}

#[test]
fn synthetic_gradients_match_cpu() {
    grads_match(
        synthetic(Algo::Imdm, 2.0, 0.0),
        4,
        false,
        "synthetic imdm softcap 2",
    );
    grads_match(synthetic(Algo::Mdlm, 0.0, 0.0), 4, false, "synthetic mdlm");
    // Dropout: the GPU and the CPU draw the same Philox mask (rng::dropout_keep).
    grads_match(
        synthetic(Algo::Imdm, 0.0, 0.1),
        4,
        true,
        "synthetic imdm dropout",
    );
}

fn small_run_cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        batch: 8,
        micro_batch: 4,
        steps,
        lr: 1e-3,
        warmup: 2,
        ema: 0.99,
        clip: 1.0,
        seed: 3,
        log_every: 1,
        eval_every: 0,
        eval_size: 8,
        save_every: 0,
        ..Default::default()
    }
}

fn new_trainer(m: &DitConfig, cfg: &TrainConfig, run: Option<&Path>) -> Trainer {
    let (src, val) = data::open(&cfg.data, m, cfg.seed, cfg.eval_size).unwrap();
    let rd = run.map(|dir| {
        let rec = RunConfig {
            format: RUN_FORMAT.into(),
            objective: "cpu-dit".into(),
            model: m.clone(),
            train: cfg.clone(),
        };
        RunDir::create(dir, &rec).unwrap()
    });
    Trainer::new(cfg.clone(), init_params(m, cfg.seed), src, val, rd).unwrap()
}

fn steps(t: &mut Trainer, obj: &mut dyn Objective, n: usize) -> Vec<StepLog> {
    (0..n).map(|_| t.step(obj).unwrap()).collect()
}

/// 20 steps from the reference init track the CPU trainer (f32 backend) step by step, and the
/// loss goes down; validation on the device EMA matches the CPU's.
#[test]
fn twenty_steps_track_the_cpu_loss_curve() {
    let Some(mut gpu_obj) = trainer_obj() else {
        return;
    };
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let m = synthetic(algo, 0.0, 0.0);
        let cfg = small_run_cfg(20);
        let mut a = new_trainer(&m, &cfg, None);
        let mut b = new_trainer(&m, &cfg, None);
        let la = steps(&mut a, &mut CpuDit, 20);
        let lb = steps(&mut b, &mut gpu_obj, 20);
        for (x, y) in la.iter().zip(&lb) {
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
        assert!(lb[19].loss < lb[0].loss, "{algo:?}: {lb:?}");
        let va = a.validate(&mut CpuDit).unwrap().unwrap();
        let vb = b.validate(&mut gpu_obj).unwrap().unwrap();
        assert!(
            (va.nelbo - vb.nelbo).abs() <= CURVE_REL * va.nelbo,
            "{algo:?}: validation {va:?} vs {vb:?}"
        );
        // A fresh trainer for the next algorithm (the objective reloads on the next step).
        gpu_obj = trainer_obj().unwrap();
    }
}

/// Two runs (dropout, accumulation over two micro-batches) give the same losses, norms,
/// weights, EMA and optimizer state bit for bit.
#[test]
fn two_runs_are_bit_identical() {
    let Some(mut o1) = trainer_obj() else { return };
    let mut o2 = trainer_obj().unwrap();
    let m = synthetic(Algo::Imdm, 2.0, 0.1);
    let cfg = small_run_cfg(6);
    let mut a = new_trainer(&m, &cfg, None);
    let mut b = new_trainer(&m, &cfg, None);
    let (la, lb) = (steps(&mut a, &mut o1, 6), steps(&mut b, &mut o2, 6));
    let bits = |v: &[StepLog]| {
        v.iter()
            .map(|s| (s.loss.to_bits(), s.grad_norm.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&la), bits(&lb));
    a.sync_from(&mut o1).unwrap();
    b.sync_from(&mut o2).unwrap();
    assert_eq!(a.params, b.params);
    assert_eq!(a.ema, b.ema);
    assert_eq!(a.opt, b.opt);
    assert_ne!(a.params, init_params(&m, cfg.seed), "the weights moved");
}

/// A run checkpointed at step 3 and resumed by a new trainer in a fresh objective ends
/// bit-identical to the uninterrupted run (checkpoint download, upload, counters).
#[test]
fn resumed_run_equals_the_uninterrupted_one() {
    let Some(mut o1) = trainer_obj() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let m = synthetic(Algo::Mdlm, 0.0, 0.1);
    let cfg = TrainConfig {
        save_every: 3,
        eval_every: 3,
        ..small_run_cfg(6)
    };
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a = new_trainer(&m, &cfg, Some(&da));
    a.run(&mut o1).unwrap();
    let mut b = new_trainer(&m, &cfg, Some(&db));
    b.run_until(&mut trainer_obj().unwrap(), 3).unwrap();
    drop(b);
    let (rd, rec) = RunDir::open(&db).unwrap();
    let (src, val) = data::open(
        &rec.train.data,
        &rec.model,
        rec.train.seed,
        rec.train.eval_size,
    )
    .unwrap();
    let mut b = Trainer::resume(rec.train.clone(), &rec.model, rd, src, val).unwrap();
    b.run(&mut trainer_obj().unwrap()).unwrap();
    assert_eq!(a.step, 6);
    assert_eq!(b.step, 6);
    assert_eq!(a.params, b.params);
    assert_eq!(a.ema, b.ema);
    assert_eq!(a.opt, b.opt);
    assert_eq!(
        a.state().last_loss.map(f64::to_bits),
        b.state().last_loss.map(f64::to_bits)
    );
}

/// Frozen tensors (`--freeze vocab_embed.`) keep their exact values; the rest trains and the
/// losses track the CPU trainer with the same freeze.
#[test]
fn frozen_tensors_do_not_move() {
    let Some(mut obj) = trainer_obj() else { return };
    let m = synthetic(Algo::Imdm, 0.0, 0.0);
    let cfg = TrainConfig {
        freeze: Freeze {
            prefixes: vec!["vocab_embed.".into()],
            ln_only: false,
        },
        ..small_run_cfg(3)
    };
    let mut a = new_trainer(&m, &cfg, None);
    let mut b = new_trainer(&m, &cfg, None);
    let init = b.params.clone();
    let la = steps(&mut a, &mut CpuDit, 3);
    let lb = steps(&mut b, &mut obj, 3);
    b.sync_from(&mut obj).unwrap();
    assert_eq!(b.params.embedding, init.embedding);
    assert_eq!(b.params.eps_mlp, init.eps_mlp);
    assert_ne!(b.params.blocks, init.blocks);
    // Same frozen set on both sides: no optimizer state for the frozen tensors.
    let frozen = |t: &Trainer| t.opt.state.iter().map(Option::is_none).collect::<Vec<_>>();
    assert_eq!(frozen(&a), frozen(&b));
    assert!(frozen(&b)[0], "the embedding is frozen");
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x.loss - y.loss).abs() <= CURVE_REL * x.loss,
            "step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
}

/// A NaN weight stops the first step with the loss and the first non-finite gradient named,
/// the same tensor the CPU trainer names.
#[test]
fn non_finite_values_are_named_like_the_cpu_trainer() {
    let Some(mut obj) = trainer_obj() else { return };
    let m = synthetic(Algo::Mdlm, 0.0, 0.0);
    let cfg = small_run_cfg(2);
    let name_of = |e: Error| -> String {
        let msg = e.to_string();
        assert!(
            matches!(e, Error::NonFinite { step: 1, .. }) && msg.contains("the loss is NaN"),
            "{msg}"
        );
        let k = msg.find("gradient of ").expect("names a gradient") + "gradient of ".len();
        msg[k..].split(' ').next().unwrap().to_string()
    };
    let poisoned = |t: &mut Trainer| {
        t.params.blocks[0].mlp_fc2.bias.as_mut().unwrap().data[1] = f32::NAN;
    };
    let mut a = new_trainer(&m, &cfg, None);
    let mut b = new_trainer(&m, &cfg, None);
    poisoned(&mut a);
    poisoned(&mut b);
    let ea = name_of(a.step(&mut CpuDit).unwrap_err());
    let eb = name_of(b.step(&mut obj).unwrap_err());
    assert_eq!(ea, eb);
}

/// A micro-batch far beyond the device's memory fails with an error that names it.
#[test]
fn out_of_memory_names_the_micro_batch() {
    let Some(mut obj) = trainer_obj() else { return };
    let mut c = tiny(Algo::Mdlm, 0.0);
    c.length = 1024;
    // 2048 x 1024 rows: about 20 GB of saved activations per block (8 blocks) plus 34 GB of
    // logits, more than an H100 or H200 holds.
    let nb = loss_batch(&c, 2048, 1);
    let p = init_params(&c, 1);
    let mut g = DitParams::zeros(&c);
    let e = obj
        .loss_and_grad(&p, &nb.as_loss(), &TrainOpts::default(), &mut g)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("out of GPU memory") && e.contains("micro-batch of 2048 sequences x L 1024"),
        "{e}"
    );
    // The trainer still works at a sane size afterwards.
    c.length = 33;
    let nb = loss_batch(&c, 2, 1);
    let p = init_params(&c, 1);
    let mut g = DitParams::zeros(&c);
    obj.loss_and_grad(&p, &nb.as_loss(), &TrainOpts::default(), &mut g)
        .unwrap();
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

fn cli(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .arg("train")
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

/// `imdm-engine train --device cuda`: a run stopped at step 2 and resumed to 4 writes the same
/// final weights as a straight run of 4 steps.
#[test]
fn cli_trains_on_the_gpu_and_resumes_bit_identically() {
    if gpu_for_tests().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flags = |dir: &str, steps: &'static str| -> Vec<String> {
        [
            "--preset",
            "synthetic",
            "--vocab",
            "257",
            "--data",
            "synthetic",
            "--batch",
            "8",
            "--micro-batch",
            "4",
            "--steps",
            steps,
            "--warmup",
            "2",
            "--eval-size",
            "8",
            "--save-every",
            "2",
            "--device",
            "cuda",
            "--quiet",
            "--run-dir",
            dir,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = cli(&refs(&flags(a, "4")));
    assert!(out.contains("done: 4 steps"), "{out}");
    cli(&refs(&flags(b, "2")));
    let out = cli(&["--resume", b, "--steps", "4", "--device", "cuda", "--quiet"]);
    assert!(out.contains("done: 4 steps"), "{out}");
    let model = |d: &str| {
        std::fs::read(Path::new(d).join("checkpoints/step-00000004/model.safetensors")).unwrap()
    };
    assert!(
        model(a) == model(b),
        "resumed GPU run differs from the straight one"
    );
}

/// Spec 2.6 on the GPU: an IMDM fine-tuned from an MDLM checkpoint (zero last eps-MLP layer,
/// masks independent of the eps draws) starts at exactly the MDLM's loss.
#[test]
fn init_from_mdlm_starts_at_the_mdlm_loss_on_the_gpu() {
    if gpu_for_tests().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = synthetic(Algo::Mdlm, 0.0, 0.0);
    c.vocab_size = 257;
    c.mask_index = 256;
    let file = tmp.path().join("mdlm.safetensors");
    imdm_engine::model::checkpoint::save(&file, &random_params(&c, 3)).unwrap();
    let l_mdlm = first_init_loss(&file, "mdlm", "cuda", tmp.path());
    let l_imdm = first_init_loss(&file, "imdm", "cuda", tmp.path());
    assert!(l_mdlm.is_finite() && l_mdlm > 0.0, "{l_mdlm}");
    assert_eq!(
        l_imdm.to_bits(),
        l_mdlm.to_bits(),
        "imdm {l_imdm} vs mdlm {l_mdlm}"
    );
}
