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
//! The twin is not a re-implementation: it calls [`crate::train::optim::adamw_elements`] and
//! [`crate::train::ema::ema_elements`], the functions the CPU optimizer itself runs, and the
//! kernel performs the same f32 operations with round-to-nearest intrinsics, so GPU and CPU
//! updates are bit-identical on the same inputs (the GPU tests assert equality).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::train::optim::AdamWCoeffs;

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
    use crate::train::ema::ema_elements;
    use crate::train::optim::adamw_elements;

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
mod tests {
    use super::cpu::HostTensor;
    use super::*;
    use crate::cuda::gpu_for_tests;
    use crate::model::{init::random_params, DitConfig, DitParams};
    use crate::train::optim::{clip_coef, clip_grad_norm, global_norm, AdamW, AdamWConfig};
    use crate::train::Ema;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn small_config() -> DitConfig {
        let mut c = DitConfig::minimini();
        c.vocab_size = 13;
        c.mask_index = 12;
        c.blocks = 1;
        c
    }

    fn random_like(p: &DitParams, seed: u64, scale: f32) -> DitParams {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut g = p.clone();
        for (_, t) in g.named_mut() {
            t.data
                .iter_mut()
                .for_each(|x| *x = rng.random_range(-scale..scale));
        }
        g
    }

    fn host_tensors(p: &DitParams, g: &DitParams) -> Vec<HostTensor> {
        p.named()
            .into_iter()
            .zip(g.named())
            .map(|((_, p), (_, g))| HostTensor {
                p: p.data.clone(),
                g: g.data.clone(),
                m: vec![0.0; p.numel()],
                v: vec![0.0; p.numel()],
                w16: Some(vec![bf16::ZERO; p.numel()]),
                w32: None,
            })
            .collect()
    }

