// ln_modulate: LayerNorm without bias fused with adaLN modulate (spec 2.3).
//
// Maths, per row r of x (rows = B*L, width D), with b = r / rows_per_batch and the modulation
// row offset o = b * mod_stride (mod_stride 0: every row reads modulation row 0, the constant
// conditioning of MDLM/IMDM; mod_stride 6D or 2D: sequence b reads row b of a block's (B, 6D)
// or the final layer's (B, 2D) time-conditioned modulation):
//   mean_r = sum_j x[r,j] / D
//   rstd_r = 1 / sqrt(sum_j (x[r,j] - mean_r)^2 / D + 1e-5)        (biased variance, eps 1e-5)
//   z      = (x[r,j] - mean_r) * rstd_r * weight[j]
//   y[r,j] = z * (1 + scale[o + j]) + shift[o + j]                 (shift/scale null: y = z)
// Shapes and dtypes: x (rows, D) f32 (the fp32 residual stream); weight (D) f32; shift, scale:
//   D f32 values at every row offset o (chunks of one modulation buffer, rows mod_stride apart),
//   or both null (AR baseline); y (rows, D) bf16 (the next GEMM's input).
// Saved for the backward: mean (rows) f32, rstd (rows) f32.
// Thread mapping: one warp per row, ROWS_PER_BLOCK warps per block. Two-pass statistics in fp32
//   (exact mean first, then centred squares) so large-mean rows lose no precision.
//   Fast path (D % 4 == 0 and D <= 32*4*LN_MAX_VEC = 1536: every preset; shift/scale 16-byte
//   aligned with mod_stride % 4 == 0): lane l holds the float4s at columns 4l + 128k,
//   k < LN_MAX_VEC, in registers, so the row is read from DRAM once and never re-read; the
//   output pass loads weight/scale/shift as float4 and stores four bf16 (8 bytes) per lane. The
//   per-lane summation order is the generic path's, so both paths give bit-identical results.
//   Each lane keeps up to LN_MAX_VEC independent 16-byte loads in flight.
//   Generic path (otherwise): lanes stride the row (float4 loads when D % 4 == 0), re-reading it
//   from L1/L2 for each pass, and write scalars.
// Accumulation rule: outputs are written (=), never accumulated.
//
// ---- Backward (ln_modulate_bwd_f32 + ln_modulate_bwd_reduce_f32) ----------------------------
// Maths, per row r, b = r / rows_per_batch, o = b * mod_stride, with xh = (x - mean_r) rstd_r,
// z = xh weight, s = scale[o + :] (s = 0 and no shift/scale gradients without modulation):
//   d shift[o + j] += sum_{r in b} dy[r,j]         (mod_stride 0: the sum over all rows)
//   d scale[o + j] += sum_{r in b} dy[r,j] z[r,j]
//   dz             = dy (1 + s[j])
//   d weight[j]    += sum_r dz[r,j] xh[r,j]
//   dxh            = dz weight[j]
//   dx[r,j]        += rstd_r (dxh[r,j] - mean_j(dxh[r,:]) - xh[r,j] mean_j(dxh[r,:] xh[r,:]))
// (the LayerNorm input gradient with biased variance; the saved mean/rstd are reused, not
// recomputed, so the backward is exactly the derivative of the forward that produced them).
// Shapes and dtypes: dy (rows, D) f32: the input gradient of the consumer GEMM (qkv, MLP fc1 or
//   final linear), which cuBLASLt writes in f32 (fp32 accumulators; D-wide, so f32 costs little
//   and keeps the residual-stream gradient free of bf16 rounding); x (rows, D) f32; mean, rstd
//   (rows) f32 (saved by the forward); weight (D) f32; scale as in the forward or null (no
//   modulation; shift is not needed by the backward); dx (rows, D) f32; d weight (D) f32;
//   dmod: the (shift, scale) gradient pair of the modulation buffer's gradient, d shift at
//   dmod[o + j] and d scale at dmod[o + D + j] (the two chunks are adjacent in every layer);
//   part: scratch of (B * chunks, 3, D) f32, chunks = ceil(rows_per_batch / 32).
// Accumulation rule: dx += (dx is the residual-stream gradient: it already holds the skip path's
//   gradient, and this adds the LayerNorm branch's); d weight, d shift, d scale += (parameter and
//   modulation gradients, reduced deterministically in two stages; no atomics).
// Thread mapping, stage 1 (ln_modulate_bwd_f32): grid (chunks, B), LN_BWD_THREADS threads; block
//   (c, b) owns rows b*rows_per_batch + c*LN_BWD_ROWS + i, i < LN_BWD_ROWS, inside batch b;
//   thread t owns the columns j = t, t + 256, ... (coalesced across the block). Per row: one pass
//   over the thread's columns accumulates the block's column partials of d shift, d scale and
//   d weight (in dynamic shared memory, 3*D floats, each column touched only by its owner thread,
//   so no synchronisation) and the row sums of dxh and dxh*xh; a block sum (imdm_block_sum2,
//   fixed order) gives the two row means; a second pass recomputes dxh (x and dy are L1/L2 hits)
//   and adds dx. At the end each thread writes its columns of the block's partials
//   part[(b*chunks + c), k, j], k = 0 shift, 1 scale, 2 weight (written even without modulation).
// Thread mapping, stage 2 (ln_modulate_bwd_reduce_f32): grid (ceil(D/32), B + 1), 256 threads;
//   blockIdx.y = b < B adds the chunks partials of batch b into d shift, d scale at o = b *
//   mod_stride (skipped without modulation; with mod_stride 0 block row b = 0 adds all B*chunks
//   partials and the others return, so the broadcast gradient is one fixed-order sum);
//   blockIdx.y = B adds all B*chunks partials into d weight (imdm_colsum_partials: fixed order).
//   The launcher runs the broadcast case as one batch of all rows (B = 1, rows_per_batch = rows).
#include "common.cuh"

