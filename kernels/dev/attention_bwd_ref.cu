// attention_bwd_ref: the GPU reference of kernels/attention_bwd.cu, kept only to test it (the
// maths, shapes and saved buffers are that file's header).
//
// Kernels attention_bwd_prep_f32, attention_bwd_dq_hd*, attention_bwd_dkv_hd*,
// attention_bwd_rope_bf16: correctness-first fp32 SIMT.
// Same maths in fp32 throughout (P and dS never rounded to bf16): the GPU-side reference the
// tensor-core kernels are tested against (attention_bwd_reference in src/cuda/ops/attention.rs).
//   Workspace (f32): qr, kr, dqr, dkr (B, H, L, hd) and dsum (B, H, L) = D.
// Thread mapping (every kernel: 256 threads = 8 warps, lanes over head dims e = lane + 32k, k <
//   hd/32, so every dot product is a warp sum and every row a coalesced 128-byte access):
//   prep:     one warp per (b, h, position): rotates q and k into qr, kr (lane it < hd/16
//             rotates pairs 8 it .. 8 it + 7 with att_rope8); D into dsum (lanes over dims).
//   dq:       grid (ceil(L/8), B*H); warp w owns query i = 8 blockIdx.x + w and keeps q'_i, dO_i,
//             dq'_i in registers; the block streams 32-key tiles of k' (from kr) and v (bf16 ->
//             f32) through shared memory (2 x 32 x hd f32); causal blocks stop at their last
//             query. Writes dqr (=).
//   dkv:      grid (ceil(L/8), B*H); warp w owns key j; the block streams 32-query tiles of q',
//             dO, lse, D; causal blocks start at the tile holding their first key and each warp
//             skips queries i < j. Writes dkr (=) and the v part of dqkv (bf16, =).
//   rope:     one warp per (b, h, position): rotates dqr, dkr back, writes the q and k parts of
//             dqkv (bf16, =).
// Cost (why this is the reference, not the training kernel): two warp sums per (query, key) pair
//   in each of dq and dkv, fp32 FMAs, no tensor cores: roughly 20 ms per DiT-small layer at
//   B = 32, L = 1024 on an H100 (estimate, not measured).
#include "attention_common.cuh"

#define ATT_BWD_TILE 32  // keys (dq) or queries (dkv) staged in shared memory per step

// One warp per (b, h, position) row: rotated, bf16-rounded q and k into qr, kr (as the forward
// computes them) and D = dO.o into dsum.
extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS)
attention_bwd_prep_f32(float* __restrict__ qr, float* __restrict__ kr, float* __restrict__ dsum,
                       const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ o,
                       const __nv_bfloat16* __restrict__ dout, int batch, int len, int heads,
                       int hd) {
    const int lane = threadIdx.x % IMDM_WARP;
    const size_t row = (size_t)blockIdx.x * ATT_BWD_WARPS + threadIdx.x / IMDM_WARP;
    if (row >= (size_t)batch * heads * len) return;  // warp-uniform; no barrier below
    const size_t bh = row / len;
    const int p = (int)(row % len);
    const size_t b = bh / heads, h = bh % heads;
    const size_t tok = b * len + p;
    const __nv_bfloat16* q = qkv + tok * 3 * heads * hd + h * hd;
    const __nv_bfloat16* k = q + (size_t)heads * hd;
    const int half = hd / 2;
    // The forward's own rotation routine (att_rope8: 8 pairs, fp32, bf16 rounding) on the same
    // 16-byte chunks, so q' and k' are the forward kernel's values bit for bit. Lane `it` handles
    // pairs 8 it .. 8 it + 7 (hd / 16 <= 8 items; the rows are 16-byte aligned since hd % 32 ==
    // 0 and the base is).
    for (int it = lane; it < half / 8; it += IMDM_WARP) {
        const int c = it * 8;
        __align__(16) float fr[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) fr[u] = att_bwd_freq(c + u, hd);
#pragma unroll
        for (int part = 0; part < 2; ++part) {
            const __nv_bfloat16* src = part == 0 ? q : k;
            float* dst = (part == 0 ? qr : kr) + row * hd;
            uint4 x1 = *reinterpret_cast<const uint4*>(src + c);
            uint4 x2 = *reinterpret_cast<const uint4*>(src + half + c);
            att_rope8(x1, x2, fr, (float)p);
            float f1[8], f2[8];
            bf16x8_to_f32(x1, f1);
            bf16x8_to_f32(x2, f2);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                dst[c + u] = f1[u];
                dst[half + c + u] = f2[u];
            }
        }
    }
    const __nv_bfloat16* orow = o + tok * heads * hd + h * hd;
    const __nv_bfloat16* grow = dout + tok * heads * hd + h * hd;
    float s = 0.f;
    for (int e = lane; e < hd; e += IMDM_WARP)
        s += __bfloat162float(orow[e]) * __bfloat162float(grow[e]);
    s = warp_sum(s);
    if (lane == 0) dsum[row] = s;
}

