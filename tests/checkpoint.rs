//! Checkpoints: bit-identical round trips, reference-format variants (prefix, bf16, f16), and
//! one test per bad-checkpoint case, each checking that the message names the problem.

mod common;

use common::{read_raw, small_test_config, write_raw, Raw};
use half::{bf16, f16};
use imdm_engine::model::checkpoint::{self, load, save};
use imdm_engine::model::dit_ref;
use imdm_engine::model::init::random_params;
use imdm_engine::model::{Algo, DitConfig, DitParams};
use imdm_engine::rng::seeded_eps;
use imdm_engine::tensor::Tokens;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};

fn saved(dir: &Path, algo: Algo) -> (PathBuf, DitParams) {
    let p = random_params(&small_test_config(algo), 3);
    let path = dir.join("model.safetensors");
    save(&path, &p).unwrap();
    (path, p)
}

fn err_of(path: &Path) -> String {
    load(path, None).unwrap_err().to_string()
}

fn logits(p: &DitParams) -> Vec<f32> {
    let c = &p.config;
    let ids: Vec<u32> = (0..2 * c.length as u32)
        .map(|i| {
            if i % 3 == 0 {
                c.mask_index as u32
            } else {
                i % c.vocab_size as u32
            }
        })
        .collect();
    let tokens = Tokens::new(2, c.length, ids, c.vocab_size).unwrap();
    let eps = seeded_eps(&[5, 6], c.length, c.noise_dim, c.noise_type, 1.0);
    dit_ref::forward(p, &tokens, Some(&eps), None).unwrap().data
}

#[test]
fn round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for algo in [Algo::Imdm, Algo::Mdlm] {
        let (path, p) = saved(dir.path(), algo);
        let q = load(&path, None).unwrap();
        assert_eq!(p, q, "parameters and config survive save/load");
        let (a, b) = (logits(&p), logits(&q));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(
            a.iter().any(|&x| x != 0.0),
            "random weights give non-zero logits"
        );
    }
}

/// A time-conditioned model keeps `time_conditioning` in its metadata config, reloads equal,
/// gives the same per-sequence logits, and is refused under a constant-conditioned config.
#[test]
fn time_conditioned_model_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let c = DitConfig {
        time_conditioning: true,
        ..small_test_config(Algo::Mdlm)
    };
    let p = random_params(&c, 4);
    let path = dir.path().join("tc.safetensors");
    save(&path, &p).unwrap();
    let (_, meta) = read_raw(&path);
    let js = &meta[checkpoint::META_CONFIG];
    assert!(js.contains("\"time_conditioning\":true"), "{js}");
    let q = load(&path, None).unwrap();
    assert_eq!(p, q);
    assert!(q.config.time_conditioning);
    let ids: Vec<u32> = (0..2 * c.length as u32)
        .map(|i| i % c.vocab_size as u32)
        .collect();
    let tokens = Tokens::new(2, c.length, ids, c.vocab_size).unwrap();
    let sigma = [0.3, 4.0];
    let a = dit_ref::forward(&p, &tokens, None, Some(&sigma)).unwrap();
    let b = dit_ref::forward(&q, &tokens, None, Some(&sigma)).unwrap();
    assert!(a
        .data
        .iter()
        .zip(&b.data)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    let off = small_test_config(Algo::Mdlm);
    let e = load(&path, Some(&off)).unwrap_err().to_string();
    assert!(e.contains("time_conditioning mismatch"), "{e}");
}

/// Rewrites the saved model with `edit` applied to its tensors (metadata kept).
fn edited(dir: &Path, edit: impl FnOnce(&mut Vec<Raw>)) -> PathBuf {
    let (path, _) = saved(dir, Algo::Imdm);
    let (mut t, meta) = read_raw(&path);
    edit(&mut t);
    let out = dir.join("edited.safetensors");
    write_raw(&out, &t, Some(meta));
    out
}

