//! Flash-style attention forward and backward with fused rotary and softcap (spec 2.3, steps
//! 3-4): the only launcher of `kernels/attention_fwd.cu` (forward), `kernels/attention_bwd.cu`
//! (tensor-core backward) and `kernels/dev/attention_bwd_ref.cu` (SIMT reference backward, kept
//! to test the other), with its CPU twin; tests in `attention_tests.rs`. Maths, shapes, thread
//! mapping and shared memory: see the kernels' headers.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};

/// The forward's module (`kernels/attention_fwd.cu`).
const MODULE_FWD: &str = "attention_fwd";
/// The training backward's module (`kernels/attention_bwd.cu`).
const MODULE_BWD: &str = "attention_bwd";
/// The SIMT reference backward, kept only to test the training one (`kernels/dev/attention_bwd_ref.cu`).
const MODULE_BWD_REF: &str = "attention_bwd_ref";
/// Must equal ATT_BM (queries per CTA) and ATT_BN (keys per tile) in the kernel.
const BLOCK: usize = 64;
/// Must equal ATT_THREADS in the kernel.
const THREADS: u32 = 128;
/// Head dims with a compiled kernel (`attention_fwd_bf16_hd{32,64,96,128}`).
pub const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];

/// One attention call: `qkv` is (batch*len, 3*heads*head_dim) bf16 ([q heads | k heads | v
/// heads] per row), `o` is (batch*len, heads*head_dim) bf16 and `lse` is (batch, heads, len) f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Keys j <= i only (the AR baseline); otherwise all `len` keys.
    pub causal: bool,
    /// `s = softcap * tanh(s / softcap)` before the softmax; <= 0 is off.
    pub softcap: f32,
}

impl AttentionShape {
    /// Token rows, batch * len.
    pub fn rows(&self) -> usize {
        self.batch * self.len
    }