// The softcapped score and the factor d s / d r (1 without a cap) of a raw score r.
__device__ __forceinline__ float att_bwd_cap(float r, float softcap, float* dcap) {
    if (softcap > 0.f) {
        const float t = tanhf(r / softcap);
        *dcap = 1.f - t * t;
        return softcap * t;
    }
    *dcap = 1.f;
    return r;
}

template <int HD>
__device__ __forceinline__ void attention_bwd_dq(float* __restrict__ dqr,
                                                 const float* __restrict__ qr,
                                                 const float* __restrict__ kr,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ dsum,
                                                 const __nv_bfloat16* __restrict__ qkv,
                                                 const __nv_bfloat16* __restrict__ dout, int len,
                                                 int heads, int causal, float softcap) {
    constexpr int NE = HD / IMDM_WARP;
    __shared__ float sk[ATT_BWD_TILE][HD], sv[ATT_BWD_TILE][HD];
    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int i = blockIdx.x * ATT_BWD_WARPS + warp;
    const bool valid = i < len;  // warp-uniform
    const size_t stride = (size_t)3 * heads * HD;
    const __nv_bfloat16* vbase = qkv + (size_t)b * len * stride + (size_t)2 * heads * HD + h * HD;
    const float scale = (float)(1.0 / sqrt((double)HD));
    float q[NE], g[NE], dq[NE];
    float lse_i = 0.f, d_i = 0.f;
#pragma unroll
    for (int k = 0; k < NE; ++k) q[k] = g[k] = dq[k] = 0.f;
    if (valid) {
        const size_t row = (size_t)bh * len + i;
        const __nv_bfloat16* grow = dout + ((size_t)b * len + i) * heads * HD + h * HD;
#pragma unroll
        for (int k = 0; k < NE; ++k) {
            q[k] = qr[row * HD + lane + IMDM_WARP * k];
            g[k] = __bfloat162float(grow[lane + IMDM_WARP * k]);
        }
        lse_i = lse[row];
        d_i = dsum[row];
    }
    const int i_last = min(len - 1, (int)blockIdx.x * ATT_BWD_WARPS + ATT_BWD_WARPS - 1);
    const int n_keys = causal ? i_last + 1 : len;  // block-uniform
    const int my_keys = causal ? i + 1 : len;      // keys of this warp's query
    for (int j0 = 0; j0 < n_keys; j0 += ATT_BWD_TILE) {
        for (int x = tid; x < ATT_BWD_TILE * HD; x += ATT_BWD_THREADS) {
            const int r = x / HD, e = x % HD, j = j0 + r;
            float kv = 0.f, vv = 0.f;
            if (j < len) {
                kv = kr[((size_t)bh * len + j) * HD + e];
                vv = __bfloat162float(vbase[(size_t)j * stride + e]);
            }
            sk[r][e] = kv;
            sv[r][e] = vv;
        }
        __syncthreads();
        if (valid) {
            const int jend = min(ATT_BWD_TILE, my_keys - j0);
            for (int r = 0; r < jend; ++r) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int k = 0; k < NE; ++k) {
                    s += q[k] * sk[r][lane + IMDM_WARP * k];
                    dp += g[k] * sv[r][lane + IMDM_WARP * k];
                }
                s = warp_sum(s) * scale;
                dp = warp_sum(dp);
                float dcap;
                s = att_bwd_cap(s, softcap, &dcap);
                const float pij = expf(s - lse_i);
                const float ds = pij * (dp - d_i) * dcap * scale;
#pragma unroll
                for (int k = 0; k < NE; ++k) dq[k] += ds * sk[r][lane + IMDM_WARP * k];
            }
        }
        __syncthreads();
    }
    if (valid) {
        const size_t row = (size_t)bh * len + i;
#pragma unroll
        for (int k = 0; k < NE; ++k) dqr[row * HD + lane + IMDM_WARP * k] = dq[k];
    }
}

