//! How `imdm-engine train`'s flags resolve into the run's configurations: the model of a new
//! run (preset or `--init` file, plus overrides), its training configuration, and the
//! configuration of a resumed run (the recorded one, with the flags a resume may change).

use std::path::Path;

use super::train::{parse_data, ObjectiveKind, TrainArgs};
use crate::data::Manifest;
use crate::diffusion::d3pm::D3pmOptions;
use crate::error::{Error, Result};
use crate::model::{checkpoint, DitConfig};
use crate::train::config::{DataSpec, Freeze, TrainConfig};
use crate::train::run::RunConfig;

/// The model configuration of a new run: the preset (or the --init file's recorded config)
/// with every override applied.
pub(super) fn resolve_model(a: &TrainArgs) -> Result<DitConfig> {
    let c = &a.config;
    let mut m = match (c.preset, &a.init) {
        (Some(p), _) => DitConfig::preset(p),
        (None, Some(init)) => checkpoint::read_config(init)?.ok_or_else(|| {
            Error::Config(format!(
                "--init {}: the file records no configuration; choose one with --preset",
                init.display()
            ))
        })?,
        (None, None) => {
            return Err(Error::Config(
                "a new run needs --preset (or --init with a checkpoint that records its \
                 configuration)"
                    .into(),
            ))
        }
    };
    let shards = a.data.as_deref().filter(|d| d.starts_with("shards:"));
    if let (Some(_), Some(d)) = (c.preset, shards) {
        // Shards define V, the mask and L; explicit flags still win (and are then checked).
        let DataSpec::Shards { dir } = parse_data(d, None)? else {
            unreachable!("a shards: flag parses as shards")
        };
        let man = Manifest::read(&dir)?;
        m.vocab_size = man.vocab_size;
        m.mask_index = man.mask_index as usize;
        m.length = man.length;
    }
    c.apply(&mut m);
    if let Some(h) = a.hidden {
        if c.noise_dim.is_none() && m.noise_dim == m.hidden {
            m.noise_dim = h;
        }
        m.hidden = h;
    }
    if let Some(x) = a.heads {
        m.heads = x;
    }
    if let Some(x) = a.blocks {
        m.blocks = x;
    }
    if let Some(x) = a.cond_dim {
        m.cond_dim = x;
    }
    if let Some(x) = a.dropout {
        m.dropout = x;
    }
    if let Some(x) = a.noise_scale {
        m.noise_scale = x;
    }
    if a.hidden.is_some() || a.heads.is_some() || a.blocks.is_some() || a.cond_dim.is_some() {
        m.preset = "custom".into();
    }
    m.validate()?;
    Ok(m)
}

/// The training configuration of a new run.
pub(super) fn resolve_train(a: &TrainArgs) -> Result<TrainConfig> {
    let d = TrainConfig::default();
    let data = a.data.as_deref().ok_or_else(|| {
        Error::Config("a new run needs --data (synthetic, shards:DIR or tokens:PATH)".into())
    })?;
    let batch = a.batch.unwrap_or(d.batch);
    let c = TrainConfig {
        data: parse_data(data, a.token_dtype)?,
        batch,
        micro_batch: a.micro_batch.unwrap_or(batch),
        steps: a.steps.unwrap_or(d.steps),
        lr: a.lr.unwrap_or(d.lr),
        warmup: a.warmup.unwrap_or(d.warmup),
        weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
        ema: a.ema.unwrap_or(d.ema),
        clip: a.clip.unwrap_or(d.clip),
        seed: a.seed.unwrap_or(d.seed),
        log_every: a.log_every.unwrap_or(d.log_every),
        eval_every: a.eval_every.unwrap_or(d.eval_every),
        eval_size: a.eval_size.unwrap_or(d.eval_size),
        save_every: a.save_every.unwrap_or(d.save_every),
        keep_checkpoints: a.keep_checkpoints.unwrap_or(d.keep_checkpoints),
        freeze: Freeze {
            prefixes: a.freeze.clone(),
            ln_only: a.ln_tune,
        },
        init: a.init.clone(),
        d3pm: D3pmOptions {
            steps: a.d3pm_steps.unwrap_or(d.d3pm.steps),
            alpha_s: a.d3pm_alpha_s.unwrap_or(d.d3pm.alpha_s),
            ..d.d3pm
        },
        ..d
    };
    c.validate()?;
    Ok(c)
}

