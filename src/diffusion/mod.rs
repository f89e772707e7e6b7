//! The diffusion side of the engine, independent of how the DiT is computed (CPU or GPU):
//! the batch a loss sees and the `Denoiser` contract that samplers drive.

pub mod algo_batch;
pub mod ar;
pub mod d3pm;
pub mod denoiser;
pub mod logits_model;
pub mod metrics;
pub mod noising;
pub mod posterior;
pub mod sampler;
pub mod schedule;
pub mod sedd;
pub mod stats;
pub mod stream;
pub mod toy;

pub use denoiser::{check_sigma, Denoiser, DistillBatch, DistillMode, LossBatch};
pub use posterior::{Outcome, SamplerKind, StepAlphas, TokenFilter};
pub use sampler::{generate, NoiseRemoval, SampleOutput, SamplerConfig};
pub use stream::SamplerStream;
