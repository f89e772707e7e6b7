// ln_modulate: LayerNorm without bias fused with adaLN modulate (spec 2.3).
//
// Maths, per row r of x (rows = B*L, width D), with b = r / rows_per_batch:
//   mean_r = sum_j x[r,j] / D
//   rstd_r = 1 / sqrt(sum_j (x[r,j] - mean_r)^2 / D + 1e-5)        (biased variance, eps 1e-5)
//   z      = (x[r,j] - mean_r) * rstd_r * weight[j]
//   y[r,j] = z * (1 + scale[b,j]) + shift[b,j]                     (shift/scale null: y = z)
// Shapes and dtypes: x (rows, D) f32 (the fp32 residual stream); weight (D) f32;
//   shift, scale (B, D) f32 or both null (AR baseline); y (rows, D) bf16 (the next GEMM's input).
// Saved for the backward: mean (rows) f32, rstd (rows) f32.
// Thread mapping: one warp per row, ROWS_PER_BLOCK warps per block; lanes stride the row with
//   float4 loads when D % 4 == 0 (all presets), scalar loads otherwise. Two-pass statistics in
//   fp32 (exact mean first, then centred squares) so large-mean rows lose no precision; the row
//   is re-read from L1/L2, not DRAM.
// Accumulation rule: outputs are written (=), never accumulated.
#include "common.cuh"

#define ROWS_PER_BLOCK 8

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * IMDM_WARP)
ln_modulate_fwd_bf16(__nv_bfloat16* __restrict__ y, float* __restrict__ mean_out,
                     float* __restrict__ rstd_out, const float* __restrict__ x,
                     const float* __restrict__ weight, const float* __restrict__ shift,
                     const float* __restrict__ scale, int rows, int d, int rows_per_batch) {
    const int lane = threadIdx.x % IMDM_WARP;
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / IMDM_WARP;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * d;
    const bool vec = (d % 4) == 0;

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

    const size_t mod = (size_t)(row / rows_per_batch) * d;
    __nv_bfloat16* yr = y + (size_t)row * d;
    for (int j = lane; j < d; j += IMDM_WARP) {
        float z = (xr[j] - mean) * rstd * weight[j];
        if (shift != nullptr) z = z * (1.f + scale[mod + j]) + shift[mod + j];
        yr[j] = __float2bfloat16_rn(z);
    }
}
