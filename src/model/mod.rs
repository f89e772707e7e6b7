//! The DiT denoiser: configuration presets, parameters and their reference names, random
//! initialisation, safetensors checkpoints and the CPU reference forward (`dit_ref`).

pub mod checkpoint;
pub mod config;
pub mod dit_ref;
pub mod init;
pub mod params;

pub use config::{Algo, DitConfig, NoiseType, Preset};
pub use params::DitParams;
