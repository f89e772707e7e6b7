//! Real text end to end on the CPU, through the binary, on the committed public-domain fixtures
//! (tests/fixtures/text, GPT-2 tokenizer, L = 32: 56 train and 9 valid sequences): `train
//! --data shards:DIR` with a tiny DiT (dropout on), a resumed run equal to the uninterrupted
//! one across an epoch boundary, `eval ppl` equal to the run's own validation, `sample
//! --decode`, `plot`, and the errors when model and shards do not fit.

mod common;

use common::cli::{bin, fails, ok};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imdm_engine::data::TokenizerKind;
use imdm_engine::data::{prepare, Conventions, PrepareOptions, SplitRule, Tokenizer, TxtMode};
use imdm_engine::diffusion::metrics::mean_unigram_entropy;
use imdm_engine::tensor::Tokens;
use safetensors::SafeTensors;

fn prepare_fixtures(out: &Path, length: usize, heldout: &[&str]) {
    prepare(&PrepareOptions {
        inputs: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")],
        out: out.to_path_buf(),
        tokenizer: TokenizerKind::Gpt2,
        conventions: Conventions::Reference,
        length,
        split: SplitRule {
            frac: 0.0,
            prefixes: heldout.iter().map(|s| s.to_string()).collect(),
        },
        insert_eos: true,
        txt_mode: TxtMode::File,
        text_field: "text".into(),
        shard_mib: 256,
        force: true,
        progress: false,
    })
    .unwrap();
}

/// A tiny IMDM on the shards: 7 batches of 8 per epoch, so 10 steps cross into epoch 1.
fn train_args<'a>(data: &'a str, dir: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
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
        "--algo",
        "imdm",
        "--data",
        data,
        "--batch",
        "8",
        "--micro-batch",
        "4",
        "--steps",
        steps,
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--eval-size",
        "100",
        "--save-every",
        "4",
        "--quiet",
        "--run-dir",
        dir,
    ]
}

struct Fixture {
    root: PathBuf,
    /// Prepared shards, L = 32 (Persuasion held out).
    data: PathBuf,
    /// An uninterrupted 10-step run on them.
    run: PathBuf,
}

impl Fixture {
    fn data_flag(&self) -> String {
        format!("shards:{}", self.data.display())
    }

    fn ema(&self) -> PathBuf {
        self.run.join("checkpoints/step-00000010/ema.safetensors")
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("realtext");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let data = root.join("gpt2-32");
        prepare_fixtures(&data, 32, &["austen/persuasion/"]);
        let run = root.join("uninterrupted");
        let f = Fixture { root, data, run };
        ok(&train_args(&f.data_flag(), f.run.to_str().unwrap(), "10"));
        f
    })
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The metrics without the timing fields.
fn trajectory(dir: &Path) -> Vec<String> {
    metrics(dir)
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("tok_per_s");
            v.to_string()
        })
        .collect()
}

/// Tensors (dtype, shape, bytes) and metadata of a safetensors file (the header's JSON order
/// is not canonical, so files are compared by content).
type Contents = (
    BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
    BTreeMap<String, String>,
);

fn contents(path: &Path) -> Contents {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let val = (
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            );
            (n, val)
        })
        .collect();
    let meta = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (tensors, meta)
}