#[test]
fn accepts_backbone_prefix_bf16_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = saved(dir.path(), Algo::Imdm);
    let (t, meta) = read_raw(&path);
    for (dtype, tag) in [(Dtype::BF16, "bf16"), (Dtype::F16, "f16")] {
        let conv: Vec<Raw> = t
            .iter()
            .map(|(n, _, s, b)| {
                let vals = b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
                let bytes: Vec<u8> = match dtype {
                    Dtype::BF16 => vals.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
                    _ => vals.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
                };
                (format!("backbone.{n}"), dtype, s.clone(), bytes)
            })
            .collect();
        let out = dir.path().join(format!("{tag}.safetensors"));
        // A converter writes its own metadata: the config, not our data checksum.
        let mut meta = meta.clone();
        meta.remove("checksum");
        write_raw(&out, &conv, Some(meta));
        let q = load(&out, None).unwrap();
        for ((name, a), (_, b)) in p.named().into_iter().zip(q.named()) {
            for (x, y) in a.data.iter().zip(&b.data) {
                let want = match dtype {
                    Dtype::BF16 => bf16::from_f32(*x).to_f32(),
                    _ => f16::from_f32(*x).to_f32(),
                };
                assert_eq!(want.to_bits(), y.to_bits(), "{tag} {name}");
            }
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |t| {
        t.retain(|e| e.0 != "blocks.1.attn_out.weight")
    });
    let e = err_of(&path);
    assert!(
        e.contains("missing 1 tensor(s): blocks.1.attn_out.weight"),
        "{e}"
    );
    assert!(e.contains("edited.safetensors"), "names the file: {e}");
}

#[test]
fn unexpected_tensors_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |t| {
        for n in ["blocks.0.attn_qkv.bias", "extra.thing"] {
            t.push((n.into(), Dtype::F32, vec![1], vec![0; 4]));
        }
    });
    let e = err_of(&path);
    assert!(
        e.contains("unexpected 2 tensor(s): blocks.0.attn_qkv.bias, extra.thing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_expected_and_got() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |t| {
        let e = t
            .iter_mut()
            .find(|e| e.0 == "blocks.0.mlp.0.weight")
            .unwrap();
        e.2 = vec![64, 64]; // same byte count as [128, 32]
    });
    let e = err_of(&path);
    assert!(
        e.contains("tensor blocks.0.mlp.0.weight: expected shape [128, 32], got [64, 64]"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved(dir.path(), Algo::Imdm);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(&cut);
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let e = err_of(&junk);
    assert!(
        e.contains("junk.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    let tiny = dir.path().join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").unwrap();
    assert!(err_of(&tiny).contains("truncated or corrupt"));
}

#[test]
fn missing_file_names_the_path() {
    let e = err_of(Path::new("/nonexistent/model.safetensors"));
    assert!(e.contains("/nonexistent/model.safetensors"), "{e}");
}

#[test]
fn vocab_and_noise_dim_mismatch_with_chosen_config() {
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = saved(dir.path(), Algo::Imdm);
    let mut other = p.config.clone();
    other.vocab_size += 1;
    let e = load(&path, Some(&other)).unwrap_err().to_string();
    assert!(
        e.contains("vocab_size mismatch: the checkpoint has 37, the chosen configuration has 38"),
        "{e}"
    );
    let mut other = p.config.clone();
    other.noise_dim = 99;
    let e = load(&path, Some(&other)).unwrap_err().to_string();
    assert!(
        e.contains("noise_dim mismatch: the checkpoint has 12, the chosen configuration has 99"),
        "{e}"
    );
}

#[test]
fn file_without_config_needs_a_preset_and_is_shape_checked_against_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = saved(dir.path(), Algo::Imdm);
    let (t, _) = read_raw(&path);
    let bare = dir.path().join("bare.safetensors");
    write_raw(&bare, &t, None);
    let e = err_of(&bare);
    assert!(
        e.contains("no config metadata") && e.contains("--preset"),
        "{e}"
    );
    assert_eq!(load(&bare, Some(&p.config)).unwrap(), p);
    let mut wrong = p.config.clone();
    wrong.vocab_size = 50;
    wrong.mask_index = 49;
    let e = load(&bare, Some(&wrong)).unwrap_err().to_string();
    assert!(
        e.contains("vocab_embed.embedding") && e.contains("vocabulary mismatch"),
        "{e}"
    );
    let mut wrong = p.config.clone();
    wrong.noise_dim = 7;
    let e = load(&bare, Some(&wrong)).unwrap_err().to_string();
    assert!(
        e.contains("imdm_mlp.0.weight") && e.contains("noise_dim mismatch"),
        "{e}"
    );
}

#[test]
fn bad_config_metadata_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved(dir.path(), Algo::Imdm);
    let (t, mut meta) = read_raw(&path);
    meta.insert(checkpoint::META_CONFIG.into(), "{\"vocab_size\": 3}".into());
    let out = dir.path().join("meta.safetensors");
    write_raw(&out, &t, Some(meta));
    let e = err_of(&out);
    assert!(
        e.contains("meta.safetensors") && e.contains("invalid config JSON"),
        "{e}"
    );
}
