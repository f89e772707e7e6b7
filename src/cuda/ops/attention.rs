//! Flash-style attention forward and backward with fused rotary and softcap (spec 2.3, steps
//! 3-4): the only launcher of `kernels/attention.cu` (forward, tensor-core backward, SIMT
//! reference backward), its CPU twin and the comparison tests. Maths, shapes, thread mapping,
//! shared memory and registers: see the kernel's header.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};

const MODULE: &str = "attention";
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
    let f = gpu.function(MODULE, &format!("attention_fwd_bf16_hd{}", shape.head_dim))?;
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
    let f = gpu.function(MODULE, "attention_bwd_prep_bf16")?;
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
        let f = gpu.function(MODULE, &format!("attention_bwd_{name}_bf16_hd{hd}"))?;
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

    let f = gpu.function(MODULE, "attention_bwd_prep_f32")?;
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

    let f = gpu.function(MODULE, &format!("attention_bwd_dq_hd{hd}"))?;
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

    let f = gpu.function(MODULE, &format!("attention_bwd_dkv_hd{hd}"))?;
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

    let f = gpu.function(MODULE, "attention_bwd_rope_bf16")?;
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
pub mod cpu {
    use super::AttentionShape;
    use half::bf16;
    use rayon::prelude::*;

    /// The rotary inverse frequencies as the kernel holds them: 10000^(-2t/hd) =
    /// 2^(-(2t/hd) log2 10000) in f64, rounded to f32 (the correctly rounded value for every
    /// supported hd; torch's fp32 pow differs from it by an ulp in places).
    pub fn inv_freq(head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|t| (-((2 * t) as f64) / head_dim as f64 * 10000f64.log2()).exp2() as f32)
            .collect()
    }

    fn to_bf16(x: f64) -> f64 {
        bf16::from_f32(x as f32).to_f64()
    }

    /// Rotated q' and k' ((B, H, L, hd) each) as [`attention_fwd`] computes them (rounded to
    /// bf16 with `round_bf16`).
    pub fn rotated_qk(
        qkv: &[f32],
        shape: &AttentionShape,
        round_bf16: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        (
            rotate(qkv, shape, 0, round_bf16),
            rotate(qkv, shape, 1, round_bf16),
        )
    }

    /// Rotated q (`part` 0) or k (`part` 1) of every (batch, head, position), (B, H, L, hd).
    /// The angle p * f_t is an f32 product (as in the kernel and the reference), the rest f64.
    fn rotate<T: Copy + Into<f64> + Sync>(
        qkv: &[T],
        s: &AttentionShape,
        part: usize,
        round: bool,
    ) -> Vec<f64> {
        let (hd, d) = (s.head_dim, s.width());
        let inv = inv_freq(hd);
        let mut out = vec![0f64; s.batch * s.heads * s.len * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(idx, y)| {
            let (bh, p) = (idx / s.len, idx % s.len);
            let (b, h) = (bh / s.heads, bh % s.heads);
            let x = &qkv[(b * s.len + p) * 3 * d + part * d + h * hd..][..hd];
            for t in 0..hd / 2 {
                let (sin, cos) = ((p as f32 * inv[t]) as f64).sin_cos();
                let (x1, x2) = (x[t].into(), x[t + hd / 2].into());
                y[t] = x1 * cos - x2 * sin;
                y[t + hd / 2] = x2 * cos + x1 * sin;
            }
            if round {
                y.iter_mut().for_each(|v| *v = to_bf16(*v));
            }
        });
        out
    }

    /// Returns (o (rows, heads*hd), lse (batch, heads, len)). With `round_bf16` the values are
    /// rounded to bf16 where the kernel rounds them: rotated q and k, the probabilities fed to
    /// the P.V product (exp(s - m) with the row's final max; the kernel uses its running max),
    /// and o. The normaliser l and lse always use the unrounded probabilities.
    pub fn attention_fwd(
        qkv: &[f32],
        shape: &AttentionShape,
        round_bf16: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let (o, lse) = attention_fwd_f64(qkv, shape, round_bf16);
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        (f(o), f(lse))
    }

    /// [`attention_fwd`] on any float input, returning f64 (o and lse unrounded to f32; with
    /// `round_bf16` o is still rounded to bf16 values). The finite-difference tests of the
    /// backward run this on f64 inputs.
    pub fn attention_fwd_f64<T: Copy + Into<f64> + Sync>(
        qkv: &[T],
        shape: &AttentionShape,
        round_bf16: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let s = *shape;
        let (hd, d) = (s.head_dim, s.width());
        assert_eq!(qkv.len(), s.rows() * 3 * d, "qkv length");
        let q = rotate(qkv, &s, 0, round_bf16);
        let k = rotate(qkv, &s, 1, round_bf16);
        let scale = 1.0 / (hd as f64).sqrt();
        let cap = s.softcap as f64;
        let round = |x: f64| if round_bf16 { to_bf16(x) } else { x };
        let mut o_bhl = vec![0f64; s.batch * s.heads * s.len * hd];
        let mut lse = vec![0f64; s.batch * s.heads * s.len];
        o_bhl
            .par_chunks_mut(hd)
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each(|(row, (orow, lrow))| {
                let (bh, i) = (row / s.len, row % s.len);
                let b = bh / s.heads;
                let qi = &q[row * hd..][..hd];
                let n_keys = if s.causal { i + 1 } else { s.len };
                let scores: Vec<f64> = (0..n_keys)
                    .map(|j| {
                        let kj = &k[(bh * s.len + j) * hd..][..hd];
                        let x = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                        if cap > 0.0 {
                            cap * (x / cap).tanh()
                        } else {
                            x
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut l = 0f64;
                let mut acc = vec![0f64; hd];
                let v_off = 2 * d + (bh % s.heads) * hd;
                for (j, &x) in scores.iter().enumerate() {
                    let p = (x - m).exp();
                    l += p;
                    let pr = round(p);
                    let v = &qkv[(b * s.len + j) * 3 * d + v_off..][..hd];
                    acc.iter_mut()
                        .zip(v)
                        .for_each(|(a, &vv)| *a += pr * vv.into());
                }
                for (y, a) in orow.iter_mut().zip(&acc) {
                    *y = round(a / l);
                }
                *lrow = m + l.ln();
            });
        // (B, H, L, hd) -> (B*L, H*hd)
        let mut o = vec![0f64; s.rows() * d];
        for (row, orow) in o_bhl.chunks(hd).enumerate() {
            let (bh, i) = (row / s.len, row % s.len);
            let (b, h) = (bh / s.heads, bh % s.heads);
            o[(b * s.len + i) * d + h * hd..][..hd].copy_from_slice(orow);
        }
        (o, lse)
    }

    /// The backward in f64 (twin of the `attention_bwd_*` kernels): returns dqkv (rows, 3*H*hd)
    /// for the forward's `o` (rows, H*hd) and `lse` (B, H, L) (given, as the kernel takes them)
    /// and `dout` = d o. With `round_bf16` the rotated q and k are rounded to bf16 first, as the
    /// forward kernel (and the backward's recomputation) does; otherwise everything is exact.
    /// P = exp(s - lse), D_i = dO_i.o_i, dS = P (dP - D), softcap and rotary backward as in the
    /// kernel header.
    pub fn attention_bwd(
        qkv: &[f32],
        o: &[f64],
        lse: &[f64],
        dout: &[f32],
        shape: &AttentionShape,
        round_bf16: bool,
    ) -> Vec<f64> {
        let q = rotate(qkv, shape, 0, round_bf16);
        let k = rotate(qkv, shape, 1, round_bf16);
        attention_bwd_rotated(&q, &k, qkv, o, lse, dout, shape)
    }

    /// [`attention_bwd`] from given rotated q' and k' ((B, H, L, hd), e.g. the GPU's own, so a
    /// comparison is free of bf16 rounding flips between two rotation implementations); v is
    /// read from `qkv`.
    pub fn attention_bwd_rotated(
        q: &[f64],
        k: &[f64],
        qkv: &[f32],
        o: &[f64],
        lse: &[f64],
        dout: &[f32],
        shape: &AttentionShape,
    ) -> Vec<f64> {
        attention_bwd_rotated_ext(q, k, qkv, o, lse, dout, shape, false).grad
    }

    /// What [`attention_bwd_rotated_ext`] returns, each (rows, 3*H*hd) like dqkv.
    pub struct BwdTwin {
        /// The gradient dqkv.
        pub grad: Vec<f64>,
        /// Per element, the cancellation-free size of the terms whose operand the fast kernel
        /// rounds to bf16: sum_i P_ij |dO_i| (v part); scale sum |dS_ij dcap| |k'_j| (q part) or
        /// |q'_i| (k part), carried through the rotary backward as |y_t| + |y_(t+hd/2)|. Rounding
        /// P (dv) or dS (dq, dk) to bf16 moves the element by at most 2^-8 times this.
        pub round_mag: Vec<f64>,
        /// Per element, the size of the fp32 dot products behind dS: sum P_ij (A_ij + B_i) scale
        /// |k'_j| (q) or |q'_i| (k), A_ij = sum_e |dO_ie v_je| (dP), B_i = sum_e |dO_ie o_ie| (D);
        /// 0 for the v part. fp32 errors in dP - D (and the approximate softcap's derivative)
        /// move the element by a small multiple (<= hd 2^-24) of this, however small dS is.
        pub fp32_mag: Vec<f64>,
    }

    /// The backward twin with the error scales of the fast kernel: with `round_ps`, P is rounded
    /// to bf16 before dV += P^T dO and dS = P (dP - D) dcap before dK' += dS^T Q' and dQ' += dS K'
    /// (the fast kernel's rounding points; P inside dS stays unrounded), otherwise everything is
    /// f64. Same inputs as [`attention_bwd_rotated`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd_rotated_ext(
        q: &[f64],
        k: &[f64],
        qkv: &[f32],
        o: &[f64],
        lse: &[f64],
        dout: &[f32],
        shape: &AttentionShape,
        round_ps: bool,
    ) -> BwdTwin {
        let s = *shape;
        let (hd, d, l) = (s.head_dim, s.width(), s.len);
        let scale = 1.0 / (hd as f64).sqrt();
        let cap = s.softcap as f64;
        let nbh = s.batch * s.heads;
        let round = |x: f64| if round_ps { to_bf16(x) } else { x };
        let v = |b: usize, h: usize, j: usize, e: usize| {
            qkv[(b * l + j) * 3 * d + 2 * d + h * hd + e] as f64
        };
        let g = |b: usize, h: usize, i: usize, e: usize| dout[(b * l + i) * d + h * hd + e] as f64;
        // Per (b, h), each (L, hd): dq', dk', dv and the error scales (round: q, k, v; fp32: q, k).
        type Head = [Vec<f64>; 8];
        let per_head: Vec<Head> = (0..nbh)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / s.heads, bh % s.heads);
                let mut t: Head = std::array::from_fn(|_| vec![0f64; l * hd]);
                let [dq, dk, dv, mq, mk, mv, fq, fk] = &mut t;
                for i in 0..l {
                    let qi = &q[(bh * l + i) * hd..][..hd];
                    let oi = |e: usize| o[(b * l + i) * d + h * hd + e];
                    let di: f64 = (0..hd).map(|e| oi(e) * g(b, h, i, e)).sum();
                    let bi: f64 = (0..hd).map(|e| (oi(e) * g(b, h, i, e)).abs()).sum();
                    let n_keys = if s.causal { i + 1 } else { l };
                    for j in 0..n_keys {
                        let kj = &k[(bh * l + j) * hd..][..hd];
                        let r = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                        let (sc, dcap) = if cap > 0.0 {
                            let t = (r / cap).tanh();
                            (cap * t, 1.0 - t * t)
                        } else {
                            (r, 1.0)
                        };
                        let p = (sc - lse[bh * l + i]).exp();
                        let dp: f64 = (0..hd).map(|e| g(b, h, i, e) * v(b, h, j, e)).sum();
                        let aij: f64 = (0..hd).map(|e| (g(b, h, i, e) * v(b, h, j, e)).abs()).sum();
                        let ds = p * (dp - di) * dcap;
                        let (pr, dr) = (round(p), round(ds) * scale);
                        let (m_ds, f_ds) = (ds.abs() * scale, p * (aij + bi) * scale);
                        for e in 0..hd {
                            let ge = g(b, h, i, e);
                            dv[j * hd + e] += pr * ge;
                            dq[i * hd + e] += dr * kj[e];
                            dk[j * hd + e] += dr * qi[e];
                            mv[j * hd + e] += p * ge.abs();
                            mq[i * hd + e] += m_ds * kj[e].abs();
                            mk[j * hd + e] += m_ds * qi[e].abs();
                            fq[i * hd + e] += f_ds * kj[e].abs();
                            fk[j * hd + e] += f_ds * qi[e].abs();
                        }
                    }
                }
                t
            })
            .collect();
        // Rotary backward and the (rows, 3*H*hd) layout; the scales add through the rotation.
        let inv = inv_freq(hd);
        let n = s.rows() * 3 * d;
        let (mut grad, mut round_mag, mut fp32_mag) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        for (bh, [dq, dk, dv, mq, mk, mv, fq, fk]) in per_head.iter().enumerate() {
            let (b, h) = (bh / s.heads, bh % s.heads);
            for p in 0..l {
                let at = |part: usize, e: usize| (b * l + p) * 3 * d + part * d + h * hd + e;
                for t in 0..hd / 2 {
                    let (sin, cos) = ((p as f32 * inv[t]) as f64).sin_cos();
                    for (part, src, m, f) in [(0, dq, mq, fq), (1, dk, mk, fk)] {
                        let (y1, y2) = (src[p * hd + t], src[p * hd + t + hd / 2]);
                        grad[at(part, t)] = y1 * cos + y2 * sin;
                        grad[at(part, t + hd / 2)] = y2 * cos - y1 * sin;
                        let mm = m[p * hd + t] + m[p * hd + t + hd / 2];
                        let ff = f[p * hd + t] + f[p * hd + t + hd / 2];
                        round_mag[at(part, t)] = mm;
                        round_mag[at(part, t + hd / 2)] = mm;
                        fp32_mag[at(part, t)] = ff;
                        fp32_mag[at(part, t + hd / 2)] = ff;
                    }
                }
                for e in 0..hd {
                    grad[at(2, e)] = dv[p * hd + e];
                    round_mag[at(2, e)] = mv[p * hd + e];
                }
            }
        }
        BwdTwin {
            grad,
            round_mag,
            fp32_mag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gpu_for_tests;
    use crate::cuda::ops::grad_check::{assert_bits_eq, assert_grad, f64s, fd_grad};
    use crate::testing::{assert_close, compare, Tol};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn shape(b: usize, l: usize, h: usize, hd: usize, causal: bool, cap: f32) -> AttentionShape {
        AttentionShape {
            batch: b,
            len: l,
            heads: h,
            head_dim: hd,
            causal,
            softcap: cap,
        }
    }

    /// Seeded qkv, uniform in [-amp, amp], rounded to bf16 (the kernel's input dtype).
    fn rand_qkv(s: &AttentionShape, amp: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..s.rows() * 3 * s.width())
            .map(|_| bf16::from_f32(rng.random_range(-amp..amp)).to_f32())
            .collect()
    }

    /// An independent, deliberately different implementation: torch-style rotary
    /// (x cos + rotate_half(x) sin, f64 angles), the full L x L score matrix per (b, h), mask
    /// with -inf, log-sum-exp, then P V.
    fn naive(qkv: &[f32], s: &AttentionShape) -> (Vec<f32>, Vec<f32>) {
        let (l, hd, d) = (s.len, s.head_dim, s.width());
        let inv = crate::model::params::inv_freq(hd);
        let mut o = vec![0f32; s.rows() * d];
        let mut lse = vec![0f32; s.batch * s.heads * l];
        let get = |b: usize, p: usize, part: usize, h: usize, e: usize| {
            qkv[(b * l + p) * 3 * d + part * d + h * hd + e] as f64
        };
        for b in 0..s.batch {
            for h in 0..s.heads {
                let rot = |part: usize, p: usize, e: usize| {
                    let ang = p as f64 * inv[e % (hd / 2)];
                    let half = if e < hd / 2 {
                        -get(b, p, part, h, e + hd / 2)
                    } else {
                        get(b, p, part, h, e - hd / 2)
                    };
                    get(b, p, part, h, e) * ang.cos() + half * ang.sin()
                };
                let mut sc = vec![vec![f64::NEG_INFINITY; l]; l];
                for (i, row) in sc.iter_mut().enumerate() {
                    for (j, x) in row.iter_mut().enumerate() {
                        if s.causal && j > i {
                            continue;
                        }
                        let mut dot = 0.0;
                        for e in 0..hd {
                            dot += rot(0, i, e) * rot(1, j, e);
                        }
                        *x = dot / (hd as f64).sqrt();
                        if s.softcap > 0.0 {
                            let c = s.softcap as f64;
                            *x = c * (*x / c).tanh();
                        }
                    }
                }
                for (i, row) in sc.iter().enumerate() {
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    lse[(b * s.heads + h) * l + i] = z as f32;
                    for e in 0..hd {
                        let y: f64 = (0..l)
                            .map(|j| (row[j] - z).exp() * get(b, j, 2, h, e))
                            .sum();
                        o[(b * l + i) * d + h * hd + e] = y as f32;
                    }
                }
            }
        }
        (o, lse)
    }

    #[test]
    fn twin_matches_naive() {
        let tol = Tol {
            abs: 2e-5,
            rel: 1e-5,
        };
        for (k, (s, amp)) in [
            (shape(2, 5, 3, 32, false, 0.0), 2.0),
            (shape(1, 9, 2, 64, true, 2.0), 2.0),
            (shape(1, 12, 2, 96, false, 50.0), 4.0),
            (shape(2, 7, 1, 128, true, 0.0), 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            let qkv = rand_qkv(&s, amp, 100 + k as u64);
            let (o, lse) = cpu::attention_fwd(&qkv, &s, false);
            let (o_ref, lse_ref) = naive(&qkv, &s);
            assert_close(&format!("twin o {s:?}"), &o, &o_ref, tol);
            assert_close(&format!("twin lse {s:?}"), &lse, &lse_ref, tol);
        }
        // The kernel's frequency table is the correctly rounded 1 / 10000^(2t/hd).
        for hd in HEAD_DIMS {
            for (t, &f) in cpu::inv_freq(hd).iter().enumerate() {
                assert_eq!(f, (1.0 / 10000f64.powf((2 * t) as f64 / hd as f64)) as f32);
            }
        }
    }

    #[test]
    fn causal_first_query_is_v0() {
        let s = shape(2, 6, 3, 64, true, 50.0);
        let qkv = rand_qkv(&s, 2.0, 7);
        let d = s.width();
        for round in [false, true] {
            let (o, _) = cpu::attention_fwd(&qkv, &s, round);
            for b in 0..s.batch {
                let r = b * s.len; // query 0 of batch b: its only key is itself
                let v0 = &qkv[r * 3 * d + 2 * d..][..d];
                assert_eq!(&o[r * d..][..d], v0, "batch {b}, round {round}");
            }
        }
    }

    /// Uniform attention: o_i is the mean of the visible v_j, lse_i = ln(n_keys), within `tol`.
    fn assert_uniform(qkv: &[f32], s: &AttentionShape, tol: f64) {
        let (o, lse) = cpu::attention_fwd(qkv, s, false);
        let (d, hd) = (s.width(), s.head_dim);
        for (idx, &z) in lse.iter().enumerate() {
            let (b, h, i) = (idx / s.len / s.heads, idx / s.len % s.heads, idx % s.len);
            let n = if s.causal { i + 1 } else { s.len };
            assert!((z as f64 - (n as f64).ln()).abs() < tol, "lse {idx}: {z}");
            for c in h * hd..(h + 1) * hd {
                let v = |j: usize| qkv[(b * s.len + j) * 3 * d + 2 * d + c] as f64;
                let mean = (0..n).map(v).sum::<f64>() / n as f64;
                let got = o[(b * s.len + i) * d + c] as f64;
                assert!(
                    (got - mean).abs() < tol,
                    "{s:?} o[{b},{i},{c}] {got} vs {mean}"
                );
            }
        }
    }

    #[test]
    fn uniform_attention_and_softcap_bounds() {
        for causal in [false, true] {
            // Structured: q = 0 gives s = 0 for every key.
            let s = shape(2, 10, 2, 32, causal, 0.0);
            let mut qkv = rand_qkv(&s, 2.0, 11);
            let d = s.width();
            (0..s.rows()).for_each(|r| qkv[r * 3 * d..][..d].fill(0.0));
            assert_uniform(&qkv, &s, 1e-6);
            // Large q, k (raw scores up to ~60), v in [-1, 1]: a tiny cap bounds |s| by 1e-4,
            // so the weights are uniform to 2e-4.
            let s = shape(1, 16, 2, 64, causal, 1e-4);
            let mut qkv = rand_qkv(&s, 8.0, 5);
            let d = s.width();
            (0..s.rows()).for_each(|r| {
                qkv[r * 3 * d + 2 * d..][..d]
                    .iter_mut()
                    .for_each(|v| *v /= 8.0)
            });
            assert_uniform(&qkv, &s, 1e-3);
            // Cap 2: |s| <= 2, so |lse - ln(n_keys)| <= 2, while the uncapped scores exceed it.
            let capped = cpu::attention_fwd(&qkv, &AttentionShape { softcap: 2.0, ..s }, false).1;
            let raw = cpu::attention_fwd(&qkv, &AttentionShape { softcap: 0.0, ..s }, false).1;
            for (idx, &z) in capped.iter().enumerate() {
                let n = if causal { idx % s.len + 1 } else { s.len };
                assert!((z - (n as f32).ln()).abs() <= 2.0 + 1e-5, "{idx}: {z}");
            }
            assert!(raw.iter().enumerate().any(|(idx, &z)| {
                let n = if causal { idx % s.len + 1 } else { s.len };
                z - (n as f32).ln() > 4.0
            }));
        }
    }

    #[test]
    fn shape_checks_and_flops() {
        let s = shape(2, 7, 3, 64, false, 0.0);
        let (o, lse, qkv) = (2 * 7 * 192, 2 * 3 * 7, 2 * 7 * 576);
        assert!(check_shape(o, lse, qkv, &s).is_ok());
        assert!(check_shape(o + 1, lse, qkv, &s).is_err());
        assert!(check_shape(o, lse - 1, qkv, &s).is_err());
        assert!(check_shape(o, lse, qkv + 8, &s).is_err());
        let bad = AttentionShape { head_dim: 48, ..s };
        let msg = check_shape(7 * 2 * 144, 42, 7 * 2 * 432, &bad)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("head_dim 48"), "{msg}");
        assert!(check_shape(0, 0, 0, &AttentionShape { len: 0, ..s }).is_err());
        let nan = AttentionShape {
            softcap: f32::NAN,
            ..s
        };
        assert!(check_shape(o, lse, qkv, &nan).is_err());
        let lm1b = shape(512, 128, 12, 64, false, 50.0);
        assert_eq!(flops(&lm1b), 4.0 * 512.0 * 12.0 * 128.0 * 128.0 * 64.0);
        let ar = AttentionShape {
            causal: true,
            ..lm1b
        };
        assert_eq!(flops(&ar), flops(&lm1b) / 2.0);
        assert_eq!(smem_bytes(64), 36992);
    }

    fn run_gpu(gpu: &Gpu, qkv: &[f32], s: &AttentionShape) -> (Vec<f32>, Vec<f32>) {
        let st = &gpu.stream;
        let q16: Vec<bf16> = qkv.iter().map(|&x| bf16::from_f32(x)).collect();
        let dq = st.clone_htod(&q16).unwrap();
        // NaN-filled outputs: an element the kernel forgets to write fails the comparison.
        let mut o = st
            .clone_htod(&vec![bf16::NAN; s.rows() * s.width()])
            .unwrap();
        let n_lse = s.batch * s.heads * s.len;
        let mut lse = st.clone_htod(&vec![f32::NAN; n_lse]).unwrap();
        attention_fwd(gpu, &mut o, &mut lse, &dq, s).unwrap();
        let o: Vec<f32> = st
            .clone_dtoh(&o)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        (o, st.clone_dtoh(&lse).unwrap())
    }

    /// architecture.md's rule for attention: max |got - exact| <= 2 max |twin_bf16 - exact|,
    /// with an absolute floor.
    fn assert_twice(name: &str, got: &[f32], twin: &[f32], exact: &[f32], floor: f64) {
        let by_abs = Tol { abs: 1.0, rel: 0.0 };
        let (e_got, _, worst, _) = compare(got, exact, by_abs);
        let (e_twin, _, _, _) = compare(twin, exact, by_abs);
        assert!(
            e_got <= (2.0 * e_twin).max(floor),
            "{name}: kernel max abs err {e_got:.3e} vs f64 twin > max(2 x bf16 twin's \
             {e_twin:.3e}, {floor:e}); worst at index {worst}: got {} want {} (bf16 twin {})",
            got[worst],
            exact[worst],
            twin[worst]
        );
    }

    /// GPU vs twin on one shape. `amp`: input magnitude; `zero_q`: structured q = 0.
    fn check(gpu: &Gpu, s: AttentionShape, amp: f32, zero_q: bool) {
        let seed = (s.batch * 1_000_003 + s.len * 131 + s.heads * 17 + s.head_dim) as u64;
        let mut qkv = rand_qkv(&s, amp, seed + s.causal as u64);
        if zero_q {
            let d = s.width();
            (0..s.rows()).for_each(|r| qkv[r * 3 * d..][..d].fill(0.0));
        }
        let (o, lse) = run_gpu(gpu, &qkv, &s);
        let (o64, lse64) = cpu::attention_fwd(&qkv, &s, false);
        let (o16, lse16) = cpu::attention_fwd(&qkv, &s, true);
        let tag = format!("{s:?} amp {amp} zero_q {zero_q}");
        assert_twice(&format!("attention o {tag}"), &o, &o16, &o64, 1e-3);
        if amp <= 2.0 {
            // Against the rounded twin (same bf16 q and k), lse differs by fp32 accumulation
            // (~1e-6 relative: rel 1e-4 is ample) and by rare bf16 rounding flips of a rotated
            // q/k element (~3e-4 of them: the kernel rotates in fp32 with ~1e-6 error, the twin
            // in f64). One flip moves a score, hence lse, by at most
            // ulp(2.83) * 2.83 / sqrt(32) = 7.8e-3 (|rotated| <= 2 sqrt 2): abs 8e-3.
            let tol = Tol {
                abs: 8e-3,
                rel: 1e-4,
            };
            assert_close(&format!("attention lse {tag}"), &lse, &lse16, tol);
        } else {
            // Large scores: one flip moves a score by up to ulp(8) * 8 / sqrt(hd); judge lse by
            // the same rule as o.
            assert_twice(&format!("attention lse {tag}"), &lse, &lse16, &lse64, 2e-3);
        }
    }

    #[test]
    fn gpu_matches_twin_real_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        for s in [
            shape(2, 128, 12, 64, false, 0.0),
            shape(2, 128, 12, 64, false, 50.0),
            shape(2, 128, 12, 64, true, 0.0),
            shape(1, 1024, 12, 64, false, 0.0),
            shape(1, 1024, 12, 64, true, 50.0),
            shape(1, 512, 16, 96, false, 0.0),
            shape(1, 512, 16, 96, true, 2.0),
            shape(2, 256, 4, 32, false, 0.0),
            shape(2, 256, 4, 32, true, 50.0),
            shape(1, 384, 4, 128, false, 2.0),
            shape(1, 384, 4, 128, true, 0.0),
        ] {
            check(&gpu, s, 2.0, false);
        }
        check(&gpu, shape(2, 128, 12, 64, false, 0.0), 2.0, true);
        check(&gpu, shape(1, 200, 3, 96, true, 0.0), 2.0, true);
    }

    #[test]
    fn gpu_matches_twin_awkward_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        let caps = [0.0, 50.0, 2.0];
        let mut k = 0;
        for l in [1, 7, 129] {
            for hd in HEAD_DIMS {
                for causal in [false, true] {
                    check(&gpu, shape(2, l, 3, hd, causal, caps[k % 3]), 2.0, false);
                    k += 1;
                }
            }
        }
    }

    #[test]
    fn gpu_matches_twin_large_magnitude() {
        let Some(gpu) = gpu_for_tests() else { return };
        check(&gpu, shape(1, 200, 2, 64, false, 0.0), 8.0, false);
        check(&gpu, shape(1, 200, 2, 64, false, 50.0), 8.0, false);
        check(&gpu, shape(1, 150, 2, 128, true, 0.0), 8.0, false);
        check(&gpu, shape(2, 70, 2, 32, false, 2.0), 8.0, false);
    }

    // ---- backward ----------------------------------------------------------------------------

    /// Seeded d o, uniform in [-1, 1], rounded to bf16.
    fn rand_dout(s: &AttentionShape, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..s.rows() * s.width())
            .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
            .collect()
    }

    #[test]
    fn twin_bwd_matches_finite_differences() {
        // F = Σ G ⊙ o(qkv) (exact forward, no bf16 rounding): dF/dqkv is the backward.
        for (k, (s, amp)) in [
            (shape(1, 5, 2, 32, false, 0.0), 1.0),
            (shape(1, 6, 1, 32, true, 2.0), 2.0),
            (shape(2, 3, 1, 64, false, 50.0), 2.0),
            (shape(1, 1, 1, 32, true, 0.0), 1.0),
            (shape(1, 4, 1, 96, true, 0.0), 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            let qkv = rand_qkv(&s, amp, 300 + k as u64);
            let dout = rand_dout(&s, 400 + k as u64);
            let (o, lse) = cpu::attention_fwd_f64(&qkv, &s, false);
            let got = cpu::attention_bwd(&qkv, &o, &lse, &dout, &s, false);
            let f = |x: &[f64]| -> f64 {
                let (o, _) = cpu::attention_fwd_f64(x, &s, false);
                o.iter().zip(&dout).map(|(a, &b)| a * b as f64).sum()
            };
            let fd = fd_grad(f, &f64s(&qkv), 1e-4, None);
            let tol = Tol {
                abs: 1e-6,
                rel: 1e-5,
            };
            assert_grad(&format!("attention twin bwd {s:?}"), &got, &fd, tol);
        }
    }

    #[test]
    fn twin_bwd_structured() {
        // Bidirectional with q = 0: every query attends uniformly, so dv_j = mean_i dO_i over all
        // queries i (each P_ij = 1/L), for every key j.
        let s = shape(1, 6, 2, 32, false, 0.0);
        let mut qkv = rand_qkv(&s, 2.0, 5);
        let d = s.width();
        (0..s.rows()).for_each(|r| qkv[r * 3 * d..][..d].fill(0.0));
        let dout = rand_dout(&s, 6);
        let (o, lse) = cpu::attention_fwd_f64(&qkv, &s, false);
        let g = cpu::attention_bwd(&qkv, &o, &lse, &dout, &s, false);
        for j in 0..s.len {
            for c in 0..d {
                let mean = (0..s.len).map(|i| dout[i * d + c] as f64).sum::<f64>() / s.len as f64;
                let got = g[j * 3 * d + 2 * d + c];
                assert!((got - mean).abs() < 1e-12, "dv[{j}][{c}] {got} vs {mean}");
            }
        }
        // dO = 0: all gradients vanish.
        let zero = vec![0f32; s.rows() * d];
        let g = cpu::attention_bwd(&qkv, &o, &lse, &zero, &s, false);
        assert!(g.iter().all(|&x| x == 0.0));
    }

    /// Which GPU backward a test runs.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Bwd {
        /// [`attention_bwd`]: the tensor-core kernels.
        Fast,
        /// [`attention_bwd_reference`]: the fp32 SIMT kernels.
        Reference,
    }

    /// What one GPU forward + backward returns, read back to the host.
    struct GpuBwd {
        dqkv: Vec<f32>,
        o: Vec<f32>,
        lse: Vec<f32>,
        /// The backward's recomputed rotated q', k' ((B, H, L, hd)).
        qr: Vec<f32>,
        kr: Vec<f32>,
    }

    /// GPU forward then the `which` backward on `qkv`, `dout`.
    fn run_gpu_bwd(gpu: &Gpu, qkv: &[f32], dout: &[f32], s: &AttentionShape, which: Bwd) -> GpuBwd {
        let st = &gpu.stream;
        let up16 = |v: &[f32]| {
            let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            st.clone_htod(&b).unwrap()
        };
        let (dq, dg) = (up16(qkv), up16(dout));
        let mut o = st
            .clone_htod(&vec![bf16::NAN; s.rows() * s.width()])
            .unwrap();
        let mut lse = st
            .clone_htod(&vec![f32::NAN; s.batch * s.heads * s.len])
            .unwrap();
        attention_fwd(gpu, &mut o, &mut lse, &dq, s).unwrap();
        // NaN-filled output: an element the backward forgets to write fails the comparison.
        let mut dqkv = st.clone_htod(&vec![bf16::NAN; qkv.len()]).unwrap();
        let mut ws = AttentionBwdWorkspace::new(gpu, s).unwrap();
        let (qr, kr) = match which {
            Bwd::Fast => {
                attention_bwd(gpu, &mut dqkv, &mut ws, &lse, &o, &dq, &dg, s).unwrap();
                ws.rotated_qk(gpu).unwrap()
            }
            Bwd::Reference => {
                attention_bwd_reference(gpu, &mut dqkv, &mut ws, &lse, &o, &dq, &dg, s).unwrap();
                ws.reference_rotated_qk(gpu).unwrap().unwrap()
            }
        };
        let f = |v: Vec<bf16>| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        GpuBwd {
            dqkv: f(st.clone_dtoh(&dqkv).unwrap()),
            o: f(st.clone_dtoh(&o).unwrap()),
            lse: st.clone_dtoh(&lse).unwrap(),
            qr,
            kr,
        }
    }

    /// The forward's lse is consistent with the backward's recomputed q', k' (else P would not
    /// sum to 1): lse from q', k' in f64 vs the forward kernel's.
    fn assert_lse_consistent(tag: &str, r: &GpuBwd, s: &AttentionShape) {
        let (q64, k64) = (f64s(&r.qr), f64s(&r.kr));
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        for (idx, &z) in r.lse.iter().enumerate() {
            let (bh, i) = (idx / s.len, idx % s.len);
            let n = if s.causal { i + 1 } else { s.len };
            let sc: Vec<f64> = (0..n)
                .map(|j| {
                    let x = (0..s.head_dim)
                        .map(|e| {
                            q64[(bh * s.len + i) * s.head_dim + e]
                                * k64[(bh * s.len + j) * s.head_dim + e]
                        })
                        .sum::<f64>()
                        * scale;
                    let c = s.softcap as f64;
                    if c > 0.0 {
                        c * (x / c).tanh()
                    } else {
                        x
                    }
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let want = m + sc.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            assert!(
                (z as f64 - want).abs() <= 1e-4 + 1e-5 * want.abs(),
                "{tag}: forward lse[{idx}] {z} vs {want} from the backward's q', k'"
            );
        }
    }

    /// The f64 twin (`round_ps`: with the fast kernel's bf16 roundings of P and dS) on the GPU's
    /// own q', k', o and lse, so only the kernel's arithmetic differs.
    fn twin_of(
        r: &GpuBwd,
        qkv: &[f32],
        dout: &[f32],
        s: &AttentionShape,
        round_ps: bool,
    ) -> cpu::BwdTwin {
        cpu::attention_bwd_rotated_ext(
            &f64s(&r.qr),
            &f64s(&r.kr),
            qkv,
            &f64s(&r.o),
            &f64s(&r.lse),
            dout,
            s,
            round_ps,
        )
    }

    /// GPU backward (SIMT reference) against the f64 twin run on the GPU's own rotated q', k', o
    /// and lse (so only fp32 arithmetic and the final bf16 rounding differ): max |got - exact| <=
    /// max(2 max |bf16(exact) - exact|, 2e-3 max |exact|). Also: the forward's lse is consistent
    /// with the backward's recomputed q', k'.
    fn check_bwd_reference(gpu: &Gpu, s: AttentionShape, amp: f32, zero_q: bool) {
        let (qkv, dout) = bwd_inputs(&s, amp, zero_q);
        let r = run_gpu_bwd(gpu, &qkv, &dout, &s, Bwd::Reference);
        let tag = format!("reference {s:?} amp {amp} zero_q {zero_q}");
        assert_lse_consistent(&tag, &r, &s);
        let exact = twin_of(&r, &qkv, &dout, &s, false).grad;
        let exact32: Vec<f32> = exact.iter().map(|&x| x as f32).collect();
        let twin16: Vec<f32> = exact.iter().map(|&x| bf16::from_f64(x).to_f32()).collect();
        let max_abs = exact.iter().fold(0f64, |a, &x| a.max(x.abs()));
        assert_twice(
            &format!("attention dqkv {tag}"),
            &r.dqkv,
            &twin16,
            &exact32,
            2e-3 * max_abs,
        );
    }

    /// Seeded qkv (uniform in [-amp, amp], q = 0 with `zero_q`) and d o, bf16 values.
    fn bwd_inputs(s: &AttentionShape, amp: f32, zero_q: bool) -> (Vec<f32>, Vec<f32>) {
        let seed = (s.batch * 7_000_003 + s.len * 131 + s.heads * 17 + s.head_dim) as u64;
        let seed = seed + s.causal as u64 + 2 * s.softcap.to_bits() as u64;
        let mut qkv = rand_qkv(s, amp, seed);
        if zero_q {
            let d = s.width();
            (0..s.rows()).for_each(|r| qkv[r * 3 * d..][..d].fill(0.0));
        }
        (qkv, rand_dout(s, seed + 99))
    }

    /// bf16 unit roundoff: |bf16(x) - x| <= 2^-8 |x| (8 significant bits, round to nearest).
    const BF16_U: f64 = 1.0 / 256.0;
    /// Weight of `fp32_mag` in [`fast_tol`]: fp32 errors of the hd-term dot products dP and D
    /// (at most hd 2^-24 <= 7.6e-6 of their absolute sums) and of the approximate softcap's
    /// derivative (~4e-7 absolute) enter dS unscaled by dS itself; they dominate where dS ~ 0
    /// (L = 1: dS = 0 exactly, the twin's dq = dk = 0).
    const FAST_FP: f64 = 1e-5;

    /// Per-element tolerance of the fast backward against the exact twin (`exact`, with its error
    /// scales): |got - exact| <= U |exact| + 2 U round_mag + FAST_FP fp32_mag + 1e-7, U = 2^-8.
    /// Why: the kernel rounds P (for dV += P^T dO) and dS (for dK' += dS^T Q', dQ' += dS K') to
    /// bf16 before the tensor-core matmuls, as FlashAttention does. Each rounding moves one term
    /// by at most U of its size, and round_mag is the sum of the term sizes (through the rotary
    /// backward), so the roundings move an element by at most U round_mag; the second U round_mag
    /// covers what is left at that scale: fp32 accumulation over <= L terms (<= 3e-5 relative at
    /// L = 512), the fp32 P (S, exp2 and lse2 errors ~1e-5 relative) and the sincos of the rotary
    /// backward (6e-7). U |exact| is the final bf16 store (rounding the fp32 result, so U also of
    /// its error, again within the margin). 1e-7: exp2 flush-to-zero. A bound, not a statistical
    /// estimate: a correct kernel cannot exceed it whatever the seed.
    fn fast_tol(t: &cpu::BwdTwin) -> Vec<f64> {
        (0..t.grad.len())
            .map(|e| {
                BF16_U * t.grad[e].abs()
                    + 2.0 * BF16_U * t.round_mag[e]
                    + FAST_FP * t.fp32_mag[e]
                    + 1e-7
            })
            .collect()
    }

    /// Panics unless |got - want| <= tol elementwise, naming the worst element (largest
    /// error/tolerance ratio) with got, want and tolerance, and the max abs and rel errors.
    fn assert_within(name: &str, got: &[f32], want: &[f64], tol: &[f64]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let (mut max_abs, mut max_rel, mut worst, mut ratio) = (0f64, 0f64, 0usize, 0f64);
        for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = if g.is_finite() {
                (g as f64 - w).abs()
            } else {
                f64::INFINITY
            };
            max_abs = max_abs.max(err);
            max_rel = max_rel.max(err / w.abs().max(1e-30));
            if err / tol[e] > ratio || (e == 0 && err.is_infinite()) {
                (ratio, worst) = (err / tol[e], e);
            }
        }
        assert!(
            ratio <= 1.0,
            "{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}; worst at index \
             {worst}: got {} want {} tolerance {:.3e} (ratio {ratio:.2})",
            got[worst],
            want[worst],
            tol[worst]
        );
    }

    /// Elements of part `part` (0 q, 1 k, 2 v) of a (rows, 3*H*hd) tensor.
    fn part_of<T: Copy>(x: &[T], s: &AttentionShape, part: usize) -> Vec<T> {
        let d = s.width();
        x.chunks(3 * d)
            .flat_map(|row| row[part * d..][..d].iter().copied())
            .collect()
    }

    /// The fast backward on one shape: (1) elementwise within [`fast_tol`] of the exact twin;
    /// (2) architecture.md's rule for attention, per part (dq, dk, dv): max |got - exact| <=
    /// max(2 max |twin_r - exact|, floor), twin_r = the twin with the kernel's bf16 roundings of P
    /// and dS and a bf16 store; floor = 1e-3 max |exact| + FAST_FP max fp32_mag + 1e-7 (matters
    /// only where the rounded twin is exact, e.g. L = 1). Also the lse consistency check.
    fn check_bwd_fast(gpu: &Gpu, s: AttentionShape, amp: f32, zero_q: bool) {
        let (qkv, dout) = bwd_inputs(&s, amp, zero_q);
        let r = run_gpu_bwd(gpu, &qkv, &dout, &s, Bwd::Fast);
        let tag = format!("fast {s:?} amp {amp} zero_q {zero_q}");
        assert_lse_consistent(&tag, &r, &s);
        let exact = twin_of(&r, &qkv, &dout, &s, false);
        assert_within(
            &format!("attention dqkv {tag}"),
            &r.dqkv,
            &exact.grad,
            &fast_tol(&exact),
        );
        let rounded = twin_of(&r, &qkv, &dout, &s, true).grad;
        let twin_r: Vec<f32> = rounded
            .iter()
            .map(|&x| bf16::from_f64(x).to_f32())
            .collect();
        let exact32: Vec<f32> = exact.grad.iter().map(|&x| x as f32).collect();
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let ex = part_of(&exact.grad, &s, part);
            let max_abs = ex.iter().fold(0f64, |a, &x| a.max(x.abs()));
            let max_fp = part_of(&exact.fp32_mag, &s, part)
                .iter()
                .fold(0f64, |a, &x| a.max(x));
            assert_twice(
                &format!("attention {name} {tag}"),
                &part_of(&r.dqkv, &s, part),
                &part_of(&twin_r, &s, part),
                &part_of(&exact32, &s, part),
                1e-3 * max_abs + FAST_FP * max_fp + 1e-7,
            );
        }
    }

    #[test]
    fn gpu_bwd_fast_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        // Every head dim, both masks, softcap off / 50 / 2, lengths not a multiple of 64.
        for l in [1, 77, 200] {
            for hd in HEAD_DIMS {
                for causal in [false, true] {
                    for cap in [0.0, 50.0, 2.0] {
                        check_bwd_fast(&gpu, shape(2, l, 2, hd, causal, cap), 2.0, false);
                    }
                }
            }
        }
        // Whole tiles.
        let caps = [0.0, 50.0, 2.0];
        let mut k = 0;
        for l in [128, 512] {
            for hd in HEAD_DIMS {
                for causal in [false, true] {
                    check_bwd_fast(&gpu, shape(1, l, 2, hd, causal, caps[k % 3]), 2.0, false);
                    k += 1;
                }
            }
        }
    }

    #[test]
    fn gpu_bwd_fast_real_and_structured_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        check_bwd_fast(&gpu, shape(2, 128, 12, 64, false, 50.0), 2.0, false);
        check_bwd_fast(&gpu, shape(1, 1024, 12, 64, false, 0.0), 2.0, false);
        check_bwd_fast(&gpu, shape(1, 1024, 4, 64, true, 0.0), 2.0, false);
        check_bwd_fast(&gpu, shape(1, 256, 4, 96, true, 2.0), 2.0, false);
        // Structured: q = 0 (uniform attention) and a large magnitude (saturating softcap 2).
        check_bwd_fast(&gpu, shape(2, 64, 4, 64, false, 0.0), 2.0, true);
        check_bwd_fast(&gpu, shape(1, 200, 3, 96, true, 0.0), 2.0, true);
        check_bwd_fast(&gpu, shape(1, 200, 2, 64, false, 0.0), 8.0, false);
        check_bwd_fast(&gpu, shape(1, 150, 2, 128, true, 2.0), 8.0, false);
        check_bwd_fast(&gpu, shape(2, 77, 2, 32, false, 50.0), 8.0, false);
    }

    #[test]
    fn gpu_bwd_fast_matches_reference() {
        let Some(gpu) = gpu_for_tests() else { return };
        for s in [
            shape(2, 128, 12, 64, false, 0.0),
            shape(1, 200, 3, 96, true, 50.0),
            shape(2, 77, 2, 32, true, 2.0),
            shape(1, 256, 4, 128, false, 0.0),
            shape(2, 1, 2, 64, false, 0.0),
        ] {
            let (qkv, dout) = bwd_inputs(&s, 2.0, false);
            let fast = run_gpu_bwd(&gpu, &qkv, &dout, &s, Bwd::Fast);
            let simt = run_gpu_bwd(&gpu, &qkv, &dout, &s, Bwd::Reference);
            // Both preps rotate with att_rope8 and the forward's frequencies: identical q', k'.
            assert_bits_eq(&format!("q' fast vs reference {s:?}"), &fast.qr, &simt.qr);
            assert_bits_eq(&format!("k' fast vs reference {s:?}"), &fast.kr, &simt.kr);
            // |fast - simt| <= |fast - exact| + |simt - exact|: fast_tol plus the reference's
            // own bound (bf16 store U |exact|, fp32 P and sums within U round_mag and
            // FAST_FP fp32_mag).
            let exact = twin_of(&fast, &qkv, &dout, &s, false);
            let tol: Vec<f64> = fast_tol(&exact)
                .iter()
                .enumerate()
                .map(|(e, t)| {
                    t + BF16_U * (exact.grad[e].abs() + exact.round_mag[e])
                        + FAST_FP * exact.fp32_mag[e]
                        + 1e-7
                })
                .collect();
            assert_within(
                &format!("attention dqkv fast vs reference {s:?}"),
                &fast.dqkv,
                &f64s(&simt.dqkv),
                &tol,
            );
        }
    }

    #[test]
    fn gpu_bwd_reference_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        for s in [
            shape(2, 128, 12, 64, false, 0.0),
            shape(2, 128, 12, 64, false, 50.0),
            shape(2, 128, 12, 64, true, 0.0),
            shape(1, 512, 12, 64, false, 0.0),
            shape(1, 256, 16, 96, true, 2.0),
            shape(2, 128, 4, 32, false, 50.0),
            shape(1, 192, 4, 128, true, 0.0),
            shape(1, 192, 4, 128, false, 2.0),
        ] {
            check_bwd_reference(&gpu, s, 2.0, false);
        }
        check_bwd_reference(&gpu, shape(2, 64, 4, 64, false, 0.0), 2.0, true);
        check_bwd_reference(&gpu, shape(1, 150, 2, 64, false, 0.0), 4.0, false);
        // Awkward lengths for every head dim, both masks, all softcap settings.
        let caps = [0.0, 50.0, 2.0];
        let mut k = 0;
        for l in [1, 7, 129] {
            for hd in HEAD_DIMS {
                for causal in [false, true] {
                    check_bwd_reference(&gpu, shape(2, l, 3, hd, causal, caps[k % 3]), 2.0, false);
                    k += 1;
                }
            }
        }
    }

    #[test]
    fn gpu_bwd_is_bitwise_deterministic() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = shape(2, 256, 12, 64, true, 50.0);
        let qkv = rand_qkv(&s, 2.0, 1);
        let dout = rand_dout(&s, 2);
        for which in [Bwd::Fast, Bwd::Reference] {
            let a = run_gpu_bwd(&gpu, &qkv, &dout, &s, which).dqkv;
            let b = run_gpu_bwd(&gpu, &qkv, &dout, &s, which).dqkv;
            assert_bits_eq(&format!("attention dqkv run-to-run {which:?}"), &a, &b);
        }
    }

    #[test]
    fn gpu_bwd_rejects_bad_shapes() {
        let Some(gpu) = gpu_for_tests() else { return };
        let st = &gpu.stream;
        let s = shape(1, 8, 2, 32, false, 0.0);
        let (rows, d) = (s.rows(), s.width());
        let qkv = st.alloc_zeros::<bf16>(rows * 3 * d).unwrap();
        let o = st.alloc_zeros::<bf16>(rows * d).unwrap();
        let lse = st.alloc_zeros::<f32>(s.batch * s.heads * s.len).unwrap();
        let mut ws = AttentionBwdWorkspace::new(&gpu, &s).unwrap();
        let mut small = st.alloc_zeros::<bf16>(rows * 3 * d - 1).unwrap();
        let mut dqkv = st.alloc_zeros::<bf16>(rows * 3 * d).unwrap();
        let other = AttentionShape { causal: true, ..s };
        for f in [attention_bwd, attention_bwd_reference] {
            let r = f(&gpu, &mut small, &mut ws, &lse, &o, &qkv, &o, &s);
            assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
            let r = f(&gpu, &mut dqkv, &mut ws, &lse, &o, &qkv, &o, &other);
            assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
            f(&gpu, &mut dqkv, &mut ws, &lse, &o, &qkv, &o, &s).unwrap();
        }
    }

    #[test]
    fn bwd_geometry() {
        // Padded positions of lse2 / D: whole 64-row tiles.
        assert_eq!(padded_len(1), 64);
        assert_eq!(padded_len(64), 64);
        assert_eq!(padded_len(65), 128);
        assert_eq!(padded_len(1024), 1024);
        // AttBwdSmem<HD>::BYTES: 6 tiles of 64 x (hd+8) bf16, 4 x 64 f32, hd/2 f32; all within
        // the H100's 227 KiB per block, above 48 KiB for hd >= 64 (the launcher raises the limit).
        let want = [(32, 31808), (64, 56448), (96, 81088), (128, 105728)];
        for (hd, bytes) in want {
            assert_eq!(bwd_smem_bytes(hd), bytes, "hd {hd}");
            assert!(bytes <= 227 * 1024);
        }
        let s = shape(32, 1024, 12, 64, false, 0.0);
        assert_eq!(bwd_flops(&s), 2.5 * flops(&s));
        assert_eq!(bwd_flops(&s), 10.0 * 32.0 * 12.0 * 1024.0 * 1024.0 * 64.0);
    }

    #[test]
    fn twin_with_kernel_roundings_is_within_fast_tolerance() {
        // The CPU twin rounding P and dS to bf16 (the fast kernel's rounding points) and its
        // output to bf16 stays within fast_tol of the exact twin: the tolerance holds for the
        // roundings it is derived from. And it is not vacuous: the wrong mask or a 3% error fails.
        for (k, (s, amp)) in [
            (shape(2, 77, 2, 32, false, 0.0), 2.0),
            (shape(1, 130, 2, 64, true, 2.0), 2.0),
            (shape(1, 70, 3, 96, false, 50.0), 4.0),
            (shape(1, 65, 1, 128, true, 0.0), 8.0),
            (shape(2, 1, 2, 64, false, 0.0), 2.0),
        ]
        .into_iter()
        .enumerate()
        {
            let qkv = rand_qkv(&s, amp, 500 + k as u64);
            let dout = rand_dout(&s, 600 + k as u64);
            let (q, kr) = cpu::rotated_qk(&qkv, &s, true);
            let (o, lse) = cpu::attention_fwd_f64(&qkv, &s, true);
            let exact = cpu::attention_bwd_rotated_ext(&q, &kr, &qkv, &o, &lse, &dout, &s, false);
            let rounded = cpu::attention_bwd_rotated_ext(&q, &kr, &qkv, &o, &lse, &dout, &s, true);
            let got: Vec<f32> = rounded
                .grad
                .iter()
                .map(|&x| bf16::from_f64(x).to_f32())
                .collect();
            let tol = fast_tol(&exact);
            assert_within(&format!("rounded twin {s:?}"), &got, &exact.grad, &tol);
            assert_eq!(
                exact.grad,
                cpu::attention_bwd_rotated(&q, &kr, &qkv, &o, &lse, &dout, &s)
            );
            let off: Vec<f32> = exact.grad.iter().map(|&x| (x * 1.03) as f32).collect();
            let fails = |g: &[f32]| {
                g.iter()
                    .zip(&exact.grad)
                    .zip(&tol)
                    .any(|((&g, &w), &t)| (g as f64 - w).abs() > t)
            };
            assert!(fails(&off), "{s:?}: a 3% error passes");
            if s.len > 1 {
                let flip = AttentionShape {
                    causal: !s.causal,
                    ..s
                };
                let (o2, lse2) = cpu::attention_fwd_f64(&qkv, &flip, true);
                let wrong = cpu::attention_bwd_rotated(&q, &kr, &qkv, &o2, &lse2, &dout, &flip);
                let wrong: Vec<f32> = wrong.iter().map(|&x| x as f32).collect();
                assert!(fails(&wrong), "{s:?}: the other mask passes");
            }
        }
    }
}
