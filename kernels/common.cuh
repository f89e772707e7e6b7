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
