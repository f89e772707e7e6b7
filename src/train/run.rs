//! The run directory: everything needed to follow a run and to continue it bit for bit.
//!
//! ```text
//! DIR/config.json                  {format, objective, model: DitConfig, train: TrainConfig}
//! DIR/metrics.jsonl                one JSON object per line: {"kind":"train", step, loss, lr,
//!                                  grad_norm, tok_per_s, elapsed_s, ...} or {"kind":"val",
//!                                  step, val_nelbo, val_ppl, ...}
//! DIR/latest.json                  {"step": N, "dir": "checkpoints/step-0000000N"}
//! DIR/checkpoints/step-0000000N/   model.safetensors  raw weights (reference names + config)
//!                                  ema.safetensors    EMA weights, same format (for sampling)
//!                                  optim.safetensors  exp_avg.<name>, exp_avg_sq.<name>;
//!                                                     metadata: step and AdamW settings
//!                                  state.json         step, data position (and the shard
//!                                                     loader's, for shard data), RNG
//!                                                     seed/counter, EMA decay and updates,
//!                                                     elapsed time
//! ```
//!
//! A checkpoint is written into `step-N.tmp/`, every file synced, the directory renamed to
//! `step-N/`, and only then does `latest.json` (written to a temporary name and renamed) point
//! at it. A crash or a failed write at any moment therefore leaves `latest.json` on the last
//! complete checkpoint; a failed write also removes its partial directory, and stale `.tmp`
//! directories of a killed process are removed when the run is opened again.
//!
//! A process that writes the directory holds an exclusive `flock` on `DIR/.lock` (which
//! records its pid) for as long as it lives; the OS releases it when the process ends, however
//! it ends, so a second writer is refused with the holder named and a killed run can be resumed
//! at once. Resuming reads the checkpoint `latest.json` names, which must lie under
//! `checkpoints/`; when it is unusable (corrupt, missing, edited) the newest complete older
//! checkpoint is used instead, with a note.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::LoaderPosition;
use crate::error::{Error, Result};
use crate::model::{checkpoint, DitConfig, DitParams};
use crate::stio::{write_atomic, OutTensor, StFile};
use crate::train::config::TrainConfig;
use crate::train::ema::Ema;
use crate::train::optim::{AdamW, AdamWConfig, Moments};

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LATEST_FILE: &str = "latest.json";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const STATE_FILE: &str = "state.json";
/// The writer's lock (see the module doc).
pub const LOCK_FILE: &str = ".lock";
/// Format tag of `config.json` and `state.json`.
pub const RUN_FORMAT: &str = "imdm-engine-run/1";

/// The resolved configuration of a run (`config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub format: String,
    /// Which [`Objective`](super::Objective) the run optimises (e.g. "cpu-dit").
    pub objective: String,
    pub model: DitConfig,
    pub train: TrainConfig,
}

/// Where the random streams stand. Every stream of the loop is ChaCha8 keyed by (seed,
/// purpose) on stream `counter` = the optimizer step, so (seed, counter) is the whole state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub scheme: String,
    pub seed: u64,
    pub counter: u64,
}

/// The scalars of a checkpoint (`state.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Sequences the data source has delivered.
    pub data_position: u64,
    /// The shard loader's position (epoch, offset, seed, batch size, data fingerprint) for
    /// runs on prepared shards; absent for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_loader: Option<LoaderPosition>,
    pub rng: RngState,
    pub ema_decay: f64,
    pub ema_num_updates: u64,
    /// Training tokens consumed (steps × batch × L).
    pub tokens_seen: u64,
    /// Training wall time so far, across resumes.
    pub elapsed_s: f64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
}

/// What `latest.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    pub step: u64,
    /// Relative to the run directory.
    pub dir: PathBuf,
}

/// A checkpoint read back.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub params: DitParams,
    pub ema: Ema,
    pub opt: AdamW,
    pub state: TrainState,
}

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    pub root: PathBuf,
    /// Test hook: fail the next checkpoint after this many files were written.
    fail_after: Option<usize>,
    /// The open, exclusively locked `DIR/.lock` (released when this is dropped).
    _lock: File,
}

