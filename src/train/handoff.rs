//! What a later stage takes from an earlier one: the weights of a model (a weights file, a run
//! directory or one checkpoint directory of a run) and, from a run, the EMA's update count.
//!
//! A run directory (`latest.json`, see [`crate::train::run`]) resolves to its latest complete
//! checkpoint; any directory holding `ema.safetensors` / `model.safetensors` is one checkpoint
//! (e.g. `DIR/checkpoints/step-N/`, or a round checkpoint of a distillation run). The EMA
//! weights are the default, as the reference's fine-tunes and datagen load them
//! (`training.load_ema`, spec 2.6 and 6.2).

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::run::{Latest, EMA_FILE, LATEST_FILE, MODEL_FILE, STATE_FILE};

/// Which weights of a checkpoint directory to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum WeightsKind {
    /// The EMA weights (`ema.safetensors`): what the reference samples and fine-tunes from.
    Ema,
    /// The raw training weights (`model.safetensors`).
    Raw,
}

/// A resolved source of weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// The weights file to load.
    pub weights: PathBuf,
    /// The checkpoint directory it came from (None for a plain weights file).
    pub checkpoint_dir: Option<PathBuf>,
    /// Optimizer step of that checkpoint, when its `state.json` records one.
    pub step: Option<u64>,
    /// EMA updates the source run had made, when its `state.json` records them.
    pub ema_updates: Option<u64>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::checkpoint(path, format!("invalid JSON: {e}")))
}

/// Resolves `path` (given as `flag`) to a weights file. `kind` chooses between the EMA and the
/// raw weights of a checkpoint directory (default: EMA); giving it with a plain weights file is
/// an error, since such a file holds one set of weights only.
pub fn resolve(flag: &str, path: &Path, kind: Option<WeightsKind>) -> Result<Source> {
    if path.is_file() {
        if let Some(k) = kind {
            return Err(Error::Config(format!(
                "{flag} {}: a weights file holds one set of weights; --weights {k:?} applies \
                 to run and checkpoint directories",
                path.display()
            )));
        }
        return Ok(Source {
            weights: path.to_path_buf(),
            checkpoint_dir: None,
            step: None,
            ema_updates: None,
        });
    }
    if !path.is_dir() {
        return Err(Error::Config(format!(
            "{flag} {}: no such file or directory",
            path.display()
        )));
    }
    let dir = if path.join(LATEST_FILE).is_file() {
        let latest: Latest = serde_json::from_value(read_json(&path.join(LATEST_FILE))?)
            .map_err(|e| Error::checkpoint(path.join(LATEST_FILE), format!("{e}")))?;
        path.join(latest.dir)
    } else {
        path.to_path_buf()
    };
    let file = match kind.unwrap_or(WeightsKind::Ema) {
        WeightsKind::Ema => EMA_FILE,
        WeightsKind::Raw => MODEL_FILE,
    };
    let weights = dir.join(file);
    if !weights.is_file() {
        return Err(Error::Config(format!(
            "{flag} {}: expected a weights file, a run directory (with {LATEST_FILE}) or a \
             checkpoint directory; {} does not exist",
            path.display(),
            weights.display()
        )));
    }
    let (mut step, mut ema_updates) = (None, None);
    let state = dir.join(STATE_FILE);
    if state.is_file() {
        let v = read_json(&state)?;
        step = v.get("step").and_then(|x| x.as_u64());
        ema_updates = v.get("ema_num_updates").and_then(|x| x.as_u64());
    }
    Ok(Source {
        weights,
        checkpoint_dir: Some(dir),
        step,
        ema_updates,
    })
}
