//! `imdm-engine train` through the binary: flag errors that name the flag, the run-directory
//! layout, `--init` fine-tuning from an MDLM checkpoint, and a run killed with SIGKILL then
//! resumed that ends bit-identical to an uninterrupted run. The hidden `--objective
//! linear-softmax` (an analytic stand-in for the DiT) keeps these fast and independent of the
//! CPU DiT.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::first_init_loss;
use imdm_engine::model::{checkpoint, init::random_params, Algo, DitConfig, NoiseType, Preset};
use safetensors::SafeTensors;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
}

fn run(args: &[&str]) -> Output {
    bin().arg("train").args(args).output().expect("binary runs")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

/// A toy-sized model and run; `extra` appends or overrides flags.
fn toy<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--preset",
        "minimini",
        "--vocab",
        "17",
        "--length",
        "6",
        "--hidden",
        "8",
        "--blocks",
        "1",
        "--cond-dim",
        "4",
        "--data",
        "synthetic",
        "--batch",
        "8",
        "--micro-batch",
        "4",
        "--steps",
        "6",
        "--warmup",
        "2",
        "--eval-size",
        "8",
        "--objective",
        "linear-softmax",
        "--quiet",
        "--run-dir",
        dir,
    ];
    // Flags in `extra` replace the defaults above; others are appended.
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let has_value = i + 1 < extra.len() && !extra[i + 1].starts_with("--");
        match v.iter().position(|&x| x == flag) {
            Some(j) if has_value => v[j + 1] = extra[i + 1],
            _ => {
                v.push(flag);
                if has_value {
                    v.push(extra[i + 1]);
                }
            }
        }
        i += 1 + has_value as usize;
    }
    v
}

#[test]
fn help_explains_training() {
    let o = bin().args(["train", "--help"]).output().unwrap();
    let h = String::from_utf8(o.stdout).unwrap();
    for want in [
        "--micro-batch",
        "--resume",
        "--init",
        "--eval-every",
        "--save-every",
        "metrics.jsonl",
        "latest.json",
        "bit for bit",
        "EMA",
    ] {
        assert!(h.contains(want), "--help lacks {want:?}");
    }
    assert!(!h.contains("--objective"), "the testing aid stays hidden");
}

#[test]
fn bad_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("r");
    let d = d.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--preset", "minimini", "--data", "synthetic"],
            "--run-dir",
        ),
        (
            toy(d, &["--batch", "10"]),
            "--batch 10 must be a multiple of --micro-batch 4",
        ),
        (
            toy(d, &["--data", "wiki"]),
            "--data wiki: expected `synthetic` or `tokens:PATH`",
        ),
        (
            toy(d, &["--data", "tokens:/no/such.u16"]),
            "/no/such.u16 does not exist",
        ),
        // The toy's head dim (8 / 2) has no GPU kernel: refused before any device is opened,
        // so the message is the same with or without a GPU.
        (
            toy(d, &["--device", "cuda", "--objective", "dit"]),
            "--device cuda: head dim 4",
        ),
        (toy(d, &["--device", "cuda"]), "runs on the CPU only"),
        (
            toy(d, &["--algo", "sedd", "--device", "cuda"]),
            "the sedd baseline trains on the CPU",
        ),
        (toy(d, &["--ar", "--algo", "mdlm"]), "--ar"),
        (toy(d, &["--lr=-1"]), "--lr -1"),
        (toy(d, &["--ema", "1.5"]), "--ema 1.5"),
        (
            toy(d, &["--hidden", "9"]),
            "hidden 9 must be a positive multiple of heads 2",
        ),
        (
            toy(d, &["--init", "/no/such.safetensors"]),
            "/no/such.safetensors",
        ),
        (
            vec!["--data", "synthetic", "--run-dir", d],
            "needs --preset",
        ),
        (vec!["--resume", d], "not a run directory"),
    ];
    for (args, want) in cases {
        let e = fails(&args);
        assert!(e.contains(want), "{args:?}: {e:?} lacks {want:?}");
    }
    // A file without a dtype extension needs --token-dtype.
    let f = tmp.path().join("toks.bin");
    std::fs::write(&f, [0u8; 50]).unwrap();
    let data = format!("tokens:{}", f.display());
    let e = fails(&toy(d, &["--data", &data]));
    assert!(e.contains("--token-dtype"), "{e}");
    // A file of the wrong size names the file and the expectation.
    let e = fails(&toy(d, &["--data", &data, "--token-dtype", "u32"]));
    assert!(e.contains("toks.bin") && e.contains("whole number"), "{e}");
}

