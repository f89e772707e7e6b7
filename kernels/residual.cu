// residual: gated residual add with dropout (spec 2.3: h = h + gate · dropout_p(branch)).
//
// Maths, per row r (rows = B*L), column j < D, b = r / rows_per_batch, flat index i = r*D + j,
// gate row offset o = b * mod_stride (mod_stride 0: every row reads gate row 0, the constant
// conditioning of MDLM/IMDM; 6D: sequence b reads row b of a block's (B, 6D) modulation):
//   keep(i) = p == 0 || u(i) >= p,   u(i) = (x(i) >> 8) * 2^-24          (24-bit uniform)
//   h[r,j] += gate[o + j] * (keep(i) ? branch[r,j] * (1 / (1 - p)) : 0)  (gate null: 1)
// Dropout stream (shared bit for bit with `rng::dropout_keep`, which the CPU twin calls):
//   key     = (seed low 32, seed high 32)
//   counter = (i/4 low 32, i/4 high 32, offset low 32, offset high 32)
//   x(i)    = word (i % 4) of philox4x32_10(counter, key)
//   `offset` (u64) names the call (the caller derives it from step, layer and branch); p = 0
//   draws nothing. The scale 1/(1-p) is an IEEE f32 division on both sides.
// Shapes and dtypes: h (rows, D) f32, the residual stream, updated in place; branch (rows, D)
//   bf16; gate: D f32 values at every row offset o (a chunk of one modulation buffer, rows
//   mod_stride apart) or null (AR baseline); p in [0, 1).
// Saved for the backward: nothing. The backward regenerates keep(i) from (seed, offset) and
//   needs branch (kept by the caller) only for the gate gradient.
// Thread mapping: flat grid-stride loop over units of 8 consecutive elements of one row (D % 8
//   == 0, mod_stride % 4 == 0 and 16-byte aligned buffers: two float4 loads and stores of h, one
//   16-byte load of 8 bf16, two float4 loads of the gate (L1/L2 hits), two Philox calls);
//   otherwise over groups of 4 elements aligned to the Philox counter (one call each) with
//   scalar accesses. The host sizes the grid for the 8-element units; the loop covers any grid.
// Accumulation rule: h += (the residual stream); the backward writes d branch (=) and
//   accumulates d gate (+=).
//
// ---- Backward (residual_bwd_bf16 + residual_bwd_reduce_f32) ---------------------------------
// Maths, with f(i) = keep(i) ? 1/(1-p) : 0 regenerated from (seed, offset) by the same Philox
// rule as the forward (f = 1 when p == 0, which draws nothing), dh the gradient of the updated
// residual stream:
//   d branch[r,j]  = gate[o + j] * (f(i) * dh[r,j])           (gate null: 1)
//   d gate[o + j] += sum_{r in batch b} dh[r,j] * (branch[r,j] * f(i))
//                                                   (mod_stride 0: the sum over all rows)
// (branch * f is the forward's f32 product, so d gate is the exact derivative of what the forward
// added.) The skip path passes dh through unchanged: the caller keeps using the same dh buffer
// as the gradient of the stream before the add; this kernel does not touch it.
// Shapes and dtypes: dh (rows, D) f32 (the residual-stream gradient); branch (rows, D) bf16 (kept
//   by the caller; read only for d gate); gate as in the forward or null; d branch (rows, D)
//   bf16 (the operand of the branch's backward GEMMs); part: scratch (B * chunks, D) f32,
//   chunks = ceil(rows_per_batch / 64); d gate: D f32 at every row offset o of the modulation
//   gradient buffer (the gate's layout).
// Thread mapping, stage 1: grid (ceil(units/128), B * chunks), 128 threads; blockIdx.y = b *
//   chunks + c owns rows b*rows_per_batch + c*64 + (0..63) inside batch b. A unit is 8 consecutive
//   columns (D % 8 == 0 and 16-byte aligned buffers: two float4 loads of dh, two Philox calls for
//   the two aligned groups of 4, one 16-byte store of d branch, one 16-byte load of branch) or
//   one column otherwise (one Philox call per element). Each thread walks its block's rows for its
//   unit (units strided by the grid), summing the d gate terms in fp32 registers, then writes its
//   columns of part[blockIdx.y] (when part != null).
// Thread mapping, stage 2 (residual_bwd_reduce_f32): grid (ceil(D/32), B), 256 threads;
//   d gate[o + j] += the chunks partials of batch b, column j, in a fixed order
//   (imdm_colsum_partials); with mod_stride 0 block row b = 0 adds all B*chunks partials and
//   the others return. The launcher runs the broadcast case as one batch of all rows (B = 1,
//   rows_per_batch = rows).
// Accumulation rule (backward): d branch is written (=); d gate += (deterministic: no atomics).
#include "common.cuh"

