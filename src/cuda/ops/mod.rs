//! GPU ops: one module per `kernels/<op>.cu`, each holding the op's only launcher, its CPU twin
//! (`mod cpu`) and the tests comparing the two. `gemm` wraps cuBLASLt (no kernel file).

pub mod adamw;
pub mod attention;
pub mod distill_kl;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod ln_modulate;
pub mod modulation;
pub mod residual;
pub mod rollout_target;
pub mod sample;
pub mod subs;
