//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cli;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use imdm_engine::model::{Algo, DitConfig, NoiseType};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A small config with every feature on (IMDM, odd sizes) for fast tests.
pub fn small_test_config(algo: Algo) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: 37,
        mask_index: 36,
        length: 9,
        hidden: 32,
        heads: 2,
        blocks: 2,
        cond_dim: 16,
        mlp_ratio: 4,
        dropout: 0.0,
        softcap: 0.0,
        algo,
        noise_dim: 12,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal: false,
        time_conditioning: false,
    }
}

/// A raw tensor entry: (name, dtype, shape, little-endian bytes).
pub type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

/// Reads every tensor and the metadata of a safetensors file.
pub fn read_raw(path: &Path) -> (Vec<Raw>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut v: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    (v, meta.metadata().clone().unwrap_or_default())
}

/// Writes raw tensors with metadata.
pub fn write_raw(path: &Path, tensors: &[Raw], meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, meta, path).unwrap();
}

/// The committed fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The first logged loss of a one-step `imdm-engine train` run on `device` initialised from
/// `file` as `algo` (synthetic data, batch 8 in micro-batches of 4, seed 3), in `dir/algo`.
pub fn first_init_loss(file: &Path, algo: &str, device: &str, dir: &Path) -> f64 {
    let d = dir.join(algo);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args(["train", "--init", file.to_str().unwrap(), "--algo", algo])
        .args(["--device", device, "--data", "synthetic", "--batch", "8"])
        .args(["--micro-batch", "4", "--steps", "1", "--log-every", "1"])
        .args([
            "--save-every",
            "0",
            "--eval-size",
            "0",
            "--seed",
            "3",
            "--quiet",
        ])
        .arg("--run-dir")
        .arg(&d)
        .output()
        .expect("binary runs");
    assert!(
        o.status.success(),
        "train --init {} --algo {algo} --device {device} failed: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let m = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let line = m.lines().next().expect("one metrics line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["step"], 1, "{line}");
    v["loss"].as_f64().unwrap()
}