#define RES_THREADS 256

__device__ __forceinline__ uint4 res_words(size_t group, uint64_t seed, uint64_t offset) {
    return philox4x32_10(make_uint4((uint32_t)group, (uint32_t)((uint64_t)group >> 32),
                                    (uint32_t)offset, (uint32_t)(offset >> 32)),
                         make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)));
}

// The dropout factor for one Philox word: scale when kept, 0 when dropped. The uniform is an
// integer below 2^24 times 2^-24, exact in f32, so the comparison matches the CPU exactly.
__device__ __forceinline__ float res_factor(uint32_t w, float p, float scale) {
    return __uint2float_rn(w >> 8) * 5.9604644775390625e-8f >= p ? scale : 0.f;
}

// Batch index of row r (r < rows <= INT_MAX, so a 32-bit division).
__device__ __forceinline__ size_t res_batch(size_t r, int rows_per_batch) {
    return (uint32_t)r / (uint32_t)rows_per_batch;
}

__device__ __forceinline__ uint32_t res_word(const uint4 v, int k) {
    return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

extern "C" __global__ void __launch_bounds__(RES_THREADS)
residual_fwd_bf16(float* __restrict__ h, const __nv_bfloat16* __restrict__ branch,
                  const float* __restrict__ gate, int rows, int d, int rows_per_batch,
                  int mod_stride, float p, uint64_t seed, uint64_t offset) {
    const size_t n = (size_t)rows * d;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool drop = p > 0.f;
    const float scale = 1.f / (1.f - p);
    const bool vec = d % 8 == 0 && mod_stride % 4 == 0 && imdm_aligned16(h) &&
                     imdm_aligned16(branch) && imdm_aligned16(gate);
    if (vec) {
        for (size_t q = t0; q < n / 8; q += stride) {
            const size_t i = q * 8;
            float f[8], g[8];
            bf16x8_to_f32(*reinterpret_cast<const uint4*>(branch + i), f);
            if (gate != nullptr) {
                const size_t r = imdm_row_of(i, d);
                // o + col is a multiple of 4: both float4 loads are 16-byte aligned.
                const float* gr =
                    gate + res_batch(r, rows_per_batch) * mod_stride + (i - r * d);
                const float4 g0 = *reinterpret_cast<const float4*>(gr);
                const float4 g1 = *reinterpret_cast<const float4*>(gr + 4);
                g[0] = g0.x, g[1] = g0.y, g[2] = g0.z, g[3] = g0.w;
                g[4] = g1.x, g[5] = g1.y, g[6] = g1.z, g[7] = g1.w;
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) g[k] = 1.f;
            }
            if (drop) {
                // i is a multiple of 8: groups i/4 and i/4 + 1 cover the unit exactly.
                const uint4 w0 = res_words(i / 4, seed, offset);
                const uint4 w1 = res_words(i / 4 + 1, seed, offset);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    f[k] *= res_factor(res_word(w0, k), p, scale);
                    f[k + 4] *= res_factor(res_word(w1, k), p, scale);
                }
            }
            float4* hp = reinterpret_cast<float4*>(h + i);
            float4 h0 = hp[0], h1 = hp[1];
            h0.x += g[0] * f[0], h0.y += g[1] * f[1], h0.z += g[2] * f[2], h0.w += g[3] * f[3];
            h1.x += g[4] * f[4], h1.y += g[5] * f[5], h1.z += g[6] * f[6], h1.w += g[7] * f[7];
            hp[0] = h0;
            hp[1] = h1;
        }
    } else {
        for (size_t grp = t0; grp < (n + 3) / 4; grp += stride) {
            const uint4 w = drop ? res_words(grp, seed, offset) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const size_t i = grp * 4 + k;
                if (i >= n) break;
                float f = __bfloat162float(branch[i]), g = 1.f;
                if (drop) f *= res_factor(res_word(w, k), p, scale);
                if (gate != nullptr) {
                    const size_t r = imdm_row_of(i, d);
                    g = gate[res_batch(r, rows_per_batch) * mod_stride + (i - r * d)];
                }
                h[i] += g * f;
            }
        }
    }
}

#define RES_BWD_THREADS 128
#define RES_BWD_ROWS 64