#define ROWS_PER_BLOCK 8
#define LN_MAX_VEC 12  // float4s per lane held in registers by the fast path (D <= 1536)

// The fast path of ln_modulate_fwd_bf16 (see the header): one warp, one row, held in registers.
__device__ __forceinline__ void ln_fwd_row_regs(__nv_bfloat16* __restrict__ yr,
                                                float* __restrict__ mean_out,
                                                float* __restrict__ rstd_out,
                                                const float* __restrict__ xr,
                                                const float* __restrict__ weight,
                                                const float* __restrict__ shift,
                                                const float* __restrict__ scale, size_t mod,
                                                int row, int d, int lane) {
    float4 v[LN_MAX_VEC];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < LN_MAX_VEC; ++k) {
        const int j = (lane + k * IMDM_WARP) * 4;
        if (j < d) {
            v[k] = *reinterpret_cast<const float4*>(xr + j);
            s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
        }
    }
    const float mean = warp_sum(s) / d;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < LN_MAX_VEC; ++k) {
        const int j = (lane + k * IMDM_WARP) * 4;
        if (j < d) {
            float a = v[k].x - mean, b = v[k].y - mean, c = v[k].z - mean, e = v[k].w - mean;
            q += (a * a + b * b) + (c * c + e * e);
        }
    }
    const float rstd = rsqrtf(warp_sum(q) / d + 1e-5f);
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < LN_MAX_VEC; ++k) {
        const int j = (lane + k * IMDM_WARP) * 4;
        if (j < d) {
            const float4 w = *reinterpret_cast<const float4*>(weight + j);
            float z0 = (v[k].x - mean) * rstd * w.x, z1 = (v[k].y - mean) * rstd * w.y;
            float z2 = (v[k].z - mean) * rstd * w.z, z3 = (v[k].w - mean) * rstd * w.w;
            if (shift != nullptr) {
                const float4 sc = *reinterpret_cast<const float4*>(scale + mod + j);
                const float4 sh = *reinterpret_cast<const float4*>(shift + mod + j);
                z0 = z0 * (1.f + sc.x) + sh.x, z1 = z1 * (1.f + sc.y) + sh.y;
                z2 = z2 * (1.f + sc.z) + sh.z, z3 = z3 * (1.f + sc.w) + sh.w;
            }
            const __nv_bfloat162 lo = __floats2bfloat162_rn(z0, z1);
            const __nv_bfloat162 hi = __floats2bfloat162_rn(z2, z3);
            uint2 packed;
            packed.x = *reinterpret_cast<const uint32_t*>(&lo);
            packed.y = *reinterpret_cast<const uint32_t*>(&hi);
            *reinterpret_cast<uint2*>(yr + j) = packed;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * IMDM_WARP)
ln_modulate_fwd_bf16(__nv_bfloat16* __restrict__ y, float* __restrict__ mean_out,
                     float* __restrict__ rstd_out, const float* __restrict__ x,
                     const float* __restrict__ weight, const float* __restrict__ shift,
                     const float* __restrict__ scale, int rows, int d, int rows_per_batch,
                     int mod_stride) {
    const int lane = threadIdx.x % IMDM_WARP;
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / IMDM_WARP;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * d;
    const bool vec = (d % 4) == 0;
    const bool mod_vec = shift == nullptr || (mod_stride % 4 == 0 && imdm_aligned16(shift) &&
                                              imdm_aligned16(scale));
    const size_t mod = (size_t)(row / rows_per_batch) * mod_stride;
    if (vec && mod_vec && d <= IMDM_WARP * 4 * LN_MAX_VEC) {
        ln_fwd_row_regs(y + (size_t)row * d, mean_out, rstd_out, xr, weight, shift, scale, mod,
                        row, d, lane);
        return;
    }

    float s = 0.f;
    if (vec) {
        for (int j = lane * 4; j < d; j += IMDM_WARP * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + j);
            s += (v.x + v.y) + (v.z + v.w);
        }
    } else {
        for (int j = lane; j < d; j += IMDM_WARP) s += xr[j];
    }
    const float mean = warp_sum(s) / d;

    float q = 0.f;
    if (vec) {
        for (int j = lane * 4; j < d; j += IMDM_WARP * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + j);
            float a = v.x - mean, b = v.y - mean, c = v.z - mean, e = v.w - mean;
            q += (a * a + b * b) + (c * c + e * e);
        }
    } else {
        for (int j = lane; j < d; j += IMDM_WARP) {
            float a = xr[j] - mean;
            q += a * a;
        }
    }
    const float rstd = rsqrtf(warp_sum(q) / d + 1e-5f);
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }

    __nv_bfloat16* yr = y + (size_t)row * d;
    for (int j = lane; j < d; j += IMDM_WARP) {
        float z = (xr[j] - mean) * rstd * weight[j];
        if (shift != nullptr) z = z * (1.f + scale[mod + j]) + shift[mod + j];
        yr[j] = __float2bfloat16_rn(z);
    }
}