    #[test]
    fn chunk_plan_covers_every_element_once() {
        let lens = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 0, 5];
        let plan = plan_chunks(&lens).unwrap();
        let mut covered = vec![0usize; lens.len()];
        let mut last = (-1i32, -1i64);
        for c in &plan {
            let n = lens[c.tensor as usize] as i64;
            assert!(c.start < n && c.start % CHUNK as i64 == 0, "{c:?}");
            assert!((c.tensor, c.start) > last, "chunks out of order");
            last = (c.tensor, c.start);
            covered[c.tensor as usize] += (n - c.start).min(CHUNK as i64) as usize;
        }
        assert_eq!(covered, lens);
        assert_eq!(plan.len(), 1 + 1 + 1 + 2 + 4 + 1);
    }

    /// Two steps of the twin with clipping and weight decay are bit-identical to
    /// `clip_grad_norm` followed by `AdamW::step`, the CPU trainer's sequence.
    #[test]
    fn twin_is_bit_identical_to_the_cpu_optimizer() {
        let c = small_config();
        let p0 = random_params(&c, 1);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut p = p0.clone();
        let mut opt = AdamW::new(&p, cfg, |_| false);
        let mut twin = host_tensors(&p0, &p0);
        let all = vec![true; p.named().len()];
        for (step, (seed, lr)) in [(3u64, 0.01), (4, 0.02)].into_iter().enumerate() {
            let g = random_like(&p0, seed, 2.0);
            // The CPU trainer: clip (in place), then AdamW.
            let mut gc = g.clone();
            let norm = clip_grad_norm(&mut gc, &all, 1.0);
            opt.step(&mut p, &gc, lr).unwrap();
            // The twin: per-tensor sums of squares -> the same norm -> the clip coefficient
            // folded into the update.
            let gs: Vec<&[f32]> = g.named().iter().map(|(_, t)| &t.data[..]).collect();
            let sq = cpu::sumsq(&gs);
            let norm2 = sq.iter().sum::<f64>().sqrt();
            assert!((norm - norm2).abs() <= 1e-12 * norm, "{norm} vs {norm2}");
            assert!((norm - global_norm(&g, &all)).abs() <= 1e-12 * norm);
            let coef = clip_coef(norm, 1.0);
            assert!(coef.is_some(), "the test should clip");
            for (t, (_, gt)) in twin.iter_mut().zip(g.named()) {
                t.g.copy_from_slice(&gt.data);
            }
            let k = AdamWCoeffs::new(&cfg, step as u64 + 1, lr);
            let bad = cpu::adamw(&mut twin, &k, coef);
            assert!(bad.iter().all(|&b| !b));
            for ((name, want), (t, st)) in p.named().into_iter().zip(twin.iter().zip(&opt.state)) {
                let st = st.as_ref().unwrap();
                assert!(
                    t.p.iter()
                        .zip(&want.data)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: twin weights differ from AdamW::step"
                );
                assert_eq!(t.m, st.exp_avg.data, "{name} m");
                assert_eq!(t.v, st.exp_avg_sq.data, "{name} v");
                let w16: Vec<bf16> = want.data.iter().map(|&x| bf16::from_f32(x)).collect();
                assert_eq!(t.w16.as_ref().unwrap(), &w16, "{name} bf16 copy");
            }
        }
    }

    #[test]
    fn twin_ema_matches_ema_update_and_flags_non_finite() {
        let c = small_config();
        let p0 = random_params(&c, 2);
        let p1 = random_like(&p0, 5, 1.0);
        let mut ema = Ema::new(&p0, 0.999);
        ema.update(&p1).unwrap();
        let omd = (1.0 - ema.decay_at(1)) as f32;
        for ((_, s0), ((_, p), (_, want))) in p0
            .named()
            .into_iter()
            .zip(p1.named().into_iter().zip(ema.shadow.named()))
        {
            let mut s = s0.data.clone();
            cpu::ema(&mut s, &p.data, omd, false);
            assert_eq!(s, want.data);
            cpu::ema(&mut s, &p.data, omd, true);
            assert_eq!(s, p.data);
        }
        let mut ts = vec![HostTensor {
            p: vec![1.0, 2.0],
            g: vec![f32::NAN, 0.0],
            m: vec![0.0; 2],
            v: vec![0.0; 2],
            w16: None,
            w32: Some(vec![0.0; 2]),
        }];
        let k = AdamWCoeffs::new(&AdamWConfig::default(), 1, 1e-3);
        assert_eq!(cpu::adamw(&mut ts, &k, None), vec![true]);
        assert_eq!(ts[0].w32.as_ref().unwrap()[1], ts[0].p[1]);
    }

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// The kernels against the twin: AdamW bit for bit (weights, moments, bf16 and f32 working
    /// copies, clip and decay on), sums of squares to 1e-12, EMA bit for bit, non-finite flags;
    /// lengths 1, CHUNK - 1, CHUNK + 1, 3 CHUNK + 7 and an empty tensor.
    #[test]
    fn gpu_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let lens = [1usize, CHUNK - 1, CHUNK + 1, 0, 3 * CHUNK + 7];
        let mut host: Vec<HostTensor> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| HostTensor {
                p: rand_vec(&mut rng, n, 1.0),
                g: rand_vec(&mut rng, n, 3.0),
                m: rand_vec(&mut rng, n, 0.1),
                v: rand_vec(&mut rng, n, 0.1).iter().map(|x| x.abs()).collect(),
                w16: (i % 2 == 0).then(|| vec![bf16::ZERO; n]),
                w32: (i % 2 == 1).then(|| vec![0.0; n]),
            })
            .collect();
        host[4].g[CHUNK + 3] = f32::INFINITY;
        // Device copies (one element at least: no zero-sized allocations).
        let up = |v: &[f32]| {
            let mut v = v.to_vec();
            if v.is_empty() {
                v.push(0.0);
            }
            s.clone_htod(&v).unwrap()
        };
        let dev: Vec<[CudaSlice<f32>; 5]> = host
            .iter()
            .map(|t| {
                let w32 = t.w32.clone().unwrap_or_else(|| vec![0.0; t.p.len().max(1)]);
                [up(&t.p), up(&t.g), up(&t.m), up(&t.v), up(&w32)]
            })
            .collect();
        let w16: Vec<CudaSlice<bf16>> = host
            .iter()
            .map(|t| s.alloc_zeros::<bf16>(t.p.len().max(1)).unwrap())
            .collect();
        let descs: Vec<AdamwTensor> = host
            .iter()
            .enumerate()
            .map(|(i, t)| AdamwTensor {
                p: device_addr(&gpu, &dev[i][0]),
                g: device_addr(&gpu, &dev[i][1]),
                m: device_addr(&gpu, &dev[i][2]),
                v: device_addr(&gpu, &dev[i][3]),
                w16: if t.w16.is_some() {
                    device_addr(&gpu, &w16[i])
                } else {
                    0
                },
                w32: if t.w32.is_some() {
                    device_addr(&gpu, &dev[i][4])
                } else {
                    0
                },
                n: t.p.len() as i64,
            })
            .collect();
        // SAFETY: every buffer above lives until the end of the test and holds n elements.
        let mut table = unsafe { AdamwTable::new(&gpu, &descs) }.unwrap();
        let sq = table.sumsq(&gpu).unwrap();
        let gs: Vec<&[f32]> = host.iter().map(|t| &t.g[..]).collect();
        let want_sq = cpu::sumsq(&gs);
        for (i, (a, b)) in sq.iter().zip(&want_sq).enumerate() {
            assert!(
                a == b || (a - b).abs() <= 1e-12 * b.abs(),
                "sumsq tensor {i}: {a} vs {b}"
            );
        }
        assert!(sq[4].is_infinite() && sq[..4].iter().all(|x| x.is_finite()));
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let k = AdamWCoeffs::new(&cfg, 3, 2e-3);
        let clip = Some(0.37f32);
        table.step(&gpu, AdamwParams::new(&k, clip)).unwrap();
        let want_bad = cpu::adamw(&mut host, &k, clip);
        assert_eq!(table.take_bad(&gpu).unwrap(), want_bad);
        assert_eq!(want_bad, vec![false, false, false, false, true]);
        // Bit equality, except that any NaN equals any NaN (x86 and CUDA produce different NaN
        // payloads for inf/inf; tensor 4 holds NaNs on purpose).
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
        };
        for (i, t) in host.iter().enumerate() {
            let got = |j: usize| s.clone_dtoh(&dev[i][j]).unwrap();
            let n = t.p.len();
            assert!(same(&got(0)[..n], &t.p), "tensor {i} p");
            assert!(same(&got(2)[..n], &t.m), "tensor {i} m");
            assert!(same(&got(3)[..n], &t.v), "tensor {i} v");
            if let Some(w) = &t.w32 {
                assert!(same(&got(4)[..n], w), "tensor {i} w32");
            }
            if let Some(w) = &t.w16 {
                let g16: Vec<f32> = s.clone_dtoh(&w16[i]).unwrap()[..n]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let w: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
                assert!(same(&g16, &w), "tensor {i} w16");
            }
        }
        // EMA of the updated weights into fresh shadows, then a copy.
        let shadows: Vec<Vec<f32>> = host
            .iter()
            .map(|t| rand_vec(&mut rng, t.p.len(), 1.0))
            .collect();
        let dshadow: Vec<CudaSlice<f32>> = shadows.iter().map(|v| up(v)).collect();
        let edescs: Vec<EmaTensor> = host
            .iter()
            .enumerate()
            .map(|(i, t)| EmaTensor {
                s: device_addr(&gpu, &dshadow[i]),
                p: device_addr(&gpu, &dev[i][0]),
                n: t.p.len() as i64,
            })
            .collect();
        // SAFETY: as above.
        let et = unsafe { EmaTable::new(&gpu, &edescs) }.unwrap();
        let omd = 1.0 - 0.99f32;
        et.update(&gpu, omd, false).unwrap();
        for (i, t) in host.iter().enumerate() {
            let mut want = shadows[i].clone();
            cpu::ema(&mut want, &t.p, omd, false);
            let got = s.clone_dtoh(&dshadow[i]).unwrap();
            assert!(same(&got[..t.p.len()], &want), "ema tensor {i}");
        }
        et.update(&gpu, omd, true).unwrap();
        for (i, t) in host.iter().enumerate() {
            let got = s.clone_dtoh(&dshadow[i]).unwrap();
            assert!(same(&got[..t.p.len()], &t.p), "ema copy tensor {i}");
        }
    }
}
