// common.cuh: the only header shared by the kernels: warp/block reductions and bf16 helpers.
// Philox (counter-based RNG shared bit-for-bit with src/rng.rs) joins it with the first random
// kernel.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define IMDM_WARP 32

// Sum over the 32 lanes of a warp; every lane receives the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = IMDM_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = IMDM_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- 16-byte vector helpers ---------------------------------------------------------------

// True when p is 16-byte aligned (a null pointer counts as aligned: it is never dereferenced).
__device__ __forceinline__ bool imdm_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// 8 bf16 packed in a uint4 (one 16-byte load) -> 8 floats (exact).
__device__ __forceinline__ void bf16x8_to_f32(const uint4 v, float f[8]) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 t = __bfloat1622float2(p[k]);
        f[2 * k] = t.x;
        f[2 * k + 1] = t.y;
    }
}

// 8 floats -> 8 bf16 (round to nearest even) packed in a uint4 (one 16-byte store).
__device__ __forceinline__ uint4 f32_to_bf16x8(const float f[8]) {
    uint4 v;
    __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int k = 0; k < 4; ++k) p[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    return v;
}

// ---- Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32_10) ------------------------
// Bit-identical to `rng::philox4x32_10` in src/rng.rs, which checks the Random123 known-answer
// vectors. Ten rounds; the key is bumped by (W0, W1) between rounds (nine bumps).
#define IMDM_PHILOX_M0 0xD2511F53u
#define IMDM_PHILOX_M1 0xCD9E8D57u
#define IMDM_PHILOX_W0 0x9E3779B9u
#define IMDM_PHILOX_W1 0xBB67AE85u

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key.x += IMDM_PHILOX_W0;
            key.y += IMDM_PHILOX_W1;
        }
        const uint32_t hi0 = __umulhi(IMDM_PHILOX_M0, ctr.x), lo0 = IMDM_PHILOX_M0 * ctr.x;
        const uint32_t hi1 = __umulhi(IMDM_PHILOX_M1, ctr.z), lo1 = IMDM_PHILOX_M1 * ctr.z;
        ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    }
    return ctr;
}

// Row of flat index i in rows of width d: a 32-bit division whenever i fits in 32 bits (every
// model shape), the slow 64-bit one otherwise.
__device__ __forceinline__ size_t imdm_row_of(size_t i, int d) {
    return i <= 0xffffffffull ? (size_t)((uint32_t)i / (uint32_t)d) : i / (size_t)d;
}

// ---- Deterministic reductions for the backward kernels ---------------------------------------
// Parameter and per-batch gradients are reduced in two stages with no float atomics, so a
// training step is bit-reproducible: stage 1 (the op's backward kernel) writes one partial row of
// width `ncols` per block of rows into a scratch buffer; stage 2 (the op's `_reduce` kernel)
// calls imdm_colsum_partials, which adds the partials of each column in a fixed order.

#define IMDM_RED_WARPS 8  // stage-2 block: 8 warps x 32 columns = 256 threads

// out[j] += sum_{p < nparts} part[p * stride + j] for the 32 columns j = col0 + lane of this
// block. Warp w sums partials p = w, w + 8, w + 16, ... in increasing p; warp 0 then adds the 8
// warp sums in order w = 0..7. The order depends only on (nparts, j), never on scheduling.
// Must be called by all IMDM_RED_WARPS * 32 threads of the block (it synchronises); columns
// j >= ncols are neither read nor written.
__device__ __forceinline__ void imdm_colsum_partials(float* __restrict__ out,
                                                     const float* __restrict__ part,
                                                     size_t nparts, size_t stride, int ncols,
                                                     int col0) {
    __shared__ float red[IMDM_RED_WARPS][IMDM_WARP];
    const int lane = threadIdx.x % IMDM_WARP, w = threadIdx.x / IMDM_WARP;
    const int j = col0 + lane;
    float s = 0.f;
    if (j < ncols)
        for (size_t p = w; p < nparts; p += IMDM_RED_WARPS) s += part[p * stride + j];
    red[w][lane] = s;
    __syncthreads();
    if (w == 0 && j < ncols) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < IMDM_RED_WARPS; ++k) t += red[k][lane];
        out[j] += t;
    }
    __syncthreads();  // red may be reused by a second call in the same kernel
}

// Sum of (a, b) over all threads of the block; every thread receives the same result (each
// thread adds the per-warp sums in warp order, so the result is identical across threads and
// runs). `red` holds one float2 per warp. Must be called by all threads (it synchronises twice,
// so `red` can be reused by the next call at once).
__device__ __forceinline__ float2 imdm_block_sum2(float a, float b, float2* red) {
    a = warp_sum(a);
    b = warp_sum(b);
    const int lane = threadIdx.x % IMDM_WARP, w = threadIdx.x / IMDM_WARP;
    if (lane == 0) red[w] = make_float2(a, b);
    __syncthreads();
    float2 t = make_float2(0.f, 0.f);
    const int nw = blockDim.x / IMDM_WARP;
    for (int k = 0; k < nw; ++k) {
        t.x += red[k].x;
        t.y += red[k].y;
    }
    __syncthreads();
    return t;
}
