//! The minimal autograd tape of the GPU DiT: the training forward (`GpuDit::forward_recorded`)
//! appends one [`Op`] per op it launches, naming the site (which block, which layer) and the
//! per-call constants the backward needs (dropout seed and offset); `cuda::dit_bwd::backward`
//! replays the backward launchers in reverse order. Only what DiT training and distillation need:
//! there is no general graph, no tensor handles and no pointer arithmetic. Saved buffers are the
//! typed fields of the training `Workspace` (`cuda::dit`), one [`BlockActs`] per block, and
//! every op's doc below lists the ones its backward reads, with shapes (rows = B·L).
//!
//! Gradients flow between ops through fixed registers of the backward scratch
//! (`cuda::dit_bwd::BwdScratch`); each op's backward reads the gradient of its output from one
//! register and writes the gradient of its input into another (listed per op as `dY -> dX`):
//!
//! ```text
//! dlogits  (rows, ld) bf16, in place over the f32 logits (fused SUBS loss)
//! dln      (rows, D)  f32   gradient of a LayerNorm output (the consumer GEMM's input)
//! dh       (rows, D)  f32   residual-stream gradient (+= by every LayerNorm backward)
//! dbranch  (rows, D)  bf16  gradient of a residual branch output
//! dattn    (rows, D)  bf16  gradient of the attention output
//! dqkv     (rows, 3D) bf16
//! dact     (rows, H)  bf16  gradient of a GELU output (H = mlp hidden); eps MLP: deps_act (4D)
//! dpre     (rows, H)  bf16  gradient of a GELU input;                    eps MLP: deps_pre (4D)
//! deps     (rows, D)  bf16  gradient of the eps-MLP output (mask rows only)
//! ```
//!
//! [`Tape::expected`] is the op sequence the forward must record for a configuration; the
//! backward checks the recorded tape against it before replaying, so a forward edited without
//! its backward fails loudly instead of computing wrong gradients.
//!
//! [`BlockActs`]: crate::cuda::dit::BlockActs

use crate::error::{Error, Result};
use crate::model::DitConfig;

/// A LayerNorm + adaLN modulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LnSite {
    /// Block i's first norm: saved `blocks[i].ln1_x` (its input, the block input) and
    /// `blocks[i].ln1.{mean, rstd}`; modulation (shift_msa, scale_msa).
    Block1(usize),
    /// Block i's second norm: saved `blocks[i].ln2_x`, `blocks[i].ln2.{mean, rstd}`;
    /// modulation (shift_mlp, scale_mlp).
    Block2(usize),
    /// The final norm: saved `ws.h` (the final residual stream, never modified after it),
    /// `ws.final_ln.{mean, rstd}`; modulation (shift, scale) of the final adaLN.
    Final,
}

/// A linear layer `y = x Wᵀ (+ b)` through cuBLASLt (its input is the saved buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinSite {
    /// eps MLP fc1 with bias epilogue: x = `ws.eps` (rows, nd) bf16; dpre(eps) -> (nothing: eps
    /// is an input); grads W (4D, nd) (b comes from the GELU backward).
    EpsFc1,
    /// eps MLP fc2 (no bias): x = `ws.eps_act` (rows, 4D) bf16; deps -> deps_act.
    EpsFc2,
    /// x = `blocks[i].ln1.y` (rows, D) bf16; dqkv -> dln.
    Qkv(usize),
    /// x = `blocks[i].attn` (rows, D) bf16; dbranch -> dattn.
    Out(usize),
    /// fc1 with the GELU-tanh + bias epilogue: x = `blocks[i].ln2.y`, pre-activation saved in
    /// `blocks[i].mlp_pre` (rows, H) bf16; dact -> (GELU backward, d b1) dpre -> dln.
    Mlp1(usize),
    /// fc2 with bias: x = `blocks[i].mlp_act` (rows, H) bf16; dbranch -> dact (d b2 as a
    /// column sum).
    Mlp2(usize),
    /// The logits: x = `ws.final_ln.y` (rows, D) bf16, output f32 (rows, ld); dlogits -> dln
    /// (d b as a column sum).
    Final,
}

