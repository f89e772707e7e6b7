//! The baselines (AR, SEDD, D3PM) through the binary on the CPU: tiny models train to a falling
//! validation loss on the synthetic source and on the committed text fixture
//! (tests/fixtures/text, GPT-2 tokenizer, L = 32), `eval ppl` reports each one's bound on the
//! same shards (AR: equal to the run's own validation, the NLL being exact), `sample` writes
//! mask-free samples (AR: the uncached sampler gives the KV-cached one's file), and commands
//! refuse a model of the wrong algorithm with a message naming the file and both algorithms.

mod common;

use common::cli::{fails, ok};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imdm_engine::data::TokenizerKind;
use imdm_engine::data::{prepare, Conventions, PrepareOptions, SplitRule, TxtMode};

const ALGOS: [&str; 3] = ["ar", "sedd", "d3pm"];

/// D3PM trains and is evaluated with the corrected α_s: the reference's written rule is not
/// a bound (deviation 14.53; `d3pm_as_written_goes_below_zero` below).
fn d3pm_flags(algo: &str) -> &'static [&'static str] {
    if algo == "d3pm" {
        &["--d3pm-alpha-s", "corrected"]
    } else {
        &[]
    }
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The validation losses of a run, in step order.
fn val_losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter(|v| v["kind"] == "val")
        .map(|v| v["val_nelbo"].as_f64().unwrap())
        .collect()
}

fn last_ema(dir: &Path) -> PathBuf {
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("latest.json")).unwrap()).unwrap();
    dir.join(latest["dir"].as_str().unwrap())
        .join("ema.safetensors")
}

/// A tiny model of `algo` on `data` for `steps` steps, validated every `every` steps on the
/// raw weights (EMA off, so validation follows training).
#[allow(clippy::too_many_arguments)]
fn train(algo: &str, data: &str, dir: &Path, sizes: &[&str], steps: &str, every: &str, lr: &str) {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["train", "--algo", algo, "--data", data, "--run-dir", dir];
    args.extend_from_slice(sizes);
    args.extend_from_slice(d3pm_flags(algo));
    args.extend_from_slice(&[
        "--steps",
        steps,
        "--eval-every",
        every,
        "--lr",
        lr,
        "--warmup",
        "5",
        "--ema",
        "0",
        "--save-every",
        "0",
        "--quiet",
    ]);
    ok(&args);
}

