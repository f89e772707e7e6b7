//! Time conditioning on the GPU (SEDD, D3PM: `DitConfig::time_conditioning`): every sequence's
//! adaLN modulations come from its own sigma through the sigma map (spec 2.2), so each block's
//! modulation is a (B, 6D) buffer and the final layer's a (B, 2D) one, read by the LayerNorm and
//! residual kernels with row stride 6D / 2D (`ops::modulation::ModRows::PerSequence`).
//!
//! Per forward ([`TimeCond::modulations`], rows b < B):
//! ```text
//! c[b]  = SiLU(fc2(SiLU(fc1(feat(sigma[b])))))   host, f64 (B rows of a 50k-weight map), uploaded
//!                                                 as C (B, cond) f32
//! M     = C W_adaLNᵀ + 1 bᵀ  (B, n·D)             cuBLAS sgemm per adaLN layer (n = 6 or 2)
//! ```
//! and per backward ([`TimeCond::backward`]), from the per-sequence sums dM (B, n·D) the
//! LayerNorm and residual backward kernels leave:
//! ```text
//! d b_adaLN += dMᵀ 1         sgemv
//! d W_adaLN += dMᵀ C          sgemm (skipped when frozen)
//! dC        += dM W_adaLN     sgemm (all layers)
//! sigma map: dC[b] -> d fc1, d fc2 per row on the host (f64, the rows' activations kept by
//!            the forward), summed over rows and added to the gradient buffers
//! ```
//! `c` changes with every micro-batch's sigmas, so (unlike the constant path of `cuda::cond`)
//! the backward finishes these gradients itself, each micro-batch adding its own.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm as BlasGemm, GemmConfig, Gemv, GemvConfig};
use cudarc::driver::CudaSlice;

use crate::cuda::cond::{CondHost, LinearGrad};
use crate::cuda::param_tree::{LinearOf, ParamTree};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::params::{DitParams, Linear};
use crate::model::DitConfig;

/// One adaLN layer in f32 on the device: W (n·D, cond) row-major, b (n·D).
pub struct AdaLnF32 {
    pub w: CudaSlice<f32>,
    pub b: CudaSlice<f32>,
    /// Chunks of D per modulation row: 6 for a block, 2 for the final layer.
    pub n: usize,
}

/// The weights a time-conditioned `GpuDit` computes its per-sequence modulations from: the
/// adaLN layers in f32 on the device and the sigma map's f32 weights on the host.
pub struct TimeCond {
    blas: CudaBlas,
    pub blocks: Vec<AdaLnF32>,
    pub final_layer: AdaLnF32,
    /// The sigma map: fc1 (cond, 256), fc2 (cond, cond), with biases.
    pub fc1: Linear,
    pub fc2: Linear,
    d: usize,
    cond: usize,
}

/// One forward's conditioning, kept in the workspace for the backward: the sequences' sigmas
/// ([`crate::cuda::workspace::Workspace::load_sigma`]), their host activations, `C` and the
/// modulations.
pub struct RowCond {
    /// (B) sigma per sequence; `None` until loaded.
    pub sigma: Option<Vec<f64>>,
    /// The sigma map's activations per sequence (written by the forward).
    pub host: Vec<CondHost>,
    /// (B, cond) f32
    pub c: CudaSlice<f32>,
    /// Per block (B, 6D) f32: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    pub blocks: Vec<CudaSlice<f32>>,
    /// (B, 2D) f32: shift, scale.
    pub final_layer: CudaSlice<f32>,
    /// (B) f32 ones (the bias broadcast and column sums).
    ones: CudaSlice<f32>,
}

