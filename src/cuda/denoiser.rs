//! The DiT on the GPU as the samplers see it, two ways:
//!
//! - [`GpuDenoiser`] implements [`Denoiser`]: a `GpuDit` forward with SUBS, log-probs
//!   downloaded to the host, so the CPU driver (`diffusion::generate`) runs on the GPU model.
//!   Every feature works this way (nucleus included), but each forward moves B·L·V f32 over
//!   PCIe (6.6 GB at the OWT shape).
//! - [`GpuDenoiser::generate`]: the fast path. Tokens, eps and log-probs stay on the device;
//!   each step is the forward (only when the cache is empty) plus one fused `ops::sample`
//!   launch that updates the tokens in place and writes a reset's fresh eps into the
//!   workspace; only the step's (unmasks, resets) counters come back for the cache rule. It
//!   returns exactly what `diffusion::generate` returns on the same `GpuDenoiser` (same tokens,
//!   NFE and resets; eps is returned bf16-rounded, the precision the model sees), because the
//!   kernel reproduces the CPU posterior and its Philox draws bit for bit. Nucleus filtering is
//!   not on the device: use the first way when it is on.
//!
//! One deliberate reordering keeps the fast path fused: the CPU driver redraws a reset
//! position's eps just before the next forward (step i+1), while the kernel writes it during
//! step i, with the counters of step i+1. The two agree because a reset always drops the cache,
//! so that forward always runs at step i+1; at the last step nothing is redrawn.
//!
//! The loop itself ([`drive`]) is shared with [`generate_twin`], which runs it with the
//! kernel's CPU twin on any denoiser, so the loop is tested against the CPU driver without a
//! GPU.

use cudarc::driver::CudaSlice;
use half::bf16;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::cuda::dit::{ForwardOpts, GpuDit, Keep, Workspace};
use crate::cuda::ops::sample::{cpu as sample_cpu, sample_fwd_f32, SampleParams};
use crate::cuda::Gpu;
use crate::diffusion::schedule::alpha;
use crate::diffusion::{Denoiser, NoiseRemoval, SampleOutput, SamplerConfig, SamplerKind};
use crate::error::{Error, Result};
use crate::model::{DitConfig, DitParams, NoiseType};
use crate::tensor::{Tensor, Tokens};

/// A DiT uploaded to the GPU with a workspace for the last (batch, len) it ran at.
pub struct GpuDenoiser<'g> {
    gpu: &'g Gpu,
    model: GpuDit,
    ws: Option<Workspace>,
}

impl<'g> GpuDenoiser<'g> {
    /// Checks the configuration and uploads the weights.
    pub fn new(gpu: &'g Gpu, params: &DitParams) -> Result<Self> {
        params.config.validate()?;
        Ok(GpuDenoiser {
            gpu,
            model: GpuDit::upload_inference(gpu, params)?,
            ws: None,
        })
    }

    /// A denoiser over a model its owner keeps between uses (the distillation teacher, held
    /// beside the trainer that owns `gpu`): pair with [`GpuDenoiser::into_parts`].
    pub fn from_parts(gpu: &'g Gpu, model: GpuDit, ws: Option<Workspace>) -> Self {
        GpuDenoiser { gpu, model, ws }
    }

    /// The model and the last workspace, for a later [`GpuDenoiser::from_parts`].
    pub fn into_parts(self) -> (GpuDit, Option<Workspace>) {
        (self.model, self.ws)
    }

    /// The inference workspace for (batch, len), reallocated (old one freed first) when the
    /// shape changes.
    fn workspace(&mut self, batch: usize, len: usize) -> Result<&mut Workspace> {
        if !matches!(&self.ws, Some(w) if w.batch == batch && w.len == len) {
            self.ws = None;
            self.ws = Some(Workspace::new(
                self.gpu,
                &self.model.config,
                batch,
                len,
                Keep::None,
            )?);
        }
        Ok(self.ws.as_mut().expect("allocated above"))
    }

    /// The fast sampler: the same contract and result as `diffusion::generate` on this
    /// denoiser (see the module doc), with everything on the device. Errors on nucleus
    /// (`cfg.nucleus_p < 1`), which only the CPU posterior implements.
    pub fn generate<R: Rng + ?Sized>(
        &mut self,
        cfg: &SamplerConfig,
        x_t: &Tokens,
        given_t: Option<&[f64]>,
        eps_seeds: Option<&[i64]>,
        rng: &mut R,
    ) -> Result<SampleOutput> {
        let model = self.model.config.clone();
        let init = prepare(&model, cfg, x_t, given_t, eps_seeds, rng)?;
        let (bsz, len) = (x_t.batch, x_t.len);
        let gpu = self.gpu;
        // Split borrows: the model is read while the workspace is written.
        let ws = {
            self.workspace(bsz, len)?;
            self.ws.as_mut().expect("allocated")
        };
        ws.load_inputs(gpu, &x_t.ids, init.eps.as_ref())?;
        let s = &gpu.stream;
        let mut be = GpuBackend {
            gpu,
            model: &self.model,
            ws,
            cat: s.alloc_zeros(bsz * len)?,
            counters: s.alloc_zeros(2)?,
            alphas: s.alloc_zeros(2 * bsz)?,
        };
        let (nfe, resets) = drive(&mut be, &model, cfg, (bsz, len), &init.given_t)?;
        let ids = s.clone_dtoh(&be.ws.tokens)?;
        let eps = match &be.ws.eps {
            Some(e) => {
                let v: Vec<f32> = s.clone_dtoh(e)?.iter().map(|x| x.to_f32()).collect();
                Some(Tensor::from_vec(&[bsz, len, model.noise_dim], v)?)
            }
            None => None,
        };
        Ok(SampleOutput {
            tokens: Tokens {
                batch: bsz,
                len,
                ids,
            },
            nfe,
            resets,
            eps,
        })
    }
}