/// Takes the exclusive lock of the run directory `root` (which must exist) and records this
/// process's pid in it; fails naming the holder's pid when another process has it.
fn lock(root: &Path) -> Result<File> {
    let path = root.join(LOCK_FILE);
    let mut f = io(
        &path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path),
    )?;
    // SAFETY: flock on a descriptor this function owns; it touches no memory.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(Error::Config(format!(
                "{}: the run directory is in use: process {} holds its lock {}; wait for it \
                 to finish (or stop it), then --resume",
                root.display(),
                if holder.is_empty() {
                    "(pid not yet recorded)".to_string()
                } else {
                    format!("pid {holder}")
                },
                path.display()
            )));
        }
        return Err(Error::io(&path, e));
    }
    io(&path, f.set_len(0))?;
    io(&path, writeln!(f, "{}", std::process::id()))?;
    Ok(f)
}

/// The checkpoint directories `checkpoints/step-N` of `root`, newest first.
fn step_dirs(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(root.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let s = n.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path()
                .is_dir()
                .then(|| (s, PathBuf::from(CHECKPOINTS_DIR).join(n)))
        })
        .collect();
    v.sort_by(|a, b| b.cmp(a));
    v
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` through an exclusive temporary file and a rename, synced.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::outputs::write_bytes(path, bytes)
}

fn sync_dir(path: &Path) -> Result<()> {
    io(path, File::open(path).and_then(|f| f.sync_all()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let s = io(path, fs::read_to_string(path))?;
    serde_json::from_str(&s)
        .map_err(|e| Error::checkpoint(path, format!("invalid JSON for this file: {e}")))
}

impl RunDir {
    /// Starts a new run in `root` (created if absent; it must not hold a run already) and
    /// writes `config.json`.
    pub fn create(root: &Path, config: &RunConfig) -> Result<Self> {
        io(root, fs::create_dir_all(root))?;
        // Checked under the lock, so two new runs on one directory cannot both pass.
        let lock = lock(root)?;
        if root.join(CONFIG_FILE).exists() || root.join(LATEST_FILE).exists() {
            return Err(Error::Config(format!(
                "--run-dir {}: already holds a run; continue it with --resume {} or choose a \
                 new directory",
                root.display(),
                root.display()
            )));
        }
        io(root, fs::create_dir_all(root.join(CHECKPOINTS_DIR)))?;
        let js = serde_json::to_string_pretty(config).expect("config serialises");
        write_file_atomic(&root.join(CONFIG_FILE), js.as_bytes())?;
        Ok(RunDir {
            root: root.to_path_buf(),
            fail_after: None,
            _lock: lock,
        })
    }

    /// Opens an existing run and reads its configuration; removes stale `.tmp` checkpoints.
    pub fn open(root: &Path) -> Result<(Self, RunConfig)> {
        let cfg_path = root.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::Config(format!(
                "--resume {}: not a run directory (no {CONFIG_FILE})",
                root.display()
            )));
        }
        let lock = lock(root)?;
        let config: RunConfig = read_json(&cfg_path)?;
        if config.format != RUN_FORMAT {
            return Err(Error::checkpoint(
                &cfg_path,
                format!("format {:?}, expected {RUN_FORMAT:?}", config.format),
            ));
        }
        config.model.validate()?;
        let run = RunDir {
            root: root.to_path_buf(),
            fail_after: None,
            _lock: lock,
        };
        let ck = root.join(CHECKPOINTS_DIR);
        if let Ok(entries) = fs::read_dir(&ck) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok((run, config))
    }

    /// Records a changed training configuration (a resume that extends `steps` or changes
    /// an interval) in `config.json`. Any other change would alter the trajectory and is
    /// refused.
    pub fn record_train_config(&self, train: &TrainConfig) -> Result<()> {
        let path = self.root.join(CONFIG_FILE);
        let mut rc: RunConfig = read_json(&path)?;
        let free = |t: &TrainConfig| TrainConfig {
            steps: 0,
            log_every: 0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 0,
            ..t.clone()
        };
        if free(&rc.train) != free(train) {
            return Err(Error::Config(format!(
                "{}: the training configuration differs from the recorded one in more than \
                 the step count and the intervals; recorded {:?}, given {:?}",
                path.display(),
                rc.train,
                train
            )));
        }
        if &rc.train != train {
            rc.train = train.clone();
            let js = serde_json::to_string_pretty(&rc).expect("config serialises");
            write_file_atomic(&path, js.as_bytes())?;
        }
        Ok(())
    }

    /// Test hook: the next checkpoint fails after writing `files` of its files.
    #[doc(hidden)]
    pub fn inject_checkpoint_failure(&mut self, files: usize) {
        self.fail_after = Some(files);
    }

    /// Appends one JSON object as a line of `metrics.jsonl`.
    pub fn append_metrics(&self, value: &serde_json::Value) -> Result<()> {
        let path = self.root.join(METRICS_FILE);
        let mut f = io(
            &path,
            OpenOptions::new().create(true).append(true).open(&path),
        )?;
        io(&path, writeln!(f, "{value}"))
    }

    /// Drops metrics lines with a step beyond `step` (written by a run that was interrupted
    /// after its last checkpoint), so a resumed run's log reads as one uninterrupted run.
    pub fn truncate_metrics_after(&self, step: u64) -> Result<()> {
        let path = self.root.join(METRICS_FILE);
        if !path.exists() {
            return Ok(());
        }
        let s = io(&path, fs::read_to_string(&path))?;
        let kept: String = s
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_file_atomic(&path, kept.as_bytes())
    }

    /// The latest complete checkpoint, if any. Its directory must be `checkpoints/step-N`
    /// inside the run; anything else (an absolute path, `..`) is refused.
    pub fn latest(&self) -> Result<Option<Latest>> {
        let path = self.root.join(LATEST_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let l: Latest = read_json(&path)?;
        let parts: Vec<Component> = l.dir.components().collect();
        let inside = matches!(
            parts.as_slice(),
            [Component::Normal(a), Component::Normal(b)]
                if *a == CHECKPOINTS_DIR && b.to_string_lossy().starts_with("step-")
        );
        if !inside {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "dir {:?} is not a checkpoint of this run (expected \
                     {CHECKPOINTS_DIR}/step-N inside the run directory); refusing to follow it",
                    l.dir
                ),
            ));
        }
        Ok(Some(l))
    }

    /// Whether the run has any checkpoint to resume from (complete or not).
    pub fn has_checkpoint(&self) -> bool {
        self.root.join(LATEST_FILE).exists() || !step_dirs(&self.root).is_empty()
    }

    /// Loads the checkpoint to resume from: the one `latest.json` names or, when that one is
    /// unusable, the newest older checkpoint that loads (with a note on stderr, and
    /// `latest.json` pointed at it). `None` when the run has no checkpoint at all.
    pub fn load_resumable(
        &self,
        config: &DitConfig,
        adamw: AdamWConfig,
        frozen: impl Fn(&str) -> bool,
    ) -> Result<Option<(PathBuf, Loaded)>> {
        let (latest, mut problem) = match self.latest() {
            Ok(l) => (l, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut candidates: Vec<(u64, PathBuf)> = Vec::new();
        if let Some(l) = &latest {
            candidates.push((l.step, l.dir.clone()));
        }
        let below = latest.as_ref().map_or(u64::MAX, |l| l.step);
        candidates.extend(
            step_dirs(&self.root)
                .into_iter()
                .filter(|(s, d)| *s <= below && latest.as_ref().is_none_or(|l| &l.dir != d)),
        );
        if candidates.is_empty() {
            return match problem {
                Some(p) => Err(Error::Config(format!(
                    "{p}; and the run has no checkpoint directory to fall back on"
                ))),
                None => Ok(None),
            };
        }
        for (step, rel) in &candidates {
            let dir = self.root.join(rel);
            match Self::load_checkpoint(&dir, config, adamw, &frozen) {
                Ok(ld) => {
                    if let Some(p) = &problem {
                        let _ = writeln!(
                            std::io::stderr(),
                            "note: {p}\nnote: resuming from {}, the newest complete \
                             checkpoint",
                            dir.display()
                        );
                        let js = serde_json::to_string_pretty(&Latest {
                            step: *step,
                            dir: rel.clone(),
                        })
                        .expect("serialises");
                        write_file_atomic(&self.root.join(LATEST_FILE), js.as_bytes())?;
                    }
                    return Ok(Some((dir, ld)));
                }
                Err(e) => {
                    if problem.is_none() {
                        problem = Some(format!("checkpoint {} is unusable: {e}", dir.display()));
                    }
                }
            }
        }
        Err(Error::Config(format!(
            "--resume {}: no checkpoint loads ({}); the newest problem: {}",
            self.root.display(),
            candidates
                .iter()
                .map(|c| c.1.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            problem.unwrap_or_default()
        )))
    }

    fn step_dir_name(step: u64) -> String {
        format!("step-{step:08}")
    }

    /// Writes a checkpoint of `step` (see the module doc), points `latest.json` at it and
    /// keeps only the newest `keep` checkpoints. Returns its directory.
    pub fn save_checkpoint(
        &mut self,
        params: &DitParams,
        ema: &Ema,
        opt: &AdamW,
        state: &TrainState,
        keep: usize,
    ) -> Result<PathBuf> {
        let name = Self::step_dir_name(state.step);
        let ck = self.root.join(CHECKPOINTS_DIR);
        let (tmp, dir) = (ck.join(format!("{name}.tmp")), ck.join(&name));
        let rel = PathBuf::from(CHECKPOINTS_DIR).join(&name);
        if self.latest()?.is_some_and(|l| l.dir == rel) && dir.exists() {
            return Ok(dir); // this step is already the latest complete checkpoint
        }
        if tmp.exists() {
            io(&tmp, fs::remove_dir_all(&tmp))?;
        }
        io(&tmp, fs::create_dir_all(&tmp))?;
        let fail_after = self.fail_after.take();
        if let Err(e) = Self::write_files(&tmp, params, ema, opt, state, fail_after) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if dir.exists() {
            io(&dir, fs::remove_dir_all(&dir))?;
        }
        io(&dir, fs::rename(&tmp, &dir))?;
        sync_dir(&ck)?;
        let latest = Latest {
            step: state.step,
            dir: rel,
        };
        let js = serde_json::to_string_pretty(&latest).expect("serialises");
        write_file_atomic(&self.root.join(LATEST_FILE), js.as_bytes())?;
        sync_dir(&self.root)?;
        self.prune(keep, &name)?;
        Ok(dir)
    }

    fn write_files(
        dir: &Path,
        params: &DitParams,
        ema: &Ema,
        opt: &AdamW,
        state: &TrainState,
        fail_after: Option<usize>,
    ) -> Result<()> {
        let mut written = 0;
        let mut check = |file: &str| -> Result<()> {
            if fail_after == Some(written) {
                return Err(Error::io(
                    dir.join(file),
                    std::io::Error::other("injected write failure (test hook)"),
                ));
            }
            written += 1;
            Ok(())
        };
        check(MODEL_FILE)?;
        checkpoint::save(dir.join(MODEL_FILE), params)?;
        check(EMA_FILE)?;
        checkpoint::save(dir.join(EMA_FILE), &ema.shadow)?;
        check(OPTIM_FILE)?;
        save_optimizer(&dir.join(OPTIM_FILE), opt)?;
        check(STATE_FILE)?;
        let js = serde_json::to_string_pretty(state).expect("state serialises");
        write_file_atomic(&dir.join(STATE_FILE), js.as_bytes())?;
        for f in [MODEL_FILE, EMA_FILE, OPTIM_FILE] {
            let p = dir.join(f);
            io(&p, File::open(&p).and_then(|f| f.sync_all()))?;
        }
        sync_dir(dir)
    }

    /// Removes all but the newest `keep` checkpoint directories, never `current`.
    fn prune(&self, keep: usize, current: &str) -> Result<()> {
        let ck = self.root.join(CHECKPOINTS_DIR);
        let mut steps: Vec<(u64, PathBuf)> = io(&ck, fs::read_dir(&ck))?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let s = n.strip_prefix("step-")?.parse::<u64>().ok()?;
                (n != current).then(|| (s, e.path()))
            })
            .collect();
        steps.sort();
        let excess = (steps.len() + 1).saturating_sub(keep.max(1));
        for (_, p) in steps.into_iter().take(excess) {
            io(&p, fs::remove_dir_all(&p))?;
        }
        Ok(())
    }

    /// Reads the checkpoint in `dir` for a model of `config`; `frozen` and `adamw` rebuild
    /// the optimizer, whose moments must then all be present with matching shapes.
    pub fn load_checkpoint(
        dir: &Path,
        config: &DitConfig,
        adamw: AdamWConfig,
        frozen: impl Fn(&str) -> bool,
    ) -> Result<Loaded> {
        let state: TrainState = read_json(&dir.join(STATE_FILE))?;
        if state.format != RUN_FORMAT {
            return Err(Error::checkpoint(
                dir.join(STATE_FILE),
                format!("format {:?}, expected {RUN_FORMAT:?}", state.format),
            ));
        }
        let params = checkpoint::load(dir.join(MODEL_FILE), Some(config))?;
        let shadow = checkpoint::load(dir.join(EMA_FILE), Some(config))?;
        let mut opt = AdamW::new(&params, adamw, frozen);
        load_optimizer(&dir.join(OPTIM_FILE), &mut opt)?;
        if opt.step != state.step {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "optimizer step {} differs from the state's step {}",
                    opt.step, state.step
                ),
            ));
        }
        let ema = Ema {
            decay: state.ema_decay,
            num_updates: state.ema_num_updates,
            shadow,
        };
        Ok(Loaded {
            params,
            ema,
            opt,
            state,
        })
    }
}

/// Writes the AdamW moments of every trainable tensor and the step.
pub fn save_optimizer(path: &Path, opt: &AdamW) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, st) in opt.names.iter().zip(&opt.state) {
        if let Some(m) = st {
            tensors.push((format!("exp_avg.{name}"), OutTensor::F32(&m.exp_avg)));
            tensors.push((format!("exp_avg_sq.{name}"), OutTensor::F32(&m.exp_avg_sq)));
        }
    }
    let c = opt.config;
    let meta = HashMap::from([
        ("format".to_string(), "imdm-engine-adamw/1".to_string()),
        ("step".to_string(), opt.step.to_string()),
        ("beta1".to_string(), c.beta1.to_string()),
        ("beta2".to_string(), c.beta2.to_string()),
        ("eps".to_string(), c.eps.to_string()),
        ("weight_decay".to_string(), c.weight_decay.to_string()),
    ]);
    write_atomic(path, &tensors, meta)
}

/// Reads the moments written by [`save_optimizer`] into `opt` (built for the same model and
/// frozen set); every trainable tensor's moments must be present.
pub fn load_optimizer(path: &Path, opt: &mut AdamW) -> Result<()> {
    let f = StFile::open(path)?;
    let st = f.parse()?;
    f.verify_checksum()?;
    let meta = f.metadata()?;
    opt.step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::checkpoint(path, "metadata has no optimizer `step`"))?;
    let n_trainable = opt.state.iter().flatten().count();
    if st.len() != 2 * n_trainable {
        return Err(Error::checkpoint(
            path,
            format!(
                "{} tensors, expected {} (two moments for each of {n_trainable} trainable \
                 parameters; was the run started with another --freeze?)",
                st.len(),
                2 * n_trainable
            ),
        ));
    }
    for (name, slot) in opt.names.iter().zip(opt.state.iter_mut()) {
        let Some(Moments {
            exp_avg,
            exp_avg_sq,
        }) = slot
        else {
            continue;
        };
        for (key, t) in [
            (format!("exp_avg.{name}"), exp_avg),
            (format!("exp_avg_sq.{name}"), exp_avg_sq),
        ] {
            let v = st
                .tensor(&key)
                .map_err(|_| Error::checkpoint(path, format!("missing tensor {key}")))?;
            if v.shape() != t.shape.as_slice() {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor {key}: expected shape {:?}, got {:?}",
                        t.shape,
                        v.shape()
                    ),
                ));
            }
            *t = crate::stio::view_to_f32(path, &key, &v)?;
            if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {key}: element {i} is {}", t.data[i]),
                ));
            }
        }
    }
    Ok(())
}
