//! The training machinery end to end with the analytic objective (`LinearSoftmax`, exact
//! gradients): the loss decreases, runs are bit-reproducible, a resumed run equals the
//! uninterrupted one bit for bit, NaN/Inf stops the run naming the tensor, and a failed
//! checkpoint write leaves the last good checkpoint in place.

use std::path::Path;

use imdm_engine::cpu::TrainOpts;
use imdm_engine::diffusion::LossBatch;
use imdm_engine::model::{init::init_params, Algo, DitConfig, DitParams, NoiseType};
use imdm_engine::train::config::{DataSpec, Freeze, TokenDtype};
use imdm_engine::train::run::{RunConfig, RunDir, RUN_FORMAT};
use imdm_engine::train::trainer::adamw_config;
use imdm_engine::train::{data, LinearSoftmax, Objective, TrainConfig, Trainer};
use imdm_engine::{Error, Result};

fn model(algo: Algo) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: 17,
        mask_index: 16,
        length: 6,
        hidden: 8,
        heads: 2,
        blocks: 1,
        cond_dim: 4,
        mlp_ratio: 4,
        dropout: 0.0,
        softcap: 0.0,
        algo,
        noise_dim: 5,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    }
}

fn train_cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        data: DataSpec::Synthetic,
        batch: 16,
        micro_batch: 4,
        steps,
        lr: 1e-2,
        warmup: 3,
        ema: 0.99,
        clip: 1.0,
        seed: 7,
        log_every: 1,
        eval_every: 5,
        eval_size: 24,
        save_every: 4,
        keep_checkpoints: 2,
        ..Default::default()
    }
}

fn trainer(m: &DitConfig, cfg: &TrainConfig, run: Option<&Path>) -> Trainer {
    let (src, val) = data::open(&cfg.data, m, cfg.seed, cfg.eval_size).unwrap();
    let rd = run.map(|dir| {
        let rec = RunConfig {
            format: RUN_FORMAT.into(),
            objective: "linear-softmax".into(),
            model: m.clone(),
            train: cfg.clone(),
        };
        RunDir::create(dir, &rec).unwrap()
    });
    Trainer::new(cfg.clone(), init_params(m, cfg.seed), src, val, rd).unwrap()
}

fn resume(dir: &Path) -> Trainer {
    let (rd, rec) = RunDir::open(dir).unwrap();
    let (src, val) = data::open(
        &rec.train.data,
        &rec.model,
        rec.train.seed,
        rec.train.eval_size,
    )
    .unwrap();
    Trainer::resume(rec.train.clone(), &rec.model, rd, src, val).unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The trajectory-defining fields of the metrics (timings dropped).
fn trajectory(dir: &Path) -> Vec<String> {
    metrics(dir)
        .iter()
        .map(|v| {
            let f = |k: &str| v.get(k).map_or("-".to_string(), |x| x.to_string());
            format!(
                "{} {} {} {} {} {} {}",
                f("kind"),
                f("step"),
                f("loss"),
                f("lr"),
                f("grad_norm"),
                f("val_nelbo"),
                f("val_ppl")
            )
        })
        .collect()
}

fn losses(t: &mut Trainer, n: u64) -> Vec<f64> {
    (0..n)
        .map(|_| t.step(&mut LinearSoftmax).unwrap().loss)
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn loss_decreases_with_the_analytic_objective() {
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let m = model(algo);
        let cfg = train_cfg(150);
        let mut t = trainer(&m, &cfg, None);
        let v0 = t.validate(&mut LinearSoftmax).unwrap().unwrap();
        let l = losses(&mut t, 150);
        let v1 = t.validate(&mut LinearSoftmax).unwrap().unwrap();
        let (first, last) = (mean(&l[..20]), mean(&l[130..]));
        assert!(
            last < 0.6 * first,
            "{algo:?}: loss {first:.4} -> {last:.4} did not decrease enough"
        );
        assert!(
            v1.nelbo < 0.7 * v0.nelbo && (v1.ppl - v1.nelbo.exp()).abs() < 1e-9 * v1.ppl,
            "{algo:?}: validation {v0:?} -> {v1:?}"
        );
        // At init the logits are exactly 0: NELBO = E[masked/L · log V / t] is about log V.
        assert!((v0.nelbo - (17f64).ln()).abs() < 0.5, "{v0:?}");
    }
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let m = model(Algo::Imdm);
    let cfg = train_cfg(25);
    let mut a = trainer(&m, &cfg, None);
    let mut b = trainer(&m, &cfg, None);
    let (la, lb) = (losses(&mut a, 25), losses(&mut b, 25));
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&la), bits(&lb));
    assert_eq!(a.params, b.params);
    assert_eq!(a.ema, b.ema);
    assert_eq!(a.opt, b.opt);
    let mut c = trainer(&m, &TrainConfig { seed: 8, ..cfg }, None);
    assert_ne!(
        bits(&losses(&mut c, 25)),
        bits(&la),
        "another seed, another run"
    );
}

