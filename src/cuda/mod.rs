//! The GPU backend, beside [`crate::cpu`]: the device context and kernel lookup ([`device`]),
//! the DiT forward ([`dit`], its buffers in [`workspace`]) and backward ([`dit_bwd`], its
//! gradient registers in [`bwd_scratch`]) over the training [`tape`], the conditioning path
//! ([`cond`]), the device parameter tree ([`param_tree`]), the sampling denoiser
//! ([`denoiser`]), the distillation teacher rollout ([`rollout`]), the training objective
//! ([`trainer`]), NVTX ranges ([`nvtx`]) and their GPU timeline ([`trace`]), the kernel
//! sources' constants ([`kernel_defines`]) and one module per kernel file under [`ops`] (its
//! only launcher and its CPU twin).

pub mod bwd_linear;
pub mod bwd_scratch;
pub mod cond;
pub mod denoiser;
pub mod device;
pub mod dit;
pub mod dit_bwd;
pub mod folded_gates;
pub mod kernel_defines;
pub mod nvtx;
pub mod ops;
pub mod param_tree;
pub mod rollout;
pub mod tape;
pub mod time_cond;
pub mod trace;
pub mod trainer;
pub mod workspace;

pub use device::{
    device_peaks, gpu_for_tests, peak_bf16_tflops, Backend, DeviceChoice, DevicePeaks, Gpu, ARCH,
    PTX,
};
pub use trainer::GpuTrainer;
