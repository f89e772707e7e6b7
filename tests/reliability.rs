//! Nothing lost, nothing silently wrong, through the real binary: outputs never replace inputs
//! or existing files, run directories are locked, non-finite values and corrupt files are
//! refused, a closed stdout does not stop long work, a run without a checkpoint restarts in
//! place, sizes and flags are checked before the work, and messages name what is at fault.
//! Runs use the hidden `--objective linear-softmax` (an analytic stand-in for the DiT) where
//! the DiT itself does not matter, so they take milliseconds per step.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{read_raw, write_raw, Raw};
use rand::{Rng, SeedableRng};
use safetensors::tensor::Dtype;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
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

/// Runs `args`, which must fail with exit status 1 (an error, not a panic or an abort), and
/// returns stderr.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?} should fail with status 1: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stderr).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A toy run (linear-softmax objective, V 17, L 6) into `dir`; `extra` overrides flags.
fn toy(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
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
        "--device",
        "cpu",
        "--quiet",
        "--run-dir",
        s(dir),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let has_value = i + 1 < extra.len() && !extra[i + 1].starts_with("--");
        match v.iter().position(|x| x == flag) {
            Some(j) if has_value => v[j + 1] = extra[i + 1].to_string(),
            Some(_) => {}
            None => {
                v.push(flag.to_string());
                if has_value {
                    v.push(extra[i + 1].to_string());
                }
            }
        }
        i += 1 + has_value as usize;
    }
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn latest_step(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("latest.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

fn latest_dir(dir: &Path) -> PathBuf {
    let s = std::fs::read_to_string(dir.join("latest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    dir.join(v["dir"].as_str().unwrap())
}

/// The tensors (name, dtype, shape, bytes) of every safetensors file of the latest checkpoint.
fn final_weights(dir: &Path) -> BTreeMap<String, Vec<Raw>> {
    let ck = latest_dir(dir);
    ["model", "ema", "optim"]
        .iter()
        .map(|f| {
            let (t, _) = read_raw(&ck.join(format!("{f}.safetensors")));
            (f.to_string(), t)
        })
        .collect()
}

/// (kind, step) -> loss or val_nelbo of `metrics.jsonl`; duplicates are an error.
fn metrics(dir: &Path) -> BTreeMap<(String, u64), f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        let step = v["step"].as_u64().unwrap();
        let x = v["loss"].as_f64().or(v["val_nelbo"].as_f64()).unwrap();
        assert!(
            m.insert((kind.clone(), step), x).is_none(),
            "duplicate {kind} row at step {step}"
        );
    }
    m
}

fn no_tmp_left(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".tmp"), "leftover {}", e.path().display());
    }
}

/// A small IMDM model file (V 17, L 6) written by `init`.
fn model(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    ok(&[
        "init",
        "--preset",
        "minimini",
        "--vocab",
        "17",
        "--length",
        "6",
        "--noise-dim",
        "8",
        "--out",
        s(&p),
    ]);
    p
}

/// Rewrites `src` into `dst` with `f` applied to tensor `name`'s f32 values; the checksum is
/// dropped (as another tool would), so only the value checks can object.
fn tamper(src: &Path, dst: &Path, name: &str, f: impl Fn(&mut [f32])) {
    let (mut t, mut meta) = read_raw(src);
    meta.remove("checksum");
    let e = t.iter_mut().find(|e| e.0 == name).expect("tensor exists");
    let mut vals: Vec<f32> = bytemuck::pod_collect_to_vec(&e.3);
    f(&mut vals);
    e.3 = bytemuck::cast_slice(&vals).to_vec();
    write_raw(dst, &t, Some(meta));
}

