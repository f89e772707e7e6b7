//! The adaLN modulation operands of the LayerNorm+modulate and gated-residual kernels
//! (`kernels/ln_modulate.cu`, `kernels/residual.cu`): which rows of a layer's modulation buffer
//! the activation rows read (the kernels' `mod_stride`), and the buffer, chunk and layout that
//! one launch reads or accumulates into.
//!
//! A layer's modulation buffer holds, per modulation row, its chunks of D values in the
//! reference's order: a block's 6 (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
//! gate_mlp), the final layer's 2 (shift, scale). Constant conditioning (MDLM/IMDM) has one row
//! for every activation row; time conditioning (SEDD, D3PM) one row per sequence, (B, 6D) or
//! (B, 2D) row-major.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::error::{Error, Result};

/// How the activation rows map to the rows of a modulation buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModRows {
    /// Every activation row reads row 0 (constant conditioning: the kernels' stride 0); the
    /// backward sums the gradient over all rows into that one row.
    Broadcast,
    /// Sequence b (activation rows b·L .. (b+1)·L) reads row b, `stride` elements after row
    /// b - 1: 6D for a block's (B, 6D) buffer, 2D for the final layer's (B, 2D), D for a (B, D)
    /// buffer of one chunk. The backward sums the gradient per sequence.
    PerSequence { stride: usize },
}

impl ModRows {
    /// The kernels' `mod_stride`: elements between consecutive modulation rows (0: broadcast).
    pub fn stride(self) -> usize {
        match self {
            ModRows::Broadcast => 0,
            ModRows::PerSequence { stride } => stride,
        }
    }

    /// Offset of the modulation row that sequence `b` reads.
    pub fn row_offset(self, b: usize) -> usize {
        b * self.stride()
    }

    /// Modulation rows this layout addresses for `batches` sequences.
    pub fn rows(self, batches: usize) -> usize {
        match self {
            ModRows::Broadcast => 1,
            ModRows::PerSequence { .. } => batches,
        }
    }

    /// Checks that a buffer of `len` elements holds chunks `chunk .. chunk + width` (D = `d`
    /// each) of every row addressed for `batches` sequences, and that the rows do not overlap.
    pub fn check(
        self,
        what: &str,
        len: usize,
        chunk: usize,
        width: usize,
        batches: usize,
        d: usize,
    ) -> Result<()> {
        let end = (chunk + width) * d;
        if let ModRows::PerSequence { stride } = self {
            if stride < end || (stride % 4 != 0 && d % 4 == 0) {
                return Err(Error::Shape(format!(
                    "{what}: modulation row stride {stride} must cover chunks ..{} of D {d} \
                     (at least {end}) and be a multiple of 4 when D is",
                    chunk + width
                )));
            }
        }
        let need = match self.rows(batches) {
            0 => 0,
            n => self.row_offset(n - 1) + end,
        };
        if len < need || self.stride() > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "{what}: the modulation buffer holds {len} elements; chunks {chunk}..{} of {} \
                 rows ({self:?}, D {d}) need {need}",
                chunk + width,
                self.rows(batches)
            )));
        }
        Ok(())
    }
}

/// The modulation operand of one launch: chunk `chunk` (and, for the LayerNorm, `chunk + 1`:
/// shift then scale) of every row of `buf`, rows laid out as `rows`.
#[derive(Clone, Copy)]
pub struct ModIn<'a> {
    pub buf: &'a CudaSlice<f32>,
    pub chunk: usize,
    pub rows: ModRows,
}

impl<'a> ModIn<'a> {
    /// A broadcast operand: chunk `chunk` of a single modulation row.
    pub fn broadcast(buf: &'a CudaSlice<f32>, chunk: usize) -> Self {
        ModIn {
            buf,
            chunk,
            rows: ModRows::Broadcast,
        }
    }

    /// The view starting at chunk `chunk + k` of row 0 (the kernel's pointer).
    pub(crate) fn view(&self, k: usize, d: usize) -> CudaView<'a, f32> {
        self.buf.slice((self.chunk + k) * d..)
    }
}

/// The accumulation target of a modulation gradient: the same layout as [`ModIn`], in the
/// buffer of the layer's modulation gradient.
pub struct ModOut<'a> {
    pub buf: &'a mut CudaSlice<f32>,
    pub chunk: usize,
    pub rows: ModRows,
}

impl ModOut<'_> {
    /// The view starting at chunk `chunk` of row 0 (the kernel's pointer).
    pub(crate) fn view(&mut self, d: usize) -> CudaViewMut<'_, f32> {
        self.buf.slice_mut(self.chunk * d..)
    }
}

/// The twins' modulation operand on the host: [`ModIn`] over a slice.
#[derive(Clone, Copy)]
pub struct HostMod<'a, T> {
    pub buf: &'a [T],
    pub chunk: usize,
    pub rows: ModRows,
}

impl<'a, T: Copy> HostMod<'a, T> {
    /// A broadcast operand at chunk 0 of a single modulation row.
    pub fn broadcast(buf: &'a [T]) -> Self {
        HostMod {
            buf,
            chunk: 0,
            rows: ModRows::Broadcast,
        }
    }

    /// Column `j` of chunk `chunk + k` for sequence `b`.
    pub fn at(&self, b: usize, k: usize, j: usize, d: usize) -> T {
        self.buf[self.rows.row_offset(b) + (self.chunk + k) * d + j]
    }
}

/// The twins' gradient target on the host: [`ModOut`] over a slice.
pub struct HostModMut<'a> {
    pub buf: &'a mut [f32],
    pub chunk: usize,
    pub rows: ModRows,
}

impl HostModMut<'_> {
    /// Element index of column `j` of chunk `chunk + k` for modulation row `g`.
    pub fn index(&self, g: usize, k: usize, j: usize, d: usize) -> usize {
        self.rows.row_offset(g) + (self.chunk + k) * d + j
    }
}
