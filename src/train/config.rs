//! The training configuration: every setting that decides the trajectory, serialised into the
//! run directory (`config.json`) so a resume continues exactly the run that was started.
//! Defaults are the reference's (spec 9) where it has one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::diffusion::d3pm::D3pmOptions;
use crate::error::{Error, Result};

/// Element type of a token file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

/// Where training sequences come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DataSpec {
    /// Spec 1.3 `synthetic-align`: one token per sequence, uniform over the vocabulary minus
    /// the mask, repeated over all L positions.
    Synthetic,
    /// A flat little-endian file of (N, L) token ids.
    Tokens { path: PathBuf, dtype: TokenDtype },
    /// A folder prepared by `data prepare`: its `train` split, shuffled per epoch by the data
    /// loader; validation on its `valid` split.
    Shards { dir: PathBuf },
}

/// Which parameters stay fixed (no gradient step, excluded from the clip norm).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Freeze {
    /// Parameters whose reference name starts with any of these are frozen.
    pub prefixes: Vec<String>,
    /// Train only the LayerNorm weights (`optim.ln_tune` of the reference).
    pub ln_only: bool,
}

impl Freeze {
    /// Whether the parameter `name` (reference naming, spec 2.5) is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        let is_ln = name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name.ends_with("norm_final.weight");
        (self.ln_only && !is_ln) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// Everything about a run except the model configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataSpec,
    /// Global batch (sequences per optimizer step).
    pub batch: usize,
    /// Sequences per forward/backward; `batch` must be a multiple of it.
    pub micro_batch: usize,
    /// Optimizer steps of the whole run.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps (torch LambdaLR semantics: step n uses lr·n/warmup).
    pub warmup: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// EMA decay (0 disables the EMA: the EMA weights then equal the raw weights).
    pub ema: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
    /// Seed of data order, times, masks, eps and dropout.
    pub seed: u64,
    /// Steps between progress lines / metrics entries.
    pub log_every: u64,
    /// Steps between validations (0 = only at the end).
    pub eval_every: u64,
    /// Held-out sequences for validation (0 = no validation).
    pub eval_size: usize,
    /// Steps between checkpoints (0 = only the final one).
    pub save_every: u64,
    /// Checkpoints kept on disk (the newest ones; at least 1).
    pub keep_checkpoints: usize,
    pub freeze: Freeze,
    /// Initial weights (fine-tuning), recorded for provenance.
    pub init: Option<PathBuf>,
    /// D3PM's discrete steps and L_vb variant (read by d3pm models only). Absent in older
    /// files: the reference's settings.
    #[serde(default)]
    pub d3pm: D3pmOptions,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: DataSpec::Synthetic,
            batch: 512,
            micro_batch: 512,
            steps: 1_000_000,
            lr: 3e-4,
            warmup: 2500,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            ema: 0.9999,
            clip: 1.0,
            seed: 1,
            log_every: 10,
            eval_every: 500,
            eval_size: 256,
            save_every: 500,
            keep_checkpoints: 2,
            freeze: Freeze::default(),
            init: None,
            d3pm: D3pmOptions::default(),
        }
    }
}

impl TrainConfig {
    /// Micro-batches per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.batch / self.micro_batch.max(1)
    }

    /// Checks ranges and divisibility; messages name the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch == 0 || self.micro_batch == 0 {
            return bad("--batch and --micro-batch must be positive".into());
        }
        if self.batch % self.micro_batch != 0 {
            return bad(format!(
                "--batch {} must be a multiple of --micro-batch {}",
                self.batch, self.micro_batch
            ));
        }
        if self.d3pm.steps < 2 {
            return bad(format!(
                "--d3pm-steps {}: D3PM needs at least 2 discrete steps",
                self.d3pm.steps
            ));
        }
        if self.steps == 0 {
            return bad("--steps must be positive".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("--lr {} must be finite and >= 0", self.lr));
        }
        for (flag, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("AdamW {flag} {b} must be in [0, 1)"));
            }
        }
        if !(self.adam_eps > 0.0 && self.adam_eps.is_finite()) {
            return bad(format!("AdamW eps {} must be positive", self.adam_eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("--weight-decay {} must be >= 0", self.weight_decay));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return bad(format!("--ema {} must be in [0, 1)", self.ema));
        }
        if !(self.clip >= 0.0 && self.clip.is_finite()) {
            return bad(format!("--clip {} must be >= 0 (0 = off)", self.clip));
        }
        if self.log_every == 0 {
            return bad("--log-every must be positive".into());
        }
        if self.keep_checkpoints == 0 {
            return bad("--keep-checkpoints must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_rules() {
        let f = Freeze {
            prefixes: vec!["vocab_embed.".into()],
            ln_only: false,
        };
        assert!(f.is_frozen("vocab_embed.embedding"));
        assert!(f.is_frozen("vocab_embed.imdm_mlp.0.weight"));
        assert!(!f.is_frozen("blocks.0.norm1.weight"));
        let ln = Freeze {
            prefixes: vec![],
            ln_only: true,
        };
        assert!(!ln.is_frozen("blocks.3.norm2.weight"));
        assert!(!ln.is_frozen("output_layer.norm_final.weight"));
        assert!(ln.is_frozen("blocks.3.mlp.0.weight"));
        assert!(!Freeze::default().is_frozen("anything"));
    }

    #[test]
    fn validate_names_the_flag() {
        let c = TrainConfig {
            batch: 10,
            micro_batch: 4,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--batch 10") && e.contains("--micro-batch 4"),
            "{e}"
        );
        TrainConfig::default().validate().unwrap();
        let js = serde_json::to_string(&TrainConfig::default()).unwrap();
        let back: TrainConfig = serde_json::from_str(&js).unwrap();
        assert_eq!(back, TrainConfig::default());
    }
}