fn state(dir: &Path, step: u64) -> serde_json::Value {
    let p = dir.join(format!("checkpoints/step-{step:08}/state.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn shards_training_resumed_equals_uninterrupted() {
    let f = fixture();
    let a = &f.run;
    // The run trained on the shards: loss recorded, validation on the 9 valid sequences.
    let m = metrics(a);
    let val: Vec<&serde_json::Value> = m.iter().filter(|v| v["kind"] == "val").collect();
    assert_eq!(
        val.iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 8, 10]
    );
    assert!(val.iter().all(|v| v["val_tokens"] == 9 * 32));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["train"]["data"]["kind"], "shards");
    // V, mask and L came from the manifest.
    assert_eq!(
        (
            &cfg["model"]["vocab_size"],
            &cfg["model"]["mask_index"],
            &cfg["model"]["length"]
        ),
        (&50258.into(), &50257.into(), &32.into())
    );
    let s = state(a, 10);
    assert_eq!(s["data_position"], 80);
    let lp = &s["data_loader"];
    assert_eq!((&lp["epoch"], &lp["offset"]), (&1.into(), &24.into()));
    assert_eq!(
        (&lp["sequences"], &lp["batch_size"]),
        (&56.into(), &8.into())
    );
    assert!(a.join("curves.png").is_file(), "train plots its curves");

    // The same run stopped at step 8 (a checkpoint in epoch 1) and resumed to 10.
    let b = f.root.join("resumed");
    let bs = b.to_str().unwrap();
    ok(&train_args(&f.data_flag(), bs, "8"));
    assert_eq!(state(&b, 8)["data_loader"]["epoch"], 1);
    let out = ok(&["train", "--resume", bs, "--steps", "10"]);
    assert!(
        out.contains("resuming") && out.contains("done: 10 steps"),
        "{out}"
    );
    assert_eq!(trajectory(a), trajectory(&b));
    for file in ["model", "ema", "optim"] {
        let p = format!("checkpoints/step-00000010/{file}.safetensors");
        assert!(
            contents(&a.join(&p)) == contents(&b.join(&p)),
            "{file} differs"
        );
    }
    let sb = state(&b, 10);
    assert_eq!(
        (&s["data_position"], &s["data_loader"], &s["last_loss"]),
        (&sb["data_position"], &sb["data_loader"], &sb["last_loss"])
    );

    // Shards re-prepared with other content under the run: the resume refuses them.
    let c = f.root.join("moved-data");
    let data2 = f.root.join("gpt2-32-b");
    prepare_fixtures(&data2, 32, &["austen/persuasion/"]);
    let d2 = format!("shards:{}", data2.display());
    ok(&train_args(&d2, c.to_str().unwrap(), "4"));
    prepare_fixtures(&data2, 32, &["sotu/"]);
    let e = fails(&["train", "--resume", c.to_str().unwrap(), "--steps", "6"]);
    assert!(
        e.contains("cannot resume the data position") && e.contains("gpt2-32-b"),
        "{e}"
    );
}

