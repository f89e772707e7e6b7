//! Evaluation: scoring what the models produce.
//!
//! - [`ppl`]: held-out NELBO and perplexity of a denoiser (spec 8.1); [`baseline_ppl`]: the
//!   same protocol for the AR (exact NLL), SEDD and D3PM (their bounds) baselines.
//! - [`lm`]: the [`lm::Judge`] interface, a causal language model that scores text (Gen PPL,
//!   spec 8.2) and gives features (MAUVE, spec 8.4), independent of how it is implemented.
//! - [`judge`]: opening a judge by file or name; [`judge::GgufJudge`], a llama-family GGUF
//!   model implementing it on the CPU.
//! - [`gen_ppl`]: the Gen PPL protocol of spec 8.2 (retokenisation, the valid-token rule,
//!   pooling).
//! - [`mauve`]: MAUVE as mauve-text computes it (PCA, k-means, divergence frontier).
//! - [`gen`]: generative evaluation of checkpoints, sample files and held-out text (Gen PPL,
//!   entropy, TC, conditional generation and MAUVE), the library behind `eval gen`.
//! - [`toy`]: small deterministic judges for tests.

pub mod baseline_ppl;
pub mod gen;
pub mod gen_ppl;
pub mod judge;
pub mod lm;
pub mod mauve;
pub mod ppl;
pub mod toy;
