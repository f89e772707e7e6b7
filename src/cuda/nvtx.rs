//! NVTX ranges around blocks and ops, for Nsight Systems/Compute. cudarc loads libnvToolsExt
//! dynamically and panics when it is absent, so presence is checked once and ranges become
//! no-ops without it (the engine must run on machines without the profiler libraries).
//! While a `--trace` is recorded ([`super::trace`]), each range also gets a CUDA event pair.

use std::sync::OnceLock;

fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    // SAFETY: this only tries to dlopen libnvToolsExt by its candidate names.
    *ON.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// A range that ends when dropped (or nothing, without NVTX and without a trace).
pub struct Range {
    _nvtx: Option<cudarc::nvtx::safe::Range>,
    traced: Option<usize>,
}

impl Drop for Range {
    fn drop(&mut self) {
        if let Some(i) = self.traced {
            super::trace::close(i);
        }
    }
}

/// Opens a named range: `let _r = nvtx::range("block 3");`.
pub fn range(name: &str) -> Range {
    range_work(name, 0.0, 0.0)
}

/// A range whose kernels must do `flops` and move `bytes` (the trace summary's rates).
pub fn range_work(name: &str, flops: f64, bytes: f64) -> Range {
    Range {
        _nvtx: available().then(|| cudarc::nvtx::safe::scoped_range(name)),
        traced: super::trace::open(name, flops, bytes),
    }
}
