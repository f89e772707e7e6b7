//! A GGUF causal language model as the [`Judge`] of generative evaluation (spec 8.2, 8.4).
//!
//! - [`open`]: a `.gguf` path or a judge name (`smollm2`, `qwen-0.5b`, `qwen-1.5b`) looked up in
//!   `data/judges/` (or `$IMDM_JUDGES`), where `scripts/fetch-judge.sh NAME` puts it.
//! - `gguf`: the header (candle-core's `gguf_file`), the hyper-parameters and the weights as
//!   row views of the mapped file, dequantised by candle's block types.
//! - `tokenizer`: byte-level BPE from the metadata with the model's pre-tokenizer family.
//! - `forward`: the llama / qwen2 forward on the CPU, log-probabilities at every position.
//!
//! Only llama-family decoders are read (RMSNorm, rotary, grouped-query attention, SwiGLU, tied
//! or untied output, optional q/k/v biases). The forward is written here rather than taken
//! from candle-transformers because its quantised models return the last position's logits
//! only; the products use f32 weights dequantised tile by tile rather than candle's `QMatMul`,
//! which quantises the activations to 8 bits and so would not match a float reference.

mod forward;
mod gguf;
mod tokenizer;

#[cfg(test)]
mod forward_tests;
#[cfg(test)]
mod tokenizer_tests;

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::eval::lm::Judge;

pub use gguf::{LlamaConfig, RopeStyle};
pub use tokenizer::{JudgeTokenizer, PreFamily};

/// The judge names `scripts/fetch-judge.sh` knows, each stored as `NAME.gguf`.
pub const JUDGE_NAMES: [&str; 3] = ["smollm2", "qwen-0.5b", "qwen-1.5b"];

/// Sequences are scored in passes of at most this many tokens (bounds the activations; the
/// results do not depend on it).
const TOKENS_PER_PASS: usize = 8192;

/// The folder judge names are looked up in: `$IMDM_JUDGES`, else `data/judges` at the
/// repository root.
pub fn judges_dir() -> PathBuf {
    match std::env::var_os("IMDM_JUDGES") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("data/judges"),
    }
}

/// The file a judge spec names: a known name becomes `judges_dir()/NAME.gguf`, anything else is
/// a path. Fails, naming the file and what to run, when it does not exist.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if JUDGE_NAMES.contains(&spec) {
        let p = judges_dir().join(format!("{spec}.gguf"));
        if !p.is_file() {
            return Err(gguf::judge_err(
                &p,
                format!(
                    "judge {spec:?} is not fetched; run scripts/fetch-judge.sh {spec} \
                     (or set IMDM_JUDGES to the folder that holds {spec}.gguf)"
                ),
            ));
        }
        return Ok(p);
    }
    let p = PathBuf::from(spec);
    if !p.is_file() {
        return Err(gguf::judge_err(
            &p,
            format!(
                "no such file; --judge takes a .gguf file or one of {}",
                JUDGE_NAMES.join(", ")
            ),
        ));
    }
    Ok(p)
}

/// Opens the judge `spec` (a `.gguf` path or a name of [`JUDGE_NAMES`]).
pub fn open(spec: &str) -> Result<Box<dyn Judge>> {
    Ok(Box::new(GgufJudge::open(&resolve(spec)?)?))
}

/// The tokenizer of a GGUF file alone (its metadata; the file need hold no tensors).
pub fn open_tokenizer(path: &Path) -> Result<JudgeTokenizer> {
    tokenizer::from_gguf(&gguf::GgufFile::open(path)?)
}

/// A llama-family GGUF model and its tokenizer, scoring on the CPU.
pub struct GgufJudge {
    model: forward::Model,
    tok: tokenizer::JudgeTokenizer,
}

impl GgufJudge {
    /// Loads `path` (maps the file; the weights stay quantised).
    pub fn open(path: &Path) -> Result<Self> {
        let file = gguf::GgufFile::open(path)?;
        let tok = tokenizer::from_gguf(&file)?;
        let model = forward::Model::load(file)?;
        if tok.inner.get_vocab_size(true) > model.cfg.vocab {
            return Err(model.file.err(format!(
                "the tokenizer has {} tokens, the embedding {} rows",
                tok.inner.get_vocab_size(true),
                model.cfg.vocab
            )));
        }
        Ok(GgufJudge { model, tok })
    }

