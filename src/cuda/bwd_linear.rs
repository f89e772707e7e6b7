//! The linear layers' backward products of `cuda::dit_bwd` (`y = x Wᵀ + b`, bf16 operands and
//! f32 accumulation in cuBLASLt): the weight, bias and input gradients, each skipped for a
//! frozen tensor where it is a parameter gradient.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::ops::gemm::{Epilogue, Gemm};
use crate::cuda::param_tree::LinearOf;
use crate::cuda::Gpu;
use crate::error::{Error, Result};

/// `dW += dYᵀ X` unless `frozen`: dY (rows, out) bf16, X (rows, in) bf16, dW (out, in) f32.
pub(crate) fn weight_grad(
    gpu: &Gpu,
    g: &Gemm,
    dw: &mut CudaSlice<f32>,
    frozen: bool,
    dy: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    (rows, out, inp): (usize, usize, usize),
) -> Result<()> {
    if frozen {
        return Ok(());
    }
    g.matmul(
        gpu,
        dw,
        dy,
        true,
        x,
        false,
        (out, inp, rows),
        1.0,
        Epilogue::None,
    )
}

/// `db += Σ_rows dY` unless `frozen` (a (1, rows) x (rows, out) GEMM with a row of ones).
pub(crate) fn bias_grad(
    gpu: &Gpu,
    g: &Gemm,
    db: &mut CudaSlice<f32>,
    frozen: bool,
    ones: &CudaSlice<bf16>,
    dy: &CudaSlice<bf16>,
    (rows, out): (usize, usize),
) -> Result<()> {
    if frozen {
        return Ok(());
    }
    g.matmul(
        gpu,
        db,
        ones,
        false,
        dy,
        false,
        (1, out, rows),
        1.0,
        Epilogue::None,
    )
}

/// `dX = dY W`: dY (rows, out) bf16, W (out, in) bf16, dX (rows, in) f32 or bf16.
pub(crate) fn input_grad<T: crate::cuda::ops::gemm::GemmOut>(
    gpu: &Gpu,
    g: &Gemm,
    dx: &mut CudaSlice<T>,
    dy: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    (rows, out, inp): (usize, usize, usize),
) -> Result<()> {
    g.matmul(
        gpu,
        dx,
        dy,
        false,
        w,
        false,
        (rows, inp, out),
        0.0,
        Epilogue::None,
    )
}

pub(crate) fn bias_of<'a>(
    l: &'a mut LinearOf<CudaSlice<f32>>,
    what: &str,
) -> Result<&'a mut CudaSlice<f32>> {
    l.b.as_mut()
        .ok_or_else(|| Error::Shape(format!("{what}: the gradient tree has no bias")))
}

pub(crate) fn frozen_bias(l: &LinearOf<bool>) -> bool {
    l.b.unwrap_or(true)
}