template <int HD>
__device__ __forceinline__ void attention_bwd_dkv(float* __restrict__ dkr,
                                                  __nv_bfloat16* __restrict__ dqkv,
                                                  const float* __restrict__ qr,
                                                  const float* __restrict__ kr,
                                                  const float* __restrict__ lse,
                                                  const float* __restrict__ dsum,
                                                  const __nv_bfloat16* __restrict__ qkv,
                                                  const __nv_bfloat16* __restrict__ dout, int len,
                                                  int heads, int causal, float softcap) {
    constexpr int NE = HD / IMDM_WARP;
    __shared__ float sq[ATT_BWD_TILE][HD], sg[ATT_BWD_TILE][HD];
    __shared__ float sl[ATT_BWD_TILE], sd[ATT_BWD_TILE];
    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int j = blockIdx.x * ATT_BWD_WARPS + warp;
    const bool valid = j < len;  // warp-uniform
    const size_t stride = (size_t)3 * heads * HD;
    const size_t ostride = (size_t)heads * HD;
    const float scale = (float)(1.0 / sqrt((double)HD));
    float kj[NE], vj[NE], dk[NE], dv[NE];
#pragma unroll
    for (int k = 0; k < NE; ++k) kj[k] = vj[k] = dk[k] = dv[k] = 0.f;
    if (valid) {
        const __nv_bfloat16* vrow =
            qkv + ((size_t)b * len + j) * stride + (size_t)2 * heads * HD + h * HD;
#pragma unroll
        for (int k = 0; k < NE; ++k) {
            kj[k] = kr[((size_t)bh * len + j) * HD + lane + IMDM_WARP * k];
            vj[k] = __bfloat162float(vrow[lane + IMDM_WARP * k]);
        }
    }
    // Causal: queries i >= j only; start at the tile holding the block's first key.
    const int j_first = blockIdx.x * ATT_BWD_WARPS;
    const int i_begin = causal ? (j_first / ATT_BWD_TILE) * ATT_BWD_TILE : 0;  // block-uniform
    for (int i0 = i_begin; i0 < len; i0 += ATT_BWD_TILE) {
        for (int x = tid; x < ATT_BWD_TILE * HD; x += ATT_BWD_THREADS) {
            const int r = x / HD, e = x % HD, i = i0 + r;
            float qv = 0.f, gv = 0.f;
            if (i < len) {
                qv = qr[((size_t)bh * len + i) * HD + e];
                gv = __bfloat162float(dout[((size_t)b * len + i) * ostride + h * HD + e]);
            }
            sq[r][e] = qv;
            sg[r][e] = gv;
        }
        if (tid < ATT_BWD_TILE) {
            const int i = i0 + tid;
            sl[tid] = i < len ? lse[(size_t)bh * len + i] : 0.f;
            sd[tid] = i < len ? dsum[(size_t)bh * len + i] : 0.f;
        }
        __syncthreads();
        if (valid) {
            const int rbeg = causal ? max(0, j - i0) : 0;
            const int rend = min(ATT_BWD_TILE, len - i0);
            for (int r = rbeg; r < rend; ++r) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int k = 0; k < NE; ++k) {
                    s += sq[r][lane + IMDM_WARP * k] * kj[k];
                    dp += sg[r][lane + IMDM_WARP * k] * vj[k];
                }
                s = warp_sum(s) * scale;
                dp = warp_sum(dp);
                float dcap;
                s = att_bwd_cap(s, softcap, &dcap);
                const float pij = expf(s - sl[r]);
                const float ds = pij * (dp - sd[r]) * dcap * scale;
#pragma unroll
                for (int k = 0; k < NE; ++k) {
                    dv[k] += pij * sg[r][lane + IMDM_WARP * k];
                    dk[k] += ds * sq[r][lane + IMDM_WARP * k];
                }
            }
        }
        __syncthreads();
    }
    if (valid) {
        __nv_bfloat16* dvrow =
            dqkv + ((size_t)b * len + j) * stride + (size_t)2 * heads * HD + h * HD;
#pragma unroll
        for (int k = 0; k < NE; ++k) {
            dkr[((size_t)bh * len + j) * HD + lane + IMDM_WARP * k] = dk[k];
            dvrow[lane + IMDM_WARP * k] = __float2bfloat16_rn(dv[k]);
        }
    }
}

