// gelu: bias + GELU over the (rows, n) bf16 output of a bias-free GEMM (spec 2.3 MLP with the
// tanh form; spec 3.2 eps MLP with the exact erf form).
//
// Maths, per element (r, j), computed in fp32:
//   pre[r,j] = x[r,j] + bias[j]                     (bias null: pre = x)
//   tanh  form: y = 0.5 pre (1 + tanh(u)),  u = sqrt(2/pi) (pre + 0.044715 pre^3)
//               evaluated as y = pre / (1 + exp(-2u)) (the same function: 0.5(1+tanh u) is the
//               logistic of 2u), which has no cancellation for negative pre; exp's argument is
//               clamped at 80 so the fast divide never sees an overflowed denominator.
//   exact form: y = 0.5 pre (1 + erf(pre / sqrt 2))
//   y = bf16(GELU(pre)) from the fp32 pre (not from its bf16 rounding).
// Shapes and dtypes: x (rows, n) bf16; bias (n) f32 or null; y (rows, n) bf16;
//   pre_out (rows, n) bf16 or null.
// Saved for the backward: pre_out = bf16(pre) when the caller passes a buffer (the backward
//   evaluates GELU'(pre) there); with a null buffer the caller keeps x (and the bias) instead.
// Thread mapping: flat grid-stride loop over units of 8 consecutive elements of one row (n % 8
//   == 0 and 16-byte aligned buffers: one 16-byte load of x, two float4 loads of the bias (L1/L2
//   hits), one or two 16-byte stores); otherwise over single elements. The host sizes the grid
//   for the vector units; the loop covers any grid.
// Accumulation rule: y and pre_out are written (=).
//
// ---- Backward (gelu_{tanh,exact}_bwd_bf16 + gelu_bwd_reduce_f32) ----------------------------
// Maths, per element, in fp32, with pre = x + bias (bias null: pre = x):
//   tanh form:  y = pre s,  s = sigmoid(2u) = 0.5 (1 + tanh u),  u = k (pre + c pre^3),
//               k = sqrt(2/pi), c = 0.044715;
//               GELU'(pre) = s + 2 pre u' s (1 - s),  u' = k (1 + 3 c pre^2),
//               with e = exp(-2u): s = 1/(1+e), 1 - s = e s (no cancellation). For |pre| > 10
//               the derivative is 1 (pre > 0) or 0 to within 1e-36, returned exactly (this also
//               keeps pre^3 and e finite for any bf16 input).
//   exact form: GELU'(pre) = Phi(pre) + pre phi(pre) = 0.5 (1 + erf(pre/sqrt 2))
//               + pre exp(-pre^2/2) / sqrt(2 pi).
//   dpre = dy GELU'(pre);  dx = bf16(dpre);  d bias[j] += sum_rows dpre (from the fp32 dpre).
// Shapes and dtypes: dy (rows, n) bf16 (the input gradient of the next GEMM: bf16 is what that
//   GEMM's backward feeds on, and halves the traffic of this 4D-wide tensor); x (rows, n) bf16:
//   the saved pre_out (bias null) or the forward's input x (then bias is the forward's bias);
//   dx (rows, n) bf16 (the next backward GEMM's operand); part: scratch (ceil(rows/64), n) f32;
//   d bias (n) f32. For the block MLPs the bias lives in the GEMM epilogue and x = the saved
//   pre-activation, so bias = null while d bias is still requested.
// Thread mapping, stage 1: grid (ceil(units/128), ceil(rows/64)), 128 threads; a unit is 8
//   consecutive columns (n % 8 == 0 and 16-byte aligned buffers: 16-byte loads of dy and x, one
//   16-byte store of dx) or one column otherwise. Each thread walks the 64 rows of its block's
//   row chunk for its unit (loop over units strided by the grid, so any grid is covered) and
//   sums dpre in fp32 registers, then writes its columns of part[blockIdx.y] (when part != null).
// Thread mapping, stage 2 (gelu_bwd_reduce_f32): grid ceil(n/32), 256 threads; d bias[j] += the
//   sum of the ceil(rows/64) partials of column j in a fixed order (imdm_colsum_partials).
// Accumulation rule: dx is written (=); d bias += (deterministic: no atomics).
#include "common.cuh"

