//! `dit_ref` against the independent PyTorch implementation (`tools/reference/dit.py`, float64)
//! on the committed fixtures: every fixture within 1e-5 relative (f32), through the library and
//! through the `forward` command. Regenerate with `python3 tools/reference/make_fixtures.py
//! --out tests/fixtures` on a machine with torch.

mod common;

use std::path::Path;
use std::process::Command;

use imdm_engine::model::{checkpoint, dit_ref};
use imdm_engine::stio::{view_to_f32, view_to_ids, StFile};
use imdm_engine::tensor::{Tensor, Tokens};
use imdm_engine::testing::{assert_close, Tol};

const FIXTURES: [&str; 4] = [
    "imdm_tiny",
    "imdm_tiny_softcap",
    "mdlm_prefixed",
    "imdm_hd64_bf16",
];

/// 1e-5 relative, with an absolute floor of 1e-5 for entries near zero.
const PARITY: Tol = Tol {
    abs: 1e-5,
    rel: 1e-5,
};

struct Io {
    tokens: Tokens,
    eps: Option<Tensor>,
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
        logits: get("logits").unwrap(),
        log_probs: get("log_probs").unwrap(),
    }
}

fn check(model: &Path, io: &Path, tag: &str) {
    let p = checkpoint::load(model, None).unwrap();
    let io = read_io(io, p.config.vocab_size);
    let logits = dit_ref::forward(&p, &io.tokens, io.eps.as_ref(), None).unwrap();
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
