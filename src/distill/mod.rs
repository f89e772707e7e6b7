//! Distillation: ReDi / IM-ReDi rectification (spec 6.2-6.3). SDTT / IM-SDTT follow.

pub mod coupling;
pub mod fit;
pub mod redi;
pub mod redi_train;
pub mod report;
pub mod synthetic;

pub use coupling::{CouplingBatch, Couplings};
