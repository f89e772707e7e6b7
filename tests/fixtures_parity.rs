//! `dit_ref` and the CPU backend (f32 and f64) against the independent PyTorch implementation
//! (`tools/reference/dit.py`, float64) on the committed fixtures: every fixture within 1e-5
//! relative, through the library and through the `forward` command. `sedd_tiny` is
//! time-conditioned: its io file carries one sigma per sequence. Regenerate with `python3
//! tools/reference/make_fixtures.py --out tests/fixtures [--only NAME]` on a machine with torch.

mod common;

use std::path::Path;
use std::process::Command;

use imdm_engine::cpu;
use imdm_engine::model::{checkpoint, dit_ref};
use imdm_engine::stio::{view_to_f32, view_to_f64, view_to_ids, StFile};
use imdm_engine::tensor::{Tensor, Tokens};
use imdm_engine::testing::{assert_close, Tol};

const FIXTURES: [&str; 5] = [
    "imdm_tiny",
    "imdm_tiny_softcap",
    "mdlm_prefixed",
    "imdm_hd64_bf16",
    "sedd_tiny",
];

/// 1e-5 relative, with an absolute floor of 1e-5 for entries near zero.
const PARITY: Tol = Tol {
    abs: 1e-5,
    rel: 1e-5,
};

struct Io {
    tokens: Tokens,
    eps: Option<Tensor>,
    /// (B) per-sequence sigma of a time-conditioned fixture
    sigma: Option<Vec<f64>>,
    logits: Tensor,
    log_probs: Tensor,
}

fn read_io(path: &Path, vocab: usize) -> Io {
    let f = StFile::open(path).unwrap();
    let st = f.parse().unwrap();
    let tv = st.tensor("tokens").unwrap();
    let (b, l) = (tv.shape()[0], tv.shape()[1]);
    let ids = view_to_ids(path, "tokens", &tv).unwrap();
    let get = |n: &str| st.tensor(n).ok().map(|v| view_to_f32(path, n, &v).unwrap());
    Io {
        tokens: Tokens::new(b, l, ids, vocab).unwrap(),
        eps: get("eps"),
        sigma: st
            .tensor("sigma")
            .ok()
            .map(|v| view_to_f64(path, "sigma", &v).unwrap().1),
        logits: get("logits").unwrap(),
        log_probs: get("log_probs").unwrap(),
    }
}

fn check(model: &Path, io: &Path, tag: &str) {
    let p = checkpoint::load(model, None).unwrap();
    let io = read_io(io, p.config.vocab_size);
    assert_eq!(
        io.sigma.is_some(),
        p.config.time_conditioning,
        "{tag}: sigma exactly for a time-conditioned config"
    );
    let (eps, sigma) = (io.eps.as_ref(), io.sigma.as_deref());
    let logits = dit_ref::forward(&p, &io.tokens, eps, sigma).unwrap();
    assert_eq!(logits.shape, io.logits.shape);
    assert_close(
        &format!("{tag} logits"),
        &logits.data,
        &io.logits.data,
        PARITY,
    );
    let lp = dit_ref::subs_log_probs(&logits, &io.tokens, p.config.mask_index);
    assert_close(
        &format!("{tag} log_probs"),
        &lp.data,
        &io.log_probs.data,
        PARITY,
    );
    let cpu32 = cpu::log_probs::<f32>(&p, &io.tokens, eps, sigma).unwrap();
    let cpu64 = cpu::log_probs::<f64>(&p, &io.tokens, eps, sigma).unwrap();
    for (t, got) in [("f32", &cpu32), ("f64", &cpu64)] {
        let name = format!("{tag} CPU backend {t} log_probs");
        assert_close(&name, &got.data, &io.log_probs.data, PARITY);
    }
}

/// The time-conditioned fixture really depends on each sequence's sigma: the constant
/// conditioning (the same model with time conditioning off) moves every sequence's logits.
#[test]
fn sedd_fixture_depends_on_sigma() {
    let dir = common::fixtures();
    let mut p = checkpoint::load(dir.join("sedd_tiny.model.safetensors"), None).unwrap();
    assert!(
        p.config.time_conditioning,
        "the config records time_conditioning"
    );
    let io = read_io(&dir.join("sedd_tiny.io.safetensors"), p.config.vocab_size);
    let s = io.sigma.clone().unwrap();
    assert!(
        s.len() == 3 && s[0] < 0.5 && s[2] > 5.0,
        "sigma spread {s:?}"
    );
    p.config.time_conditioning = false;
    let flat = dit_ref::forward(&p, &io.tokens, None, None).unwrap();
    let n = io.tokens.len * p.config.vocab_size;
    for b in 0..3 {
        let r = b * n..(b + 1) * n;
        let moved = flat.data[r.clone()]
            .iter()
            .zip(&io.logits.data[r])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-2,
            "sequence {b}: sigma moves the logits by only {moved}"
        );
    }
}

#[test]
fn dit_ref_matches_pytorch_fixtures() {
    let dir = common::fixtures();
    for name in FIXTURES {
        check(
            &dir.join(format!("{name}.model.safetensors")),
            &dir.join(format!("{name}.io.safetensors")),
            name,
        );
    }
}

/// The converter's output (EMA weights of a fake Lightning checkpoint) reproduces imdm_tiny.
#[test]
fn converted_reference_checkpoint_matches() {
    let dir = common::fixtures();
    check(
        &dir.join("converted_tiny.safetensors"),
        &dir.join("imdm_tiny.io.safetensors"),
        "converted_tiny",
    );
}

/// The `forward` command (the parity entry point) gives the same numbers from the files.
#[test]
fn forward_command_matches_fixture() {
    let dir = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args(["forward", "--device", "cpu", "--checkpoint"])
        .arg(dir.join("imdm_tiny_softcap.model.safetensors"))
        .arg("--input")
        .arg(dir.join("imdm_tiny_softcap.io.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = read_io(&dir.join("imdm_tiny_softcap.io.safetensors"), 53);
    let got = read_io(&out, 53);
    assert_close(
        "forward logits",
        &got.logits.data,
        &want.logits.data,
        PARITY,
    );
    assert_close(
        "forward log_probs",
        &got.log_probs.data,
        &want.log_probs.data,
        PARITY,
    );
}

/// The `forward` command reads a time-conditioned model's sigma from `--input` and writes it
/// back with the fixture's numbers.
#[test]
fn forward_command_takes_sigma() {
    let dir = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let io_path = dir.join("sedd_tiny.io.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args(["forward", "--device", "cpu", "--checkpoint"])
        .arg(dir.join("sedd_tiny.model.safetensors"))
        .arg("--input")
        .arg(&io_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (want, got) = (read_io(&io_path, 53), read_io(&out, 53));
    assert_eq!(got.sigma, want.sigma);
    assert_close(
        "forward logits",
        &got.logits.data,
        &want.logits.data,
        PARITY,
    );
    // Without sigma the command refuses the time-conditioned model, naming what is missing.
    let no_sigma = tmp.path().join("no_sigma.safetensors");
    let (raw, meta) = common::read_raw(&io_path);
    let kept: Vec<common::Raw> = raw.into_iter().filter(|t| t.0 == "tokens").collect();
    common::write_raw(&no_sigma, &kept, Some(meta));
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args(["forward", "--device", "cpu", "--checkpoint"])
        .arg(dir.join("sedd_tiny.model.safetensors"))
        .arg("--input")
        .arg(&no_sigma)
        .arg("--out")
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--input") && err.contains("sigma"),
        "{err}"
    );
}