/// With --resume: the recorded configuration, with the flags that may change applied; any
/// other flag given must agree with the record.
pub(super) fn resolve_resume(a: &TrainArgs, dir: &Path, rec: &RunConfig) -> Result<TrainConfig> {
    let c = &a.config;
    let model_flags = c.preset.is_some()
        || c.vocab.is_some()
        || c.mask_index.is_some()
        || c.noise_dim.is_some()
        || c.algo.is_some()
        || c.noise_type.is_some()
        || c.softcap.is_some()
        || c.length.is_some()
        || c.ar
        || a.hidden.is_some()
        || a.heads.is_some()
        || a.blocks.is_some()
        || a.cond_dim.is_some()
        || a.dropout.is_some()
        || a.noise_scale.is_some()
        || a.init.is_some();
    if model_flags {
        return Err(Error::Config(format!(
            "--resume {}: the model flags (--preset, sizes, --algo, --init, ...) cannot be \
             changed; the run's recorded configuration is used",
            dir.display()
        )));
    }
    if a.run_dir.as_ref().is_some_and(|r| r != dir) {
        return Err(Error::Config(
            "--run-dir and --resume name different directories; give only --resume".into(),
        ));
    }
    let mut t = rec.train.clone();
    let mut clash = Vec::new();
    let mut check = |flag: &str, given: Option<String>, recorded: String| {
        if let Some(g) = given {
            if g != recorded {
                clash.push(format!("{flag} {g} (the run has {recorded})"));
            }
        }
    };
    check(
        "--batch",
        a.batch.map(|x| x.to_string()),
        t.batch.to_string(),
    );
    check(
        "--micro-batch",
        a.micro_batch.map(|x| x.to_string()),
        t.micro_batch.to_string(),
    );
    check("--lr", a.lr.map(|x| x.to_string()), t.lr.to_string());
    check(
        "--warmup",
        a.warmup.map(|x| x.to_string()),
        t.warmup.to_string(),
    );
    check(
        "--weight-decay",
        a.weight_decay.map(|x| x.to_string()),
        t.weight_decay.to_string(),
    );
    check("--ema", a.ema.map(|x| x.to_string()), t.ema.to_string());
    check("--clip", a.clip.map(|x| x.to_string()), t.clip.to_string());
    check("--seed", a.seed.map(|x| x.to_string()), t.seed.to_string());
    check(
        "--d3pm-steps",
        a.d3pm_steps.map(|x| x.to_string()),
        t.d3pm.steps.to_string(),
    );
    check(
        "--d3pm-alpha-s",
        a.d3pm_alpha_s.map(|x| format!("{x:?}")),
        format!("{:?}", t.d3pm.alpha_s),
    );
    check(
        "--eval-size",
        a.eval_size.map(|x| x.to_string()),
        t.eval_size.to_string(),
    );
    if let Some(d) = &a.data {
        let given = parse_data(d, a.token_dtype)?;
        if given != t.data {
            clash.push(format!("--data {d} (the run has {:?})", t.data));
        }
    }
    let freeze = Freeze {
        prefixes: a.freeze.clone(),
        ln_only: a.ln_tune,
    };
    if freeze != Freeze::default() && freeze != t.freeze {
        clash.push(format!("--freeze/--ln-tune (the run has {:?})", t.freeze));
    }
    let recorded = ObjectiveKind::from_recorded(&rec.objective)?;
    if a.objective.is_some_and(|o| o != recorded) {
        clash.push(format!("--objective (the run has {})", rec.objective));
    }
    if !clash.is_empty() {
        return Err(Error::Config(format!(
            "--resume {}: these flags differ from the run's recorded configuration and would \
             change its trajectory: {}",
            dir.display(),
            clash.join("; ")
        )));
    }
    if let Some(s) = a.steps {
        t.steps = s;
    }
    if let Some(x) = a.log_every {
        t.log_every = x;
    }
    if let Some(x) = a.eval_every {
        t.eval_every = x;
    }
    if let Some(x) = a.save_every {
        t.save_every = x;
    }
    if let Some(x) = a.keep_checkpoints {
        t.keep_checkpoints = x;
    }
    t.validate()?;
    Ok(t)
}
