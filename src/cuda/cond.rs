//! The conditioning path of GPU training: the constant vector
//! `c = SiLU(fc2(SiLU(fc1(feat(σ=0)))))` (spec 2.2 step 2, 4.2) and the adaLN modulations
//! `m = W c + b` of every block and of the final layer, forward and backward, and the sigma
//! map's host activations [`CondHost`] at any sigma (the per-sequence path of time conditioning
//! is `cuda::time_cond`; for such a model [`CondDevice::refresh_modulations`] hands it the new
//! weights instead).
//!
//! Without time conditioning `c` is one vector per set of weights and each modulation is
//! one vector broadcast over all rows. The backward kernels therefore leave per-step sums
//! `dm` (`dit_bwd::ModGrads`), and the whole path's gradients follow from them once per
//! optimizer step (`c` does not change within a step, so summing `dm` over micro-batches first
//! is exact):
//! ```text
//! d b_adaLN  = dm                         (copied: the bias gradient is the concatenation)
//! d W_adaLN += dm ⊗ c                     cuBLAS sgemm, rank 1, f32
//! dc        += W_adaLNᵀ dm (all layers)   cuBLAS sgemv, f32
//! sigma map: dc -> d fc2, d fc1           host, f64 ([`CondHost::backward`]), uploaded
//! ```
//! and the forward after every weight update: `m = W c + b` (sgemv on the f32 master weights),
//! `c` from the sigma map on the host (its 50k weights are downloaded). The sigma map is tiny
//! (256 -> cond -> cond) and `dc` is one vector, so the host is the simplest correct place for
//! it; the adaLN matrices (6D x cond per block) stay on the device.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm as BlasGemm, GemmConfig, Gemv, GemvConfig};
use cudarc::driver::CudaSlice;

use crate::cuda::dit::GpuDit;
use crate::cuda::dit_bwd::ModGrads;
use crate::cuda::param_tree::{LinearOf, ParamTree};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::params::{Linear, TIME_FEATURES};
use crate::model::DitConfig;

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// `W x + b` in f64 for a row-major (out, in) f32 layer.
fn affine(l: &Linear, x: &[f64]) -> Vec<f64> {
    let inp = l.in_dim();
    l.weight
        .data
        .chunks_exact(inp)
        .enumerate()
        .map(|(o, row)| {
            let b = l.bias.as_ref().map_or(0.0, |b| b.data[o] as f64);
            b + row
                .iter()
                .zip(x)
                .map(|(&w, &xi)| w as f64 * xi)
                .sum::<f64>()
        })
        .collect()
}

/// The sigma map's activations on the host, in f64 (one row).
#[derive(Clone, Debug, PartialEq)]
pub struct CondHost {
    /// (256) time feature `[cos(σ f_k)] ++ [sin(σ f_k)]`, f_k = 10000^(-k/128) (spec 2.2); at
    /// sigma = 0 `[1]*128 ++ [0]*128`
    pub feat: Vec<f64>,
    /// (cond) fc1 output, its SiLU, fc2 output
    pub c1: Vec<f64>,
    pub s1: Vec<f64>,
    pub c2: Vec<f64>,
    /// (cond) c = SiLU(c2)
    pub c: Vec<f64>,
}

/// Gradients of one linear layer of the sigma map: weight (out, in) and bias (out), row-major.
pub type LinearGrad = (Vec<f64>, Vec<f64>);

impl CondHost {
    /// The forward of the sigma map `fc1` (256 -> cond), `fc2` (cond -> cond) at sigma = 0
    /// (constant conditioning).
    pub fn forward(fc1: &Linear, fc2: &Linear) -> Self {
        Self::forward_at(fc1, fc2, 0.0)
    }