impl Denoiser for GpuDenoiser<'_> {
    fn config(&self) -> &DitConfig {
        &self.model.config
    }

    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        let (bsz, len, v) = (xt.batch, xt.len, self.model.config.vocab_size);
        if let Some((i, t)) = xt.ids.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(Error::Shape(format!(
                "GPU denoiser: id {t} at flat index {i} is outside the vocabulary of {v}"
            )));
        }
        let gpu = self.gpu;
        self.workspace(bsz, len)?;
        let ws = self.ws.as_mut().expect("allocated");
        ws.load_inputs(gpu, &xt.ids, eps)?;
        self.model.forward(gpu, ws, ForwardOpts::eval())?;
        Tensor::from_vec(&[bsz, len, v], ws.log_probs_host(gpu)?)
    }
}

/// The checked inputs of a run: per-row given_t and the initial eps.
pub struct Prepared {
    pub given_t: Vec<f64>,
    pub eps: Option<Tensor>,
}

/// The checks and the initial eps of `diffusion::generate`, in the same order with the same
/// messages (and, for unseeded rows, the same draws from `rng`), plus the device driver's own
/// limit: no nucleus.
pub fn prepare<R: Rng + ?Sized>(
    model: &DitConfig,
    cfg: &SamplerConfig,
    x_t: &Tokens,
    given_t: Option<&[f64]>,
    eps_seeds: Option<&[i64]>,
    rng: &mut R,
) -> Result<Prepared> {
    cfg.validate()?;
    if cfg.filter().nucleus_on() {
        return Err(Error::Config(format!(
            "sampler: nucleus (p = {}) runs only in the CPU posterior; use diffusion::generate \
             with a GpuDenoiser",
            cfg.nucleus_p
        )));
    }
    let (bsz, len) = (x_t.batch, x_t.len);
    let g = crate::diffusion::sampler::check_inputs(model, x_t, given_t)?;
    let (nd, scale) = (model.noise_dim, model.noise_scale as f32);
    let eps = if model.has_eps_mlp() {
        Some(match eps_seeds {
            Some(s) if s.len() != bsz => {
                return Err(Error::Shape(format!(
                    "sampler: {} eps seeds for a batch of {bsz}",
                    s.len()
                )))
            }
            Some(s) => crate::rng::seeded_eps(s, len, nd, model.noise_type, scale),
            None => {
                // The draws of `diffusion::sampler`'s unseeded eps, in the same order.
                let data = (0..bsz * len * nd)
                    .map(|_| match model.noise_type {
                        NoiseType::Rand => (2.0 * rng.random::<f32>() - 1.0) * scale,
                        NoiseType::Randn => {
                            let z: f32 = StandardNormal.sample(rng);
                            z * scale
                        }
                    })
                    .collect();
                Tensor::from_vec(&[bsz, len, nd], data)?
            }
        })
    } else {
        None
    };
    Ok(Prepared { given_t: g, eps })
}

/// Where [`drive`] runs: the GPU, or the kernel's CPU twin.
pub trait StepBackend {
    /// Runs the denoiser on the current tokens and eps and keeps its log-probs.
    fn forward(&mut self) -> Result<()>;
    /// One fused step on the kept log-probs with `alphas` (B, 2); returns (unmasks, resets).
    fn step(&mut self, alphas: &[f64], p: &SampleParams) -> Result<[u32; 2]>;
}