#define ATT_BWD_KERNELS(HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS) attention_bwd_dq_hd##HD(      \
        float* __restrict__ dqr, const float* __restrict__ qr, const float* __restrict__ kr,    \
        const float* __restrict__ lse, const float* __restrict__ dsum,                          \
        const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ dout, int len, \
        int heads, int causal, float softcap) {                                                 \
        attention_bwd_dq<HD>(dqr, qr, kr, lse, dsum, qkv, dout, len, heads, causal, softcap);   \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS) attention_bwd_dkv_hd##HD(     \
        float* __restrict__ dkr, __nv_bfloat16* __restrict__ dqkv,                              \
        const float* __restrict__ qr, const float* __restrict__ kr,                             \
        const float* __restrict__ lse, const float* __restrict__ dsum,                          \
        const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ dout, int len, \
        int heads, int causal, float softcap) {                                                 \
        attention_bwd_dkv<HD>(dkr, dqkv, qr, kr, lse, dsum, qkv, dout, len, heads, causal,      \
                              softcap);                                                         \
    }

ATT_BWD_KERNELS(32)
ATT_BWD_KERNELS(64)
ATT_BWD_KERNELS(96)
ATT_BWD_KERNELS(128)

// One warp per (b, h, position) row: the rotary backward of dq' and dk' into the q and k parts
// of dqkv (bf16).
extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS)
attention_bwd_rope_bf16(__nv_bfloat16* __restrict__ dqkv, const float* __restrict__ dqr,
                        const float* __restrict__ dkr, int batch, int len, int heads, int hd) {
    const int lane = threadIdx.x % IMDM_WARP;
    const size_t row = (size_t)blockIdx.x * ATT_BWD_WARPS + threadIdx.x / IMDM_WARP;
    if (row >= (size_t)batch * heads * len) return;
    const size_t bh = row / len;
    const int p = (int)(row % len);
    const size_t b = bh / heads, h = bh % heads;
    __nv_bfloat16* dq = dqkv + (b * len + p) * 3 * heads * hd + h * hd;
    __nv_bfloat16* dk = dq + (size_t)heads * hd;
    const int half = hd / 2;
    for (int t = lane; t < half; t += IMDM_WARP) {
        float sn, cs;
        att_sincos((float)p * att_bwd_freq(t, hd), &sn, &cs);
        const float q1 = dqr[row * hd + t], q2 = dqr[row * hd + t + half];
        const float k1 = dkr[row * hd + t], k2 = dkr[row * hd + t + half];
        dq[t] = __float2bfloat16_rn(q1 * cs + q2 * sn);
        dq[t + half] = __float2bfloat16_rn(q2 * cs - q1 * sn);
        dk[t] = __float2bfloat16_rn(k1 * cs + k2 * sn);
        dk[t + half] = __float2bfloat16_rn(k2 * cs - k1 * sn);
    }
}
