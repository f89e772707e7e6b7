// embedding: token-embedding lookup with the IMDM eps injection (spec 2.2 step 1, 3.2 step 5).
//
// Maths, per row r (rows = B*L) and column j < D:
//   h[r,j] = E[tok[r], j] + (eps_add != null && tok[r] == mask_index ? eps_add[r,j] : 0)
// eps_add = imdm_mlp(eps) = W_b GELU_exact(W_a eps + b_a), the (rows, D) bf16 output of the W_b
// GEMM, computed for every row; it is added only where the input token is the mask. A null
// eps_add means MDLM (no injection). The add is one f32 addition of an exactly converted bf16,
// so the CPU twin reproduces h bit for bit.
// Shapes and dtypes: E (V, D) f32; tok (rows) u32 (i32 ids may be passed as-is: valid ids read
//   the same and negative ones become >= V); eps_add (rows, D) bf16 or null; h (rows, D) f32.
// An out-of-range id (tok >= V) writes a row of NaN instead of reading outside E, so a bad id
//   shows up in the loss rather than as a memory fault; the twin does the same.
// Thread mapping: flat grid-stride loop over units of 4 consecutive elements of one row
//   (D % 4 == 0 and 16-byte aligned buffers: a float4 load of E, an 8-byte load of 4 bf16, a
//   float4 store of h); otherwise over single elements. The host sizes the grid for the vector
//   units; the loop covers any grid. tok[r] is re-read by each unit of row r (an L1 hit).
// Saved for the backward: nothing (dE[tok[r]] += dh[r] needs tok; d eps_add = dh at mask rows).
// Accumulation rule: h is written (=); the backward accumulates dE (+=), writes d eps_add (=).
#include "common.cuh"

#define EMB_THREADS 256

__device__ __forceinline__ float emb_value(const float* __restrict__ table, uint32_t tok,
                                          size_t col, int d, int vocab) {
    return tok < (uint32_t)vocab ? table[(size_t)tok * d + col] : __int_as_float(0x7fc00000);
}

extern "C" __global__ void __launch_bounds__(EMB_THREADS)
embedding_fwd_f32(float* __restrict__ h, const float* __restrict__ table,
                  const uint32_t* __restrict__ tokens, const __nv_bfloat16* __restrict__ eps_add,
                  int rows, int d, int vocab, uint32_t mask_index) {
    const size_t n = (size_t)rows * d;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = d % 4 == 0 && imdm_aligned16(h) && imdm_aligned16(table) &&
                     imdm_aligned16(eps_add);
    if (vec) {
        const int d4 = d / 4;
        for (size_t q = t0; q < n / 4; q += stride) {
            const size_t r = imdm_row_of(q, d4);
            const size_t col = (q - r * d4) * 4;
            const uint32_t tok = tokens[r];
            float4 v;
            if (tok < (uint32_t)vocab) {
                v = *reinterpret_cast<const float4*>(table + (size_t)tok * d + col);
            } else {
                const float nan = __int_as_float(0x7fc00000);
                v = make_float4(nan, nan, nan, nan);
            }
            if (eps_add != nullptr && tok == mask_index) {
                // 4 bf16 = 8 bytes at element 4q: 8-byte aligned since the base is 16-aligned.
                const uint2 e = *reinterpret_cast<const uint2*>(eps_add + q * 4);
                const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&e.x));
                const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&e.y));
                v.x += a.x;
                v.y += a.y;
                v.z += b.x;
                v.w += b.y;
            }
            *reinterpret_cast<float4*>(h + q * 4) = v;
        }
    } else {
        for (size_t i = t0; i < n; i += stride) {
            const size_t r = imdm_row_of(i, d);
            const uint32_t tok = tokens[r];
            float v = emb_value(table, tok, i - r * d, d, vocab);
            if (eps_add != nullptr && tok == mask_index) v += __bfloat162float(eps_add[i]);
            h[i] = v;
        }
    }
}
