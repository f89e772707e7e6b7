//! The optimizer step of GPU training: the only launcher of `kernels/adamw.cu` (fused AdamW
//! writing the working copies, the per-tensor gradient sum of squares for the global-norm
//! clip, the EMA), its CPU twin and the tests. Maths, layout and thread mapping: see the kernel's
//! header.
//!
//! Why descriptor tables and not one flat buffer: every other launcher takes one `CudaSlice`
//! per tensor (the GEMMs write `dW` into it, the LayerNorm backward `d weight`, ...), so the
//! parameters, gradients and moments are per-tensor allocations. A table of (pointer, length)
//! descriptors built once lets one launch cover all of them without copies into a flat buffer
//! (torch's fused AdamW does the same with `multi_tensor_apply`). The tables hold raw device
//! pointers, so building one is `unsafe`: the owner (`cuda::trainer`) keeps every buffer alive and
//! in place for as long as the table exists.
//!
//! The twin is not a re-implementation: it calls [`crate::optim_coeffs::adamw_elements`] and
//! [`crate::optim_coeffs::ema_elements`], the functions the CPU optimizer itself runs, and the
//! kernel performs the same f32 operations with round-to-nearest intrinsics, so GPU and CPU
//! updates are bit-identical on the same inputs (the GPU tests assert equality).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::optim_coeffs::AdamWCoeffs;

const MODULE: &str = "adamw";
/// Must equal MT_THREADS in the kernel.
const THREADS: u32 = 256;
/// Elements per chunk (one block); must equal MT_CHUNK in the kernel.
pub const CHUNK: usize = 65536;

/// One tensor of an AdamW (or sum-of-squares) launch: raw device pointers (0 = null) and the
/// element count. Mirrors the kernel's `AdamwTensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdamwTensor {
    /// master weights (n) f32, updated in place
    pub p: u64,
    /// gradient (n) f32
    pub g: u64,
    /// first and second moments (n) f32, updated in place
    pub m: u64,
    pub v: u64,
    /// bf16 working copy (n) or 0
    pub w16: u64,
    /// f32 working copy (n) or 0
    pub w32: u64,
    pub n: i64,
}
const _: () = assert!(std::mem::size_of::<AdamwTensor>() == 56);
// SAFETY: #[repr(C)], six u64 and an i64 (no padding), the kernel's AdamwTensor layout.
unsafe impl DeviceRepr for AdamwTensor {}

/// One tensor of an EMA launch: shadow `s` (updated) and weights `p`, both (n) f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmaTensor {
    pub s: u64,
    pub p: u64,
    pub n: i64,
}
const _: () = assert!(std::mem::size_of::<EmaTensor>() == 24);
// SAFETY: #[repr(C)], two u64 and an i64 (no padding), the kernel's EmaTensor layout.
unsafe impl DeviceRepr for EmaTensor {}

/// Chunk `[start, min(start + CHUNK, n))` of descriptor `tensor`. Mirrors `MtChunk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MtChunk {
    pub tensor: i32,
    pub pad: i32,
    pub start: i64,
}
const _: () = assert!(std::mem::size_of::<MtChunk>() == 16);
// SAFETY: #[repr(C)], two i32 and an i64 (no padding), the kernel's MtChunk layout.
unsafe impl DeviceRepr for MtChunk {}

/// The scalars of one AdamW launch (the kernel's `AdamwParams`): [`AdamWCoeffs`] plus the clip.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamwParams {
    pub neg_step_size: f32,
    pub bc2_sqrt: f32,
    pub decay: f32,
    pub omb1: f32,
    pub beta2: f32,
    pub omb2: f32,
    pub eps: f32,
    pub clip_coef: f32,
    pub use_decay: i32,
    pub use_clip: i32,
}
const _: () = assert!(std::mem::size_of::<AdamwParams>() == 40);
// SAFETY: #[repr(C)], eight f32 and two i32 (no padding), the kernel's AdamwParams layout.
unsafe impl DeviceRepr for AdamwParams {}