/// Stop after step 10 (the last checkpoint is step 8, as after a kill), resume, finish:
/// metrics, weights, EMA and optimizer state equal the uninterrupted run bit for bit. With a
/// token file the resume point lies in a later epoch of the shuffled order.
/// MFU in the metrics is `6 · N · tok/s / peak` when a peak is set, and null without one.
#[test]
fn metrics_report_mfu_against_the_given_peak() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(Algo::Imdm);
    let cfg = train_cfg(3);
    for (k, peak) in [(0, Some(1e9)), (1, None)] {
        let dir = tmp.path().join(format!("r{k}"));
        let mut t = trainer(&m, &cfg, Some(&dir));
        t.set_peak_flops(peak);
        t.run(&mut LinearSoftmax).unwrap();
        let n = t.params.count() as f64;
        let train: Vec<_> = metrics(&dir)
            .into_iter()
            .filter(|v| v["kind"] == "train")
            .collect();
        assert_eq!(train.len(), 3);
        for v in train {
            let tps = v["tok_per_s"].as_f64().unwrap();
            match peak {
                Some(p) => {
                    let mfu = v["mfu"].as_f64().unwrap();
                    assert!(
                        mfu >= 0.0 && (mfu - 6.0 * n * tps / p).abs() <= 1e-9 * mfu,
                        "{v}"
                    );
                }
                None => assert!(v["mfu"].is_null(), "{v}"),
            }
        }
    }
}