impl RowCond {
    /// For a time-conditioned model with adaLN (`None` otherwise) at batch `batch`.
    pub fn new(gpu: &Gpu, c: &DitConfig, batch: usize) -> Result<Option<Self>> {
        if !(c.time_conditioning && c.has_adaln()) {
            return Ok(None);
        }
        let (s, d) = (&gpu.stream, c.hidden);
        let b = batch.max(1);
        Ok(Some(RowCond {
            sigma: None,
            host: Vec::new(),
            c: s.alloc_zeros(b * c.cond_dim)?,
            blocks: (0..c.blocks)
                .map(|_| Ok(s.alloc_zeros(b * 6 * d)?))
                .collect::<Result<_>>()?,
            final_layer: s.alloc_zeros(b * 2 * d)?,
            ones: s.clone_htod(&vec![1f32; b])?,
        }))
    }

    fn batch(&self) -> usize {
        self.ones.len()
    }
}

/// The per-sequence modulation gradients of one backward: per block (B, 6D), the final layer
/// (B, 2D), and dC (B, cond); zeroed at the start of each backward.
pub struct RowModGrads {
    pub blocks: Vec<CudaSlice<f32>>,
    pub final_layer: CudaSlice<f32>,
    dc: CudaSlice<f32>,
}

impl RowModGrads {
    /// For a time-conditioned model with adaLN (`None` otherwise) at batch `batch`.
    pub fn new(gpu: &Gpu, c: &DitConfig, batch: usize) -> Result<Option<Self>> {
        if !(c.time_conditioning && c.has_adaln()) {
            return Ok(None);
        }
        let (s, d, b) = (&gpu.stream, c.hidden, batch.max(1));
        Ok(Some(RowModGrads {
            blocks: (0..c.blocks)
                .map(|_| Ok(s.alloc_zeros(b * 6 * d)?))
                .collect::<Result<_>>()?,
            final_layer: s.alloc_zeros(b * 2 * d)?,
            dc: s.alloc_zeros(b * c.cond_dim)?,
        }))
    }

    pub fn zero(&mut self, gpu: &Gpu) -> Result<()> {
        for x in self.blocks.iter_mut() {
            gpu.stream.memset_zeros(x)?;
        }
        gpu.stream.memset_zeros(&mut self.final_layer)?;
        gpu.stream.memset_zeros(&mut self.dc)?;
        Ok(())
    }
}

fn blas_err(what: &str, e: cudarc::cublas::result::CublasError) -> Error {
    Error::Cuda(format!("cuBLAS {what}: {e}"))
}

fn upload_adaln(gpu: &Gpu, l: Option<&Linear>, n: usize, what: &str) -> Result<AdaLnF32> {
    let l = l.ok_or_else(|| Error::Shape(format!("time conditioning: {what} has no adaLN")))?;
    let b = l
        .bias
        .as_ref()
        .ok_or_else(|| Error::Shape(format!("time conditioning: {what} adaLN has no bias")))?;
    Ok(AdaLnF32 {
        w: gpu.stream.clone_htod(&l.weight.data)?,
        b: gpu.stream.clone_htod(&b.data)?,
        n,
    })
}