#[test]
fn run_directory_layout_and_resume_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("run");
    let ds = d.to_str().unwrap();
    let out = ok(&toy(ds, &["--save-every", "2"]));
    assert!(out.contains("done: 6 steps"), "{out}");
    for f in ["config.json", "metrics.jsonl", "latest.json"] {
        assert!(d.join(f).is_file(), "{f}");
    }
    let ck = d.join("checkpoints/step-00000006");
    for f in [
        "model.safetensors",
        "ema.safetensors",
        "optim.safetensors",
        "state.json",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    assert!(d.join("checkpoints/step-00000004").is_dir());
    assert!(!d.join("checkpoints/step-00000002").exists(), "keep 2");
    // The EMA file is a loadable model with the run's config.
    let ema = checkpoint::load(ck.join("ema.safetensors"), None).unwrap();
    assert_eq!(ema.config.vocab_size, 17);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["train"]["batch"], 8);
    assert_eq!(cfg["model"]["hidden"], 8);
    // The metrics: train entries with the documented fields, validation at the end.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train = lines.iter().find(|v| v["kind"] == "train").unwrap();
    for k in ["step", "loss", "lr", "grad_norm", "tok_per_s", "elapsed_s"] {
        assert!(train.get(k).is_some(), "metrics lack {k}");
    }
    let val = lines.last().unwrap();
    assert_eq!(
        (val["kind"].as_str(), val["step"].as_u64()),
        (Some("val"), Some(6))
    );
    assert!(val["val_ppl"].as_f64().unwrap() > 1.0);

    // The directory now holds a run.
    assert!(fails(&toy(ds, &[])).contains("already holds a run"));
    // --resume refuses flags that would change the trajectory, and model flags.
    let e = fails(&["--resume", ds, "--lr", "0.5", "--seed", "3"]);
    assert!(e.contains("--lr 0.5") && e.contains("--seed 3"), "{e}");
    assert!(fails(&["--resume", ds, "--preset", "tiny"]).contains("model flags"));
    assert!(fails(&["--resume", ds, "--objective", "dit"]).contains("--objective"));
    // ...and accepts a longer run.
    let out = ok(&[
        "--resume",
        ds,
        "--steps",
        "8",
        "--objective",
        "linear-softmax",
    ]);
    assert!(
        out.contains("resuming") && out.contains("done: 8 steps"),
        "{out}"
    );
    // A finished run resumed again does nothing; --steps below its step is refused.
    let before = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let out = ok(&["--resume", ds]);
    assert!(out.contains("done: 8 steps"), "{out}");
    assert_eq!(
        std::fs::read_to_string(d.join("metrics.jsonl")).unwrap(),
        before
    );
    let e = fails(&["--resume", ds, "--steps", "3"]);
    assert!(e.contains("--steps 3 is below the step 8"), "{e}");
}

#[test]
fn init_from_an_mdlm_checkpoint_grafts_the_eps_mlp() {
    let tmp = tempfile::tempdir().unwrap();
    let mdlm = DitConfig {
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
        algo: Algo::Mdlm,
        noise_dim: 8,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    };
    let src = random_params(&mdlm, 1);
    let file = tmp.path().join("mdlm.safetensors");
    checkpoint::save(&file, &src).unwrap();
    let d = tmp.path().join("ft");
    let args = [
        "--init",
        file.to_str().unwrap(),
        "--algo",
        "imdm",
        "--data",
        "synthetic",
        "--batch",
        "4",
        "--steps",
        "1",
        "--save-every",
        "0",
        "--eval-size",
        "0",
        "--objective",
        "linear-softmax",
        "--run-dir",
        d.to_str().unwrap(),
    ];
    ok(&args);
    let p0 = checkpoint::load(d.join("checkpoints/step-00000000/model.safetensors"), None).unwrap();
    assert_eq!(p0.config.algo, Algo::Imdm);
    assert_eq!(p0.embedding, src.embedding);
    assert_eq!(p0.blocks, src.blocks);
    let e = p0.eps_mlp.unwrap();
    assert!(e.fc2.weight.data.iter().all(|&x| x == 0.0));
    assert!(e.fc1.weight.data.iter().any(|&x| x != 0.0));
}