#define GELU_THREADS 256
#define GELU_TANH 0
#define GELU_EXACT 1

template <int KIND>
__device__ __forceinline__ float gelu_act(float x) {
    if (KIND == GELU_TANH) {
        const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return __fdividef(x, 1.f + __expf(fminf(-2.f * u, 80.f)));
    } else {
        return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
    }
}

template <int KIND>
__device__ __forceinline__ void gelu_fwd_impl(__nv_bfloat16* __restrict__ y,
                                              __nv_bfloat16* __restrict__ pre_out,
                                              const __nv_bfloat16* __restrict__ x,
                                              const float* __restrict__ bias, int rows, int n) {
    const size_t total = (size_t)rows * n;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = n % 8 == 0 && imdm_aligned16(y) && imdm_aligned16(pre_out) &&
                     imdm_aligned16(x) && imdm_aligned16(bias);
    if (vec) {
        for (size_t q = t0; q < total / 8; q += stride) {
            const size_t i = q * 8;
            float f[8];
            bf16x8_to_f32(*reinterpret_cast<const uint4*>(x + i), f);
            if (bias != nullptr) {
                // col is a multiple of 8, so both float4 loads are 16-byte aligned.
                const size_t col = i - imdm_row_of(i, n) * n;
                const float4 b0 = *reinterpret_cast<const float4*>(bias + col);
                const float4 b1 = *reinterpret_cast<const float4*>(bias + col + 4);
                f[0] += b0.x, f[1] += b0.y, f[2] += b0.z, f[3] += b0.w;
                f[4] += b1.x, f[5] += b1.y, f[6] += b1.z, f[7] += b1.w;
            }
            if (pre_out != nullptr) *reinterpret_cast<uint4*>(pre_out + i) = f32_to_bf16x8(f);
#pragma unroll
            for (int k = 0; k < 8; ++k) f[k] = gelu_act<KIND>(f[k]);
            *reinterpret_cast<uint4*>(y + i) = f32_to_bf16x8(f);
        }
    } else {
        for (size_t i = t0; i < total; i += stride) {
            float v = __bfloat162float(x[i]);
            if (bias != nullptr) v += bias[i - imdm_row_of(i, n) * n];
            if (pre_out != nullptr) pre_out[i] = __float2bfloat16_rn(v);
            y[i] = __float2bfloat16_rn(gelu_act<KIND>(v));
        }
    }
}

extern "C" __global__ void __launch_bounds__(GELU_THREADS)
gelu_tanh_fwd_bf16(__nv_bfloat16* __restrict__ y, __nv_bfloat16* __restrict__ pre_out,
                   const __nv_bfloat16* __restrict__ x, const float* __restrict__ bias, int rows,
                   int n) {
    gelu_fwd_impl<GELU_TANH>(y, pre_out, x, bias, rows, n);
}

extern "C" __global__ void __launch_bounds__(GELU_THREADS)
gelu_exact_fwd_bf16(__nv_bfloat16* __restrict__ y, __nv_bfloat16* __restrict__ pre_out,
                    const __nv_bfloat16* __restrict__ x, const float* __restrict__ bias, int rows,
                    int n) {
    gelu_fwd_impl<GELU_EXACT>(y, pre_out, x, bias, rows, n);
}

#define GELU_BWD_THREADS 128
#define GELU_BWD_ROWS 64

