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