/// `forward` input: all-mask tokens (B 2, L `len`), and optionally an eps tensor.
fn forward_input(path: &Path, len: usize, eps: Option<f32>) {
    let ids: Vec<i64> = vec![16; 2 * len];
    let mut t: Vec<Raw> = vec![(
        "tokens".into(),
        Dtype::I64,
        vec![2, len],
        bytemuck::cast_slice(&ids).to_vec(),
    )];
    if let Some(x) = eps {
        let e = vec![x; 2 * len * 8];
        t.push((
            "eps".into(),
            Dtype::F32,
            vec![2, len, 8],
            bytemuck::cast_slice(&e).to_vec(),
        ));
    }
    write_raw(path, &t, None);
}

// 1. Outputs never replace inputs or existing files; temporary files are exclusive.
#[test]
fn outputs_never_replace_inputs_or_existing_files() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m.safetensors");
    let before = std::fs::read(&m).unwrap();
    let init = |force: bool| {
        let mut v = vec![
            "init", "--preset", "minimini", "--vocab", "17", "--length", "6",
        ];
        v.extend(["--noise-dim", "8", "--seed", "5", "--out", s(&m)]);
        if force {
            v.push("--force");
        }
        run(&v)
    };
    let o = init(false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists; pass --force"));
    assert_eq!(std::fs::read(&m).unwrap(), before, "init kept the file");
    let input = d.path().join("in.safetensors");
    forward_input(&input, 6, None);
    for args in [
        vec![
            "sample",
            "--checkpoint",
            s(&m),
            "--steps",
            "2",
            "--out",
            s(&m),
        ],
        vec![
            "forward",
            "--checkpoint",
            s(&m),
            "--input",
            s(&input),
            "--out",
            s(&m),
        ],
        vec![
            "forward",
            "--checkpoint",
            s(&m),
            "--input",
            s(&input),
            "--out",
            s(&input),
        ],
    ] {
        let mut a = args.clone();
        a.extend(["--device", "cpu", "--force"]);
        let e = fails(&a);
        assert!(e.contains("is the same file as"), "{a:?}: {e}");
    }
    assert_eq!(std::fs::read(&m).unwrap(), before, "the input is intact");
    assert!(init(true).status.success(), "--force replaces");
    assert_ne!(std::fs::read(&m).unwrap(), before);
    // A link planted at the old predictable temporary name is not followed.
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out = d.path().join("new.safetensors");
    std::os::unix::fs::symlink(&victim, d.path().join("new.safetensors.tmp")).unwrap();
    model(d.path(), "new.safetensors");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(out.is_file());
    // An existing sample output is kept unless --force.
    let samples = d.path().join("s.jsonl");
    std::fs::write(&samples, b"keep").unwrap();
    let e = fails(&[
        "sample",
        "--checkpoint",
        s(&m),
        "--steps",
        "2",
        "--out",
        s(&samples),
    ]);
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&samples).unwrap(), b"keep");
}

// 2. Two writers on one run directory: exactly one proceeds, the other names the lock.
#[test]
fn two_writers_on_one_run_directory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("run");
    let long = toy(
        &dir,
        &["--steps", "400", "--save-every", "1", "--log-every", "50"],
    );
    let mut first = bin()
        .args(strs(&long))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while latest_step(&dir).is_none_or(|s| s < 5) {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let new = run(&strs(&long));
    let resume = run(&["train", "--resume", s(&dir), "--quiet"]);
    let done = first.try_wait().unwrap().is_some();
    for o in [&new, &resume] {
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        if !done {
            assert!(
                e.contains("in use") && e.contains(".lock") && e.contains("pid"),
                "{e}"
            );
        }
    }
    assert!(
        !done,
        "the first run finished before the second writers; make it longer"
    );
    assert!(first.wait().unwrap().success());
    // The directory stays resumable; its log has one row per step.
    ok(&["train", "--resume", s(&dir), "--steps", "420", "--quiet"]);
    assert_eq!(latest_step(&dir), Some(420));
    let m = metrics(&dir);
    assert!(m.contains_key(&("train".into(), 420)));
    // Two new runs started at once on a fresh directory: exactly one succeeds.
    for trial in 0..3 {
        let dir = d.path().join(format!("race{trial}"));
        let args = toy(&dir, &["--steps", "200", "--save-every", "1"]);
        let a = bin()
            .args(strs(&args))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let b = bin()
            .args(strs(&args))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let wins = [&a, &b].iter().filter(|o| o.status.success()).count();
        assert_eq!(wins, 1, "trial {trial}: {a:?} {b:?}");
        ok(&["train", "--resume", s(&dir), "--steps", "201", "--quiet"]);
    }
}