/// A gated residual add `h += gate ⊙ dropout(branch)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResSite {
    /// Branch `blocks[i].proj` (rows, D) bf16, gate_msa.
    Attn(usize),
    /// Branch `blocks[i].mlp_out` (rows, D) bf16, gate_mlp.
    Mlp(usize),
}

/// The dropout of one residual add, regenerated bit for bit by the backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// probability in [0, 1); 0 draws nothing
    pub p: f32,
    pub seed: u64,
    /// Philox call offset (`opts.offset + 2i`, `+ 1` for the MLP branch)
    pub offset: u64,
}

/// One recorded forward op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// See [`LinSite`].
    Linear(LinSite),
    /// The eps MLP's exact GELU (a separate kernel): saved `ws.eps_hidden` (rows, 4D) bf16, its
    /// input with fc1's bias included; deps_act -> deps_pre (and d b of fc1).
    GeluExact,
    /// `h = E[tokens] (+ eps_out at mask rows)`: saved `ws.tokens` (rows) and the host copy
    /// of the ids the backward's scatter plan was built from; dh -> dE (+=), deps (= dh at mask
    /// rows) when `eps`.
    Embedding { eps: bool },
    /// See [`LnSite`]: dln -> dh (+=), d weight, d shift, d scale (+=).
    LnModulate(LnSite),
    /// Block i's attention with rotary and softcap: saved `blocks[i].{qkv, attn, lse}`;
    /// dattn -> dqkv.
    Attention(usize),
    /// See [`ResSite`]: dh -> dbranch, d gate (+=); dh passes through to the skip path.
    Residual(ResSite, Dropout),
}

/// The recorded ops of one forward, in forward order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tape {
    ops: Vec<Op>,
}

impl Tape {
    pub fn new() -> Self {
        Tape::default()
    }

    /// Forgets the recorded ops (the forward calls this first).
    pub fn clear(&mut self) {
        self.ops.clear();
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// The ops in forward order (the backward walks them reversed).
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The sequence the GPU forward records for `c`: the eps MLP (when `eps`), the embedding,
    /// per block LN1, qkv, attention, out, residual, LN2, fc1 (GELU), fc2, residual, then the
    /// final norm and the logits. `dropout` = (p, seed, offset base) as in `ForwardOpts`.
    pub fn expected(c: &DitConfig, eps: bool, dropout: (f32, u64, u64)) -> Vec<Op> {
        let (p, seed, base) = dropout;
        let drop = |i: usize, branch: u64| Dropout {
            p,
            seed,
            offset: base + 2 * i as u64 + branch,
        };
        let mut ops = Vec::new();
        if eps {
            ops.extend([
                Op::Linear(LinSite::EpsFc1),
                Op::GeluExact,
                Op::Linear(LinSite::EpsFc2),
            ]);
        }
        ops.push(Op::Embedding { eps });
        for i in 0..c.blocks {
            ops.extend([
                Op::LnModulate(LnSite::Block1(i)),
                Op::Linear(LinSite::Qkv(i)),
                Op::Attention(i),
                Op::Linear(LinSite::Out(i)),
                Op::Residual(ResSite::Attn(i), drop(i, 0)),
                Op::LnModulate(LnSite::Block2(i)),
                Op::Linear(LinSite::Mlp1(i)),
                Op::Linear(LinSite::Mlp2(i)),
                Op::Residual(ResSite::Mlp(i), drop(i, 1)),
            ]);
        }
        ops.extend([Op::LnModulate(LnSite::Final), Op::Linear(LinSite::Final)]);
        ops
    }

    /// Fails, naming the first difference, unless the recorded ops are exactly
    /// [`Tape::expected`] for these arguments.
    pub fn check(&self, c: &DitConfig, eps: bool, dropout: (f32, u64, u64)) -> Result<()> {
        let want = Tape::expected(c, eps, dropout);
        if let Some(i) =
            (0..want.len().max(self.ops.len())).find(|&i| self.ops.get(i) != want.get(i))
        {
            return Err(Error::Shape(format!(
                "tape: op {i} is {:?}, the backward expects {:?} ({} ops recorded, {} expected); \
                 the forward and its backward disagree",
                self.ops.get(i),
                want.get(i),
                self.ops.len(),
                want.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tape_tests.rs"]
mod tests;
