//! Model configuration: the reference's presets (spec 2.1) as constructors, the algorithm and
//! noise enums, and validation. The JSON form is what checkpoints carry in their metadata.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which algorithm a model serves: the loss it trains with, the sampler it is drawn with and
/// the bound `eval ppl` reports. It decides whether the eps MLP exists (IMDM), whether the
/// network is causal (AR) and whether it is time-conditioned (SEDD, D3PM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Absorbing-state masked diffusion (SUBS, log-linear): no eps MLP.
    Mdlm,
    /// Infinite mask: MDLM plus `imdm_mlp(eps)` added at masked positions (spec 3).
    Imdm,
    /// Autoregressive baseline: the causal DiT without adaLN, shifted next-token
    /// cross-entropy (spec 2.4, `algo.AR`).
    Ar,
    /// SEDD with the absorbing state: score parameterisation, score-entropy loss, analytic
    /// sampler; time-conditioned (`algo.SEDDAbsorb`).
    Sedd,
    /// D3PM with the absorbing state: 'mean' parameterisation, discrete-time L_vb with the
    /// reconstruction term; time-conditioned (`algo.D3PMAbsorb`).
    D3pm,
}

impl Algo {
    /// The spelling of the CLI flag, the JSON record and messages.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Mdlm => "mdlm",
            Algo::Imdm => "imdm",
            Algo::Ar => "ar",
            Algo::Sedd => "sedd",
            Algo::D3pm => "d3pm",
        }
    }

    /// Whether this is one of the SUBS masked diffusion models (MDLM, IMDM) that the
    /// MDLM/IMDM samplers, the NELBO evaluation, distillation and the GPU trainer serve.
    pub fn is_subs(self) -> bool {
        matches!(self, Algo::Mdlm | Algo::Imdm)
    }

    /// Whether the model reads a per-row sigma(t) (SEDD, D3PM).
    pub fn is_time_conditioned(self) -> bool {
        matches!(self, Algo::Sedd | Algo::D3pm)
    }

    /// Refuses a model of another algorithm than MDLM/IMDM where only those are served:
    /// `what` names the file or flag, `tool` the command and what it does.
    pub fn require_subs(self, what: &str, tool: &str) -> Result<()> {
        if self.is_subs() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "{what} holds a {} model, but {tool} serves mdlm and imdm models only",
            self.name()
        )))
    }
}

/// Distribution of the eps vector at masked positions (spec 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoiseType {
    /// `U[-1, 1)^noise_dim · noise_scale` (every reference script).
    Rand,
    /// `N(0, 1) · noise_scale`.
    Randn,
}

/// Named model sizes of the reference (spec 2.1; `medium` from MDLM/DUO).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    Tiny,
    Small,
    Medium,
    Large,
    Synthetic,
    Minimini,
}

/// Resolved configuration of one DiT. Every run directory and checkpoint records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitConfig {
    /// Preset name this was derived from, or "custom" (informational).
    pub preset: String,
    /// Model vocabulary V, mask token included.
    pub vocab_size: usize,
    /// Id of the mask token (V-1 when appended, 103 for BERT).
    pub mask_index: usize,
    /// Sequence length L the model is used at.
    pub length: usize,
    /// Hidden width D.
    pub hidden: usize,
    /// Attention heads H; head dim = D / H.
    pub heads: usize,
    /// Number of DiT blocks.
    pub blocks: usize,
    /// Width of the conditioning vector c.
    pub cond_dim: usize,
    /// MLP hidden width = mlp_ratio · D.
    pub mlp_ratio: usize,
    /// Dropout on both branch outputs in training.
    pub dropout: f64,
    /// Attention logit softcap; <= 0 means off (50 for LM1B).
    pub softcap: f64,
    pub algo: Algo,
    /// Length of eps at each masked position (IMDM).
    pub noise_dim: usize,
    pub noise_type: NoiseType,
    pub noise_scale: f64,
    /// Causal AR baseline: no adaLN, no sigma map, causal attention.
    pub causal: bool,
    /// Per-row time conditioning: each sequence's adaLN modulation comes from its own
    /// sigma(t) through the sigma map (SEDD, D3PM). Off for MDLM/IMDM, whose modulation is
    /// one constant vector (sigma = 0, spec 2.2). Absent in older files: off.
    #[serde(default)]
    pub time_conditioning: bool,
}