    /// The forward of the sigma map at `sigma` (time conditioning: one call per sequence).
    pub fn forward_at(fc1: &Linear, fc2: &Linear, sigma: f64) -> Self {
        let half = TIME_FEATURES / 2;
        // cos(0) = 1 and sin(0) = 0 exactly, so sigma = 0 gives the constant feature.
        let feat: Vec<f64> = (0..TIME_FEATURES)
            .map(|k| {
                let f = (-(10000f64.ln()) * (k % half) as f64 / half as f64).exp();
                if k < half {
                    (sigma * f).cos()
                } else {
                    (sigma * f).sin()
                }
            })
            .collect();
        let c1 = affine(fc1, &feat);
        let s1: Vec<f64> = c1.iter().map(|&x| silu(x)).collect();
        let c2 = affine(fc2, &s1);
        let c = c2.iter().map(|&x| silu(x)).collect();
        CondHost {
            feat,
            c1,
            s1,
            c2,
            c,
        }
    }

    /// `c` rounded to f32.
    pub fn c_f32(&self) -> Vec<f32> {
        self.c.iter().map(|&x| x as f32).collect()
    }

    /// The sigma map's weight and bias gradients for `dc` = dLoss/dc: `[(d W1, d b1), (d W2,
    /// d b2)]`.
    pub fn backward(&self, fc2: &Linear, dc: &[f64]) -> [LinearGrad; 2] {
        let dc2: Vec<f64> = dc
            .iter()
            .zip(&self.c2)
            .map(|(&g, &x)| g * silu_grad(x))
            .collect();
        let outer = |dy: &[f64], x: &[f64]| -> Vec<f64> {
            dy.iter()
                .flat_map(|&g| x.iter().map(move |&xi| g * xi))
                .collect()
        };
        let dw2 = outer(&dc2, &self.s1);
        let inp = fc2.in_dim();
        let mut ds1 = vec![0f64; inp];
        for (row, &g) in fc2.weight.data.chunks_exact(inp).zip(&dc2) {
            for (d, &w) in ds1.iter_mut().zip(row) {
                *d += w as f64 * g;
            }
        }
        let dc1: Vec<f64> = ds1
            .iter()
            .zip(&self.c1)
            .map(|(&g, &x)| g * silu_grad(x))
            .collect();
        let dw1 = outer(&dc1, &self.feat);
        [(dw1, dc1), (dw2, dc2)]
    }
}

/// The device side: the conditioning vector, the modulation refresh and the per-step gradient
/// finish, on cuBLAS (f32, deterministic).
pub struct CondDevice {
    blas: CudaBlas,
    /// (cond) f32 conditioning vector
    c: CudaSlice<f32>,
    /// (cond) f32 accumulated W_adaLNᵀ dm
    dc: CudaSlice<f32>,
    /// host activations and the sigma map's f32 weights they came from
    host: CondHost,
    fc1: Linear,
    fc2: Linear,
    cond: usize,
}

fn blas_err(what: &str, e: cudarc::cublas::result::CublasError) -> Error {
    Error::Cuda(format!("cuBLAS {what}: {e}"))
}

