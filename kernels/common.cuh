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