impl DitConfig {
    /// A preset with the OWT vocabulary (50258, mask appended) unless the preset is a synthetic
    /// one (50001, mask 50000). IMDM noise_dim defaults to D (spec 2.1).
    pub fn preset(p: Preset) -> Self {
        let (name, hidden, heads, blocks, cond, length, dropout, vocab) = match p {
            Preset::Tiny => ("tiny", 256, 8, 8, 128, 1024, 0.1, 50258),
            Preset::Small => ("small", 768, 12, 12, 128, 1024, 0.1, 50258),
            Preset::Medium => ("medium", 1024, 16, 24, 128, 1024, 0.1, 50258),
            Preset::Large => ("large", 1536, 16, 24, 128, 1024, 0.1, 50258),
            Preset::Synthetic => ("synthetic", 128, 4, 4, 128, 10, 0.0, 50001),
            Preset::Minimini => ("minimini", 64, 2, 2, 64, 3, 0.0, 50001),
        };
        DitConfig {
            preset: name.to_string(),
            vocab_size: vocab,
            mask_index: vocab - 1,
            length,
            hidden,
            heads,
            blocks,
            cond_dim: cond,
            mlp_ratio: 4,
            dropout,
            softcap: 0.0,
            algo: Algo::Imdm,
            noise_dim: hidden,
            noise_type: NoiseType::Rand,
            noise_scale: 1.0,
            causal: false,
            time_conditioning: false,
        }
    }

    pub fn tiny() -> Self {
        Self::preset(Preset::Tiny)
    }
    pub fn small() -> Self {
        Self::preset(Preset::Small)
    }
    pub fn medium() -> Self {
        Self::preset(Preset::Medium)
    }
    pub fn large() -> Self {
        Self::preset(Preset::Large)
    }
    pub fn synthetic() -> Self {
        Self::preset(Preset::Synthetic)
    }
    pub fn minimini() -> Self {
        Self::preset(Preset::Minimini)
    }

    /// Head dimension D / H.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// MLP hidden width.
    pub fn mlp_hidden(&self) -> usize {
        self.mlp_ratio * self.hidden
    }

    /// Whether the eps MLP exists.
    pub fn has_eps_mlp(&self) -> bool {
        self.algo == Algo::Imdm && !self.causal
    }

    /// Whether blocks carry adaLN modulation (everything but the AR baseline).
    pub fn has_adaln(&self) -> bool {
        !self.causal
    }

    /// Whether the attention softcap is on.
    pub fn softcap_on(&self) -> bool {
        self.softcap > 0.0
    }