fn tmp(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("baselines")
        .join(name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

const SYNTH: &[&str] = &[
    "--preset",
    "minimini",
    "--vocab",
    "17",
    "--length",
    "6",
    "--hidden",
    "16",
    "--heads",
    "2",
    "--blocks",
    "1",
    "--cond-dim",
    "8",
    "--batch",
    "32",
    "--eval-size",
    "64",
];

#[test]
fn baselines_learn_the_synthetic_task() {
    let root = tmp("synthetic");
    for algo in ALGOS {
        let dir = root.join(algo);
        train(algo, "synthetic", &dir, SYNTH, "80", "20", "3e-3");
        let v = val_losses(&dir);
        assert_eq!(v.len(), 4, "{algo}: validations at 20, 40, 60, 80");
        assert!(
            v[3] < 0.9 * v[0] && v.windows(2).all(|w| w[1] < w[0]),
            "{algo}: validation loss does not fall: {v:?}"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model"]["algo"], algo);
        assert_eq!(cfg["model"]["causal"], algo == "ar");
        assert_eq!(cfg["model"]["time_conditioning"], algo != "ar");
    }
}

/// D3PM with the reference's written `alpha_s = t − dt` learns to put mass on the mask column
/// at late times, where the written second term rewards it: its per-token "bound" goes below
/// zero on the synthetic task, which no NLL bound can (the corrected rule stays positive).
#[test]
fn d3pm_as_written_goes_below_zero() {
    let root = tmp("as-written");
    let dir = root.join("d3pm");
    let dir_s = dir.to_str().unwrap();
    let mut args = vec![
        "train",
        "--algo",
        "d3pm",
        "--data",
        "synthetic",
        "--run-dir",
        dir_s,
    ];
    args.extend_from_slice(SYNTH);
    args.extend_from_slice(&[
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--ema",
        "0",
        "--save-every",
        "0",
        "--quiet",
    ]);
    ok(&args);
    let v = val_losses(&dir);
    assert!(v[v.len() - 1] < 0.0, "as written: {v:?}");
    let corrected = tmp("synthetic-corrected").join("d3pm");
    train("d3pm", "synthetic", &corrected, SYNTH, "40", "20", "3e-3");
    assert!(val_losses(&corrected).iter().all(|&x| x > 0.0));
}

/// Shards of the text fixture (L = 32, Persuasion held out), shared by the tests below.
fn shards() -> &'static PathBuf {
    static S: OnceLock<PathBuf> = OnceLock::new();
    S.get_or_init(|| {
        let out = tmp("shards").join("gpt2-32");
        prepare(&PrepareOptions {
            inputs: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")],
            out: out.clone(),
            tokenizer: TokenizerKind::Gpt2,
            conventions: Conventions::Reference,
            length: 32,
            split: SplitRule {
                frac: 0.0,
                prefixes: vec!["austen/persuasion/".into()],
            },
            insert_eos: true,
            txt_mode: TxtMode::File,
            text_field: "text".into(),
            shard_mib: 256,
            force: true,
            progress: false,
        })
        .unwrap();
        out
    })
}

const TEXT: &[&str] = &[
    "--preset",
    "tiny",
    "--hidden",
    "32",
    "--heads",
    "2",
    "--blocks",
    "1",
    "--cond-dim",
    "16",
    "--batch",
    "8",
    "--eval-size",
    "100",
];

/// Trains each baseline on the text shards (falling validation), then evaluates the three on
/// the same valid split with `eval ppl`; AR's exact NLL equals its run's last validation.
#[test]
fn baselines_train_and_evaluate_on_text() {
    let data = shards();
    let flag = format!("shards:{}", data.display());
    let root = tmp("text");
    for algo in ALGOS {
        let dir = root.join(algo);
        train(algo, &flag, &dir, TEXT, "24", "8", "2e-3");
        let v = val_losses(&dir);
        assert!(
            v.len() == 3 && v[2] < v[0],
            "{algo}: validation loss does not fall: {v:?}"
        );
        let ck = last_ema(&dir);
        let mut args = vec![
            "eval",
            "ppl",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--batch",
            "8",
            "--json",
            "-",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(d3pm_flags(algo));
        let out = ok(&args);
        let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["algo"], algo);
        let nelbo = r["nelbo"].as_f64().unwrap();
        assert!(nelbo.is_finite() && nelbo > 0.0, "{algo}: {r}");
        let per_row = if algo == "ar" { 31 } else { 32 };
        assert_eq!(r["tokens"].as_u64().unwrap(), 9 * per_row);
        if algo == "ar" {
            assert_eq!(r["bound"], "exact NLL");
            let want = v[2];
            assert!(
                (nelbo - want).abs() <= 1e-6 * want,
                "eval {nelbo} vs run {want}"
            );
        }
    }
}

/// Samples of each baseline are mask-free and of the right shape; AR's start with BOS and its
/// reference sampler writes the KV-cached sampler's file.
#[test]
fn baselines_sample() {
    let root = tmp("sample");
    for algo in ALGOS {
        let dir = root.join(algo);
        train(algo, "synthetic", &dir, SYNTH, "10", "0", "3e-3");
        let ck = last_ema(&dir);
        let ck = ck.to_str().unwrap();
        let out = root.join(format!("{algo}.jsonl"));
        let mut args = vec![
            "sample",
            "--checkpoint",
            ck,
            "--steps",
            "4",
            "--num-samples",
            "5",
            "--batch",
            "2",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        if algo == "ar" {
            args.extend_from_slice(&["--bos", "7"]);
        }
        ok(&args);
        let text = std::fs::read_to_string(&out).unwrap();
        let rows: Vec<Vec<u64>> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(rows.len(), 5);
        assert!(
            rows.iter()
                .all(|r| r.len() == 6 && r.iter().all(|&t| t < 16)),
            "{algo}"
        );
        if algo == "ar" {
            assert!(rows.iter().all(|r| r[0] == 7));
            let other = root.join("ar-uncached.jsonl");
            let o = other.to_str().unwrap();
            let mut a2: Vec<&str> = args.clone();
            let at = a2.iter().position(|x| *x == out.to_str().unwrap()).unwrap();
            a2[at] = o;
            a2.push("--uncached");
            ok(&a2);
            assert_eq!(std::fs::read_to_string(&other).unwrap(), text);
        }
    }
}

/// A model of another algorithm than a command serves is refused with the file and both
/// algorithms named.
#[test]
fn mismatched_algorithms_are_refused() {
    let root = tmp("refuse");
    let ar = root.join("ar");
    train("ar", "synthetic", &ar, SYNTH, "2", "0", "1e-3");
    let ck = last_ema(&ar);
    let ck = ck.to_str().unwrap();
    let out = root.join("x.jsonl");
    let out = out.to_str().unwrap();
    let e = fails(&[
        "sample",
        "--checkpoint",
        ck,
        "--steps",
        "4",
        "--sampler",
        "imdm",
        "--out",
        out,
    ]);
    assert!(
        e.contains(ck) && e.contains("ar model") && e.contains("MDLM/IMDM"),
        "{e}"
    );
    let e = fails(&[
        "sample",
        "--checkpoint",
        ck,
        "--steps",
        "4",
        "--bos",
        "1",
        "--device",
        "cuda",
        "--out",
        out,
    ]);
    assert!(e.contains("--device cuda") && e.contains("CPU"), "{e}");
    let e = fails(&[
        "distill",
        "sdtt",
        "--teacher",
        ck,
        "--data",
        "synthetic",
        "--run-dir",
        root.join("sd").to_str().unwrap(),
    ]);
    assert!(e.contains(ck), "{e}");
    let e = fails(&[
        "eval",
        "ppl",
        "--checkpoint",
        ck,
        "--data",
        "/nonexistent",
        "--d3pm-steps",
        "10",
    ]);
    assert!(e.contains("--d3pm-steps") && e.contains("ar model"), "{e}");
}
