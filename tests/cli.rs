//! The `imdm-engine` binary end to end: parameter counts of `init` + `info --json` against
//! spec 2.5, errors with non-zero exits, and the `forward` entry point.

mod common;

use common::cli::{fails, ok};

use std::path::Path;

fn params_of(path: &Path) -> u64 {
    let js: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--json", path.to_str().unwrap()])).unwrap();
    js["params"].as_u64().unwrap()
}

/// Spec 2.5's totals, through the CLI: init writes the model, info --json counts it.
#[test]
fn init_and_info_parameter_counts_match_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], u64)] = &[
        (&["--preset", "small", "--noise-dim", "2048"], 178_281_042),
        (&["--preset", "small", "--algo", "mdlm"], 169_627_218),
        (
            &[
                "--preset",
                "small",
                "--vocab",
                "30522",
                "--mask-index",
                "103",
            ],
            144_014_650,
        ),
        (&["--preset", "tiny"], 34_314_322),
        (&["--preset", "synthetic"], 14_250_705),
        (&["--preset", "large", "--noise-dim", "2048"], 885_184_338),
    ];
    for (i, (flags, want)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("m{i}.safetensors"));
        let mut args = vec!["init"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        ok(&args);
        assert_eq!(params_of(&out), *want, "{flags:?}");
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn info_prints_groups_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mm.safetensors");
    ok(&[
        "init",
        "--preset",
        "minimini",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = ok(&["info", out.to_str().unwrap()]);
    for want in ["minimini", "vocab_embed.imdm_mlp", "blocks", "F32"] {
        assert!(text.contains(want), "info output lacks {want}:\n{text}");
    }
}

#[test]
fn bad_input_exits_non_zero_with_a_named_cause() {
    let e = fails(&["info", "/no/such/model.safetensors"]);
    assert!(e.contains("/no/such/model.safetensors"), "{e}");
    let e = fails(&[
        "init",
        "--preset",
        "tiny",
        "--vocab",
        "1",
        "--out",
        "/tmp/x.safetensors",
    ]);
    assert!(e.contains("vocab_size 1"), "{e}");
    let e = fails(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        "/no/such/dir/x.safetensors",
    ]);
    assert!(e.contains("--out") && e.contains("/no/such/dir"), "{e}");
    let e = fails(&["init", "--preset", "huge", "--out", "x.safetensors"]);
    assert!(e.contains("huge"), "{e}");
}

/// A miniature of the whole experiment (seconds, not minutes): every stage runs, the table
/// lists every model, and --out writes synthetic.json in the documented shape plus the plot.
#[test]
fn demo_runs_every_stage_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let text = ok(&[
        "demo",
        "--base-steps",
        "6",
        "--student-steps",
        "4",
        "--rounds",
        "2",
        "--pairs",
        "256",
        "--samples",
        "16",
        "--eval-steps",
        "1,2",
        "--sdtt-steps-per-round",
        "2",
        "--sdtt-redi-rounds",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    for model in [
        "mdlm",
        "imdm",
        "mdm_redi",
        "imdm_redi_r1",
        "imdm_redi_r2",
        "mdlm_sdtt",
        "imdm_sdtt",
        "imdm_sdtt_redi",
    ] {
        assert!(text.contains(model), "table lacks {model}:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("synthetic.json")).unwrap())
            .unwrap();
    for model in [
        "mdlm",
        "imdm",
        "mdm_redi",
        "imdm_redi",
        "imdm_redi_r1",
        "imdm_redi_r2",
        "mdlm_sdtt",
        "imdm_sdtt",
        "imdm_sdtt_redi",
    ] {
        for steps in ["1", "2"] {
            let cell = &json[model][steps];
            let em = cell["exact_match"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&em), "{model} {steps}: {cell}");
            assert_eq!(
                cell["samples"].as_u64(),
                Some(16),
                "{model} {steps}: {cell}"
            );
            let distinct = cell["distinct"].as_u64().unwrap();
            assert!((1..=16).contains(&distinct), "{model} {steps}: {cell}");
            assert!(
                cell["tc"].as_f64().unwrap() >= 0.0,
                "{model} {steps}: {cell}"
            );
        }
    }
    assert_eq!(json["config"]["vocab"].as_u64(), Some(64));
    assert_eq!(json["config"]["length"].as_u64(), Some(8));
    assert_eq!(json["config"]["rounds"].as_u64(), Some(2));
    let png = std::fs::read(out.join("exact_match.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    // Bad flags name themselves.
    let e = fails(&["demo", "--student-top-p", "0"]);
    assert!(e.contains("--student-top-p"), "{e}");
    let e = fails(&["demo", "--rounds", "0"]);
    assert!(e.contains("round"), "{e}");
}

#[test]
fn forward_writes_logits_and_log_probs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    ok(&[
        "init",
        "--preset",
        "minimini",
        "--out",
        model.to_str().unwrap(),
    ]);
    // Tokens (2, 3) with masks, no eps: it is drawn from --seed.
    let ids: Vec<i64> = vec![50000, 5, 50000, 7, 50000, 50000];
    let input = dir.path().join("in.safetensors");
    let bytes: &[u8] = bytemuck::cast_slice(&ids);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, 3], bytes).unwrap();
    safetensors::tensor::serialize_to_file(vec![("tokens", view)], None, &input).unwrap();
    let out = dir.path().join("out.safetensors");
    let args = [
        "forward",
        "--checkpoint",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    ok(&args);
    let (t, _) = common::read_raw(&out);
    let names: Vec<&str> = t.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["eps", "log_probs", "logits", "tokens"]);
    assert_eq!(t[2].2, vec![2, 3, 50001]);
    // Same seed, same tensors; the carried-over position is exactly 0 at its token.
    let mut args = args.to_vec();
    args.push("--force"); // the first run's output exists
    ok(&args);
    let (again, _) = common::read_raw(&out);
    assert!(
        t == again,
        "a second run with the same seed gave different tensors"
    );
    let lp: &[f32] = bytemuck::cast_slice(&t[1].3);
    assert_eq!(lp[50001 + 5], 0.0);
    // A token outside the vocabulary is rejected with the input named.
    let bad: Vec<i64> = vec![60000, 5, 5, 5, 5, 5];
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::I64,
        vec![2, 3],
        bytemuck::cast_slice(&bad),
    )
    .unwrap();
    safetensors::tensor::serialize_to_file(vec![("tokens", view)], None, &input).unwrap();
    let e = fails(&args);
    assert!(e.contains("in.safetensors") && e.contains("60000"), "{e}");
}