    /// Checks internal consistency; every constructor path ends here.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden == 0 || self.heads == 0 || self.hidden % self.heads != 0 {
            return bad(format!(
                "hidden {} must be a positive multiple of heads {}",
                self.hidden, self.heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head dim {} must be even for rotary",
                self.head_dim()
            ));
        }
        if self.vocab_size < 2 {
            return bad(format!("vocab_size {} must be at least 2", self.vocab_size));
        }
        if self.mask_index >= self.vocab_size {
            return bad(format!(
                "mask_index {} must be below vocab_size {}",
                self.mask_index, self.vocab_size
            ));
        }
        if self.blocks == 0 || self.cond_dim == 0 || self.mlp_ratio == 0 || self.length == 0 {
            return bad("blocks, cond_dim, mlp_ratio and length must be positive".into());
        }
        if self.time_conditioning && self.causal {
            return bad(
                "time_conditioning needs the adaLN modulation, which the causal AR baseline \
                 (causal) does not have; turn one of them off"
                    .into(),
            );
        }
        if self.algo == Algo::Ar && !self.causal {
            return bad("algo ar is the causal DiT: it needs causal = true".into());
        }
        if self.algo.is_time_conditioned() && (self.causal || !self.time_conditioning) {
            return bad(format!(
                "algo {} is the time-conditioned bidirectional DiT: it needs \
                 time_conditioning = true and causal = false",
                self.algo.name()
            ));
        }
        if self.algo == Algo::Imdm && self.noise_dim == 0 {
            return bad("IMDM needs noise_dim > 0".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if !self.softcap.is_finite() || !self.noise_scale.is_finite() {
            return bad("softcap and noise_scale must be finite".into());
        }
        // Far above any real model; beyond them sizes overflow or exhaust memory.
        for (what, v, max) in [
            ("vocab_size (--vocab)", self.vocab_size, 1usize << 24),
            ("length (--length)", self.length, 1 << 20),
            ("hidden (--hidden)", self.hidden, 1 << 16),
            ("heads (--heads)", self.heads, 1 << 10),
            ("blocks (--blocks)", self.blocks, 1 << 12),
            ("cond_dim (--cond-dim)", self.cond_dim, 1 << 16),
            ("noise_dim (--noise-dim)", self.noise_dim, 1 << 16),
            ("mlp_ratio", self.mlp_ratio, 64),
        ] {
            if v > max {
                return bad(format!("{what} {v} is above the limit {max}"));
            }
        }
        Ok(())
    }

    /// Sets `algo` and the switches it implies: AR is causal, SEDD and D3PM are
    /// time-conditioned, MDLM and IMDM are neither (an explicit `causal` MDLM stays causal).
    pub fn set_algo(&mut self, algo: Algo) {
        self.algo = algo;
        match algo {
            Algo::Ar => {
                self.causal = true;
                self.time_conditioning = false;
            }
            Algo::Sedd | Algo::D3pm => {
                self.causal = false;
                self.time_conditioning = true;
            }
            Algo::Mdlm | Algo::Imdm => self.time_conditioning = false,
        }
    }

    /// Parses the JSON stored in checkpoint metadata, then validates it.
    pub fn from_json(s: &str) -> Result<Self> {
        let c: DitConfig = serde_json::from_str(s)
            .map_err(|e| Error::Config(format!("invalid config JSON: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// JSON form (one line) for metadata and run directories.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_roundtrip_json() {
        for p in [
            Preset::Tiny,
            Preset::Small,
            Preset::Medium,
            Preset::Large,
            Preset::Synthetic,
            Preset::Minimini,
        ] {
            let c = DitConfig::preset(p);
            c.validate().unwrap();
            assert_eq!(DitConfig::from_json(&c.to_json()).unwrap(), c);
        }
        assert_eq!(DitConfig::small().head_dim(), 64);
        assert_eq!(DitConfig::large().head_dim(), 96);
        assert_eq!(DitConfig::synthetic().length, 10);
    }

    #[test]
    fn validate_names_the_problem() {
        let mut c = DitConfig::tiny();
        c.mask_index = c.vocab_size;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mask_index"), "{e}");
        let e = DitConfig::from_json("{\"preset\": 1}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid config JSON"), "{e}");
    }

    #[test]
    fn time_conditioning_round_trips_and_refuses_the_causal_mode() {
        let mut c = DitConfig::minimini();
        c.time_conditioning = true;
        let j = c.to_json();
        assert!(j.contains("\"time_conditioning\":true"), "{j}");
        assert_eq!(DitConfig::from_json(&j).unwrap(), c);
        // Files written before the field existed read as off.
        let old = DitConfig::minimini()
            .to_json()
            .replace(",\"time_conditioning\":false", "");
        assert!(!old.contains("time_conditioning"), "{old}");
        assert!(!DitConfig::from_json(&old).unwrap().time_conditioning);
        c.causal = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("time_conditioning") && e.contains("causal"),
            "{e}"
        );
    }
}
