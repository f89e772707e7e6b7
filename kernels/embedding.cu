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
//
// ---- Backward: dE (embedding_bwd_f32 + embedding_bwd_reduce_f32) ----------------------------
// Maths: dE[v, j] += sum_{r : tok[r] == v} dh[r, j], for every id v present in tok.
// Deterministic scatter-add without atomics, from a plan the host builds from the token ids
// (they are on the host anyway: the batcher makes them) by a counting sort, O(rows + V):
//   order      (rows) u32: row indices sorted by id, rows ascending within an id (stable);
//   item_start (n_items + 1) u32: order[item_start[k] .. item_start[k+1]) is item k: at most
//              EMB_BWD_ITEM_ROWS (64) rows, all with one id; the items of an id are consecutive;
//   seg_token  (n_seg) u32: the distinct ids, ascending; seg_item (n_seg + 1) u32: the items of
//              id seg_token[s] are seg_item[s] .. seg_item[s+1].
// Splitting an id's rows into items of <= 64 keeps the work per block bounded: the mask id
// holds about half of all rows in MDLM training, and one block summing 16k rows sequentially
// would serialise the whole kernel. (Rejected: one block per vocabulary row, V = 50k mostly
// idle blocks; float atomics, not reproducible.)
//   stage 1, embedding_bwd_f32: part[k, j] = sum over the rows of item k, in order (fp32);
//   stage 2, embedding_bwd_reduce_f32: dE[seg_token[s], j] += sum over the items of segment s,
//            in order (fp32). Each row of dE is written by exactly one block per column tile.
// Shapes and dtypes: dh (rows, D) f32 (the residual-stream gradient at the embedding); part:
//   scratch (n_items, D) f32; dE (V, D) f32. Ids are validated (< V) by the host plan; stage 2
//   also skips any id >= V.
// Thread mapping (both stages): grid (items or segments, ceil(units / 128)), 128 threads; a unit
//   is 4 consecutive columns (D % 4 == 0 and 16-byte aligned buffers: float4 loads/stores) or
//   one column; blockIdx.x names the item or segment (gridDim.x allows 2^31 - 1), blockIdx.y
//   the column tile; units are strided by the grid, so any grid covers D.
// Accumulation rule: dE += (parameter gradient); part is written (=).
//
// ---- Backward: IMDM eps injection (embedding_eps_bwd_bf16) ----------------------------------
// Maths: d eps_add[r, j] = tok[r] == mask_index ? dh[r, j] : 0 (the add is an identity at mask
//   rows and absent elsewhere). Shapes: dh (rows, D) f32, tok (rows) u32, d eps_add (rows, D) bf16
//   (the operand of the W_b GEMM's backward). Thread mapping: flat grid-stride loop over
//   elements. Accumulation rule: d eps_add is written (=).
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

#define EMB_BWD_THREADS 128
#define EMB_BWD_ITEM_ROWS 64

// True when the float4 path applies: D % 4 == 0 and every buffer 16-byte aligned.
__device__ __forceinline__ bool emb_bwd_vec(int d, const void* a, const void* b) {
    return d % 4 == 0 && imdm_aligned16(a) && imdm_aligned16(b);
}

extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS)
embedding_bwd_f32(float* __restrict__ part, const float* __restrict__ dh,
                  const uint32_t* __restrict__ order, const uint32_t* __restrict__ item_start,
                  int n_items, int d) {
    const int k = blockIdx.x;
    if (k >= n_items) return;
    const uint32_t q0 = item_start[k], q1 = item_start[k + 1];
    float* pk = part + (size_t)k * d;
    const bool vec = emb_bwd_vec(d, part, dh);
    const int units = vec ? d / 4 : d;
    for (int u = blockIdx.y * blockDim.x + threadIdx.x; u < units; u += gridDim.y * blockDim.x) {
        if (vec) {
            float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
            for (uint32_t q = q0; q < q1; ++q) {
                const float4 v =
                    *reinterpret_cast<const float4*>(dh + (size_t)order[q] * d + 4 * u);
                s.x += v.x;
                s.y += v.y;
                s.z += v.z;
                s.w += v.w;
            }
            *reinterpret_cast<float4*>(pk + 4 * u) = s;
        } else {
            float s = 0.f;
            for (uint32_t q = q0; q < q1; ++q) s += dh[(size_t)order[q] * d + u];
            pk[u] = s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS)
embedding_bwd_reduce_f32(float* __restrict__ dtable, const float* __restrict__ part,
                         const uint32_t* __restrict__ seg_token,
                         const uint32_t* __restrict__ seg_item, int n_seg, int d, int vocab) {
    const int sg = blockIdx.x;
    if (sg >= n_seg) return;
    const uint32_t tok = seg_token[sg];
    if (tok >= (uint32_t)vocab) return;
    const uint32_t k0 = seg_item[sg], k1 = seg_item[sg + 1];
    float* row = dtable + (size_t)tok * d;
    const bool vec = emb_bwd_vec(d, dtable, part);
    const int units = vec ? d / 4 : d;
    for (int u = blockIdx.y * blockDim.x + threadIdx.x; u < units; u += gridDim.y * blockDim.x) {
        if (vec) {
            float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
            for (uint32_t k = k0; k < k1; ++k) {
                const float4 v = *reinterpret_cast<const float4*>(part + (size_t)k * d + 4 * u);
                s.x += v.x;
                s.y += v.y;
                s.z += v.z;
                s.w += v.w;
            }
            float4* o = reinterpret_cast<float4*>(row + 4 * u);
            float4 t = *o;
            t.x += s.x;
            t.y += s.y;
            t.z += s.z;
            t.w += s.w;
            *o = t;
        } else {
            float s = 0.f;
            for (uint32_t k = k0; k < k1; ++k) s += part[(size_t)k * d + u];
            row[u] += s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(EMB_THREADS)
embedding_eps_bwd_bf16(__nv_bfloat16* __restrict__ d_eps_add, const float* __restrict__ dh,
                       const uint32_t* __restrict__ tokens, int rows, int d,
                       uint32_t mask_index) {
    const size_t n = (size_t)rows * d;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const size_t r = imdm_row_of(i, d);
        d_eps_add[i] = __float2bfloat16_rn(tokens[r] == mask_index ? dh[i] : 0.f);
    }
}
