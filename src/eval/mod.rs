//! Evaluation: scoring what the models produce.
//!
//! - [`ppl`]: held-out NELBO and perplexity of a denoiser (spec 8.1).
//! - [`lm`]: the [`lm::Judge`] interface, a causal language model that scores text (Gen PPL,
//!   spec 8.2) and gives features (MAUVE, spec 8.4), independent of how it is implemented.

pub mod lm;
pub mod ppl;
