//! The diffusion side of the engine, independent of how the DiT is computed (CPU or GPU):
//! the batch a loss sees and the `Denoiser` contract that samplers drive.

pub mod denoiser;
pub mod noising;
pub mod schedule;

pub use denoiser::{Denoiser, LossBatch};
