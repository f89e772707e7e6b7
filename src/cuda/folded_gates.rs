//! The inference upload's gate-folded output layers ([`FoldedGates`]): with constant adaLN
//! gates, `g ∘ (x W^T + b) = x (diag(g) W)^T + g ∘ b`, so each gated residual of a block becomes
//! one GEMM accumulating into the f32 stream (see `cuda::dit`). Constant conditioning only.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::dit::to_bf16;
use crate::cuda::Gpu;
use crate::error::Result;

/// A block's two gated output layers with their (constant) adaLN gates folded into the weights,
/// for forwards without dropout or tape: `g ∘ (x W^T + b) = x (diag(g) W)^T + g ∘ b`. The
/// folded weights are rounded to bf16 once (instead of rounding each GEMM output to bf16 before
/// the gate), which keeps the result within the forward's bf16 tolerance of `dit_ref`.
pub struct FoldedGates {
    /// diag(gate_msa) · W_out, (D, D) bf16
    pub attn_out: CudaSlice<bf16>,
    /// diag(gate_mlp) · W_2, (D, 4D) bf16
    pub mlp2: CudaSlice<bf16>,
    /// gate_mlp ∘ b_2, (D) f32
    pub mlp2_bias: CudaSlice<f32>,
}

/// `diag(g) · W` for W stored (out, in) row-major: row r scaled by g[r] (f32 products, as the
/// upload then rounds to bf16). No gate (`None`, the AR baseline) leaves W as it is.
pub fn fold_rows(w: &[f32], g: Option<&[f32]>, inp: usize) -> Vec<f32> {
    match g {
        None => w.to_vec(),
        Some(g) => w
            .chunks_exact(inp)
            .zip(g)
            .flat_map(|(row, &gr)| row.iter().map(move |&x| x * gr))
            .collect(),
    }
}

impl FoldedGates {
    /// From a block's host weights and its host modulation (6 chunks of D, or none).
    pub(crate) fn new(
        gpu: &Gpu,
        b: &crate::model::params::Block,
        m: Option<&[f32]>,
    ) -> Result<Self> {
        let d = b.attn_out.out_dim();
        let gate = |k: usize| m.map(|m| &m[k * d..(k + 1) * d]);
        let (w_o, w_2) = (&b.attn_out, &b.mlp_fc2);
        let bias = w_2.bias.as_ref().expect("mlp bias");
        let b2: Vec<f32> = match gate(5) {
            Some(g) => bias.data.iter().zip(g).map(|(&x, &gi)| x * gi).collect(),
            None => bias.data.clone(),
        };
        let s = &gpu.stream;
        Ok(FoldedGates {
            attn_out: s.clone_htod(&to_bf16(&fold_rows(
                &w_o.weight.data,
                gate(2),
                w_o.in_dim(),
            )))?,
            mlp2: s.clone_htod(&to_bf16(&fold_rows(
                &w_2.weight.data,
                gate(5),
                w_2.in_dim(),
            )))?,
            mlp2_bias: s.clone_htod(&b2)?,
        })
    }
}