#[test]
fn resume_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    // 40 sequences, 24 held out; sequence i is a ramp of i.
    let ids: Vec<u32> = (0..40u32)
        .flat_map(|i| (0..6u32).map(move |j| (i + j) % 16))
        .collect();
    let file = tmp.path().join("tokens.u16");
    std::fs::write(
        &file,
        ids.iter()
            .flat_map(|&x| (x as u16).to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let specs = [
        DataSpec::Synthetic,
        DataSpec::Tokens {
            path: file,
            dtype: TokenDtype::U16,
        },
    ];
    for (k, spec) in specs.into_iter().enumerate() {
        for algo in [Algo::Imdm, Algo::Mdlm] {
            let m = model(algo);
            let cfg = TrainConfig {
                data: spec.clone(),
                ..train_cfg(14)
            };
            let (da, db) = (
                tmp.path().join(format!("a{k}{algo:?}")),
                tmp.path().join(format!("b{k}{algo:?}")),
            );
            let mut a = trainer(&m, &cfg, Some(&da));
            a.run(&mut LinearSoftmax).unwrap();

            let mut b = trainer(&m, &cfg, Some(&db));
            b.run_until(&mut LinearSoftmax, 10).unwrap();
            assert_eq!(b.step, 10);
            drop(b); // interrupted: steps 9 and 10 are lost
            let mut b = resume(&db);
            assert_eq!(b.step, 8, "resumes from the latest checkpoint");
            b.run(&mut LinearSoftmax).unwrap();

            assert_eq!(trajectory(&da), trajectory(&db), "{spec:?} {algo:?}");
            assert_eq!(a.params, b.params);
            assert_eq!(a.ema, b.ema);
            assert_eq!(a.opt, b.opt);
            let (sa, sb) = (a.state(), b.state());
            assert_eq!(
                (
                    sa.step,
                    sa.data_position,
                    sa.rng.counter,
                    sa.ema_num_updates
                ),
                (
                    sb.step,
                    sb.data_position,
                    sb.rng.counter,
                    sb.ema_num_updates
                )
            );
            // Train entries 1..=14, once each.
            let steps: Vec<u64> = metrics(&db)
                .iter()
                .filter(|v| v["kind"] == "train")
                .map(|v| v["step"].as_u64().unwrap())
                .collect();
            assert_eq!(steps, (1..=14).collect::<Vec<_>>());
            // Checkpoints on disk: the newest two.
            let mut dirs: Vec<String> = std::fs::read_dir(db.join("checkpoints"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            dirs.sort();
            assert_eq!(dirs, ["step-00000012", "step-00000014"]);
            // Extending a finished run continues the same trajectory (once its trainer, which
            // holds the directory's lock, is gone).
            drop(a);
            let mut c = resume(&da);
            c.cfg.steps = 16;
            c.run(&mut LinearSoftmax).unwrap();
            let mut d = trainer(&m, &TrainConfig { steps: 16, ..cfg }, None);
            losses(&mut d, 16);
            assert_eq!(c.params, d.params);
        }
    }
}

/// Wraps the analytic objective and spoils one micro-batch of one step.
struct Poison {
    calls: u64,
    at_call: u64,
    spoil_loss: bool,
}

impl Objective for Poison {
    fn name(&self) -> &'static str {
        "poison"
    }
    fn loss_and_grad(
        &mut self,
        p: &DitParams,
        b: &LossBatch,
        o: &TrainOpts,
        g: &mut DitParams,
    ) -> Result<f64> {
        let mut loss = LinearSoftmax.loss_and_grad(p, b, o, g)?;
        if self.calls == self.at_call {
            if self.spoil_loss {
                loss = f64::NAN;
                g.final_layer.linear.weight.data[1] = f32::INFINITY;
            } else {
                g.blocks[0].mlp_fc1.weight.data[2] = f32::NAN;
            }
        }
        self.calls += 1;
        Ok(loss)
    }
    fn eval_loss(&mut self, p: &DitParams, b: &LossBatch) -> Result<f64> {
        LinearSoftmax.eval_loss(p, b)
    }
}

#[test]
fn non_finite_values_stop_the_run_naming_step_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(Algo::Imdm);
    for spoil_loss in [false, true] {
        let dir = tmp.path().join(format!("nan{spoil_loss}"));
        let cfg = TrainConfig {
            save_every: 2,
            ..train_cfg(10)
        };
        let mut t = trainer(&m, &cfg, Some(&dir));
        // 4 micro-batches per step: call 17 belongs to step 5.
        let mut obj = Poison {
            calls: 0,
            at_call: 17,
            spoil_loss,
        };
        let err = t.run(&mut obj).unwrap_err();
        let Error::NonFinite { step, what } = &err else {
            panic!("unexpected error {err}");
        };
        assert_eq!(*step, 5, "{err}");
        if spoil_loss {
            assert!(what.contains("loss is NaN"), "{err}");
            assert!(
                what.contains("output_layer.linear.weight (element 1 = inf)"),
                "{err}"
            );
        } else {
            assert!(
                what.contains("blocks.0.mlp.0.weight (element 2 = NaN)"),
                "{err}"
            );
        }
        assert!(err.to_string().contains("last good checkpoint"), "{err}");
        // The bad update was not applied and the checkpoint of step 4 is the latest.
        assert_eq!(t.step, 4);
        drop(t);
        let r = resume(&dir);
        assert_eq!(r.step, 4);
        assert!(imdm_engine::train::optim::first_non_finite(&r.params).is_none());
    }
}

fn no_tmp_left(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "leftover {}", e.path().display());
        if e.file_type().unwrap().is_dir() {
            no_tmp_left(&e.path());
        }
    }
}

#[test]
fn failed_checkpoint_write_keeps_the_last_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(Algo::Imdm);
    let cfg = TrainConfig {
        save_every: 2,
        ..train_cfg(10)
    };
    for fail_after in 0..4 {
        let dir = tmp.path().join(format!("f{fail_after}"));
        let mut t = trainer(&m, &cfg, Some(&dir));
        t.run_until(&mut LinearSoftmax, 4).unwrap();
        let good = t.params.clone();
        t.run_dir_mut()
            .unwrap()
            .inject_checkpoint_failure(fail_after);
        let err = t.run_until(&mut LinearSoftmax, 6).unwrap_err().to_string();
        assert!(err.contains("injected write failure"), "{err}");
        let rd = t.run_dir().unwrap();
        assert_eq!(rd.latest().unwrap().unwrap().step, 4);
        assert!(!dir.join("checkpoints/step-00000006").exists());
        no_tmp_left(&dir);
        // The latest checkpoint is complete and loads.
        let ld = RunDir::load_checkpoint(
            &dir.join("checkpoints/step-00000004"),
            &m,
            adamw_config(&cfg),
            |_| false,
        )
        .unwrap();
        assert_eq!(ld.params, good);
        assert_eq!(ld.state.step, 4);
        // The next checkpoint succeeds again.
        t.run_until(&mut LinearSoftmax, 8).unwrap();
        assert_eq!(t.run_dir().unwrap().latest().unwrap().unwrap().step, 8);
    }
}