#[test]
fn shards_that_do_not_fit_the_model_are_refused() {
    let f = fixture();
    let dir = f.root.join("misfit");
    let ds = dir.to_str().unwrap();
    let data = f.data_flag();
    let mut args = train_args(&data, ds, "1");
    args.extend(["--length", "64"]);
    let e = fails(&args);
    let man = f.data.join("manifest.json");
    assert!(
        e.contains(man.to_str().unwrap())
            && e.contains("V=50258 mask=50257 length 32 (gpt2 tokenizer)")
            && e.contains("length 64"),
        "{e}"
    );
    let mut args = train_args(&data, ds, "1");
    args.extend(["--vocab", "30522", "--mask-index", "103"]);
    let e = fails(&args);
    assert!(e.contains("manifest.json") && e.contains("V=30522"), "{e}");
    let e = fails(&train_args("shards:/no/such/dir", ds, "1"));
    assert!(e.contains("/no/such/dir has no manifest.json"), "{e}");
    // A folder without valid sequences is never written: `data prepare` refuses it.
    let nov = f.root.join("no-valid");
    let e = prepare(&PrepareOptions {
        inputs: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")],
        out: nov.clone(),
        tokenizer: TokenizerKind::Gpt2,
        conventions: Conventions::Reference,
        length: 32,
        split: SplitRule {
            frac: 0.0,
            prefixes: vec![],
        },
        insert_eos: true,
        txt_mode: TxtMode::File,
        text_field: "text".into(),
        shard_mib: 256,
        force: true,
        progress: false,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("valid split would hold no sequences"), "{e}");
    assert!(!nov.join("manifest.json").exists(), "nothing written");
}

#[test]
fn eval_ppl_equals_the_runs_validation() {
    let f = fixture();
    let last = metrics(&f.run)
        .into_iter()
        .rfind(|v| v["kind"] == "val")
        .unwrap();
    let ema = f.ema();
    let json = f.root.join("ppl.json");
    let base = [
        "eval",
        "ppl",
        "--checkpoint",
        ema.to_str().unwrap(),
        "--data",
        f.data.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    // The run's micro-batch and validation seed: the same draws, the same number.
    let mut args = base.to_vec();
    args.extend(["--batch", "4", "--json", json.to_str().unwrap()]);
    let out = ok(&args);
    assert!(out.contains("NELBO") && out.contains("PPL"), "{out}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["nelbo"].as_f64(), last["val_nelbo"].as_f64(), "{r}");
    assert_eq!(r["ppl"].as_f64(), last["val_ppl"].as_f64());
    assert_eq!(
        (r["sequences"].as_u64(), r["tokens"].as_u64()),
        (Some(9), Some(288))
    );
    let nelbo = r["nelbo"].as_f64().unwrap();

    // Another seed or batch: another estimate of the same bound, close by.
    let mut args = base.to_vec();
    args.extend(["--seed", "5", "--batch", "3", "--json", "-"]);
    let r: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    let other = r["nelbo"].as_f64().unwrap();
    assert!(
        other != nelbo && (other - nelbo).abs() < 0.2 * nelbo,
        "{other} vs {nelbo}"
    );
    assert!((r["ppl"].as_f64().unwrap() - other.exp()).abs() < 1e-6 * other.exp());
    // --limit, and the training split.
    let mut args = base.to_vec();
    args.extend(["--limit", "4", "--split", "train", "--json", "-"]);
    let r: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert_eq!(
        (r["sequences"].as_u64(), r["split"].as_str()),
        (Some(4), Some("train"))
    );

    // Shards of another length are refused, naming the manifest.
    let d64 = f.root.join("gpt2-64");
    prepare_fixtures(&d64, 64, &["austen/persuasion/"]);
    let mut args = base.to_vec();
    args[5] = d64.to_str().unwrap();
    let e = fails(&args);
    assert!(
        e.contains("gpt2-64/manifest.json") && e.contains("length 64"),
        "{e}"
    );
}

#[test]
fn sample_decodes_text_and_reports_entropy() {
    let f = fixture();
    let out = f.root.join("samples.jsonl");
    let ema = f.ema();
    let stdout = ok(&[
        "sample",
        "--checkpoint",
        ema.to_str().unwrap(),
        "--steps",
        "8",
        "--num-samples",
        "3",
        "--batch",
        "2",
        "--decode",
        f.data.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let tok = Tokenizer::gpt2().unwrap();
    let mut ids = Vec::new();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for v in &lines {
        let t: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
        assert_eq!(t.len(), 32);
        assert_eq!(v["text"].as_str().unwrap(), tok.decode(&t, false).unwrap());
        ids.extend(t);
    }
    let h = mean_unigram_entropy(&Tokens {
        batch: 3,
        len: 32,
        ids,
    });
    assert!(h > 0.0 && h <= (32f64).ln() + 1e-12);
    assert!(
        stdout.contains(&format!("mean unigram entropy {h:.4} nats"))
            && stdout.contains("decoded with gpt2"),
        "{stdout}"
    );
    // A tokenizer name works too; one of another vocabulary is refused before sampling.
    let args = |decode: &'static str| -> Vec<String> {
        [
            "sample",
            "--checkpoint",
            ema.to_str().unwrap(),
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
            "--force",
            "--decode",
            decode,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let o = bin().args(args("gpt2:clean")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin().args(args("bert")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("V=30522") && e.contains("V=50258"),
        "{e}"
    );
}

#[test]
fn plot_draws_runs() {
    let f = fixture();
    let png = f.root.join("both.png");
    let runs = [f.run.to_str().unwrap(), f.run.to_str().unwrap()];
    let out = ok(&[
        "plot",
        runs[0],
        runs[1],
        "--out",
        png.to_str().unwrap(),
        "--log-y",
    ]);
    assert!(out.contains("wrote") && out.contains("points"), "{out}");
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    assert!(fails(&["plot", runs[0], runs[1]]).contains("--out"));
    let e = fails(&["plot", f.data.to_str().unwrap()]);
    assert!(e.contains("metrics.jsonl"), "{e}");
}
