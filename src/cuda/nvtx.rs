//! NVTX ranges around blocks and ops, for Nsight Systems/Compute. cudarc loads libnvToolsExt
//! dynamically and panics when it is absent, so presence is checked once and ranges become
//! no-ops without it (the engine must run on machines without the profiler libraries).

use std::sync::OnceLock;

fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    // SAFETY: this only tries to dlopen libnvToolsExt by its candidate names.
    *ON.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// A range that ends when dropped (or nothing, without NVTX).
pub struct Range(#[allow(dead_code)] Option<cudarc::nvtx::safe::Range>);

/// Opens a named range: `let _r = nvtx::range("block 3");`.
pub fn range(name: &str) -> Range {
    Range(available().then(|| cudarc::nvtx::safe::scoped_range(name)))
}