impl TimeCond {
    /// For a time-conditioned model with adaLN (`None` otherwise): its adaLN layers uploaded
    /// in f32 and its sigma map kept on the host.
    pub fn new(gpu: &Gpu, p: &DitParams) -> Result<Option<Self>> {
        let c = &p.config;
        if !(c.time_conditioning && c.has_adaln()) {
            return Ok(None);
        }
        let s = p.sigma_map.as_ref().ok_or_else(|| {
            Error::Shape("time conditioning: the weights have no sigma map".into())
        })?;
        // SAFETY: this only tries to dlopen libcublas by its candidate names (cudarc panics
        // when it is missing).
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Cuda("libcublas was not found".into()));
        }
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(|e| blas_err("handle", e))?;
        let blocks = p
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| upload_adaln(gpu, b.adaln.as_ref(), 6, &format!("block {i}")))
            .collect::<Result<Vec<_>>>()?;
        let final_layer = upload_adaln(gpu, p.final_layer.adaln.as_ref(), 2, "the final layer")?;
        Ok(Some(TimeCond {
            blas,
            blocks,
            final_layer,
            fc1: s.fc1.clone(),
            fc2: s.fc2.clone(),
            d: c.hidden,
            cond: c.cond_dim,
        }))
    }

    /// Follows new weights: the adaLN layers from the f32 masters `master` (device copies) and
    /// the sigma map `fc1`, `fc2` (host).
    pub fn set_weights(
        &mut self,
        gpu: &Gpu,
        master: &ParamTree<CudaSlice<f32>>,
        fc1: &Linear,
        fc2: &Linear,
    ) -> Result<()> {
        let copy = |dst: &mut AdaLnF32, src: Option<&LinearOf<CudaSlice<f32>>>| -> Result<()> {
            let src = src.ok_or_else(|| Error::Shape("time conditioning: no adaLN".into()))?;
            let b = src.b.as_ref().ok_or_else(|| {
                Error::Shape("time conditioning: adaLN master has no bias".into())
            })?;
            if src.w.len() != dst.w.len() || b.len() != dst.b.len() {
                return Err(Error::Shape(format!(
                    "time conditioning: adaLN master {}/{} elements, expected {}/{}",
                    src.w.len(),
                    b.len(),
                    dst.w.len(),
                    dst.b.len()
                )));
            }
            gpu.stream.memcpy_dtod(&src.w, &mut dst.w)?;
            gpu.stream.memcpy_dtod(b, &mut dst.b)?;
            Ok(())
        };
        if master.blocks.len() != self.blocks.len() {
            return Err(Error::Shape("time conditioning: block count".into()));
        }
        for (dst, mb) in self.blocks.iter_mut().zip(&master.blocks) {
            copy(dst, mb.adaln.as_ref())?;
        }
        copy(&mut self.final_layer, master.final_adaln.as_ref())?;
        self.fc1 = fc1.clone();
        self.fc2 = fc2.clone();
        Ok(())
    }

    /// The forward's conditioning into `rc`: `c` per sequence from its sigma (host), then every
    /// layer's modulation `M = C Wᵀ + 1 bᵀ`.
    pub fn modulations(&self, gpu: &Gpu, rc: &mut RowCond) -> Result<()> {
        let sigma = rc.sigma.as_ref().ok_or_else(|| {
            Error::Config(
                "time-conditioned forward: no sigma loaded (Workspace::load_sigma)".into(),
            )
        })?;
        let bsz = rc.batch();
        rc.host = sigma
            .iter()
            .map(|&s| CondHost::forward_at(&self.fc1, &self.fc2, s))
            .collect();
        let c: Vec<f32> = rc.host.iter().flat_map(|h| h.c_f32()).collect();
        gpu.stream.memcpy_htod(&c, &mut rc.c)?;
        for (l, m) in self.blocks.iter().zip(rc.blocks.iter_mut()) {
            self.layer_forward(l, &rc.c, &rc.ones, m, bsz)?;
        }
        self.layer_forward(&self.final_layer, &rc.c, &rc.ones, &mut rc.final_layer, bsz)
    }

    /// `m (B, nD) = C Wᵀ + 1 bᵀ` for one adaLN layer.
    fn layer_forward(
        &self,
        l: &AdaLnF32,
        c: &CudaSlice<f32>,
        ones: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        bsz: usize,
    ) -> Result<()> {
        let (nd, cond) = (l.n * self.d, self.cond);
        if m.len() != bsz * nd || l.w.len() != nd * cond || c.len() != bsz * cond {
            return Err(Error::Shape(format!(
                "time conditioning: modulation {} / weight {} / c {} elements for B {bsz}, {nd} \
                 x {cond}",
                m.len(),
                l.w.len(),
                c.len()
            )));
        }
        // Column-major: M_cm (nD, B) = b (nD, 1) · 1ᵀ (1, B), then += W_cmᵀ (nD, cond) C_cm
        // (cond, B), where row-major W (nD, cond) is W_cm (cond, nD) and C (B, cond) is C_cm.
        let bias = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: nd as i32,
            n: bsz as i32,
            k: 1,
            alpha: 1.0f32,
            lda: nd as i32,
            ldb: 1,
            beta: 0.0f32,
            ldc: nd as i32,
        };
        // SAFETY: b holds nD, ones B and m B·nD f32 (checked above), matching the config.
        unsafe { self.blas.gemm(bias, &l.b, ones, m) }
            .map_err(|e| blas_err("modulation bias", e))?;
        let main = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: nd as i32,
            n: bsz as i32,
            k: cond as i32,
            alpha: 1.0f32,
            lda: cond as i32,
            ldb: cond as i32,
            beta: 1.0f32,
            ldc: nd as i32,
        };
        // SAFETY: W holds nD·cond, c B·cond and m B·nD f32 (checked above).
        unsafe { self.blas.gemm(main, &l.w, c, m) }.map_err(|e| blas_err("modulation gemm", e))?;
        Ok(())
    }

    /// One adaLN layer's backward: `d b += dMᵀ 1`, `d W += dMᵀ C` unless `w_frozen`,
    /// `dC += dM W`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: &AdaLnF32,
        rc: &RowCond,
        dm: &CudaSlice<f32>,
        dc: &mut CudaSlice<f32>,
        g: &mut LinearOf<CudaSlice<f32>>,
        w_frozen: bool,
    ) -> Result<()> {
        let (nd, cond, bsz) = (l.n * self.d, self.cond, rc.batch());
        let db =
            g.b.as_mut()
                .ok_or_else(|| Error::Shape("adaLN gradient without bias".into()))?;
        if dm.len() != bsz * nd || db.len() != nd || g.w.len() != nd * cond {
            return Err(Error::Shape(format!(
                "time conditioning backward: dM {} / bias {} / weight {} elements for B {bsz}, \
                 {nd} x {cond}",
                dm.len(),
                db.len(),
                g.w.len()
            )));
        }
        // db (nD) += dM_cm (nD, B) · 1 (B).
        let sum = GemvConfig {
            trans: cublasOperation_t::CUBLAS_OP_N,
            m: nd as i32,
            n: bsz as i32,
            alpha: 1.0f32,
            lda: nd as i32,
            incx: 1,
            beta: 1.0f32,
            incy: 1,
        };
        // SAFETY: dM holds B·nD, ones B and db nD f32 (checked above).
        unsafe { self.blas.gemv(sum, dm, &rc.ones, db) }
            .map_err(|e| blas_err("adaLN bias gradient", e))?;
        if !w_frozen {
            // dW_cm (cond, nD) += C_cm (cond, B) · dM_cmᵀ (B, nD).
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_T,
                m: cond as i32,
                n: nd as i32,
                k: bsz as i32,
                alpha: 1.0f32,
                lda: cond as i32,
                ldb: nd as i32,
                beta: 1.0f32,
                ldc: cond as i32,
            };
            // SAFETY: c holds B·cond, dM B·nD and dW nD·cond f32 (checked above).
            unsafe { self.blas.gemm(cfg, &rc.c, dm, &mut g.w) }
                .map_err(|e| blas_err("adaLN weight gradient", e))?;
        }
        // dC_cm (cond, B) += W_cm (cond, nD) · dM_cm (nD, B).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: cond as i32,
            n: bsz as i32,
            k: nd as i32,
            alpha: 1.0f32,
            lda: cond as i32,
            ldb: nd as i32,
            beta: 1.0f32,
            ldc: cond as i32,
        };
        // SAFETY: W holds nD·cond, dM B·nD and dC B·cond f32 (dC sized with the batch).
        unsafe { self.blas.gemm(cfg, &l.w, dm, dc) }
            .map_err(|e| blas_err("conditioning gradient", e))?;
        Ok(())
    }

    /// The conditioning path's gradients from one backward's per-sequence sums `g` (added, `+=`,
    /// into `grads`): every adaLN layer's, then the sigma map's on the host from dC, summed over
    /// the sequences. `frozen` skips adaLN weight-gradient products.
    pub fn backward(
        &self,
        gpu: &Gpu,
        rc: &RowCond,
        g: &mut RowModGrads,
        grads: &mut ParamTree<CudaSlice<f32>>,
        frozen: &ParamTree<bool>,
    ) -> Result<()> {
        if rc.host.len() != rc.batch() || g.dc.len() != rc.c.len() {
            return Err(Error::Shape(
                "time conditioning backward: the forward's conditioning is missing or of another \
                 batch"
                    .into(),
            ));
        }
        for (i, (l, dm)) in self.blocks.iter().zip(&g.blocks).enumerate() {
            let (Some(gb), Some(fb)) = (grads.blocks[i].adaln.as_mut(), &frozen.blocks[i].adaln)
            else {
                return Err(Error::Shape(format!(
                    "time conditioning backward: block {i} has no adaLN gradient"
                )));
            };
            self.layer_backward(l, rc, dm, &mut g.dc, gb, fb.w)?;
        }
        let (Some(gf), Some(ff)) = (grads.final_adaln.as_mut(), &frozen.final_adaln) else {
            return Err(Error::Shape(
                "time conditioning backward: the final layer has no adaLN gradient".into(),
            ));
        };
        self.layer_backward(&self.final_layer, rc, &g.final_layer, &mut g.dc, gf, ff.w)?;
        let dc = gpu.stream.clone_dtoh(&g.dc)?;
        let sums = sigma_map_grads(&rc.host, &self.fc2, &dc, self.cond);
        let Some([g1, g2]) = grads.sigma_map.as_mut() else {
            return Err(Error::Shape(
                "time conditioning backward: no sigma-map gradient".into(),
            ));
        };
        let [(dw1, db1), (dw2, db2)] = sums;
        let b1 =
            g1.b.as_mut()
                .ok_or_else(|| Error::Shape("sigma map bias".into()))?;
        add_host(gpu, &mut g1.w, &dw1)?;
        add_host(gpu, b1, &db1)?;
        let b2 =
            g2.b.as_mut()
                .ok_or_else(|| Error::Shape("sigma map bias".into()))?;
        add_host(gpu, &mut g2.w, &dw2)?;
        add_host(gpu, b2, &db2)?;
        Ok(())
    }
}

