//! The buffers of one GPU DiT forward at a fixed (batch, len): per-block activations
//! ([`BlockActs`], kept per block for the backward or one set reused in inference), the inputs,
//! the residual stream, the logits with their padded row stride and the SUBS outputs. The
//! forward that fills them is [`crate::cuda::dit`].

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::dit::to_bf16;
use crate::cuda::ops::ln_modulate::LnModulateOut;
use crate::cuda::time_cond::RowCond;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::tensor::Tensor;

/// Activations of one block (kept per block for the backward, or shared in inference).
pub struct BlockActs {
    pub ln1: LnModulateOut,
    /// (rows, 3D)
    pub qkv: CudaSlice<bf16>,
    /// (rows, D)
    pub attn: CudaSlice<bf16>,
    /// (B, H, L)
    pub lse: CudaSlice<f32>,
    /// (rows, D): attention projection, then reused for the MLP output
    pub proj: CudaSlice<bf16>,
    pub ln2: LnModulateOut,
    /// (rows, 4D) pre-activation and GELU output
    pub mlp_pre: CudaSlice<bf16>,
    pub mlp_act: CudaSlice<bf16>,
    /// (rows, D)
    pub mlp_out: CudaSlice<bf16>,
    /// Training only: (rows, D) f32 copies of the residual stream entering LN1 (the block
    /// input) and LN2, the inputs the LayerNorm backward needs.
    pub ln1_x: Option<CudaSlice<f32>>,
    pub ln2_x: Option<CudaSlice<f32>>,
}

impl BlockActs {
    fn new(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize, saved: bool) -> Result<Self> {
        let (rows, d, s) = (batch * len, c.hidden, &gpu.stream);
        let x = || -> Result<Option<CudaSlice<f32>>> {
            Ok(if saved {
                Some(s.alloc_zeros(rows * d)?)
            } else {
                None
            })
        };
        Ok(BlockActs {
            ln1: LnModulateOut::new(gpu, rows, d)?,
            qkv: s.alloc_zeros(rows * 3 * d)?,
            attn: s.alloc_zeros(rows * d)?,
            lse: s.alloc_zeros(batch * c.heads * len)?,
            proj: s.alloc_zeros(rows * d)?,
            ln2: LnModulateOut::new(gpu, rows, d)?,
            mlp_pre: s.alloc_zeros(rows * c.mlp_hidden())?,
            mlp_act: s.alloc_zeros(rows * c.mlp_hidden())?,
            mlp_out: s.alloc_zeros(rows * d)?,
            ln1_x: x()?,
            ln2_x: x()?,
        })
    }
}

/// Whether activations are kept per block (training) or one set is reused (inference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    All,
    None,
}

/// Every buffer of one forward at a fixed (batch, len).
pub struct Workspace {
    pub batch: usize,
    pub len: usize,
    /// (rows) token ids
    pub tokens: CudaSlice<u32>,
    /// (rows, nd) bf16 eps, and the eps-MLP hidden/output (IMDM only)
    pub eps: Option<CudaSlice<bf16>>,
    pub eps_hidden: Option<CudaSlice<bf16>>,
    pub eps_act: Option<CudaSlice<bf16>>,
    pub eps_out: Option<CudaSlice<bf16>>,
    /// (rows, D) f32 residual stream
    pub h: CudaSlice<f32>,
    pub blocks: Vec<BlockActs>,
    pub final_ln: LnModulateOut,
    /// (rows, logits_ld) f32; columns V..logits_ld are padding
    pub logits: CudaSlice<f32>,
    /// Row stride of `logits` and `log_probs`: V rounded up to 64
    pub logits_ld: usize,
    /// V: the real columns of each logits row
    pub vocab: usize,
    /// (rows, logits_ld) f32 SUBS log-probs (columns V.. are padding, never written) and (rows)
    /// their log-sum-exp; unused (1 element) in training
    pub log_probs: CudaSlice<f32>,
    pub lse: CudaSlice<f32>,
    /// Whether this workspace can record a training forward (saved LayerNorm inputs).
    pub training: bool,
    /// Time conditioning: the sequences' sigmas and the per-sequence conditioning and
    /// modulations the forward computes from them (`None` for other models).
    pub cond: Option<RowCond>,
}

impl Workspace {
    pub fn new(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize, keep: Keep) -> Result<Self> {
        Self::build(gpu, c, batch, len, keep, false)
    }

    /// The workspace of a training forward: every block's activations and LayerNorm inputs
    /// kept, and no log-probs buffer (the fused loss overwrites the logits, whose padded rows
    /// also keep its bf16 gradient view 16-byte aligned).
    pub fn training(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize) -> Result<Self> {
        Self::build(gpu, c, batch, len, Keep::All, true)
    }