impl CondDevice {
    /// For a model with adaLN (`None` for the AR baseline). `fc1`, `fc2`: the sigma map.
    pub fn new(gpu: &Gpu, c: &DitConfig, fc1: &Linear, fc2: &Linear) -> Result<Option<Self>> {
        if !c.has_adaln() {
            return Ok(None);
        }
        // SAFETY: this only tries to dlopen libcublas by its candidate names (cudarc panics
        // when it is missing).
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Cuda("libcublas was not found".into()));
        }
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(|e| blas_err("handle", e))?;
        let s = &gpu.stream;
        let mut me = CondDevice {
            blas,
            c: s.alloc_zeros(c.cond_dim)?,
            dc: s.alloc_zeros(c.cond_dim)?,
            host: CondHost::forward(fc1, fc2),
            fc1: fc1.clone(),
            fc2: fc2.clone(),
            cond: c.cond_dim,
        };
        me.set_sigma_map(gpu, fc1, fc2)?;
        Ok(Some(me))
    }

    /// Recomputes `c` from new sigma-map weights (host) and uploads it.
    pub fn set_sigma_map(&mut self, gpu: &Gpu, fc1: &Linear, fc2: &Linear) -> Result<()> {
        if fc1.out_dim() != self.cond || fc2.out_dim() != self.cond {
            return Err(Error::Shape(format!(
                "sigma map: outputs {}/{} for cond {}",
                fc1.out_dim(),
                fc2.out_dim(),
                self.cond
            )));
        }
        self.host = CondHost::forward(fc1, fc2);
        self.fc1 = fc1.clone();
        self.fc2 = fc2.clone();
        gpu.stream.memcpy_htod(&self.host.c_f32(), &mut self.c)?;
        Ok(())
    }

    /// `out (n·D) = W c + b` for an adaLN layer with weight (n·D, cond) and bias (n·D), f32.
    fn modulation(
        &mut self,
        gpu: &Gpu,
        l: &LinearOf<CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let nd = out.len();
        let b =
            l.b.as_ref()
                .ok_or_else(|| Error::Shape("adaLN without bias".into()))?;
        if l.w.len() != nd * self.cond || b.len() != nd {
            return Err(Error::Shape(format!(
                "adaLN: weight {} / bias {} elements for {nd} x {}",
                l.w.len(),
                b.len(),
                self.cond
            )));
        }
        gpu.stream.memcpy_dtod(b, out)?;
        // Row-major W (nd, cond) is column-major (cond, nd) with ld = cond: m = W_cmᵀ c.
        let cfg = GemvConfig {
            trans: cublasOperation_t::CUBLAS_OP_T,
            m: self.cond as i32,
            n: nd as i32,
            alpha: 1.0f32,
            lda: self.cond as i32,
            incx: 1,
            beta: 1.0f32,
            incy: 1,
        };
        // SAFETY: W holds cond·nd f32 (checked), c holds cond and out nd, matching the config.
        unsafe { self.blas.gemv(cfg, &l.w, &self.c, out) }
            .map_err(|e| blas_err("modulation gemv", e))?;
        Ok(())
    }

    /// Rewrites every modulation vector of `model` from the f32 master adaLN weights in
    /// `master` and the current `c`. A time-conditioned model instead takes the masters and
    /// the sigma map into its [`crate::cuda::time_cond::TimeCond`] (its modulations are
    /// computed per forward).
    pub fn refresh_modulations(
        &mut self,
        gpu: &Gpu,
        model: &mut GpuDit,
        master: &ParamTree<CudaSlice<f32>>,
    ) -> Result<()> {
        if let Some(tc) = model.time_cond.as_mut() {
            return tc.set_weights(gpu, master, &self.fc1, &self.fc2);
        }
        for (blk, mb) in model.blocks.iter_mut().zip(&master.blocks) {
            let (Some(mods), Some(l)) = (blk.modulation.as_mut(), mb.adaln.as_ref()) else {
                continue;
            };
            self.modulation(gpu, l, mods)?;
        }
        if let (Some(mods), Some(l)) =
            (model.final_modulation.as_mut(), master.final_adaln.as_ref())
        {
            self.modulation(gpu, l, mods)?;
        }
        Ok(())
    }

    /// One adaLN layer's gradients from its row sums `dm` (n·D): `d b = dm` (copied into the
    /// bias gradient, which the caller zeroed), `d W += dm ⊗ c` unless frozen, `dc += Wᵀ dm`.
    fn layer_grads(
        &mut self,
        gpu: &Gpu,
        w: &CudaSlice<f32>,
        dm: &CudaSlice<f32>,
        g: &mut LinearOf<CudaSlice<f32>>,
        w_frozen: bool,
    ) -> Result<()> {
        let cond = self.cond;
        let nd = dm.len();
        let db =
            g.b.as_mut()
                .ok_or_else(|| Error::Shape("adaLN without bias".into()))?;
        if db.len() != nd || g.w.len() != nd * cond || w.len() != nd * cond {
            return Err(Error::Shape(format!(
                "adaLN gradients: bias {} / weight {} elements for {nd} x {cond}",
                db.len(),
                g.w.len()
            )));
        }
        gpu.stream.memcpy_dtod(dm, db)?;
        if !w_frozen {
            // Column-major: dW_cm (cond, nd) += c (cond, 1) · dmᵀ (1, nd).
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: cond as i32,
                n: nd as i32,
                k: 1,
                alpha: 1.0f32,
                lda: cond as i32,
                ldb: 1,
                beta: 1.0f32,
                ldc: cond as i32,
            };
            // SAFETY: c holds cond, dm (= db) nd and dW cond·nd f32 (checked above).
            unsafe { self.blas.gemm(cfg, &self.c, &*db, &mut g.w) }
                .map_err(|e| blas_err("adaLN weight gradient", e))?;
        }
        // dc (cond) += W_cm (cond, nd) · dm (nd).
        let cfg = GemvConfig {
            trans: cublasOperation_t::CUBLAS_OP_N,
            m: cond as i32,
            n: nd as i32,
            alpha: 1.0f32,
            lda: cond as i32,
            incx: 1,
            beta: 1.0f32,
            incy: 1,
        };
        // SAFETY: W holds cond·nd, dm nd and dc cond f32 (checked above).
        unsafe { self.blas.gemv(cfg, w, &*db, &mut self.dc) }
            .map_err(|e| blas_err("conditioning gradient", e))?;
        Ok(())
    }

    /// Turns the step's modulation gradient sums into parameter gradients: every adaLN layer's
    /// (see [`CondDevice::layer_grads`]), then the sigma map's from `dc` on the host (written,
    /// not added: call once per step, after zeroing `grads`). `master` holds the current f32
    /// adaLN weights; `frozen` skips weight-gradient products.
    pub fn finish_grads(
        &mut self,
        gpu: &Gpu,
        master: &ParamTree<CudaSlice<f32>>,
        dmods: &ModGrads,
        grads: &mut ParamTree<CudaSlice<f32>>,
        frozen: &ParamTree<bool>,
    ) -> Result<()> {
        gpu.stream.memset_zeros(&mut self.dc)?;
        for (i, ((mb, gb), fb)) in master
            .blocks
            .iter()
            .zip(grads.blocks.iter_mut())
            .zip(&frozen.blocks)
            .enumerate()
        {
            let (Some(w), Some(g), Some(f)) =
                (mb.adaln.as_ref(), gb.adaln.as_mut(), fb.adaln.as_ref())
            else {
                continue;
            };
            self.layer_grads(gpu, &w.w, &dmods.blocks[i], g, f.w)?;
        }
        if let (Some(w), Some(g), Some(f)) = (
            master.final_adaln.as_ref(),
            grads.final_adaln.as_mut(),
            frozen.final_adaln.as_ref(),
        ) {
            self.layer_grads(gpu, &w.w, &dmods.final_layer, g, f.w)?;
        }
        let dc: Vec<f64> = gpu
            .stream
            .clone_dtoh(&self.dc)?
            .iter()
            .map(|&x| x as f64)
            .collect();
        let [(dw1, db1), (dw2, db2)] = self.host.backward(&self.fc2, &dc);
        if let Some([g1, g2]) = grads.sigma_map.as_mut() {
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            for (dst, src) in [(&mut g1.w, dw1), (&mut g2.w, dw2)] {
                if dst.len() != src.len() {
                    return Err(Error::Shape("sigma map gradient shape".into()));
                }
                gpu.stream.memcpy_htod(&f32s(&src), dst)?;
            }
            for (dst, src) in [(g1.b.as_mut(), db1), (g2.b.as_mut(), db2)] {
                let dst = dst.ok_or_else(|| Error::Shape("sigma map without bias".into()))?;
                if dst.len() != src.len() {
                    return Err(Error::Shape("sigma map bias gradient shape".into()));
                }
                gpu.stream.memcpy_htod(&f32s(&src), dst)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "cond_tests.rs"]
mod tests;
