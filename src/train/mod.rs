//! Training machinery, independent of how the DiT is computed: the loop ([`trainer`]), AdamW,
//! clipping and the LR schedule ([`optim`]), the EMA ([`ema`]), data sources ([`data`]), the
//! run directory with its atomic, complete checkpoints ([`run`]) and the [`Objective`] a loop
//! optimises (the CPU DiT, or an analytic stand-in for tests).
//!
//! Defaults follow the reference (spec 9): AdamW lr 3e-4, betas (0.9, 0.999), eps 1e-8, no
//! weight decay; constant LR after a linear warmup; clip 1.0; EMA 0.9999 with warm-up;
//! antithetic times over the global batch; the MDLM/IMDM NELBO normalised by the global batch's
//! token count.

pub mod algo_objective;
pub mod config;
pub mod curves;
pub mod data;
pub mod ema;
pub mod handoff;
pub mod init;
pub mod objective;
pub mod optim;
pub mod run;
pub mod shard_source;
pub mod source;
pub mod trainer;
pub mod update;

pub use config::{DataSpec, Freeze, TokenDtype, TrainConfig};
pub use ema::Ema;
pub use objective::{CpuDit, LinearSoftmax, LossInput, Objective, Resident};
pub use optim::{AdamW, AdamWConfig, LrSchedule};
pub use run::{RunConfig, RunDir};
pub use source::DataSource;
pub use trainer::{Event, StepLog, Trainer, ValLog};
