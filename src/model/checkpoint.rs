//! Checkpoints: safetensors with the reference's parameter names (spec 2.5), an optional
//! `backbone.` prefix on load, the resolved config in the metadata, bf16/f16/f32 accepted.
//! Every failure names the file and the tensor or setting at fault.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::{Algo, DitConfig};
use crate::model::params::{inv_freq, DitParams, INV_FREQ};
use crate::stio::{view_to_f32, write_atomic, OutTensor, StFile};
use crate::tensor::Tensor;

/// Metadata key holding the config JSON.
pub const META_CONFIG: &str = "config";
/// Metadata key and value marking our format.
pub const META_FORMAT: &str = "format";
pub const FORMAT: &str = "imdm-engine/1";
/// Prefix the reference's Lightning state_dict puts on every key.
pub const PREFIX: &str = "backbone.";

/// Saves `params` (f32) plus the rotary buffer and the config, atomically.
pub fn save(path: impl AsRef<Path>, params: &DitParams) -> Result<()> {
    let hd = params.config.head_dim();
    let inv = Tensor::from_vec(&[hd / 2], inv_freq(hd).iter().map(|&x| x as f32).collect())?;
    let mut tensors: Vec<(String, OutTensor)> = params
        .named()
        .into_iter()
        .map(|(n, t)| (n, OutTensor::F32(t)))
        .collect();
    tensors.push((INV_FREQ.to_string(), OutTensor::F32(&inv)));
    let meta = HashMap::from([
        (META_FORMAT.to_string(), FORMAT.to_string()),
        (META_CONFIG.to_string(), params.config.to_json()),
    ]);
    write_atomic(path.as_ref(), &tensors, meta)
}

/// Reads only the config of a checkpoint (its metadata), if it has one.
pub fn read_config(path: impl AsRef<Path>) -> Result<Option<DitConfig>> {
    let f = StFile::open(path)?;
    match f.metadata()?.get(META_CONFIG) {
        Some(js) => DitConfig::from_json(js)
            .map(Some)
            .map_err(|e| Error::checkpoint(&f.path, e.to_string())),
        None => Ok(None),
    }
}

/// Checks the settings a checkpoint must share with the configuration the user chose.
fn check_compatible(path: &Path, file: &DitConfig, chosen: &DitConfig) -> Result<()> {
    let pairs = [
        ("vocab_size", file.vocab_size, chosen.vocab_size),
        ("mask_index", file.mask_index, chosen.mask_index),
        ("hidden", file.hidden, chosen.hidden),
        ("heads", file.heads, chosen.heads),
        ("blocks", file.blocks, chosen.blocks),
        ("cond_dim", file.cond_dim, chosen.cond_dim),
    ];
    for (what, got, want) in pairs {
        if got != want {
            return Err(Error::checkpoint(
                path,
                format!("{what} mismatch: the checkpoint has {got}, the chosen configuration has {want}"),
            ));
        }
    }
    if file.algo != chosen.algo {
        return Err(Error::checkpoint(
            path,
            format!(
                "algo mismatch: the checkpoint is {:?}, the chosen configuration is {:?}",
                file.algo, chosen.algo
            ),
        ));
    }
    if file.time_conditioning != chosen.time_conditioning {
        let on_off = |b: bool| if b { "on" } else { "off" };
        return Err(Error::checkpoint(
            path,
            format!(
                "time_conditioning mismatch: the checkpoint has it {}, the chosen configuration \
                 {} (a time-conditioned model needs one sigma per sequence; the others use the \
                 constant sigma = 0)",
                on_off(file.time_conditioning),
                on_off(chosen.time_conditioning)
            ),
        ));
    }
    if file.algo == Algo::Imdm && file.noise_dim != chosen.noise_dim {
        return Err(Error::checkpoint(
            path,
            format!(
                "noise_dim mismatch: the checkpoint has {}, the chosen configuration has {}",
                file.noise_dim, chosen.noise_dim
            ),
        ));
    }
    Ok(())
}