impl AdamwParams {
    /// The step scalars `k` and the clip coefficient (`None`: gradients used as they are).
    pub fn new(k: &AdamWCoeffs, clip: Option<f32>) -> Self {
        AdamwParams {
            neg_step_size: k.neg_step_size,
            bc2_sqrt: k.bc2_sqrt,
            decay: k.decay,
            omb1: k.omb1,
            beta2: k.beta2,
            omb2: k.omb2,
            eps: k.eps,
            clip_coef: clip.unwrap_or(1.0),
            use_decay: k.use_decay as i32,
            use_clip: clip.is_some() as i32,
        }
    }
}

/// The chunk table for tensors of lengths `lens` (descriptor i has `lens[i]` elements): chunks
/// in tensor order, each at most [`CHUNK`] elements; empty tensors get none.
pub fn plan_chunks(lens: &[usize]) -> Result<Vec<MtChunk>> {
    if lens.len() > i32::MAX as usize {
        return Err(Error::Shape(format!("adamw: {} tensors", lens.len())));
    }
    let mut out = Vec::new();
    for (t, &n) in lens.iter().enumerate() {
        let mut start = 0;
        while start < n {
            out.push(MtChunk {
                tensor: t as i32,
                pad: 0,
                start: start as i64,
            });
            start += CHUNK;
        }
    }
    if out.len() > i32::MAX as usize {
        return Err(Error::Shape(format!("adamw: {} chunks", out.len())));
    }
    Ok(out)
}

/// The raw device address of `s` (for descriptor tables).
pub fn device_addr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    let (p, _sync) = s.device_ptr(&gpu.stream);
    p
}

