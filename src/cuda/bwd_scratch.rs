//! What the GPU DiT backward ([`crate::cuda::dit_bwd`]) works in: the gradient registers of
//! `tape.rs` for one (batch, len) ([`BwdScratch`], with the per-sequence modulation gradients of
//! a time-conditioned model) and the constant modulations' gradients summed over rows
//! ([`ModGrads`]).

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::dit_bwd::attention_shape;
use crate::cuda::ops::attention::AttentionBwdWorkspace;
use crate::cuda::ops::embedding::EmbeddingBwdPlan;
use crate::cuda::ops::gelu::gelu_bwd_scratch_len;
use crate::cuda::ops::ln_modulate::ln_modulate_bwd_scratch_len;
use crate::cuda::ops::residual::residual_bwd_scratch_len;
use crate::cuda::time_cond::RowModGrads;
use crate::cuda::Gpu;
use crate::error::Result;
use crate::model::DitConfig;

/// Gradients of the constant modulation vectors, summed over all rows (and over the
/// micro-batches of a step): per block one (6D) f32 row (shift_msa, scale_msa, gate_msa,
/// shift_mlp, scale_mlp, gate_mlp), and the final layer's (2D) (shift, scale): the adaLN bias
/// gradients themselves.
pub struct ModGrads {
    pub blocks: Vec<CudaSlice<f32>>,
    pub final_layer: CudaSlice<f32>,
}

impl ModGrads {
    /// Zeroed buffers for `c`, or `None` when the model has no constant modulation: no adaLN
    /// (AR baseline), or time conditioning (whose per-sequence gradients live in
    /// [`BwdScratch`] and are finished by each backward).
    pub fn new(gpu: &Gpu, c: &DitConfig) -> Result<Option<Self>> {
        if !c.has_adaln() || c.time_conditioning {
            return Ok(None);
        }
        let z = |n: usize| gpu.stream.alloc_zeros::<f32>(n * c.hidden);
        let blocks = (0..c.blocks)
            .map(|_| Ok(z(6)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(ModGrads {
            blocks,
            final_layer: z(2)?,
        }))
    }

    pub fn zero(&mut self, gpu: &Gpu) -> Result<()> {
        for x in self.blocks.iter_mut() {
            gpu.stream.memset_zeros(x)?;
        }
        gpu.stream.memset_zeros(&mut self.final_layer)?;
        Ok(())
    }
}

/// The eps MLP's gradient registers (IMDM only).
pub(crate) struct EpsRegs {
    /// (rows, D) bf16: gradient of the eps-MLP output (dh at mask rows, 0 elsewhere)
    pub(crate) deps: CudaSlice<bf16>,
    /// (rows, 4D) bf16: gradient of the exact-GELU output
    pub(crate) dact: CudaSlice<bf16>,
    /// (rows, 4D) bf16: gradient of the exact-GELU input (fc1's output, bias included)
    pub(crate) dpre: CudaSlice<bf16>,
}

/// The backward's scratch for one (batch, len): the gradient registers of `tape.rs`, the
/// reduction scratch shared by the LayerNorm / GELU / residual backward kernels, a row of ones
/// for bias column sums, the attention backward's workspace and the embedding scatter plan.
pub struct BwdScratch {
    pub batch: usize,
    pub len: usize,
    /// (rows, D) f32 residual-stream gradient
    pub(crate) dh: CudaSlice<f32>,
    /// (rows, D) f32 gradient of a LayerNorm output
    pub(crate) dln: CudaSlice<f32>,
    /// (rows, D) bf16 gradient of a residual branch
    pub(crate) dbranch: CudaSlice<bf16>,
    /// (rows, D) bf16 gradient of the attention output
    pub(crate) dattn: CudaSlice<bf16>,
    /// (rows, 3D) bf16
    pub(crate) dqkv: CudaSlice<bf16>,
    /// (rows, H) bf16 gradients of the block MLP's GELU output and input
    pub(crate) dact: CudaSlice<bf16>,
    pub(crate) dpre: CudaSlice<bf16>,
    pub(crate) eps: Option<EpsRegs>,
    /// f32 partial sums, the largest any backward kernel of this shape needs
    pub(crate) red: CudaSlice<f32>,
    /// (rows) bf16 ones
    pub(crate) ones: CudaSlice<bf16>,
    pub(crate) attn: AttentionBwdWorkspace,
    pub(crate) emb: EmbeddingBwdPlan,
    pub(crate) emb_loaded: bool,
    /// Time conditioning: the per-sequence modulation gradients of this backward.
    pub(crate) rowmods: Option<RowModGrads>,
}

impl BwdScratch {
    pub fn new(gpu: &Gpu, c: &DitConfig, batch: usize, len: usize) -> Result<Self> {
        let (rows, d, h) = (batch * len, c.hidden, c.mlp_hidden());
        let s = &gpu.stream;
        // Per-sequence reductions (time conditioning) need the most partials: one set per
        // chunk of each sequence.
        let red = [
            ln_modulate_bwd_scratch_len(rows, d, len.max(1)),
            residual_bwd_scratch_len(rows, d, len.max(1)),
            gelu_bwd_scratch_len(rows, h),
            gelu_bwd_scratch_len(rows, 4 * d),
        ]
        .into_iter()
        .max()
        .unwrap_or(1)
        .max(1);
        let eps = if c.has_eps_mlp() {
            Some(EpsRegs {
                deps: s.alloc_zeros(rows * d)?,
                dact: s.alloc_zeros(rows * 4 * d)?,
                dpre: s.alloc_zeros(rows * 4 * d)?,
            })
        } else {
            None
        };
        Ok(BwdScratch {
            batch,
            len,
            dh: s.alloc_zeros(rows * d)?,
            dln: s.alloc_zeros(rows * d)?,
            dbranch: s.alloc_zeros(rows * d)?,
            dattn: s.alloc_zeros(rows * d)?,
            dqkv: s.alloc_zeros(rows * 3 * d)?,
            dact: s.alloc_zeros(rows * h)?,
            dpre: s.alloc_zeros(rows * h)?,
            eps,
            red: s.alloc_zeros(red)?,
            ones: s.clone_htod(&vec![bf16::ONE; rows])?,
            attn: AttentionBwdWorkspace::new(gpu, &attention_shape(c, batch, len))?,
            emb: EmbeddingBwdPlan::new(gpu, rows, d)?,
            emb_loaded: false,
            rowmods: RowModGrads::new(gpu, c, batch)?,
        })
    }

    /// Builds and uploads the embedding scatter plan for the forward's input ids (host copy,
    /// (rows)); call once per forward, before [`backward`].
    pub fn load_tokens(&mut self, gpu: &Gpu, ids: &[u32], vocab: usize) -> Result<()> {
        self.emb.load(gpu, ids, vocab)?;
        self.emb_loaded = true;
        Ok(())
    }
}