// 3. Non-finite weights and eps are refused on load; outputs are checked; the last good
// checkpoint of a diverging run really is good.
#[test]
fn non_finite_values_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m.safetensors");
    let nan = d.path().join("nan.safetensors");
    tamper(&m, &nan, "blocks.0.attn_qkv.weight", |v| v[7] = f32::NAN);
    let out = d.path().join("out.safetensors");
    let input = d.path().join("in.safetensors");
    forward_input(&input, 6, None);
    let fwd = |ck: &Path, inp: &Path| {
        run(&[
            "forward",
            "--checkpoint",
            s(ck),
            "--input",
            s(inp),
            "--out",
            s(&out),
            "--device",
            "cpu",
        ])
    };
    for o in [
        fwd(&nan, &input),
        run(&[
            "sample",
            "--checkpoint",
            s(&nan),
            "--steps",
            "2",
            "--out",
            s(&out),
            "--device",
            "cpu",
        ]),
    ] {
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("blocks.0.attn_qkv.weight") && e.contains("element 7 is NaN"),
            "{e}"
        );
    }
    assert!(!out.exists());
    // Finite but huge weights: the forward overflows, nothing is written.
    let huge = d.path().join("huge.safetensors");
    tamper(&m, &huge, "blocks.0.attn_qkv.weight", |v| {
        for (i, x) in v.iter_mut().enumerate() {
            *x = if (i * 2_654_435_761) % 7 < 3 {
                3e38
            } else {
                -3e38
            };
        }
    });
    let o = fwd(&huge, &input);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("non-finite logits"), "{e}");
    let o = run(&[
        "sample",
        "--checkpoint",
        s(&huge),
        "--steps",
        "2",
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("probabilities are not finite"), "{e}");
    assert!(!out.exists());
    // NaN eps in the input.
    let bad_eps = d.path().join("eps.safetensors");
    forward_input(&bad_eps, 6, Some(f32::NAN));
    let e = String::from_utf8_lossy(&fwd(&m, &bad_eps).stderr).into_owned();
    assert!(
        e.contains("--input") && e.contains("eps: element 0 is NaN"),
        "{e}"
    );
    // train --init with a NaN file writes no step 0.
    let run_dir = d.path().join("init-nan");
    let e = fails(&[
        "train",
        "--init",
        s(&nan),
        "--data",
        "synthetic",
        "--batch",
        "4",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--quiet",
        "--run-dir",
        s(&run_dir),
    ]);
    assert!(e.contains("blocks.0.attn_qkv.weight"), "{e}");
    assert!(latest_step(&run_dir).is_none());
    // A diverging DiT run: it stops, and the checkpoint it keeps gives finite logits.
    let div = d.path().join("diverge");
    let mut args = toy(
        &div,
        &["--lr", "1e12", "--save-every", "1", "--steps", "30"],
    );
    let k = args.iter().position(|a| a == "--objective").unwrap();
    args.drain(k..k + 2);
    let e = fails(&strs(&args));
    assert!(
        e.contains("training stopped (the last good checkpoint is kept)"),
        "{e}"
    );
    let kept = latest_dir(&div).join("model.safetensors");
    let small_in = d.path().join("in17.safetensors");
    let ids: Vec<i64> = vec![16; 12];
    write_raw(
        &small_in,
        &[(
            "tokens".into(),
            Dtype::I64,
            vec![2, 6],
            bytemuck::cast_slice(&ids).to_vec(),
        )],
        None,
    );
    let o = fwd(&kept, &small_in);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (t, _) = read_raw(&out);
    let logits = &t.iter().find(|e| e.0 == "logits").unwrap().3;
    let vals: Vec<f32> = bytemuck::pod_collect_to_vec(logits);
    assert!(
        vals.iter().all(|x| x.is_finite()),
        "the kept checkpoint is good"
    );
}

