//! `imdm-engine distill redi-data | redi-train` end to end on the CPU.

use std::path::Path;
use std::process::{Command, Output};

use imdm_engine::distill::Couplings;
use imdm_engine::model::{checkpoint, Algo};

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn redi_data_then_train_an_imdm_student() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        d,
        &[
            "init",
            "--preset",
            "minimini",
            "--vocab",
            "17",
            "--length",
            "6",
            "--algo",
            "mdlm",
            "--out",
            "m.safetensors",
        ],
    );
    let data = |out: &str, coupling: &str| {
        ok(
            d,
            &[
                "distill",
                "redi-data",
                "--checkpoint",
                "m.safetensors",
                "--data",
                "synthetic",
                "--pairs",
                "64",
                "--steps",
                "8",
                "--batch",
                "32",
                "--coupling",
                coupling,
                "--perturbed-frac",
                "0.5",
                "--device",
                "cpu",
                "--out",
                out,
            ],
        )
    };
    data("a.safetensors", "sample");
    data("b.safetensors", "sample");
    data("o.safetensors", "ot");
    // Reproducible, and well formed: x0 keeps every unmasked x_T token, and only masked
    // positions were generated (no mask left).
    assert_eq!(
        std::fs::read(d.join("a.safetensors")).unwrap(),
        std::fs::read(d.join("b.safetensors")).unwrap()
    );
    for f in ["a.safetensors", "o.safetensors"] {
        let p = Couplings::load(d.join(f), 17).unwrap();
        assert_eq!((p.len(), p.xt.len), (64, 6));
        for (x, y) in p.xt.ids.iter().zip(&p.x0.ids) {
            assert!(*y != 16, "{f}: x0 holds a mask");
            assert!(*x == 16 || x == y, "{f}: a kept x_T token changed");
        }
        assert!(
            p.t.iter().any(|&t| t == 1.0) && p.t.iter().any(|&t| t < 1.0),
            "{f}: {:?}",
            p.t
        );
    }
    let text = ok(
        d,
        &[
            "distill",
            "redi-train",
            "--init",
            "m.safetensors",
            "--imdm",
            "--pairs",
            "a.safetensors",
            "--steps",
            "10",
            "--batch",
            "16",
            "--lr",
            "1e-3",
            "--warmup",
            "2",
            "--ema",
            "0.9",
            "--device",
            "cpu",
            "--out",
            "s.safetensors",
        ],
    );
    assert!(
        text.contains("step 10/10") && text.contains("EMA"),
        "{text}"
    );
    let s = checkpoint::load(d.join("s.safetensors"), None).unwrap();
    assert_eq!(s.config.algo, Algo::Imdm);
    assert!(s.eps_mlp.is_some());
    // Bad input names its flag or file.
    let e = fails(
        d,
        &[
            "distill",
            "redi-train",
            "--init",
            "m.safetensors",
            "--pairs",
            "a.safetensors",
            "--batch",
            "65",
            "--device",
            "cpu",
            "--out",
            "x.safetensors",
        ],
    );
    assert!(e.contains("batch 65"), "{e}");
    let e = fails(
        d,
        &[
            "distill",
            "redi-data",
            "--checkpoint",
            "m.safetensors",
            "--data",
            "synthetic",
            "--perturbed-frac",
            "2",
            "--out",
            "x.safetensors",
        ],
    );
    assert!(e.contains("--perturbed-frac"), "{e}");
    let e = fails(
        d,
        &[
            "distill",
            "redi-train",
            "--init",
            "m.safetensors",
            "--pairs",
            "missing.safetensors",
            "--device",
            "cpu",
            "--out",
            "x.safetensors",
        ],
    );
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn redi_stages_take_a_run_directory_and_train_with_micro_batches_dropout_and_validation() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        d,
        &[
            "train",
            "--preset",
            "minimini",
            "--vocab",
            "17",
            "--length",
            "6",
            "--algo",
            "mdlm",
            "--data",
            "synthetic",
            "--batch",
            "4",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--eval-size",
            "0",
            "--device",
            "cpu",
            "--quiet",
            "--run-dir",
            "run",
        ],
    );
    let text = ok(
        d,
        &[
            "distill",
            "redi-data",
            "--checkpoint",
            "run",
            "--data",
            "synthetic",
            "--pairs",
            "40",
            "--steps",
            "4",
            "--batch",
            "20",
            "--device",
            "cpu",
            "--out",
            "p.safetensors",
        ],
    );
    assert!(
        text.contains("checkpoints/step-00000003/ema.safetensors"),
        "{text}"
    );
    let train = |extra: &[&str]| {
        let mut args = vec![
            "distill",
            "redi-train",
            "--init",
            "run",
            "--imdm",
            "--pairs",
            "p.safetensors",
            "--steps",
            "4",
            "--batch",
            "8",
            "--micro-batch",
            "4",
            "--dropout",
            "0.1",
            "--valid-frac",
            "0.2",
            "--eval-every",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        ok(d, &args)
    };
    let text = train(&["--metrics", "m.jsonl", "--out", "s.safetensors"]);
    // 40 couplings, the last 8 held out; the run's 3 EMA updates carry over.
    assert!(
        text.contains("32 training couplings, 8 held out")
            && text.contains("dropout 0.1")
            && text.contains("from update 3"),
        "{text}"
    );
    assert!(
        text.contains("valid step 2") && text.contains("valid step 4"),
        "{text}"
    );
    let m = std::fs::read_to_string(d.join("m.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "final");
    assert!(last["val_nelbo"].as_f64().unwrap() > 0.0, "{m}");
    assert!(last["loss"].as_f64().unwrap() > 0.0, "{m}");
    let s = checkpoint::load(d.join("s.safetensors"), None).unwrap();
    assert_eq!((s.config.algo, s.config.dropout), (Algo::Imdm, 0.1));
    let text = train(&["--ema-warmup", "fresh", "--out", "f.safetensors"]);
    assert!(text.contains("from update 0"), "{text}");
    // Bad flags are named.
    let e = fails(
        d,
        &[
            "distill",
            "redi-train",
            "--init",
            "run",
            "--pairs",
            "p.safetensors",
            "--batch",
            "8",
            "--micro-batch",
            "3",
            "--out",
            "x.safetensors",
        ],
    );
    assert!(e.contains("--micro-batch 3"), "{e}");
    let e = fails(
        d,
        &[
            "distill",
            "redi-train",
            "--init",
            "run",
            "--pairs",
            "p.safetensors",
            "--dropout",
            "1.5",
            "--out",
            "x.safetensors",
        ],
    );
    assert!(e.contains("--dropout 1.5"), "{e}");
    let e = fails(
        d,
        &[
            "distill",
            "redi-data",
            "--checkpoint",
            "m.jsonl.missing",
            "--data",
            "synthetic",
            "--out",
            "x.safetensors",
        ],
    );
    assert!(e.contains("--checkpoint m.jsonl.missing"), "{e}");
    assert!(!d.join("x.safetensors").exists());
}
