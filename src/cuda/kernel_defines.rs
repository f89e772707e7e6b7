//! The integer constants and struct sizes of the kernel sources, read from `kernels/` by
//! `build.rs`: launchers mirror some of them (block sizes, params-struct layouts), and each op's
//! tests assert that the mirror equals the kernel's value, so the two sides cannot drift.

include!(concat!(env!("OUT_DIR"), "/kernel_defines.rs"));

/// The value of `#define name` in kernel file `file` (for example "attention_common.cuh").
/// Panics when absent: a test that names a constant the kernel no longer defines must fail.
pub fn define(file: &str, name: &str) -> u64 {
    DEFINES
        .iter()
        .find(|(f, n, _)| *f == file && *n == name)
        .map(|&(_, _, v)| v)
        .unwrap_or_else(|| panic!("kernels/{file} defines no integer {name}"))
}

/// The size the kernel file `file` asserts for struct `ty` (`static_assert(sizeof(ty) == N)`).
pub fn struct_size(file: &str, ty: &str) -> usize {
    SIZES
        .iter()
        .find(|(f, t, _)| *f == file && *t == ty)
        .map(|&(_, _, v)| v as usize)
        .unwrap_or_else(|| panic!("kernels/{file} asserts no size for struct {ty}"))
}
