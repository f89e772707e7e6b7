//! IM-ReDi training as the reference runs it (spec 6.3): dropout, micro-batch accumulation,
//! the EMA hand-off, validation on held-out couplings, and the weights hand-off between runs.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use imdm_engine::cpu::TrainOpts;
use imdm_engine::diffusion::toy::toy_config;
use imdm_engine::diffusion::LossBatch;
use imdm_engine::distill::fit::Fitter;
use imdm_engine::distill::redi::{train_on_couplings, RediTrainConfig};
use imdm_engine::distill::redi_train::{train_on_couplings_with, validate_couplings, RediEvent};
use imdm_engine::distill::Couplings;
use imdm_engine::model::init::random_params;
use imdm_engine::model::{Algo, DitConfig, DitParams};
use imdm_engine::tensor::Tokens;
use imdm_engine::train::handoff::{resolve, WeightsKind};
use imdm_engine::train::optim::LrSchedule;
use imdm_engine::train::{CpuDit, Ema};

const L: usize = 4;

fn model(dropout: f64) -> DitParams {
    let mut c: DitConfig = toy_config(9, L, Algo::Imdm, 6);
    c.dropout = dropout;
    random_params(&c, 11)
}

/// `n` seeded couplings: x0 random data tokens, x_T masks a random share of them.
fn couplings(n: usize, seed: u64) -> Couplings {
    let (v, mask) = (9usize, 8u32);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x0: Vec<u32> = (0..n * L)
        .map(|_| rng.random_range(0..v as u32 - 1))
        .collect();
    let t: Vec<f32> = (0..n).map(|_| 1.0 - rng.random::<f32>() * 0.9).collect();
    let xt: Vec<u32> = x0
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if rng.random::<f32>() < t[i / L] {
                mask
            } else {
                x
            }
        })
        .collect();
    Couplings {
        xt: Tokens::new(n, L, xt, v).unwrap(),
        x0: Tokens::new(n, L, x0, v).unwrap(),
        t,
        seeds: (0..n as i64).map(|i| 1000 + i).collect(),
    }
}

fn cfg(batch: usize, micro: usize) -> RediTrainConfig {
    RediTrainConfig {
        steps: 6,
        batch,
        micro_batch: micro,
        lr: 3e-3,
        warmup: 2,
        ema: 0.0,
        ema_updates: 0,
        clip: 1.0,
        ignore_seed: false,
        seed: 5,
        dropout_seed: 5,
        eval_every: 0,
    }
}

fn losses(params: DitParams, pairs: &Couplings, c: &RediTrainConfig) -> (Vec<f64>, DitParams) {
    let mut out = vec![];
    let fit = train_on_couplings(&mut CpuDit, params, pairs, c, |_, l| out.push(l)).unwrap();
    (out, fit.params)
}