    /// The hyper-parameters read from the file.
    pub fn config(&self) -> &LlamaConfig {
        &self.model.cfg
    }

    /// The pre-tokenizer family of `tokenizer.ggml.pre`.
    pub fn pre_family(&self) -> PreFamily {
        self.tok.family
    }

    /// The final normed hidden states at every position of each sequence (`[len, d]`
    /// row-major per sequence).
    pub fn hidden_states(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let d = self.model.cfg.d_model;
        let mut out = Vec::with_capacity(seqs.len());
        for pass in self.passes(seqs)? {
            let refs: Vec<&[u32]> = pass.iter().map(|s| s.as_slice()).collect();
            let z = self.model.hidden(&refs)?;
            let mut at = 0;
            for s in &refs {
                out.push(z[at * d..(at + s.len()) * d].to_vec());
                at += s.len();
            }
        }
        Ok(out)
    }

    /// Checks ids and lengths, and groups consecutive sequences into passes of at most
    /// [`TOKENS_PER_PASS`] tokens (a longer sequence gets a pass of its own).
    fn passes<'a>(&self, seqs: &'a [Vec<u32>]) -> Result<Vec<&'a [Vec<u32>]>> {
        let cfg = &self.model.cfg;
        for (i, s) in seqs.iter().enumerate() {
            if s.len() > cfg.context_len {
                return Err(self.model.file.err(format!(
                    "sequence {i} has {} tokens, the context length is {}",
                    s.len(),
                    cfg.context_len
                )));
            }
            if let Some(&bad) = s.iter().find(|&&id| id as usize >= cfg.vocab) {
                return Err(self.model.file.err(format!(
                    "sequence {i} holds id {bad}, the vocabulary has {} tokens",
                    cfg.vocab
                )));
            }
        }
        let mut passes = Vec::new();
        let (mut from, mut tokens) = (0, 0);
        for (i, s) in seqs.iter().enumerate() {
            if i > from && tokens + s.len() > TOKENS_PER_PASS {
                passes.push(&seqs[from..i]);
                from = i;
                tokens = 0;
            }
            tokens += s.len();
        }
        if from < seqs.len() {
            passes.push(&seqs[from..]);
        }
        Ok(passes)
    }
}

impl Judge for GgufJudge {
    fn describe(&self) -> String {
        let c = &self.model.cfg;
        let f = &self.model.file;
        let name = f
            .meta_str("general.name")
            .map(|s| format!("{s} "))
            .unwrap_or_default();
        let dtypes: Vec<String> = f
            .dtype_counts()
            .into_iter()
            .map(|(t, n)| format!("{t}×{n}"))
            .collect();
        format!(
            "{name}({}): {}, {} layers, d {}, {}/{} heads, vocab {}, {} output, {} [{}], {:.1}M parameters",
            f.path.display(),
            c.arch,
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.vocab,
            if self.model.tied { "tied" } else { "untied" },
            format!("{:?}", self.tok.family).to_lowercase(),
            dtypes.join(" "),
            self.model.n_params() as f64 / 1e6
        )
    }

    fn context_len(&self) -> usize {
        self.model.cfg.context_len
    }

    fn eos_id(&self) -> u32 {
        self.tok.eos
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids)
    }

    fn token_log_probs(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(seqs.len());
        for pass in self.passes(seqs)? {
            let refs: Vec<&[u32]> = pass.iter().map(|s| s.as_slice()).collect();
            let z = self.model.hidden(&refs)?;
            let targets: Vec<Option<u32>> = refs
                .iter()
                .flat_map(|s| (0..s.len()).map(move |j| s.get(j + 1).copied()))
                .collect();
            let lp = self.model.log_softmax_at(&z, &targets)?;
            let mut at = 0;
            for s in &refs {
                let n = s.len().saturating_sub(1);
                out.push(lp[at..at + n].iter().map(|&v| v as f32).collect());
                at += n;
            }
        }
        Ok(out)
    }

    fn final_hidden(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let d = self.model.cfg.d_model;
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(self.model.file.err(format!(
                "sequence {i} is empty: it has no final hidden state"
            )));
        }
        Ok(self
            .hidden_states(seqs)?
            .into_iter()
            .map(|h| h[h.len() - d..].to_vec())
            .collect())
    }
}