extern "C" __global__ void __launch_bounds__(RES_BWD_THREADS)
residual_bwd_bf16(__nv_bfloat16* __restrict__ dbranch, float* __restrict__ part,
                  const float* __restrict__ dh, const __nv_bfloat16* __restrict__ branch,
                  const float* __restrict__ gate, int rows, int d, int rows_per_batch,
                  int mod_stride, float p, uint64_t seed, uint64_t offset) {
    const bool drop = p > 0.f;
    const float scale = 1.f / (1.f - p);
    const int chunks = (rows_per_batch + RES_BWD_ROWS - 1) / RES_BWD_ROWS;
    const int b = blockIdx.y / chunks, c = blockIdx.y % chunks;
    const size_t ra = (size_t)b * rows_per_batch + (size_t)c * RES_BWD_ROWS;
    const size_t rb = (size_t)b * rows_per_batch + min(rows_per_batch, (c + 1) * RES_BWD_ROWS);
    if (rb > (size_t)rows) return;  // never for valid shapes (rows = B * rows_per_batch)
    const float* gb = gate != nullptr ? gate + (size_t)b * mod_stride : nullptr;
    float* pr = part != nullptr ? part + (size_t)blockIdx.y * d : nullptr;
    const bool vec = d % 8 == 0 && imdm_aligned16(dbranch) && imdm_aligned16(dh) &&
                     imdm_aligned16(branch);
    const int units = vec ? d / 8 : d;
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        if (vec) {
            const int j0 = u * 8;
            float g[8], acc[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                g[k] = gb != nullptr ? gb[j0 + k] : 1.f;
                acc[k] = 0.f;
            }
            for (size_t r = ra; r < rb; ++r) {
                const size_t i = r * d + j0;  // a multiple of 8
                float f[8];
                if (drop) {
                    // groups i/4 and i/4 + 1 cover the 8 elements exactly, as in the forward
                    const uint4 w0 = res_words(i / 4, seed, offset);
                    const uint4 w1 = res_words(i / 4 + 1, seed, offset);
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        f[k] = res_factor(res_word(w0, k), p, scale);
                        f[k + 4] = res_factor(res_word(w1, k), p, scale);
                    }
                } else {
#pragma unroll
                    for (int k = 0; k < 8; ++k) f[k] = 1.f;
                }
                const float4 h0 = *reinterpret_cast<const float4*>(dh + i);
                const float4 h1 = *reinterpret_cast<const float4*>(dh + i + 4);
                const float gh[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
                float out[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) out[k] = g[k] * (f[k] * gh[k]);
                *reinterpret_cast<uint4*>(dbranch + i) = f32_to_bf16x8(out);
                if (pr != nullptr) {
                    float br[8];
                    bf16x8_to_f32(*reinterpret_cast<const uint4*>(branch + i), br);
#pragma unroll
                    for (int k = 0; k < 8; ++k) acc[k] += gh[k] * (br[k] * f[k]);
                }
            }
            if (pr != nullptr) {
#pragma unroll
                for (int k = 0; k < 8; ++k) pr[j0 + k] = acc[k];
            }
        } else {
            const int j = u;
            const float g = gb != nullptr ? gb[j] : 1.f;
            float acc = 0.f;
            for (size_t r = ra; r < rb; ++r) {
                const size_t i = r * d + j;
                const float f =
                    drop ? res_factor(res_word(res_words(i / 4, seed, offset), (int)(i % 4)), p,
                                      scale)
                         : 1.f;
                const float gh = dh[i];
                dbranch[i] = __float2bfloat16_rn(g * (f * gh));
                if (pr != nullptr) acc += gh * (__bfloat162float(branch[i]) * f);
            }
            if (pr != nullptr) pr[j] = acc;
        }
    }
}

extern "C" __global__ void __launch_bounds__(IMDM_RED_WARPS * IMDM_WARP)
residual_bwd_reduce_f32(float* __restrict__ dgate, const float* __restrict__ part, int batches,
                        int chunks, int d, int mod_stride) {
    const int b = blockIdx.y;
    if (b >= batches) return;  // block-uniform
    // Broadcast (mod_stride 0): one gate gradient, the sum over every batch's partials.
    if (mod_stride == 0 && b > 0) return;
    const size_t n = mod_stride == 0 ? (size_t)batches * chunks : (size_t)chunks;
    imdm_colsum_partials(dgate + (size_t)b * mod_stride, part + (size_t)b * chunks * d, n, d, d,
                         blockIdx.x * IMDM_WARP);
}