fn launch_cfg(n_chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n_chunks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A device table of AdamW descriptors with its chunk plan and result buffers.
pub struct AdamwTable {
    tensors: CudaSlice<AdamwTensor>,
    chunks: CudaSlice<MtChunk>,
    /// Host copy: the descriptor of each chunk (for summing the partials per tensor).
    chunk_tensor: Vec<usize>,
    n_tensors: usize,
    /// (chunks) f64 sum-of-squares partials
    partial: CudaSlice<f64>,
    /// (tensors) i32 non-finite flags
    bad: CudaSlice<i32>,
    /// Built by [`AdamwTable::norms_only`]: only `g` is set, [`AdamwTable::step`] refuses.
    norms_only: bool,
}

impl AdamwTable {
    /// Uploads `descs` and their chunk plan.
    ///
    /// # Safety
    /// Every non-zero pointer of every descriptor must address a live allocation of `gpu`'s
    /// context holding at least `n` elements of its type (f32, or bf16 for `w16`), and must stay
    /// valid (neither freed nor moved) for as long as the table is used; the writable buffers
    /// (`p`, `m`, `v`, `w16`, `w32`) of different descriptors must not overlap each other or
    /// any `g`.
    pub unsafe fn new(gpu: &Gpu, descs: &[AdamwTensor]) -> Result<Self> {
        if let Some((i, d)) = descs
            .iter()
            .enumerate()
            .find(|(_, d)| d.n < 0 || d.p == 0 || d.g == 0 || d.m == 0 || d.v == 0)
        {
            return Err(Error::Shape(format!(
                "adamw: descriptor {i} has a null p/g/m/v pointer or a negative length ({d:?})"
            )));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::build(gpu, descs, false) }
    }

    /// A table for [`AdamwTable::sumsq`] only, over gradients `(address, n)` (f32).
    ///
    /// # Safety
    /// Every address must be a live f32 allocation of `gpu`'s context with at least `n`
    /// elements that outlives the table.
    pub unsafe fn norms_only(gpu: &Gpu, grads: &[(u64, usize)]) -> Result<Self> {
        if let Some(i) = grads.iter().position(|&(g, _)| g == 0) {
            return Err(Error::Shape(format!("adamw norms: gradient {i} is null")));
        }
        let descs: Vec<AdamwTensor> = grads
            .iter()
            .map(|&(g, n)| AdamwTensor {
                g,
                n: n as i64,
                ..Default::default()
            })
            .collect();
        // SAFETY: only the g pointers are set, and the kernels run on this table read only g
        // (step is refused); the caller guarantees they are valid.
        unsafe { Self::build(gpu, &descs, true) }
    }

    /// # Safety
    /// As [`AdamwTable::new`] (or [`AdamwTable::norms_only`] when `norms_only`).
    unsafe fn build(gpu: &Gpu, descs: &[AdamwTensor], norms_only: bool) -> Result<Self> {
        let lens: Vec<usize> = descs.iter().map(|d| d.n as usize).collect();
        let plan = plan_chunks(&lens)?;
        let s = &gpu.stream;
        // One placeholder element when empty: no zero-sized allocations.
        let tensors = if descs.is_empty() {
            s.clone_htod(&[AdamwTensor::default()])?
        } else {
            s.clone_htod(descs)?
        };
        let chunks = if plan.is_empty() {
            s.clone_htod(&[MtChunk::default()])?
        } else {
            s.clone_htod(&plan)?
        };
        Ok(AdamwTable {
            tensors,
            chunks,
            chunk_tensor: plan.iter().map(|c| c.tensor as usize).collect(),
            n_tensors: descs.len(),
            partial: s.alloc_zeros(plan.len().max(1))?,
            bad: s.alloc_zeros(descs.len().max(1))?,
            norms_only,
        })
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.n_tensors
    }

    pub fn is_empty(&self) -> bool {
        self.n_tensors == 0
    }

    /// Per-descriptor `Σ g²` in f64: launches `adamw_sumsq_f32`, downloads the chunk partials
    /// (synchronising) and adds them per tensor in chunk order (deterministic).
    pub fn sumsq(&mut self, gpu: &Gpu) -> Result<Vec<f64>> {
        let n = self.chunk_tensor.len();
        let mut out = vec![0f64; self.n_tensors];
        if n == 0 {
            return Ok(out);
        }
        let f = gpu.function(MODULE, "adamw_sumsq_f32")?;
        let n_i = n as i32;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut self.partial)
            .arg(&self.tensors)
            .arg(&self.chunks)
            .arg(&n_i);
        // SAFETY: argument order and types match the kernel; `partial` holds one f64 per chunk,
        // the chunk table indexes only uploaded descriptors and stays below each n, and the
        // descriptors' g pointers are valid for n f32 (the contract of `new`).
        unsafe { b.launch(launch_cfg(n)) }?;
        let part = gpu.stream.clone_dtoh(&self.partial)?;
        for (c, &t) in self.chunk_tensor.iter().enumerate() {
            out[t] += part[c];
        }
        Ok(out)
    }

    /// Enqueues one AdamW update of every descriptor with `prm`.
    pub fn step(&mut self, gpu: &Gpu, prm: AdamwParams) -> Result<()> {
        if self.norms_only {
            return Err(Error::Shape(
                "adamw: this table was built for gradient norms only".into(),
            ));
        }
        let n = self.chunk_tensor.len();
        if n == 0 {
            return Ok(());
        }
        let f = gpu.function(MODULE, "adamw_f32")?;
        let n_i = n as i32;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut self.bad)
            .arg(&self.tensors)
            .arg(&self.chunks)
            .arg(&n_i)
            .arg(&prm);
        // SAFETY: argument order and types match the kernel (AdamwParams by value, layout
        // asserted on both sides); `bad` holds one i32 per descriptor; the descriptors' pointers
        // are valid for n elements and their writable buffers disjoint (the contract of `new`).
        unsafe { b.launch(launch_cfg(n)) }?;
        Ok(())
    }

    /// Per-descriptor flags "the last updates produced a NaN or an infinity" (downloads,
    /// synchronising), then clears them.
    pub fn take_bad(&mut self, gpu: &Gpu) -> Result<Vec<bool>> {
        let flags = gpu.stream.clone_dtoh(&self.bad)?;
        gpu.stream.memset_zeros(&mut self.bad)?;
        Ok(flags[..self.n_tensors].iter().map(|&x| x != 0).collect())
    }
}

/// A device table of EMA descriptors with its chunk plan.
pub struct EmaTable {
    tensors: CudaSlice<EmaTensor>,
    chunks: CudaSlice<MtChunk>,
    n_chunks: usize,
}