    fn build(
        gpu: &Gpu,
        c: &DitConfig,
        batch: usize,
        len: usize,
        keep: Keep,
        training: bool,
    ) -> Result<Self> {
        let (rows, d, s) = (batch * len, c.hidden, &gpu.stream);
        let n_acts = if keep == Keep::All { c.blocks } else { 1 };
        // Padded rows: the logits GEMM stores 16-byte aligned rows (at V = 50258 unpadded it
        // ran at 240 TFLOP/s, a third of the OWT forward) and SUBS reads whole vectors.
        let logits_ld = c.vocab_size.next_multiple_of(64);
        let imdm = c.has_eps_mlp();
        let opt = |on: bool, n: usize| -> Result<Option<CudaSlice<bf16>>> {
            Ok(if on { Some(s.alloc_zeros(n)?) } else { None })
        };
        Ok(Workspace {
            batch,
            len,
            tokens: s.alloc_zeros(rows)?,
            eps: opt(imdm, rows * c.noise_dim)?,
            eps_hidden: opt(imdm, rows * 4 * d)?,
            eps_act: opt(imdm, rows * 4 * d)?,
            eps_out: opt(imdm, rows * d)?,
            h: s.alloc_zeros(rows * d)?,
            blocks: (0..n_acts)
                .map(|_| BlockActs::new(gpu, c, batch, len, training))
                .collect::<Result<_>>()?,
            final_ln: LnModulateOut::new(gpu, rows, d)?,
            logits: s.alloc_zeros(rows * logits_ld)?,
            logits_ld,
            vocab: c.vocab_size,
            // One placeholder element in training (no zero-sized device allocations).
            log_probs: if training {
                s.alloc_zeros(1)?
            } else {
                s.alloc_zeros(rows * logits_ld)?
            },
            lse: s.alloc_zeros(rows)?,
            training,
            cond: RowCond::new(gpu, c, batch)?,
        })
    }

    /// The logits on the host as a dense (rows, V) matrix (the padding columns dropped).
    pub fn logits_host(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        Ok(self.dense_rows(gpu.stream.clone_dtoh(&self.logits)?))
    }

    /// The SUBS log-probs of the last forward with `opts.subs`, on the host as a dense
    /// (rows, V) matrix.
    pub fn log_probs_host(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        if self.training {
            return Err(Error::Shape(
                "a training workspace keeps no SUBS log-probs".into(),
            ));
        }
        Ok(self.dense_rows(gpu.stream.clone_dtoh(&self.log_probs)?))
    }

    /// Drops the padding columns `V..logits_ld` of a (rows, logits_ld) host copy.
    fn dense_rows(&self, padded: Vec<f32>) -> Vec<f32> {
        if self.logits_ld == self.vocab {
            return padded;
        }
        padded
            .chunks_exact(self.logits_ld)
            .flat_map(|row| &row[..self.vocab])
            .copied()
            .collect()
    }

    /// Sets each sequence's sigma (B values) for the forwards of a time-conditioned model (the
    /// sigma map's input, spec 2.2); an error for other models, whose conditioning is constant.
    pub fn load_sigma(&mut self, sigma: &[f64]) -> Result<()> {
        let batch = self.batch;
        let rc = self.cond.as_mut().ok_or_else(|| {
            Error::Config(
                "load_sigma: the model is not time-conditioned (DitConfig::time_conditioning \
                 is off), its conditioning is constant"
                    .into(),
            )
        })?;
        if sigma.len() != batch || sigma.iter().any(|s| !s.is_finite()) {
            return Err(Error::Shape(format!(
                "load_sigma: {} sigmas for batch {batch}; every one must be finite",
                sigma.len()
            )));
        }
        rc.sigma = Some(sigma.to_vec());
        Ok(())
    }

    /// Copies token ids (and IMDM eps, rounded to bf16) into the workspace.
    pub fn load_inputs(&mut self, gpu: &Gpu, ids: &[u32], eps: Option<&Tensor>) -> Result<()> {
        let rows = self.batch * self.len;
        if ids.len() != rows {
            return Err(Error::Shape(format!(
                "tokens: {} ids for {rows} rows",
                ids.len()
            )));
        }
        gpu.stream.memcpy_htod(ids, &mut self.tokens)?;
        if let Some(buf) = &mut self.eps {
            let e = eps.ok_or_else(|| Error::Shape("IMDM forward needs eps".into()))?;
            if e.numel() != buf.len() {
                return Err(Error::Shape(format!(
                    "eps: {} values, expected {}",
                    e.numel(),
                    buf.len()
                )));
            }
            gpu.stream.memcpy_htod(&to_bf16(&e.data), buf)?;
        }
        Ok(())
    }
}