template <int KIND>
__device__ __forceinline__ float gelu_grad(float x) {
    if (KIND == GELU_TANH) {
        if (fabsf(x) > 10.f) return x > 0.f ? 1.f : 0.f;
        const float x2 = x * x;
        const float u = 0.7978845608028654f * x * (1.f + 0.044715f * x2);
        const float e = expf(-2.f * u);  // |2u| <= 88: finite
        const float s = 1.f / (1.f + e);
        const float oms = e * s;  // 1 - s
        const float du = 0.7978845608028654f * (1.f + 3.f * 0.044715f * x2);
        return s + 2.f * x * du * s * oms;
    } else {
        const float cdf = 0.5f * (1.f + erff(x * 0.7071067811865476f));
        const float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
}

template <int KIND>
__device__ __forceinline__ void gelu_bwd_impl(__nv_bfloat16* __restrict__ dx,
                                              float* __restrict__ part,
                                              const __nv_bfloat16* __restrict__ dy,
                                              const __nv_bfloat16* __restrict__ x,
                                              const float* __restrict__ bias, int rows, int n) {
    const bool vec = n % 8 == 0 && imdm_aligned16(dx) && imdm_aligned16(dy) &&
                     imdm_aligned16(x) && imdm_aligned16(bias);
    const int units = vec ? n / 8 : n;
    const int r0 = blockIdx.y * GELU_BWD_ROWS;
    const int r1 = min(rows, r0 + GELU_BWD_ROWS);
    float* pr = part != nullptr ? part + (size_t)blockIdx.y * n : nullptr;
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        if (vec) {
            const int j0 = u * 8;
            float b[8], acc[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                b[k] = bias != nullptr ? bias[j0 + k] : 0.f;
                acc[k] = 0.f;
            }
            for (int r = r0; r < r1; ++r) {
                const size_t i = (size_t)r * n + j0;
                float g[8], p[8];
                bf16x8_to_f32(*reinterpret_cast<const uint4*>(dy + i), g);
                bf16x8_to_f32(*reinterpret_cast<const uint4*>(x + i), p);
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    g[k] *= gelu_grad<KIND>(p[k] + b[k]);
                    acc[k] += g[k];
                }
                *reinterpret_cast<uint4*>(dx + i) = f32_to_bf16x8(g);
            }
            if (pr != nullptr) {
#pragma unroll
                for (int k = 0; k < 8; ++k) pr[j0 + k] = acc[k];
            }
        } else {
            const int j = u;
            const float b = bias != nullptr ? bias[j] : 0.f;
            float acc = 0.f;
            for (int r = r0; r < r1; ++r) {
                const size_t i = (size_t)r * n + j;
                const float g =
                    __bfloat162float(dy[i]) * gelu_grad<KIND>(__bfloat162float(x[i]) + b);
                acc += g;
                dx[i] = __float2bfloat16_rn(g);
            }
            if (pr != nullptr) pr[j] = acc;
        }
    }
}

extern "C" __global__ void __launch_bounds__(GELU_BWD_THREADS)
gelu_tanh_bwd_bf16(__nv_bfloat16* __restrict__ dx, float* __restrict__ part,
                   const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ x,
                   const float* __restrict__ bias, int rows, int n) {
    gelu_bwd_impl<GELU_TANH>(dx, part, dy, x, bias, rows, n);
}

extern "C" __global__ void __launch_bounds__(GELU_BWD_THREADS)
gelu_exact_bwd_bf16(__nv_bfloat16* __restrict__ dx, float* __restrict__ part,
                    const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ x,
                    const float* __restrict__ bias, int rows, int n) {
    gelu_bwd_impl<GELU_EXACT>(dx, part, dy, x, bias, rows, n);
}

extern "C" __global__ void __launch_bounds__(IMDM_RED_WARPS * IMDM_WARP)
gelu_bwd_reduce_f32(float* __restrict__ dbias, const float* __restrict__ part, int nparts, int n) {
    imdm_colsum_partials(dbias, part, nparts, n, n, blockIdx.x * IMDM_WARP);
}