#define LN_BWD_THREADS 256
#define LN_BWD_ROWS 32

extern "C" __global__ void __launch_bounds__(LN_BWD_THREADS)
ln_modulate_bwd_f32(float* __restrict__ dx, float* __restrict__ part,
                    const float* __restrict__ mean, const float* __restrict__ rstd,
                    const float* __restrict__ dy, const float* __restrict__ x,
                    const float* __restrict__ weight, const float* __restrict__ scale, int rows,
                    int d, int rows_per_batch, int mod_stride) {
    extern __shared__ float ln_bwd_acc[];  // [3][d]: shift, scale, weight column partials
    __shared__ float2 red[LN_BWD_THREADS / IMDM_WARP];
    float* acc_shift = ln_bwd_acc;
    float* acc_scale = ln_bwd_acc + d;
    float* acc_w = ln_bwd_acc + 2 * (size_t)d;
    const int tid = threadIdx.x;
    const int c = blockIdx.x, b = blockIdx.y, chunks = gridDim.x;
    for (int j = tid; j < d; j += LN_BWD_THREADS) acc_shift[j] = acc_scale[j] = acc_w[j] = 0.f;

    const int i0 = c * LN_BWD_ROWS;  // first row of this chunk inside the batch
    const int n_rows = min(LN_BWD_ROWS, rows_per_batch - i0);  // block-uniform
    const float* sc = scale != nullptr ? scale + (size_t)b * mod_stride : nullptr;
    const float inv_d = 1.f / (float)d;
    for (int i = 0; i < n_rows; ++i) {
        const size_t r = (size_t)b * rows_per_batch + i0 + i;
        if (r >= (size_t)rows) break;  // never taken for valid shapes; block-uniform anyway
        const float* xr = x + r * d;
        const float* dyr = dy + r * d;
        const float mu = mean[r], rs = rstd[r];
        float a1 = 0.f, a2 = 0.f;
        for (int j = tid; j < d; j += LN_BWD_THREADS) {
            const float xh = (xr[j] - mu) * rs;
            const float g = dyr[j];
            float dz = g;
            if (sc != nullptr) {
                acc_shift[j] += g;
                acc_scale[j] += g * (xh * weight[j]);
                dz = g * (1.f + sc[j]);
            }
            acc_w[j] += dz * xh;
            const float dxh = dz * weight[j];
            a1 += dxh;
            a2 += dxh * xh;
        }
        const float2 sums = imdm_block_sum2(a1, a2, red);
        const float m1 = sums.x * inv_d, m2 = sums.y * inv_d;
        float* dxr = dx + r * d;
        for (int j = tid; j < d; j += LN_BWD_THREADS) {
            const float xh = (xr[j] - mu) * rs;
            const float dz = sc != nullptr ? dyr[j] * (1.f + sc[j]) : dyr[j];
            const float dxh = dz * weight[j];
            dxr[j] += rs * (dxh - m1 - xh * m2);
        }
    }
    float* pr = part + ((size_t)b * chunks + c) * 3 * d;
    for (int j = tid; j < d; j += LN_BWD_THREADS) {
        pr[j] = acc_shift[j];
        pr[d + j] = acc_scale[j];
        pr[2 * (size_t)d + j] = acc_w[j];
    }
}

extern "C" __global__ void __launch_bounds__(IMDM_RED_WARPS * IMDM_WARP)
ln_modulate_bwd_reduce_f32(float* __restrict__ dweight, float* __restrict__ dmod,
                           const float* __restrict__ part, int batches, int chunks, int d,
                           int mod_stride) {
    const int col0 = blockIdx.x * IMDM_WARP;
    const int y = blockIdx.y;  // block-uniform: every branch below is taken by the whole block
    const size_t stride = 3 * (size_t)d;
    if (y < batches) {
        if (dmod == nullptr) return;
        // Broadcast (mod_stride 0): one row of gradients, the sum over every batch's partials.
        if (mod_stride == 0 && y > 0) return;
        const size_t n = mod_stride == 0 ? (size_t)batches * chunks : (size_t)chunks;
        const float* pb = part + (size_t)y * chunks * stride;
        float* out = dmod + (size_t)y * mod_stride;
        imdm_colsum_partials(out, pb, n, stride, d, col0);
        imdm_colsum_partials(out + d, pb + d, n, stride, d, col0);
    } else {
        imdm_colsum_partials(dweight, part + 2 * (size_t)d, (size_t)batches * chunks, stride, d,
                             col0);
    }
}
