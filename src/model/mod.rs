//! The DiT denoiser: configuration presets, parameters and their reference names, random
//! initialisation, safetensors checkpoints and the CPU reference forward (`dit_ref`).

pub mod checkpoint;
pub mod cond;
pub mod config;
pub mod dit;
pub mod dit_bwd;
pub mod dit_ref;
pub mod gpu_denoiser;
pub mod init;
pub mod param_tree;
pub mod params;

pub use config::{Algo, DitConfig, NoiseType, Preset};
pub use params::DitParams;
