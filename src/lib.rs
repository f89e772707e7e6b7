//! # imdm-engine
//!
//! Masked diffusion language models (MDLM) and Infinite Mask Diffusion (IMDM) with
//! hand-written CUDA kernels, each checked against a CPU twin.
//!
//! How the pieces fit:
//! - [`model`]: the DiT denoiser of the reference. `config` holds the presets (spec 2.1),
//!   `params` the per-layer parameter structs and the reference's tensor names (spec 2.5),
//!   `init` the reference initialisation, `checkpoint` safetensors I/O with named errors, and
//!   `dit_ref` the CPU reference forward that everything else is measured against. `dit_ref`
//!   itself is checked against an independent PyTorch implementation (`tools/reference/`)
//!   through committed fixtures (`tests/fixtures/`).
//! - [`cpu`] and [`cuda`]: the two backends of one model. [`cuda`] holds the device context
//!   (cudarc, dynamic loading; the PTX that `build.rs` compiles from `kernels/*.cu`, kernel
//!   lookup, the `--device cpu|cuda|auto` choice), the tape, the GPU DiT forward and backward,
//!   the denoiser, the trainer, and `cuda::ops`: one module per kernel file, its only launcher
//!   and its CPU twin, with its tests in a file of their own beside it.
//! - [`optim_coeffs`]: the element-wise AdamW and EMA arithmetic both backends run.
//! - [`rng`]: the reference's counter-hash seeded noise (spec 5.8), bit-exact.
//! - [`stio`] and [`tensor`]: safetensors helpers and plain host tensors; [`outputs`]: the
//!   checks and exclusive temporary files every output goes through; [`sizes`]: checked sizes.
//! - [`diffusion`]: schedule, forward noising, the NELBO batch and the samplers; [`train`]: the
//!   backend-free training loop, AdamW, EMA, data sources and resumable run directories;
//!   [`eval`]: held-out NELBO/PPL and the judge interface; [`distill`]: IM-ReDi and the
//!   synthetic experiment.
//! - [`testing`]: the one home of test helpers (tolerances, finite differences, seeded inputs).
//! - [`data`]: tokenizers, corpus reading, token shards with a manifest, the batch loader.
//! - [`cli`]: the `imdm-engine` subcommands; `main.rs` only parses and reports errors.
//!
//! Numerics: f32 master weights; the CPU reference accumulates in f64; GPU kernels keep the
//! residual stream and statistics in f32 and feed bf16 to the GEMMs.

pub mod bench;
pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod diffusion;
pub mod distill;
pub mod error;
pub mod eval;
pub mod model;
pub mod optim_coeffs;
pub mod outputs;
pub mod plot;
pub mod rng;
pub mod sizes;
pub mod stio;
pub mod tensor;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