/// Spec 2.6: an IMDM initialised from a reference-format MDLM checkpoint computes exactly the
/// MDLM (the grafted eps MLP ends in a zero layer), and its masks do not depend on the ε draws
/// (separate streams), so its first loss equals the MDLM run's bit for bit. A checkpoint with
/// a non-zero last eps layer must differ, or the test could not fail.
#[test]
fn init_from_mdlm_starts_at_the_mdlm_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = DitConfig::preset(Preset::Minimini);
    (c.vocab_size, c.mask_index, c.length, c.hidden, c.heads) = (17, 16, 6, 8, 2);
    (c.blocks, c.cond_dim, c.noise_dim, c.algo) = (1, 4, 8, Algo::Mdlm);
    let mdlm = random_params(&c, 1);
    let file = tmp.path().join("mdlm.safetensors");
    checkpoint::save(&file, &mdlm).unwrap();
    let l_mdlm = first_init_loss(&file, "mdlm", "cpu", tmp.path());
    let l_imdm = first_init_loss(&file, "imdm", "cpu", tmp.path());
    assert!(l_mdlm.is_finite() && l_mdlm > 0.0, "{l_mdlm}");
    assert_eq!(
        l_imdm.to_bits(),
        l_mdlm.to_bits(),
        "imdm {l_imdm} vs mdlm {l_mdlm}"
    );

    // The same weights plus an eps MLP with a non-zero last layer.
    c.algo = Algo::Imdm;
    let mut imdm = random_params(&c, 2);
    let src: BTreeMap<String, _> = mdlm.named().into_iter().collect();
    for (name, slot) in imdm.named_mut() {
        if let Some(t) = src.get(&name) {
            slot.data.copy_from_slice(&t.data);
        }
    }
    assert!(imdm
        .eps_mlp
        .as_ref()
        .unwrap()
        .fc2
        .weight
        .data
        .iter()
        .any(|&x| x != 0.0));
    let file2 = tmp.path().join("imdm.safetensors");
    checkpoint::save(&file2, &imdm).unwrap();
    let l_eps = first_init_loss(&file2, "imdm", "cpu", &tmp.path().join("live"));
    assert_ne!(l_eps, l_mdlm);
}

/// Tensors (dtype, shape, bytes) and metadata of a safetensors file, in sorted order (the
/// header's JSON order is not canonical).
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

fn latest_step(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("latest.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

/// Kill a real CPU-DiT run with SIGKILL after its checkpoint of step >= 20, resume it: the metrics and the
/// final checkpoint files equal those of an uninterrupted run.
#[test]
fn sigkill_then_resume_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let args = |dir: &Path| -> Vec<String> {
        [
            "train",
            "--preset",
            "minimini",
            "--vocab",
            "400",
            "--length",
            "32",
            "--hidden",
            "32",
            "--blocks",
            "1",
            "--cond-dim",
            "8",
            "--data",
            "synthetic",
            "--batch",
            "32",
            "--micro-batch",
            "8",
            "--steps",
            "200",
            "--lr",
            "1e-2",
            "--warmup",
            "5",
            "--log-every",
            "1",
            "--eval-every",
            "10",
            "--eval-size",
            "16",
            "--save-every",
            "5",
            "--quiet",
            "--run-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.display().to_string()])
        .collect()
    };
    let o = bin().args(args(&a)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut child = bin()
        .args(args(&b))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if latest_step(&b).is_some_and(|s| s >= 20) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before it could be killed; make it longer"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = latest_step(&b).unwrap();
    assert!(killed_at < 200, "killed at {killed_at}");

    let o = bin()
        .args(["train", "--resume", b.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("resuming"), "{out}");

    let trajectory = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                ["kind", "step", "loss", "lr", "grad_norm", "val_nelbo"]
                    .map(|k| v.get(k).map_or("-".into(), |x| x.to_string()))
                    .join(" ")
            })
            .collect()
    };
    assert_eq!(trajectory(&a), trajectory(&b));
    for f in ["model.safetensors", "ema.safetensors", "optim.safetensors"] {
        let p = format!("checkpoints/step-00000200/{f}");
        assert!(
            contents(&a.join(&p)) == contents(&b.join(&p)),
            "{f} differs after the resume"
        );
    }
}
