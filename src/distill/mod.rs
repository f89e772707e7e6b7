//! Distillation: ReDi / IM-ReDi rectification (spec 6.2-6.3). SDTT / IM-SDTT follow.

pub mod coupling;

pub use coupling::{CouplingBatch, Couplings};