    /// Elements of one row of `o`, heads * head_dim.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Matmul FLOPs of the forward, 4*B*H*L*L*hd (QK^T and PV), halved when causal.
pub fn flops(shape: &AttentionShape) -> f64 {
    let f = 4.0
        * shape.batch as f64
        * shape.heads as f64
        * (shape.len as f64).powi(2)
        * shape.head_dim as f64;
    if shape.causal {
        f / 2.0
    } else {
        f
    }
}

/// Dynamic shared memory of the kernel (its header): K[2] + V[2] tiles of 64 x (hd+8) bf16 plus
/// hd/2 f32 frequencies.
fn smem_bytes(head_dim: usize) -> usize {
    4 * BLOCK * (head_dim + 8) * 2 + head_dim / 2 * 4
}

/// Host-side checks of the launch: sizes, head dim, grid limits and every buffer length.
fn check_shape(o_len: usize, lse_len: usize, qkv_len: usize, s: &AttentionShape) -> Result<()> {
    let err = |msg: String| Err(Error::Shape(format!("attention: {msg} ({s:?})")));
    if s.batch == 0 || s.len == 0 || s.heads == 0 {
        return err("batch, len and heads must all be >= 1".into());
    }
    if !HEAD_DIMS.contains(&s.head_dim) {
        return err(format!(
            "head_dim {} has no kernel; supported: {HEAD_DIMS:?}",
            s.head_dim
        ));
    }
    if !s.softcap.is_finite() {
        return err(format!("softcap {} is not finite", s.softcap));
    }
    if s.batch * s.heads > 65535 || s.len > i32::MAX as usize / 2 {
        return err("batch*heads must be <= 65535 (grid y) and len < 2^30".into());
    }
    let (rows, width) = (s.rows(), s.width());
    if qkv_len != rows * 3 * width {
        return err(format!(
            "qkv has {qkv_len} elements, expected rows {rows} x 3*heads*head_dim {}",
            3 * width
        ));
    }
    if o_len != rows * width || lse_len != s.batch * s.heads * s.len {
        return err(format!(
            "o/lse hold {o_len}/{lse_len} elements, expected {}/{}",
            rows * width,
            s.batch * s.heads * s.len
        ));
    }
    Ok(())
}

/// Launches `attention_fwd_bf16_hd{head_dim}`: writes `o` (rows, heads*head_dim) bf16 and `lse`
/// (batch, heads, len) f32 from `qkv` (rows, 3*heads*head_dim) bf16, rotary applied inside.
/// Every buffer length and the head dim are checked before the launch.
pub fn attention_fwd(
    gpu: &Gpu,
    o: &mut CudaSlice<bf16>,
    lse: &mut CudaSlice<f32>,
    qkv: &CudaSlice<bf16>,
    shape: &AttentionShape,
) -> Result<()> {
    check_shape(o.len(), lse.len(), qkv.len(), shape)?;
    let f = gpu.function(
        MODULE_FWD,
        &format!("attention_fwd_bf16_hd{}", shape.head_dim),
    )?;
    let smem = smem_bytes(shape.head_dim);
    if smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let (len_i, heads_i) = (shape.len as i32, shape.heads as i32);
    let causal_i = shape.causal as i32;
    let softcap = shape.softcap;
    let cfg = LaunchConfig {
        grid_dim: (
            shape.len.div_ceil(BLOCK) as u32,
            (shape.batch * shape.heads) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut *o)
        .arg(&mut *lse)
        .arg(qkv)
        .arg(&len_i)
        .arg(&heads_i)
        .arg(&causal_i)
        .arg(&softcap);
    // SAFETY: argument order and types match the kernel signature (o, lse, qkv, len, heads,
    // causal, softcap); check_shape verified qkv = rows*3*H*hd, o = rows*H*hd and lse = B*H*L
    // elements and that a kernel exists for hd; the grid is (ceil(L/64), B*H) with row guards
    // inside, and the dynamic shared memory matches the kernel's layout (limit raised above).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Must equal ATT_BWD_WARPS in the kernel: rows (queries, keys or positions) per block of the
/// reference (SIMT) backward kernels, one warp each.
const BWD_ROWS: usize = 8;
/// Must equal ATT_BWD_THREADS in the kernel (the reference kernels and the prep kernel).
const BWD_THREADS: u32 = 256;
/// Must equal ATT_PREP_ROWS in the kernel: (b, h, position) rows per block of
/// `attention_bwd_prep_bf16` (8 lanes each).
const PREP_ROWS: usize = 32;

/// Positions per (b, h) in the fast backward's padded lse2 / D buffers: `len` rounded up to a
/// whole number of 64-row tiles, so every tile reads them with 16-byte copies and no bounds.
fn padded_len(len: usize) -> usize {
    len.div_ceil(BLOCK) * BLOCK
}

/// Dynamic shared memory of the tensor-core backward kernels (`AttBwdSmem` in the kernel): six
/// 64 x (hd+8) bf16 tiles, lse2[2][64] and D[2][64] f32, hd/2 f32 frequencies.
fn bwd_smem_bytes(head_dim: usize) -> usize {
    6 * BLOCK * (head_dim + 8) * 2 + 4 * BLOCK * 4 + head_dim / 2 * 4
}

/// FLOPs credited to the backward: 2.5x the forward's [`flops`] (FlashAttention's convention: the
/// five L x L x hd matmuls S, dP, dV, dK, dQ against the forward's two). The fast kernels do
/// seven (kernel B recomputes S and dP to avoid atomics on dQ), so rates computed from this
/// count understate the tensor-core throughput by 7/5.
pub fn bwd_flops(shape: &AttentionShape) -> f64 {
    2.5 * flops(shape)
}

/// The SIMT reference's f32 scratch: rotated q', k', their gradients before the rotary backward
/// ((B, H, L, hd) each) and D = dO.o ((B, H, L)).
struct ReferenceBuffers {
    qr: CudaSlice<f32>,
    kr: CudaSlice<f32>,
    dqr: CudaSlice<f32>,
    dkr: CudaSlice<f32>,
    dsum: CudaSlice<f32>,
}

impl ReferenceBuffers {
    fn new(gpu: &Gpu, shape: &AttentionShape) -> Result<Self> {
        let rows = shape.batch * shape.heads * shape.len;
        let (s, n) = (&gpu.stream, rows * shape.head_dim);
        Ok(ReferenceBuffers {
            qr: s.alloc_zeros(n)?,
            kr: s.alloc_zeros(n)?,
            dqr: s.alloc_zeros(n)?,
            dkr: s.alloc_zeros(n)?,
            dsum: s.alloc_zeros(rows)?,
        })
    }
}

/// Scratch of [`attention_bwd`] for one shape (allocate once per shape): rotated, bf16-rounded
/// q' and k' ((B, H, L, hd) bf16) and, per (b, h), lse * log2(e) and D = dO.o (f32) over the
/// positions padded to a multiple of 64 (+inf and 0 in the padding). [`attention_bwd_reference`]
/// adds its own f32 buffers (4 x B*H*L*hd) on first use.
pub struct AttentionBwdWorkspace {
    qr: CudaSlice<bf16>,
    kr: CudaSlice<bf16>,
    lse2: CudaSlice<f32>,
    dsum: CudaSlice<f32>,
    reference: Option<ReferenceBuffers>,
    shape: AttentionShape,
}

impl AttentionBwdWorkspace {
    pub fn new(gpu: &Gpu, shape: &AttentionShape) -> Result<Self> {
        let n = shape.batch * shape.heads * shape.len * shape.head_dim;
        let n_pad = shape.batch * shape.heads * padded_len(shape.len);
        let s = &gpu.stream;
        Ok(AttentionBwdWorkspace {
            qr: s.alloc_zeros(n)?,
            kr: s.alloc_zeros(n)?,
            lse2: s.alloc_zeros(n_pad)?,
            dsum: s.alloc_zeros(n_pad)?,
            reference: None,
            shape: *shape,
        })
    }

    /// The rotated, bf16-rounded q' and k' ((B, H, L, hd), as f32) the last [`attention_bwd`]
    /// call recomputed: the forward's values bit for bit (tests and debugging).
    pub fn rotated_qk(&self, gpu: &Gpu) -> Result<(Vec<f32>, Vec<f32>)> {
        let f = |v: Vec<bf16>| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        Ok((
            f(gpu.stream.clone_dtoh(&self.qr)?),
            f(gpu.stream.clone_dtoh(&self.kr)?),
        ))
    }

    /// The q' and k' the last [`attention_bwd_reference`] call recomputed (f32 buffers), or
    /// `None` before the first such call.
    pub fn reference_rotated_qk(&self, gpu: &Gpu) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        match &self.reference {
            None => Ok(None),
            Some(r) => Ok(Some((
                gpu.stream.clone_dtoh(&r.qr)?,
                gpu.stream.clone_dtoh(&r.kr)?,
            ))),
        }
    }
}

/// Host-side checks shared by both backward launchers: the forward's shape checks, dqkv and
/// dout lengths, the workspace's shape and the row-grid limit.
#[allow(clippy::too_many_arguments)]
fn check_bwd(
    dqkv_len: usize,
    dout_len: usize,
    ws: &AttentionBwdWorkspace,
    lse_len: usize,
    o_len: usize,
    qkv_len: usize,
    shape: &AttentionShape,
) -> Result<()> {
    check_shape(o_len, lse_len, qkv_len, shape)?;
    if dqkv_len != qkv_len || dout_len != o_len {
        return Err(Error::Shape(format!(
            "attention backward: dqkv/dout hold {dqkv_len}/{dout_len} elements, expected \
             {qkv_len}/{o_len} ({shape:?})"
        )));
    }
    if ws.shape != *shape {
        return Err(Error::Shape(format!(
            "attention backward: workspace built for {:?}, called with {shape:?}",
            ws.shape
        )));
    }
    let n_rows = shape.batch * shape.heads * padded_len(shape.len);
    if n_rows.div_ceil(BWD_ROWS.min(PREP_ROWS)) > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "attention backward: {n_rows} (batch, head, position) rows exceed the grid"
        )));
    }
    Ok(())
}