fn max_abs_diff(a: &DitParams, b: &DitParams) -> f32 {
    a.named()
        .iter()
        .zip(b.named())
        .flat_map(|((_, x), (_, y))| x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// The loop as it was before micro-batches and dropout: one coupling batch per step, training
/// options off.
fn single_batch_loop(params: DitParams, pairs: &Couplings, c: &RediTrainConfig) -> Vec<f64> {
    let lr = LrSchedule {
        peak: c.lr,
        warmup: c.warmup,
    };
    let model = params.config.clone();
    let mut fit = Fitter::new(params, lr, c.ema, c.clip, |_| false);
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut cursor = order.len();
    let norm = (c.batch * model.length) as f64;
    let mut out = vec![];
    for _ in 0..c.steps {
        if cursor + c.batch > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let b = pairs.batch(
            &order[cursor..cursor + c.batch],
            &model,
            c.ignore_seed,
            &mut rng,
        );
        cursor += c.batch;
        let lb = LossBatch {
            xt: &b.xt,
            x0: &b.x0,
            eps: b.eps.as_ref(),
            weight: &b.weight,
            norm,
            sigma: None,
        };
        out.push(
            fit.step(&mut CpuDit, &[lb], |_| TrainOpts::default())
                .unwrap()
                .loss,
        );
    }
    out
}

#[test]
fn dropout_zero_reproduces_the_single_batch_loop() {
    let pairs = couplings(20, 1);
    let c = cfg(8, 0);
    let want = single_batch_loop(model(0.0), &pairs, &c);
    let (got, _) = losses(model(0.0), &pairs, &c);
    assert_eq!(got, want);
    // The same with fresh eps (ignore_seed): the draws do not depend on the micro-batches.
    let c = RediTrainConfig {
        ignore_seed: true,
        ..cfg(8, 0)
    };
    assert_eq!(
        losses(model(0.0), &pairs, &c).0,
        single_batch_loop(model(0.0), &pairs, &c)
    );
}

#[test]
fn accumulation_over_micro_batches_equals_one_batch() {
    let pairs = couplings(20, 2);
    for ignore_seed in [false, true] {
        let one = RediTrainConfig {
            ignore_seed,
            ..cfg(8, 8)
        };
        let four = RediTrainConfig {
            ignore_seed,
            ..cfg(8, 2)
        };
        let (a, pa) = losses(model(0.0), &pairs, &one);
        let (b, pb) = losses(model(0.0), &pairs, &four);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{a:?} vs {b:?}");
        }
        let d = max_abs_diff(&pa, &pb);
        assert!(d < 1e-4, "weights differ by {d} after {} steps", one.steps);
        // The losses moved, so the comparison is not between two idle runs.
        assert!(a[0] != a[a.len() - 1]);
    }
}

#[test]
fn dropout_is_active_and_seeded() {
    let pairs = couplings(16, 3);
    let with = |seed: u64| {
        let c = RediTrainConfig {
            dropout_seed: seed,
            ..cfg(8, 4)
        };
        losses(model(0.1), &pairs, &c).0
    };
    let (a, b) = (with(1), with(2));
    assert_ne!(a[0], b[0], "two dropout seeds gave the same first loss");
    assert_eq!(a, with(1), "one dropout seed must reproduce its run");
    let off = losses(model(0.0), &pairs, &cfg(8, 4)).0;
    assert_ne!(a[0], off[0]);
}

#[test]
fn ema_hand_off_uses_the_full_decay_from_the_first_update() {
    let n = Ema::warmup_end(0.9999);
    assert_eq!(n, 89_989);
    for d in [0.9999, 0.999, 0.9, 0.5] {
        let n = Ema::warmup_end(d);
        let e = Ema::new(&model(0.0), d);
        assert_eq!(e.decay_at(n + 1), d, "{d}");
        assert!(n == 0 || e.decay_at(n) < d, "{d}: {n}");
    }
    let pairs = couplings(16, 4);
    let init = model(0.0);
    let run = |updates: u64| {
        let c = RediTrainConfig {
            steps: 1,
            warmup: 0,
            ema: 0.9,
            ema_updates: updates,
            ..cfg(8, 0)
        };
        train_on_couplings(&mut CpuDit, init.clone(), &pairs, &c, |_, _| {}).unwrap()
    };
    // Continued count: s1 = s0 - 0.1 (s0 - p1). Fresh warm-up: decay 2/11 at update 1.
    for (updates, d) in [(Ema::warmup_end(0.9), 0.9f64), (0, 2.0 / 11.0)] {
        let fit = run(updates);
        let (s0, p1, s1) = (
            &init.embedding.data,
            &fit.params.embedding.data,
            &fit.ema.shadow.embedding.data,
        );
        let omd = (1.0 - d) as f32;
        let k = (0..s0.len()).find(|&k| s0[k] != p1[k]).unwrap();
        assert_eq!(s1[k], s0[k] - omd * (s0[k] - p1[k]), "updates {updates}");
        assert_eq!(fit.ema.num_updates, updates + 1);
    }
}

#[test]
fn validation_reports_the_coupling_loss_and_the_nelbo_on_held_out_pairs() {
    let mut pairs = couplings(24, 5);
    let valid = pairs.split_off_last(8);
    assert_eq!((pairs.len(), valid.len(), valid.xt.batch), (16, 8, 8));
    assert_eq!(valid.seeds[0], 1016);
    let init = model(0.0);
    // The coupling NLL of the initial weights on all 16 rows equals the first training loss
    // of a batch of all 16 (the loss does not depend on the row order).
    let v = validate_couplings(&mut CpuDit, &init, &pairs, 4, false, 0).unwrap();
    let (l, _) = losses(init.clone(), &pairs, &cfg(16, 0));
    assert!(
        (v.coupling_nll - l[0]).abs() < 1e-4 * l[0],
        "{v:?} vs {}",
        l[0]
    );
    assert!(v.nelbo.is_finite() && v.nelbo > 0.0);
    // Evaluation batches change only the order of sums.
    let w = validate_couplings(&mut CpuDit, &init, &pairs, 16, false, 0).unwrap();
    assert!((w.coupling_nll - v.coupling_nll).abs() < 1e-5 * v.coupling_nll);
    // During training: every eval_every steps and at the end, on the EMA weights.
    let c = RediTrainConfig {
        eval_every: 2,
        steps: 5,
        ..cfg(8, 4)
    };
    let mut steps = vec![];
    train_on_couplings_with(&mut CpuDit, init, &pairs, Some(&valid), &c, |e| {
        if let RediEvent::Validation(v) = e {
            assert_eq!(v.couplings, 8);
            steps.push(v.step);
        }
    })
    .unwrap();
    assert_eq!(steps, vec![2, 4, 5]);
}

#[test]
fn weights_resolve_from_files_runs_and_checkpoint_directories() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let ck = run.join("checkpoints/step-00000007");
    std::fs::create_dir_all(&ck).unwrap();
    for f in ["ema.safetensors", "model.safetensors"] {
        std::fs::write(ck.join(f), b"w").unwrap();
    }
    std::fs::write(
        ck.join("state.json"),
        r#"{"step": 7, "ema_num_updates": 6, "other": 1}"#,
    )
    .unwrap();
    std::fs::write(
        run.join("latest.json"),
        r#"{"step": 7, "dir": "checkpoints/step-00000007"}"#,
    )
    .unwrap();
    let s = resolve("--checkpoint", &run, None).unwrap();
    assert_eq!(s.weights, ck.join("ema.safetensors"));
    assert_eq!((s.step, s.ema_updates), (Some(7), Some(6)));
    let s = resolve("--checkpoint", &ck, Some(WeightsKind::Raw)).unwrap();
    assert_eq!(s.weights, ck.join("model.safetensors"));
    let f = ck.join("model.safetensors");
    let s = resolve("--init", &f, None).unwrap();
    assert_eq!((s.weights, s.ema_updates), (f.clone(), None));
    let e = resolve("--init", &f, Some(WeightsKind::Ema)).unwrap_err();
    assert!(e.to_string().contains("--init"), "{e}");
    let e = resolve("--checkpoint", t.path(), None).unwrap_err();
    assert!(e.to_string().contains("ema.safetensors"), "{e}");
    let e = resolve("--checkpoint", &t.path().join("nope"), None).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}