/// The sigma map's gradients summed over sequences: row b's activations `host[b]` and its dC
/// row `dc[b·cond..]`, in f64.
pub fn sigma_map_grads(
    host: &[CondHost],
    fc2: &Linear,
    dc: &[f32],
    cond: usize,
) -> [LinearGrad; 2] {
    let mut total: Option<[LinearGrad; 2]> = None;
    for (h, row) in host.iter().zip(dc.chunks_exact(cond)) {
        let row: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let g = h.backward(fc2, &row);
        match total.as_mut() {
            None => total = Some(g),
            Some(t) => {
                for (acc, part) in t.iter_mut().zip(&g) {
                    acc.0.iter_mut().zip(&part.0).for_each(|(a, b)| *a += b);
                    acc.1.iter_mut().zip(&part.1).for_each(|(a, b)| *a += b);
                }
            }
        }
    }
    total.unwrap_or_default()
}

/// `dst += src` for a device f32 buffer and a host f64 vector (downloaded, added in f64,
/// rounded once, uploaded).
fn add_host(gpu: &Gpu, dst: &mut CudaSlice<f32>, src: &[f64]) -> Result<()> {
    if dst.len() != src.len() {
        return Err(Error::Shape(format!(
            "sigma map gradient: {} elements, expected {}",
            src.len(),
            dst.len()
        )));
    }
    let cur = gpu.stream.clone_dtoh(dst)?;
    let sum: Vec<f32> = cur
        .iter()
        .zip(src)
        .map(|(&a, &b)| (a as f64 + b) as f32)
        .collect();
    gpu.stream.memcpy_htod(&sum, dst)?;
    Ok(())
}

#[cfg(test)]
#[path = "time_cond_tests.rs"]
mod tests;