/// Why a tensor's shape differs from the configuration's: the configuration quantity of each
/// differing dimension (the metadata and the tensors come from different models).
fn shape_hint(name: &str, want: &[usize], got: &[usize], c: &DitConfig) -> String {
    let by_tensor: &[&str] = match name {
        "vocab_embed.embedding" | "output_layer.linear.weight" => &["vocab_size", "hidden"],
        "vocab_embed.imdm_mlp.0.weight" => &["", "noise_dim"],
        _ => &[],
    };
    let quantities = [
        ("vocab_size", c.vocab_size),
        ("hidden", c.hidden),
        ("noise_dim", c.noise_dim),
        ("cond_dim", c.cond_dim),
        ("length", c.length),
    ];
    let mut parts = Vec::new();
    if want.len() == got.len() {
        for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
            if w == g {
                continue;
            }
            let named = by_tensor.get(i).copied().filter(|n| !n.is_empty());
            let what = named.or_else(|| quantities.iter().find(|q| q.1 == w).map(|q| q.0));
            if let Some(q) = what {
                let label = if q == "vocab_size" { "vocabulary" } else { q };
                parts.push(format!(
                    "{label} mismatch: the configuration has {q} {w}, the tensor {g}"
                ));
            }
        }
    }
    if parts.is_empty() {
        " (the configuration and the tensors disagree)".into()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

/// Lists up to 8 names, then a count.
fn list(names: &BTreeSet<String>) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} (and {more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Loads a checkpoint. The config comes from the metadata; `chosen` (a preset the user
/// picked) is required when the file has none (converted files always do) and, when both
/// exist, must agree on vocabulary, sizes, algorithm and noise_dim.
pub fn load(path: impl AsRef<Path>, chosen: Option<&DitConfig>) -> Result<DitParams> {
    let f = StFile::open(path)?;
    let st = f.parse()?;
    let meta = f.metadata()?;
    let config = match (meta.get(META_CONFIG), chosen) {
        (Some(js), chosen) => {
            let c =
                DitConfig::from_json(js).map_err(|e| Error::checkpoint(&f.path, e.to_string()))?;
            if let Some(ch) = chosen {
                check_compatible(&f.path, &c, ch)?;
            }
            c
        }
        (None, Some(ch)) => ch.clone(),
        (None, None) => {
            return Err(Error::checkpoint(
                &f.path,
                "has no config metadata; choose one with --preset (and --vocab/--noise-dim)",
            ))
        }
    };
    // Names in the file, with an optional `backbone.` prefix removed.
    let mut by_name = HashMap::new();
    for (raw, view) in st.tensors() {
        let name = raw.strip_prefix(PREFIX).unwrap_or(&raw).to_string();
        by_name.insert(name, (raw, view));
    }
    let mut params = DitParams::zeros(&config);
    let expected: BTreeSet<String> = params.named().into_iter().map(|(n, _)| n).collect();
    let missing: BTreeSet<String> = expected
        .iter()
        .filter(|n| !by_name.contains_key(*n))
        .cloned()
        .collect();
    let unexpected: BTreeSet<String> = by_name
        .keys()
        .filter(|n| !expected.contains(*n) && n.as_str() != INV_FREQ)
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            &f.path,
            format!("missing {} tensor(s): {}", missing.len(), list(&missing)),
        ));
    }
    if !unexpected.is_empty() {
        return Err(Error::checkpoint(
            &f.path,
            format!(
                "unexpected {} tensor(s): {}",
                unexpected.len(),
                list(&unexpected)
            ),
        ));
    }
    for (name, slot) in params.named_mut() {
        let (raw, view) = &by_name[&name];
        if view.shape() != slot.shape.as_slice() {
            return Err(Error::checkpoint(
                &f.path,
                format!(
                    "tensor {raw}: expected shape {:?}, got {:?}{}",
                    slot.shape,
                    view.shape(),
                    shape_hint(&name, &slot.shape, view.shape(), &config)
                ),
            ));
        }
    }
    // The structure is right; now the data itself.
    if !f.verify_checksum()? {
        let _ = writeln!(
            std::io::stderr(),
            "note: {} carries no checksum (written by another tool); its tensor data is not \
             verified",
            f.path.display()
        );
    }
    for (name, slot) in params.named_mut() {
        let (raw, view) = &by_name[&name];
        *slot = view_to_f32(&f.path, raw, view)?;
        if let Some(i) = slot.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::checkpoint(
                &f.path,
                format!(
                    "tensor {raw}: element {i} is {}; a model with non-finite weights cannot \
                     be used (an older checkpoint of the run may be intact)",
                    slot.data[i]
                ),
            ));
        }
    }
    if let Some((raw, view)) = by_name.get(INV_FREQ) {
        let want = [config.head_dim() / 2];
        if view.shape() != want {
            return Err(Error::checkpoint(
                &f.path,
                format!(
                    "tensor {raw}: expected shape {want:?} (head_dim/2), got {:?}",
                    view.shape()
                ),
            ));
        }
    }
    Ok(params)
}