/// Micro-batching changes only the summation order: 4 micro-batches of 4 give the same step
/// as one batch of 16 (same times, masks, eps), up to rounding.
#[test]
fn gradient_accumulation_matches_one_big_batch() {
    let m = model(Algo::Imdm);
    let mut a = trainer(&m, &train_cfg(3), None);
    let mut b = trainer(
        &m,
        &TrainConfig {
            micro_batch: 16,
            ..train_cfg(3)
        },
        None,
    );
    for _ in 0..3 {
        let (x, y) = (
            a.step(&mut LinearSoftmax).unwrap(),
            b.step(&mut LinearSoftmax).unwrap(),
        );
        assert!((x.loss - y.loss).abs() <= 1e-6 * y.loss, "{x:?} vs {y:?}");
        assert!((x.grad_norm - y.grad_norm).abs() <= 1e-5 * y.grad_norm);
    }
}

#[test]
fn frozen_parameters_do_not_move() {
    let m = model(Algo::Imdm);
    let cfg = TrainConfig {
        freeze: Freeze {
            prefixes: vec!["vocab_embed.".into()],
            ln_only: false,
        },
        ..train_cfg(10)
    };
    let mut t = trainer(&m, &cfg, None);
    let init = t.params.clone();
    losses(&mut t, 10);
    assert_eq!(t.params.embedding, init.embedding);
    assert_eq!(t.params.eps_mlp, init.eps_mlp);
    assert_eq!(t.ema.shadow.embedding, init.embedding);
    assert_ne!(t.params.final_layer.linear, init.final_layer.linear);
    // Everything frozen: refused.
    let all = TrainConfig {
        freeze: Freeze {
            prefixes: vec!["".into()],
            ln_only: false,
        },
        ..train_cfg(10)
    };
    let (src, val) = data::open(&all.data, &m, 1, 0).unwrap();
    let e = Trainer::new(all, init_params(&m, 1), src, val, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("frozen"), "{e}");
}

#[test]
fn resume_refuses_a_configuration_that_changes_the_trajectory() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(Algo::Imdm);
    let cfg = train_cfg(4);
    trainer(&m, &cfg, Some(tmp.path()))
        .run(&mut LinearSoftmax)
        .unwrap();
    let (rd, rec) = RunDir::open(tmp.path()).unwrap();
    let (src, val) = data::open(&cfg.data, &m, cfg.seed, cfg.eval_size).unwrap();
    let changed = TrainConfig {
        lr: 0.5,
        ..rec.train.clone()
    };
    let e = Trainer::resume(changed, &m, rd, src, val)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("differs from the recorded one"), "{e}");
    // Extending is recorded in config.json.
    let (rd, rec) = RunDir::open(tmp.path()).unwrap();
    let (src, val) = data::open(&cfg.data, &m, cfg.seed, cfg.eval_size).unwrap();
    let longer = TrainConfig {
        steps: 6,
        ..rec.train
    };
    let mut t = Trainer::resume(longer, &m, rd, src, val).unwrap();
    t.run(&mut LinearSoftmax).unwrap();
    drop(t); // releases the directory's lock
    assert_eq!(RunDir::open(tmp.path()).unwrap().1.train.steps, 6);
}

/// The same guarantees with the real objective, the CPU DiT: the loss decreases, a rerun is
/// bit-identical, and a resumed run equals the uninterrupted one.
#[test]
fn cpu_dit_trains_reproducibly_and_resumes_bit_for_bit() {
    use imdm_engine::train::CpuDit;
    let tmp = tempfile::tempdir().unwrap();
    let m = model(Algo::Imdm);
    let cfg = train_cfg(40);
    let (da, db, dc) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    trainer(&m, &cfg, Some(&da)).run(&mut CpuDit).unwrap();
    trainer(&m, &cfg, Some(&dc)).run(&mut CpuDit).unwrap();
    assert_eq!(trajectory(&da), trajectory(&dc), "same seed, same run");
    let l: Vec<f64> = metrics(&da)
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(
        mean(&l[30..]) < mean(&l[..10]),
        "the DiT's loss did not decrease: {l:?}"
    );
    let mut b = trainer(&m, &cfg, Some(&db));
    b.run_until(&mut CpuDit, 30).unwrap();
    drop(b);
    let mut b = resume(&db);
    assert_eq!(b.step, 28);
    b.run(&mut CpuDit).unwrap();
    assert_eq!(trajectory(&da), trajectory(&db), "resumed run");
}
