//! Distillation: SDTT / IM-SDTT rounds (spec 6.1: [`sdtt`], the teacher rollout in
//! [`rollout`]) and ReDi / IM-ReDi rectification (spec 6.2-6.3).

pub mod coupling;
pub mod fit;
pub mod redi;
pub mod redi_train;
pub mod report;
pub mod rollout;
pub mod sdtt;
pub mod synthetic;
pub mod synthetic_sdtt;

pub use coupling::{CouplingBatch, Couplings};