/// Launches the attention backward (`attention_bwd_prep_bf16`, `attention_bwd_dkv_bf16_hd{hd}`,
/// `attention_bwd_dq_bf16_hd{hd}`: FlashAttention-2's backward on the tensor cores, maths and
/// design in the kernel header): `dqkv` (rows, 3*H*hd) bf16 **=** the gradient of the loss with
/// respect to `qkv`, from the forward's `lse` (B, H, L) and `o` (rows, H*hd), the forward's input
/// `qkv` and `dout` = d o (rows, H*hd) bf16. P and dS are rounded to bf16 before their matmuls
/// (as FlashAttention does); [`attention_bwd_reference`] keeps them in fp32. Deterministic (no
/// atomics). Lengths are checked.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    gpu: &Gpu,
    dqkv: &mut CudaSlice<bf16>,
    ws: &mut AttentionBwdWorkspace,
    lse: &CudaSlice<f32>,
    o: &CudaSlice<bf16>,
    qkv: &CudaSlice<bf16>,
    dout: &CudaSlice<bf16>,
    shape: &AttentionShape,
) -> Result<()> {
    check_bwd(
        dqkv.len(),
        dout.len(),
        ws,
        lse.len(),
        o.len(),
        qkv.len(),
        shape,
    )?;
    let (batch_i, len_i, heads_i, hd_i) = (
        shape.batch as i32,
        shape.len as i32,
        shape.heads as i32,
        shape.head_dim as i32,
    );
    let causal_i = shape.causal as i32;
    let softcap = shape.softcap;
    let n_prep = shape.batch * shape.heads * padded_len(shape.len);
    let prep_cfg = LaunchConfig {
        grid_dim: (n_prep.div_ceil(PREP_ROWS) as u32, 1, 1),
        block_dim: (BWD_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE_BWD, "attention_bwd_prep_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut ws.qr)
        .arg(&mut ws.kr)
        .arg(&mut ws.lse2)
        .arg(&mut ws.dsum)
        .arg(lse)
        .arg(qkv)
        .arg(o)
        .arg(dout)
        .arg(&batch_i)
        .arg(&len_i)
        .arg(&heads_i)
        .arg(&hd_i);
    // SAFETY: argument order and types match the kernel signature (qr, kr, lse2, dsum, lse, qkv,
    // o, dout, batch, len, heads, hd); check_bwd verified qkv, o (= dout), lse and that the
    // workspace was built for this shape (qr, kr: B*H*L*hd; lse2, dsum: B*H*padded_len(L)); the
    // grid covers B*H*padded_len(L) rows, 8 lanes each, with a bounds check.
    unsafe { b.launch(prep_cfg) }?;

    let hd = shape.head_dim;
    let smem = bwd_smem_bytes(hd);
    let cfg = LaunchConfig {
        grid_dim: (
            shape.len.div_ceil(BLOCK) as u32,
            (shape.batch * shape.heads) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    for name in ["dkv", "dq"] {
        let f = gpu.function(MODULE_BWD, &format!("attention_bwd_{name}_bf16_hd{hd}"))?;
        if smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut *dqkv)
            .arg(&ws.qr)
            .arg(&ws.kr)
            .arg(&ws.lse2)
            .arg(&ws.dsum)
            .arg(qkv)
            .arg(dout)
            .arg(&len_i)
            .arg(&heads_i)
            .arg(&causal_i)
            .arg(&softcap);
        // SAFETY: argument order and types match both kernels' signature (dqkv, qr, kr, lse2,
        // dsum, qkv, dout, len, heads, causal, softcap); check_bwd verified dqkv = qkv =
        // rows*3*H*hd, dout = rows*H*hd, the workspace's shape (filled by the prep launch above
        // on the same stream) and that a kernel exists for hd; the grid is (ceil(L/64), B*H)
        // with B*H <= 65535 and position guards inside; the dynamic shared memory matches
        // AttBwdSmem (limit raised above). dkv writes the k and v parts of dqkv, dq the q part.
        unsafe { b.launch(cfg) }?;
    }
    Ok(())
}

/// The correctness-first fp32 SIMT backward (`attention_bwd_prep_f32`, `attention_bwd_dq_hd{hd}`,
/// `attention_bwd_dkv_hd{hd}`, `attention_bwd_rope_bf16`): the GPU-side reference of
/// [`attention_bwd`], same signature and result up to rounding (P and dS stay fp32). About 20x
/// slower; allocates its f32 scratch in `ws` on first use. Deterministic. Lengths are checked.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_reference(
    gpu: &Gpu,
    dqkv: &mut CudaSlice<bf16>,
    ws: &mut AttentionBwdWorkspace,
    lse: &CudaSlice<f32>,
    o: &CudaSlice<bf16>,
    qkv: &CudaSlice<bf16>,
    dout: &CudaSlice<bf16>,
    shape: &AttentionShape,
) -> Result<()> {
    check_bwd(
        dqkv.len(),
        dout.len(),
        ws,
        lse.len(),
        o.len(),
        qkv.len(),
        shape,
    )?;
    let n_rows = shape.batch * shape.heads * shape.len;
    let r = match &mut ws.reference {
        Some(r) => r,
        none => none.insert(ReferenceBuffers::new(gpu, shape)?),
    };
    let (batch_i, len_i, heads_i, hd_i) = (
        shape.batch as i32,
        shape.len as i32,
        shape.heads as i32,
        shape.head_dim as i32,
    );
    let causal_i = shape.causal as i32;
    let softcap = shape.softcap;
    let rows_cfg = LaunchConfig {
        grid_dim: (n_rows.div_ceil(BWD_ROWS) as u32, 1, 1),
        block_dim: (BWD_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let tiles_cfg = LaunchConfig {
        grid_dim: (
            shape.len.div_ceil(BWD_ROWS) as u32,
            (shape.batch * shape.heads) as u32,
            1,
        ),
        block_dim: (BWD_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let hd = shape.head_dim;

    let f = gpu.function(MODULE_BWD_REF, "attention_bwd_prep_f32")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut r.qr)
        .arg(&mut r.kr)
        .arg(&mut r.dsum)
        .arg(qkv)
        .arg(o)
        .arg(dout)
        .arg(&batch_i)
        .arg(&len_i)
        .arg(&heads_i)
        .arg(&hd_i);
    // SAFETY: argument order and types match the kernel signature; check_bwd verified qkv,
    // o (= dout) and the B*H*L rows; the reference buffers were allocated for this shape (the
    // workspace's, checked: qr, kr: B*H*L*hd, dsum: B*H*L); one warp per row with a bounds check.
    unsafe { b.launch(rows_cfg) }?;

    let f = gpu.function(MODULE_BWD_REF, &format!("attention_bwd_dq_hd{hd}"))?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut r.dqr)
        .arg(&r.qr)
        .arg(&r.kr)
        .arg(lse)
        .arg(&r.dsum)
        .arg(qkv)
        .arg(dout)
        .arg(&len_i)
        .arg(&heads_i)
        .arg(&causal_i)
        .arg(&softcap);
    // SAFETY: as above; lse holds B*H*L (check_shape); the grid is (ceil(L/8), B*H) with B*H <=
    // 65535 (check_shape) and query/key bounds checks inside; static shared memory only.
    unsafe { b.launch(tiles_cfg) }?;

    let f = gpu.function(MODULE_BWD_REF, &format!("attention_bwd_dkv_hd{hd}"))?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut r.dkr)
        .arg(&mut *dqkv)
        .arg(&r.qr)
        .arg(&r.kr)
        .arg(lse)
        .arg(&r.dsum)
        .arg(qkv)
        .arg(dout)
        .arg(&len_i)
        .arg(&heads_i)
        .arg(&causal_i)
        .arg(&softcap);
    // SAFETY: as for the dq kernel; dqkv holds rows*3*H*hd elements (checked), of which this
    // kernel writes the v part of each valid key row.
    unsafe { b.launch(tiles_cfg) }?;

    let f = gpu.function(MODULE_BWD_REF, "attention_bwd_rope_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dqkv)
        .arg(&r.dqr)
        .arg(&r.dkr)
        .arg(&batch_i)
        .arg(&len_i)
        .arg(&heads_i)
        .arg(&hd_i);
    // SAFETY: argument order and types match the kernel signature; dqr, dkr hold B*H*L*hd
    // (allocated for this shape) and dqkv rows*3*H*hd; one warp per row with a bounds check;
    // it writes the q and k parts of dqkv.
    unsafe { b.launch(rows_cfg) }?;
    Ok(())
}

/// CPU twin of the kernel: same maths, f64 accumulation, rayon over (batch, head, query) rows.
#[path = "attention_twin.rs"]
pub mod cpu;

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
