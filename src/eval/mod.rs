//! Evaluation: scoring what the models produce.
//!
//! - [`lm`]: the [`lm::Judge`] interface, a causal language model that scores text (Gen PPL,
//!   spec 8.2) and gives features (MAUVE, spec 8.4), independent of how it is implemented.
//! - [`judge`]: [`judge::GgufJudge`], a llama-family GGUF model implementing it on the CPU.

pub mod judge;
pub mod lm;
