//! `imdm-engine distill sdtt` through the binary: a run killed with SIGKILL and resumed ends
//! bit-identical to an uninterrupted run, and the errors name the flag or file (a teacher of
//! another shape or kind, data of another vocabulary, --orig-steps that is not a power of two
//! times the final step count, --device cuda without a GPU).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use imdm_engine::model::{checkpoint, init::random_params, Algo, DitConfig, NoiseType};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
}

fn sdtt(args: &[&str]) -> Output {
    bin()
        .args(["distill", "sdtt"])
        .args(args)
        .output()
        .expect("binary runs")
}

fn fails(args: &[&str]) -> String {
    let o = sdtt(args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

fn config(vocab: usize, length: usize, hidden: usize) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: vocab,
        mask_index: vocab - 1,
        length,
        hidden,
        heads: 2,
        blocks: 1,
        cond_dim: 8,
        mlp_ratio: 4,
        dropout: 0.0,
        softcap: 0.0,
        algo: Algo::Mdlm,
        noise_dim: 8,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    }
}

/// A random (non-trivial) MDLM teacher file.
fn teacher(dir: &Path, name: &str, c: &DitConfig) -> String {
    let p = dir.join(name);
    checkpoint::save(&p, &random_params(c, 3)).unwrap();
    p.display().to_string()
}

fn latest_step(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("latest.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

#[test]
fn sigkill_then_resume_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = teacher(tmp.path(), "mdlm.safetensors", &config(65, 32, 32));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let args = |dir: &Path| -> Vec<String> {
        [
            "distill",
            "sdtt",
            "--teacher",
            &t,
            "--imdm",
            "--data",
            "synthetic",
            "--orig-steps",
            "16",
            "--grow-dt-every",
            "15",
            "--steps",
            "120",
            "--global-batch",
            "32",
            "--micro-batch",
            "16",
            "--lr",
            "3e-3",
            "--warmup",
            "5",
            "--ema",
            "0.99",
            "--ema-on-growth",
            "--reset-optimizer-on-growth",
            "--log-every",
            "1",
            "--eval-every",
            "10",
            "--eval-size",
            "16",
            "--save-every",
            "4",
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
    while !latest_step(&b).is_some_and(|s| s >= 20) {
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
    assert!(killed_at < 120, "killed at {killed_at}");

    let o = sdtt(&["--resume", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resuming"));

    let trajectory = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                [
                    "kind",
                    "step",
                    "round",
                    "dt",
                    "loss",
                    "kl",
                    "grad_norm",
                    "val_kl",
                ]
                .map(|k| v.get(k).map_or("-".into(), |x| x.to_string()))
                .join(" ")
            })
            .collect()
    };
    let (ta, tb) = (trajectory(&a), trajectory(&b));
    assert!(ta.len() > 120, "{} metrics lines", ta.len());
    assert_eq!(ta, tb);
    let rounds: std::collections::BTreeSet<String> = ta
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap().to_string())
        .collect();
    assert!(rounds.len() >= 8, "rounds seen: {rounds:?}");
    // Tensors and metadata (metadata order in the file is a hash map's).
    let bytes = |p: &Path| {
        let raw = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
        let mut t: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
            .collect();
        t.sort();
        let m: std::collections::BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        (t, m)
    };
    for f in ["model.safetensors", "ema.safetensors", "optim.safetensors"] {
        let p = format!("checkpoints/step-00000120/{f}");
        assert!(
            bytes(&a.join(&p)) == bytes(&b.join(&p)),
            "{f} differs after the resume"
        );
    }
    for r in 0..8 {
        let p = format!("rounds/round-{r:02}/ema.safetensors");
        assert!(bytes(&a.join(&p)) == bytes(&b.join(&p)), "{p} differs");
    }
}

#[test]
fn errors_name_the_flag_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(17, 8, 16);
    let t = teacher(tmp.path(), "t.safetensors", &c);
    let run = tmp.path().join("r").display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        ["--teacher", &t, "--data", "synthetic", "--run-dir", &run]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let call = |extra: &[&str]| {
        let v = base(extra);
        fails(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    };

    // A student start of another shape than the teacher.
    let other = teacher(tmp.path(), "wide.safetensors", &config(17, 8, 32));
    let e = call(&["--init", &other]);
    assert!(
        e.contains("--teacher") && e.contains("student's shape"),
        "{e}"
    );
    // An autoregressive model is no teacher.
    let mut ar = c.clone();
    ar.causal = true;
    let ar = teacher(tmp.path(), "ar.safetensors", &ar);
    let v: Vec<String> = ["--teacher", &ar, "--data", "synthetic", "--run-dir", &run]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let e = fails(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(
        e.contains("ar.safetensors") && e.contains("autoregressive"),
        "{e}"
    );

    // Tokens of another vocabulary (ids up to 99 for a V = 17 teacher).
    let tok = tmp.path().join("big.u16");
    let ids: Vec<u8> = (0..8 * 40u16)
        .flat_map(|i| (i % 100).to_le_bytes())
        .collect();
    std::fs::write(&tok, ids).unwrap();
    let v: Vec<String> = [
        "--teacher",
        &t,
        "--data",
        &format!("tokens:{}", tok.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--run-dir".into(), run.clone()])
    .collect();
    let e = fails(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(
        e.contains("--data tokens:") && e.contains("vocabulary of 17"),
        "{e}"
    );

    let e = call(&["--orig-steps", "1000", "--min-steps", "4"]);
    assert!(
        e.contains("--orig-steps 1000") && e.contains("--min-steps 4"),
        "{e}"
    );
    // --device cuda with a head dim that has no GPU attention kernel (16 / 2 heads = 8) is
    // refused on every machine, naming the flag and the head dim.
    let e = call(&["--device", "cuda"]);
    assert!(
        e.contains("--device cuda") && e.contains("head dim 8"),
        "{e}"
    );
    // Without a usable GPU, --device cuda is refused before anything is written (with one it
    // runs: tests/gpu_distill.rs).
    if imdm_engine::cuda::Gpu::new(0).is_err() {
        let wide = teacher(tmp.path(), "hd32.safetensors", &config(17, 8, 64));
        let v: Vec<String> = ["--teacher", &wide, "--data", "synthetic", "--run-dir", &run]
            .iter()
            .chain(&["--device", "cuda"])
            .map(|s| s.to_string())
            .collect();
        let e = fails(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(
            e.contains("--device cuda") && e.contains("no usable GPU") && e.contains("CPU"),
            "{e}"
        );
    }
    // Nothing was half-written by any of these.
    assert!(!Path::new(&run).exists());
}

/// `bench distill` measures the GPU: without one it fails saying so (with one it runs in the
/// device check, scripts/gpu-check.sh).
#[test]
fn bench_distill_without_a_gpu_says_so() {
    if imdm_engine::cuda::Gpu::new(0).is_ok() {
        return;
    }
    let o = bin()
        .args(["bench", "distill", "--preset", "small", "--shape", "owt"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8(o.stderr).unwrap();
    assert!(e.contains("measures the GPU only"), "{e}");
}