fn closed_ok(status: std::process::ExitStatus) -> bool {
    status.success() || status.signal() == Some(libc_sigpipe())
}

fn libc_sigpipe() -> i32 {
    13
}

// 4. A closed stdout: long work finishes, short commands end quietly.
#[test]
fn a_closed_stdout_is_not_an_error() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("run");
    let mut args = toy(
        &dir,
        &["--steps", "60", "--log-every", "1", "--save-every", "20"],
    );
    args.retain(|a| a != "--quiet");
    // `train ... | head -1`
    let mut child = bin()
        .args(strs(&args))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("training"), "{line}");
    let status = child.wait().unwrap();
    assert!(status.success(), "train with a closed stdout: {status:?}");
    assert_eq!(
        latest_step(&dir),
        Some(60),
        "the final checkpoint is written"
    );
    assert!(metrics(&dir).contains_key(&("train".into(), 60)));
    // `info | head -0` and `data info --show 3 | head -0`: the reader is gone at once.
    let m = model(d.path(), "m.safetensors");
    let mut c = bin()
        .args(["info", s(&m)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let o = c.wait_with_output().unwrap();
    assert!(
        closed_ok(o.status),
        "{:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

// 5. A run that failed before its first checkpoint restarts in place.
#[test]
fn a_run_without_a_checkpoint_restarts_in_place() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    ok(&strs(&toy(&a, &["--save-every", "2"])));
    // b: a run whose step-0 checkpoint was never written (disk full, a kill).
    ok(&strs(&toy(&b, &["--save-every", "2"])));
    std::fs::remove_dir_all(b.join("checkpoints")).unwrap();
    std::fs::create_dir(b.join("checkpoints")).unwrap();
    std::fs::remove_file(b.join("latest.json")).unwrap();
    let o = run(&["train", "--resume", s(&b), "--quiet"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("no checkpoint yet; starting the run again from step 0"),
        "{e}"
    );
    assert_eq!(final_weights(&a), final_weights(&b));
    assert_eq!(metrics(&a), metrics(&b));
}

// 6a. Output paths, sizes and flag ranges are checked before the work.
#[test]
fn outputs_sizes_and_ranges_are_checked_first() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m.safetensors");
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let x = d.path().join("x");
    let x = s(&x);
    let nested = file.join("out.jsonl");
    let e = fails(&[
        "sample",
        "--checkpoint",
        s(&m),
        "--steps",
        "2",
        "--out",
        s(&nested),
    ]);
    assert!(e.contains("--out") && e.contains("does not exist"), "{e}");
    for (args, want) in [
        (
            vec!["demo", "--out", s(&file)],
            "is a file; expected a directory",
        ),
        (vec!["demo", "--perturbed-frac", "2"], "--perturbed-frac"),
        (vec!["demo", "--ot-batch", "0"], "--ot-batch"),
        (
            vec![
                "init",
                "--preset",
                "minimini",
                "--length",
                "4000000000",
                "--out",
                x,
            ],
            "length",
        ),
        (
            vec![
                "init",
                "--preset",
                "minimini",
                "--vocab",
                "4000000000",
                "--out",
                x,
            ],
            "vocab",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                s(&m),
                "--steps",
                "2",
                "--length",
                "7",
                "--out",
                x,
            ],
            "more than the model's length 6",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?} started working");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    let dir = d.path().join("run");
    let e = fails(&strs(&toy(
        &dir,
        &["--batch", "100000000", "--micro-batch", "100000000"],
    )));
    assert!(
        e.contains("--micro-batch 100000000") && e.contains("bytes"),
        "{e}"
    );
    assert!(!dir.exists(), "nothing written");
    let input = d.path().join("in.safetensors");
    forward_input(&input, 7, None);
    let e = fails(&[
        "forward",
        "--checkpoint",
        s(&m),
        "--input",
        s(&input),
        "--out",
        x,
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("--input") && e.contains("more than the model's length 6"),
        "{e}"
    );
    // data prepare: an empty split is refused and nothing is written.
    let text = d.path().join("t.txt");
    std::fs::write(&text, "just a few words").unwrap();
    let shards = d.path().join("shards");
    let e = fails(&[
        "data",
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        s(&text),
        "--out",
        s(&shards),
        "--length",
        "8",
        "--quiet",
    ]);
    assert!(e.contains("split would hold no sequences"), "{e}");
    assert!(!shards.join("manifest.json").exists());
}

/// Flips the low bit of `n` bytes spread over `path`'s last half (tensor data).
fn flip_bits(path: &Path, n: usize) {
    let mut b = std::fs::read(path).unwrap();
    let len = b.len();
    for k in 0..n {
        let i = len / 2 + k * (len / 2 - 1) / n.max(1);
        b[i] ^= 1;
    }
    std::fs::write(path, b).unwrap();
}

// 6b. Corrupt checkpoints and shards are detected where they are used.
#[test]
fn corrupt_files_are_detected() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m.safetensors");
    flip_bits(&m, 1000);
    let out = d.path().join("s.jsonl");
    for args in [
        vec![
            "sample",
            "--checkpoint",
            s(&m),
            "--steps",
            "2",
            "--out",
            s(&out),
            "--device",
            "cpu",
        ],
        vec!["info", s(&m)],
    ] {
        let e = fails(&args);
        assert!(e.contains("does not match its checksum"), "{args:?}: {e}");
    }
    // A changed shard byte stops `train` and `eval`.
    let shards = d.path().join("shards");
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        s(&common::fixtures().join("text")),
        "--out",
        s(&shards),
        "--length",
        "32",
        "--heldout-prefix",
        "austen/persuasion/",
        "--heldout-frac",
        "0",
        "--quiet",
    ]);
    let data = format!("shards:{}", shards.display());
    let args = toy(&d.path().join("run"), &["--data", &data]);
    let mut good = args.clone();
    let k = good.iter().position(|a| a == "--vocab").unwrap();
    good.drain(k..k + 4); // --vocab 17 --length 6: the shards define V and L
    ok(&strs(&good));
    let shard = shards.join("train-00000.bin");
    let mut b = std::fs::read(&shard).unwrap();
    b[100] ^= 0x01;
    std::fs::write(&shard, b).unwrap();
    let mut again = good.clone();
    let r = again.iter().position(|a| a == "--run-dir").unwrap();
    again[r + 1] = s(&d.path().join("run2")).to_string();
    let e = fails(&strs(&again));
    assert!(e.contains("train-00000.bin") && e.contains("sha256"), "{e}");
    let ema = latest_dir(&d.path().join("run")).join("ema.safetensors");
    let valid = shards.join("valid-00000.bin");
    let mut b = std::fs::read(&valid).unwrap();
    b[10] ^= 0x01;
    std::fs::write(&valid, b).unwrap();
    let e = fails(&[
        "eval",
        "ppl",
        "--checkpoint",
        s(&ema),
        "--data",
        s(&shards),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("valid-00000.bin") && e.contains("sha256"), "{e}");
}

// 6c. latest.json may not leave the run; a corrupt latest checkpoint falls back to the newest
// complete one, and the run still ends bit-identical to an uninterrupted one.
#[test]
fn resume_never_leaves_the_run_and_survives_a_corrupt_latest_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    ok(&strs(&toy(&a, &["--steps", "8", "--save-every", "2"])));
    ok(&strs(&toy(
        &b,
        &["--save-every", "2", "--keep-checkpoints", "3"],
    )));
    let latest = b.join("latest.json");
    let good = std::fs::read_to_string(&latest).unwrap();
    std::fs::write(&latest, r#"{"step": 6, "dir": "../../../../etc"}"#).unwrap();
    let o = run(&["train", "--resume", s(&b), "--steps", "6", "--quiet"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("refusing to follow it"), "{e}");
    std::fs::write(&latest, good).unwrap();
    flip_bits(&b.join("checkpoints/step-00000006/model.safetensors"), 1000);
    let o = run(&["train", "--resume", s(&b), "--steps", "8", "--quiet"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("does not match its checksum") && e.contains("step-00000004"),
        "{e}"
    );
    assert_eq!(final_weights(&a), final_weights(&b));
    assert_eq!(metrics(&a), metrics(&b));
    no_tmp_left(&b.join("checkpoints"));
}

// 7. Messages name the right thing.
#[test]
fn messages_name_the_right_thing() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), "m.safetensors");
    let input = d.path().join("in.safetensors");
    write_raw(
        &input,
        &[("x".into(), Dtype::F32, vec![1], vec![0; 4])],
        None,
    );
    let o_path = d.path().join("o");
    let e = fails(&[
        "forward",
        "--checkpoint",
        s(&m),
        "--input",
        s(&input),
        "--out",
        s(&o_path),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("--input") && !e.contains("checkpoint "), "{e}");
    let e = fails(&["info", s(d.path())]);
    assert!(
        e.contains("is a directory") && !e.contains("os error 19"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    // Metadata says hidden 128, the tensors 256.
    let (t, mut meta) = read_raw(&m);
    let mut cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    let hidden = cfg["hidden"].as_u64().unwrap();
    cfg["hidden"] = (hidden / 2).into();
    cfg["noise_dim"] = 8.into();
    meta.insert("config".into(), cfg.to_string());
    meta.remove("checksum");
    let mixed = d.path().join("mixed.safetensors");
    write_raw(&mixed, &t, Some(meta));
    let e = fails(&["info", s(&mixed)]);
    assert!(
        e.contains("hidden mismatch") && !e.contains("vocabulary mismatch"),
        "{e}"
    );
    // A negative value reaches the flag's own check.
    let o = run(&[
        "sample",
        "--checkpoint",
        s(&m),
        "--steps",
        "2",
        "--seed",
        "-1",
        "--out",
        s(&o_path),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains("'-1'") && e.contains("--seed") && !e.contains("unexpected argument"),
        "{e}"
    );
    let e = fails(&[
        "sample",
        "--checkpoint",
        s(&m),
        "--steps",
        "2",
        "--temperature",
        "-1",
        "--out",
        s(&o_path),
    ]);
    assert!(e.contains("--temperature must be positive"), "{e}");
}

/// SIGKILLs at random moments of a run that checkpoints every step (some land in the middle
/// of a checkpoint write), each followed by a resume; the final weights and the metrics equal
/// those of an uninterrupted run.
#[test]
fn random_sigkills_then_resume_equal_the_uninterrupted_run() {
    const KILLS: usize = 20;
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let extra = [
        "--steps",
        "300",
        "--save-every",
        "1",
        "--log-every",
        "7",
        "--eval-every",
        "50",
    ];
    ok(&strs(&toy(&a, &extra)));
    let fresh = toy(&b, &extra);
    let resume = |b: &Path| -> Vec<String> {
        ["train", "--resume", s(b), "--quiet"]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let mut kills = 0;
    let mut finished_early = 0;
    while kills < KILLS {
        let args = if b.join("config.json").exists() {
            resume(&b)
        } else {
            fresh.clone()
        };
        let mut child = bin()
            .args(strs(&args))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(5..120)));
        if child.try_wait().unwrap().is_some() {
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            finished_early += 1;
            assert!(finished_early < 3, "the run is too short for {KILLS} kills");
            std::fs::remove_dir_all(&b).unwrap();
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    ok(&strs(&resume(&b)));
    assert_eq!(latest_step(&b), Some(300));
    assert_eq!(final_weights(&a), final_weights(&b));
    assert_eq!(metrics(&a), metrics(&b));
}
