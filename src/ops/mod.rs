//! GPU ops: one module per `kernels/<op>.cu`, each holding the op's only launcher, its CPU twin
//! (`mod cpu`) and the tests comparing the two.

pub mod ln_modulate;