impl EmaTable {
    /// Uploads `descs` and their chunk plan.
    ///
    /// # Safety
    /// As [`AdamwTable::new`]: every `s` and `p` addresses a live f32 allocation of at least `n`
    /// elements that outlives the table, and no `s` overlaps another descriptor's `s` or `p`.
    pub unsafe fn new(gpu: &Gpu, descs: &[EmaTensor]) -> Result<Self> {
        if let Some((i, d)) = descs
            .iter()
            .enumerate()
            .find(|(_, d)| d.n < 0 || d.s == 0 || d.p == 0)
        {
            return Err(Error::Shape(format!(
                "ema: descriptor {i} has a null pointer or a negative length ({d:?})"
            )));
        }
        let lens: Vec<usize> = descs.iter().map(|d| d.n as usize).collect();
        let plan = plan_chunks(&lens)?;
        let s = &gpu.stream;
        Ok(EmaTable {
            tensors: if descs.is_empty() {
                s.clone_htod(&[EmaTensor::default()])?
            } else {
                s.clone_htod(descs)?
            },
            chunks: if plan.is_empty() {
                s.clone_htod(&[MtChunk::default()])?
            } else {
                s.clone_htod(&plan)?
            },
            n_chunks: plan.len(),
        })
    }

    /// Enqueues `s ← s − omd·(s − p)` (or `s ← p` when `copy`) over every descriptor.
    pub fn update(&self, gpu: &Gpu, omd: f32, copy: bool) -> Result<()> {
        if self.n_chunks == 0 {
            return Ok(());
        }
        let f = gpu.function(MODULE, "ema_f32")?;
        let (n_i, copy_i) = (self.n_chunks as i32, copy as i32);
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&self.tensors)
            .arg(&self.chunks)
            .arg(&n_i)
            .arg(&omd)
            .arg(&copy_i);
        // SAFETY: argument order and types match the kernel; the chunk table indexes only
        // uploaded descriptors and stays below each n; the pointers are valid (contract of `new`).
        unsafe { b.launch(launch_cfg(self.n_chunks)) }?;
        Ok(())
    }
}

/// CPU twin: the CPU optimizer's own element functions over host tensors, with the kernel's
/// chunking for the sums of squares.
pub mod cpu {
    use super::*;
    use crate::optim_coeffs::adamw_elements;
    use crate::optim_coeffs::ema_elements;

    /// One tensor of the twin: the buffers the kernel reads and writes.
    #[derive(Clone, Debug, PartialEq)]
    pub struct HostTensor {
        pub p: Vec<f32>,
        pub g: Vec<f32>,
        pub m: Vec<f32>,
        pub v: Vec<f32>,
        pub w16: Option<Vec<bf16>>,
        pub w32: Option<Vec<f32>>,
    }

    /// `adamw_f32`: every tensor updated with `k` and `clip`, working copies written; returns
    /// the per-tensor non-finite flags.
    pub fn adamw(ts: &mut [HostTensor], k: &AdamWCoeffs, clip: Option<f32>) -> Vec<bool> {
        ts.iter_mut()
            .map(|t| {
                adamw_elements(&mut t.p, &t.g, &mut t.m, &mut t.v, k, clip);
                if let Some(w) = &mut t.w16 {
                    w.iter_mut()
                        .zip(&t.p)
                        .for_each(|(w, &p)| *w = bf16::from_f32(p));
                }
                if let Some(w) = &mut t.w32 {
                    w.copy_from_slice(&t.p);
                }
                t.p.iter().any(|x| !x.is_finite())
            })
            .collect()
    }

    /// `adamw_sumsq_f32` + the host's per-tensor addition: `Σ (g as f64)²` per tensor, summed
    /// chunk by chunk in the kernel's chunking (within a chunk, in element order; the kernel's
    /// tree order differs only in the last bits).
    pub fn sumsq(grads: &[&[f32]]) -> Vec<f64> {
        grads
            .iter()
            .map(|g| {
                g.chunks(CHUNK)
                    .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
                    .sum()
            })
            .collect()
    }

    /// `ema_f32` on one tensor.
    pub fn ema(s: &mut [f32], p: &[f32], omd: f32, copy: bool) {
        if copy {
            s.copy_from_slice(p);
        } else {
            ema_elements(s, p, omd);
        }
    }
}

#[cfg(test)]
#[path = "adamw_tests.rs"]
mod tests;