/// The sampler loop of `diffusion::generate` on a [`StepBackend`]: forward when the cache is
/// empty, one fused step, the cache dropped after any unmask or reset. Returns (NFE, resets).
pub fn drive<B: StepBackend + ?Sized>(
    be: &mut B,
    model: &DitConfig,
    cfg: &SamplerConfig,
    (bsz, len): (usize, usize),
    given_t: &[f64],
) -> Result<(usize, usize)> {
    let dims = (bsz, len, model.vocab_size, model.mask_index);
    let (mut nfe, mut resets, mut cached) = (0usize, 0usize, false);
    let mut alphas = vec![0f64; 2 * bsz];
    for i in 0..cfg.steps {
        let last = i + 1 == cfg.steps;
        if !cached {
            be.forward()?;
            nfe += 1;
            cached = true;
        }
        for (b, &g) in given_t.iter().enumerate() {
            let (t, s) = cfg.step_times(i, g);
            alphas[2 * b] = alpha(t);
            alphas[2 * b + 1] = if last { 1.0 } else { alpha(s) };
        }
        let mut p = SampleParams::new(cfg.kind, dims, cfg.seed, i as u32)
            .with_temperature(cfg.temperature)
            .with_greedy(last && cfg.noise_removal == NoiseRemoval::Greedy);
        if model.has_eps_mlp() {
            // Only the IMDM posterior has a reset category.
            let write = !cfg.fix_eps && !last && cfg.kind == SamplerKind::ImdmPosterior;
            let scale = model.noise_scale as f32;
            p = p.with_eps(model.noise_dim, model.noise_type, scale, write);
        }
        let [unmasks, step_resets] = be.step(&alphas, &p)?;
        resets += step_resets as usize;
        if unmasks + step_resets > 0 {
            cached = false;
        }
    }
    Ok((nfe, resets))
}

/// The device-resident state of [`GpuDenoiser::generate`].
struct GpuBackend<'a> {
    gpu: &'a Gpu,
    model: &'a GpuDit,
    ws: &'a mut Workspace,
    cat: CudaSlice<u32>,
    counters: CudaSlice<u32>,
    alphas: CudaSlice<f64>,
}

impl StepBackend for GpuBackend<'_> {
    fn forward(&mut self) -> Result<()> {
        self.model.forward(self.gpu, self.ws, ForwardOpts::eval())
    }

    fn step(&mut self, alphas: &[f64], p: &SampleParams) -> Result<[u32; 2]> {
        let s = &self.gpu.stream;
        s.memcpy_htod(alphas, &mut self.alphas)?;
        s.memset_zeros(&mut self.counters)?;
        let ws = &mut *self.ws;
        // The workspace's log-probs rows are padded to `logits_ld`.
        let p = p.with_ld(ws.logits_ld);
        sample_fwd_f32(
            self.gpu,
            &mut ws.tokens,
            &mut self.cat,
            ws.eps.as_mut(),
            &mut self.counters,
            &ws.log_probs,
            &self.alphas,
            &p,
        )?;
        let c = s.clone_dtoh(&self.counters)?;
        Ok([c[0], c[1]])
    }
}

/// [`drive`]'s state on the host, with the kernel's twin and any denoiser.
struct TwinBackend<'d, D: ?Sized> {
    den: &'d mut D,
    x: Tokens,
    eps: Option<Tensor>,
    log_probs: Option<Tensor>,
    cat: Vec<u32>,
}

impl<D: Denoiser + ?Sized> StepBackend for TwinBackend<'_, D> {
    fn forward(&mut self) -> Result<()> {
        let v = self.den.config().vocab_size;
        let out = self.den.log_probs(&self.x, self.eps.as_ref())?;
        out.expect_shape(
            "sampler: denoiser log-probs",
            &[self.x.batch, self.x.len, v],
        )?;
        self.log_probs = Some(out);
        Ok(())
    }

    fn step(&mut self, alphas: &[f64], p: &SampleParams) -> Result<[u32; 2]> {
        let lp = self.log_probs.as_ref().expect("forward ran first");
        let mut counters = [0u32; 2];
        sample_cpu::sample_fwd(
            &mut self.x.ids,
            &mut self.cat,
            self.eps.as_mut().map(|e| e.data.as_mut_slice()),
            &mut counters,
            &lp.data,
            alphas,
            p,
        )?;
        Ok(counters)
    }
}

/// [`GpuDenoiser::generate`]'s loop with the kernel's CPU twin on any denoiser: the same result
/// as `diffusion::generate` (tested), so the device driver's logic is checked without a GPU.
pub fn generate_twin<D: Denoiser + ?Sized, R: Rng + ?Sized>(
    den: &mut D,
    cfg: &SamplerConfig,
    x_t: &Tokens,
    given_t: Option<&[f64]>,
    eps_seeds: Option<&[i64]>,
    rng: &mut R,
) -> Result<SampleOutput> {
    let model = den.config().clone();
    let init = prepare(&model, cfg, x_t, given_t, eps_seeds, rng)?;
    let (bsz, len) = (x_t.batch, x_t.len);
    let mut be = TwinBackend {
        den,
        x: x_t.clone(),
        eps: init.eps,
        log_probs: None,
        cat: vec![0; bsz * len],
    };
    let (nfe, resets) = drive(&mut be, &model, cfg, (bsz, len), &init.given_t)?;
    Ok(SampleOutput {
        tokens: be.x,
        nfe,
        resets,
        eps: be.eps,
    })
}

/// bf16 rounding of every value (what the GPU model sees of an f32 eps).
pub fn round_bf16(t: &Tensor) -> Tensor {
    Tensor {
        shape: t.shape.clone(),
        data: t.data.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
    }
}

#[cfg(test)]
#[path = "denoiser_tests.rs"]
mod tests;
