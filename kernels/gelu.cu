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
