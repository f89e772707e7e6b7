// subs: the SUBS output parameterisation (spec 4.3) as an fp32 log-softmax over the vocabulary.
//
// Maths, per row r (rows = B*L) of the logits x (rows, V) stored with row stride ld >= V
// (columns V..ld-1 are padding: never read, and never written in the output), m = mask_index:
//   masked input (tok[r] == m):
//     lse[r]    = log sum_{j != m} exp(x[r,j])        (max-shifted, fp32; the mask column is
//                                                     excluded, where the reference sets it to
//                                                     -1e6 first: the same to within exp(-1e6))
//     out[r,j]  = x[r,j] - lse[r]  (j != m),   out[r,m] = -1e6 - lse[r]
//   carry-over (tok[r] != m): out[r,:] = -1e6, out[r,tok[r]] = 0, lse[r] = 0.
// Identical to `dit_ref::subs_log_probs`. Deliberate difference from the reference code (which
// runs this on bf16 logits in bf16): the softmax, lse and output are fp32 (docs/reference.md 14.1).
// Shapes and dtypes: x (rows, ld) bf16 (`subs_fwd_bf16`) or f32 (`subs_fwd_f32`); tok (rows)
//   u32; out (rows, ld) f32 with the same stride; lse (rows) f32. mask_index < V, 2 <= V <= ld
//   (checked by the launcher). The forward writes its logits with ld = V rounded up to 64, so
//   the logits GEMM stores 16-byte aligned rows and every row here is vector-aligned.
//   An id tok >= V (corrupt input) gives a NaN row and NaN lse, never an out-of-bounds access.
// Saved for the backward: lse (the softmax is exp(out) at masked rows; carry-over rows get no
//   gradient).
// Thread mapping: one block of SUBS_THREADS per row. The row is split into a scalar head, 16-byte
//   vectors (VEC = 8 bf16 or 4 f32) aligned on flat indices that are multiples of VEC (then the
//   f32 output is 16-byte aligned too), and a scalar tail; rows are 16-byte aligned when ld is
//   a multiple of VEC, and not in general (ld = V = 50258). Pass 1 streams the row once (loads batched SUBS_UNROLL deep) keeping a
//   per-thread online (max, sum exp) in fp32, then a shuffle + shared-memory block merge. Pass 2
//   writes out with streaming (.cs) stores. When the launcher provides dynamic shared memory
//   (cache_row = 1: the row fits, as V = 50258 does for both dtypes on H100) pass 1 also copies
//   the row there, at offset (row start % VEC) so the vectors stay aligned, and pass 2 reads it
//   back, so the logits cross DRAM exactly once; otherwise pass 2 re-reads the row from global
//   memory (mostly L2 hits, last-use loads). Carry-over rows only write.
// Accumulation rule: out and lse are written (=); the backward writes d logits (=).
//
// ---- Fused SUBS + weighted cross-entropy, loss and backward (subs_bwd_{bf16,f32}) -----------
// Maths, per row r (rows = B*L) of the logits x (row stride ld >= V; columns V..ld-1 are padding
// and are ignored), with m = mask_index, t = x0[r] (target), c = w[r] / norm (an f32 division):
//   rows with tok[r] != m (carry-over) or w[r] == 0: loss[r] = 0, d x[r,:] = 0 (SUBS gives the
//     carry-over rows log p = 0 at x0 = xt and no dependence on the logits; the NELBO weight is 0
//     there anyway);
//   masked rows: lse = log sum_{j < V, j != m} exp(x[r,j])       (fp32, max-shifted, online)
//     loss[r]   = c (lse - x[r,t])     (t == m: x[r,t] is the reference's -1e6, a constant)
//     d x[r,j]  = c (exp(x[r,j] - lse) - [j == t])   for j < V, j != m
//     d x[r,m]  = 0;  d x[r,j] = 0 for V <= j < ld (padding).
//   A target t >= V (corrupt input) gives loss NaN and NaN gradients on the real columns.
// So sum_r loss[r] = sum_r w_r (-log p(x0_r | xt_r)) / norm, the MDLM / IMDM NELBO of spec 4.6
// with norm = the number of tokens, and d x is its gradient with respect to the logits.
// Shapes and dtypes: logits (rows, ld) bf16 (subs_bwd_bf16) or f32 (subs_bwd_f32); tok, x0
//   (rows) u32; w (rows) f32; norm f32 > 0; loss (rows) f32 (sum with subs_loss_sum_f32, or on
//   the host). mask_index < V, 2 <= V <= ld (checked by the launcher).
// In place: d logits (bf16, what the backward GEMMs consume) overwrite the logits. Row r of the
//   gradient starts at the same byte as row r of the logits: for bf16 logits the gradient is a
//   dense (rows, ld) bf16 matrix over the same buffer (the dW and dy GEMMs use K = ld as is: the
//   padding columns are 0); for f32 logits it is (rows, ld) bf16 with row stride 2*ld elements
//   (the first half of each f32 row's bytes; the second half keeps stale logits), so its GEMM
//   needs lda = 2*ld. No second copy of the logits ever exists.
// Thread mapping: one block of SUBS_THREADS per row. A unit is 4 consecutive columns (ld % 4 ==
//   0 and a 16-byte aligned buffer: one 8-byte (bf16) or 16-byte (f32) load, one 8-byte store of
//   4 bf16) or 1 column otherwise; padding columns are loaded with the row and excluded. Thread 0
//   first reads x[r,t]. Pass 1 keeps a per-thread online (max, sum exp) over the units, then a
//   shuffle + shared-memory block merge gives lse (as in the forward). Pass 2 walks the units in
//   tiles of SUBS_THREADS: every thread loads its unit of the tile, __syncthreads, then writes its
//   4 gradients. The barrier makes the in-place f32 -> bf16 rewrite safe: the bytes a tile writes
//   (bf16 elements [4 base, 4 (base + nt)) = f32 elements [2 base, 2 (base + nt))) lie below the
//   end of what that tile and the ones before it have read, and the next tile reads only bytes
//   above anything written so far; every pass-1 read precedes the lse barrier. For bf16 logits
//   each unit is read and written by the same thread. When the launcher provides dynamic shared
//   memory for the row (cache_row = 1, vector path only; V = 50258 fits in both dtypes on H100)
//   pass 1 stores each loaded unit there and pass 2 reads it back, so the logits cross DRAM once
//   (one read, one write); otherwise pass 2 re-reads the row from global memory (L2 hits).
//   Carry-over and zero-weight rows only write zeros.
// Saved for the backward: nothing (fused: loss and gradient in one kernel, after the logits
//   GEMM; the sampler and evaluation use subs_fwd_* instead).
// Accumulation rule: loss and d logits are written (=); subs_loss_sum_f32 writes its sum (=).
// subs_loss_sum_f32: one block of 1024 threads; thread t adds loss[t], loss[t + 1024], ... in
//   double; warp butterflies, then thread 0 adds the 32 warp sums in order: deterministic.
#include <float.h>

#include "common.cuh"

#define SUBS_THREADS 1024
#define SUBS_UNROLL 4
#define SUBS_NEG_INF (-1000000.0f)  // the reference's neg_infinity

extern __shared__ uint4 subs_row_cache[];

template <typename T>
struct SubsVec;

template <>
struct SubsVec<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void unpack(const uint4 v, float f[4]) {
        f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
    }
    static __device__ __forceinline__ float one(float v) { return v; }
};

template <>
struct SubsVec<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void unpack(const uint4 v, float f[8]) {
        bf16x8_to_f32(v, f);
    }
    static __device__ __forceinline__ float one(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// Online softmax state (m, s): s = sum exp(x - m) over the values seen. m starts at -FLT_MAX so
// that exp(m - m') is 0 or 1, never NaN; excluded values are -inf and contribute exp(-inf) = 0.
__device__ __forceinline__ void subs_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

__device__ __forceinline__ void subs_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * __expf(m - x) + 1.f;
        m = x;
    } else {
        s += __expf(x - m);
    }
}

template <typename T>
__device__ __forceinline__ void subs_fwd_impl(float* __restrict__ out, float* __restrict__ lse_out,
                                              const T* __restrict__ logits,
                                              const uint32_t* __restrict__ tokens, int vocab,
                                              int ld, uint32_t mask_index, int cache_row) {
    using V = SubsVec<T>;
    constexpr int VEC = V::N;
    const int tid = threadIdx.x, nt = blockDim.x;
    const size_t e0 = (size_t)blockIdx.x * ld;
    const T* __restrict__ x = logits + e0;
    float* __restrict__ o = out + e0;
    const uint32_t tok = tokens[blockIdx.x];
    const int mask = (int)mask_index;

    // Element j is in a vector iff head <= j < tail; then (e0 + j) % VEC == 0.
    const int mis = (int)(e0 % VEC);
    const bool vec_ok = imdm_aligned16(logits) && imdm_aligned16(out);
    const int head = vec_ok ? min(vocab, (VEC - mis) % VEC) : vocab;
    const int nvec = (vocab - head) / VEC;
    const int tail = head + nvec * VEC;
    // Scalar elements: index v < nscalar is column v below head, else tail + (v - head).
    const int nscalar = head + (vocab - tail);

    if (tok != mask_index) {
        const float fill = tok < (uint32_t)vocab ? SUBS_NEG_INF : __int_as_float(0x7fc00000);
        for (int j = tid; j < head; j += nt) o[j] = (uint32_t)j == tok ? 0.f : fill;
        for (int j = tail + tid; j < vocab; j += nt) o[j] = (uint32_t)j == tok ? 0.f : fill;
        for (int k = tid; k < nvec; k += nt) {
            const int j0 = head + k * VEC;
#pragma unroll
            for (int c = 0; c < VEC; c += 4) {
                float4 v = make_float4(fill, fill, fill, fill);
                const uint32_t jc = (uint32_t)(j0 + c);
                if (tok == jc) v.x = 0.f;
                if (tok == jc + 1) v.y = 0.f;
                if (tok == jc + 2) v.z = 0.f;
                if (tok == jc + 3) v.w = 0.f;
                __stcs(reinterpret_cast<float4*>(o + j0 + c), v);
            }
        }
        if (tid == 0) lse_out[blockIdx.x] = fill == SUBS_NEG_INF ? 0.f : fill;
        return;
    }

    // The cached row: element j at cache[mis + j]; the vectors start at uint4 (mis + head) / VEC.
    T* cache = reinterpret_cast<T*>(subs_row_cache);
    const uint4* xv = reinterpret_cast<const uint4*>(x + head);
    uint4* cv = subs_row_cache + (mis + head) / VEC;

    // Pass 1: online max / sum of exp over j != mask.
    float m = -FLT_MAX, s = 0.f;
    for (int v = tid; v < nscalar; v += nt) {
        const int j = v < head ? v : tail + (v - head);
        const T raw = x[j];
        if (cache_row) cache[mis + j] = raw;
        subs_add(m, s, j == mask ? -INFINITY : V::one(raw));
    }
    for (int k0 = tid; k0 < nvec; k0 += SUBS_UNROLL * nt) {
        uint4 raw[SUBS_UNROLL];
#pragma unroll
        for (int u = 0; u < SUBS_UNROLL; ++u) {
            const int k = k0 + u * nt;
            if (k < nvec) raw[u] = xv[k];
        }
#pragma unroll
        for (int u = 0; u < SUBS_UNROLL; ++u) {
            const int k = k0 + u * nt;
            if (k >= nvec) break;
            if (cache_row) cv[k] = raw[u];
            float f[VEC];
            V::unpack(raw[u], f);
            const int j0 = head + k * VEC;
            float vm = -INFINITY;
#pragma unroll
            for (int c = 0; c < VEC; ++c) {
                if (j0 + c == mask) f[c] = -INFINITY;
                vm = fmaxf(vm, f[c]);
            }
            if (vm > m) {
                s *= __expf(m - vm);
                m = vm;
            }
#pragma unroll
            for (int c = 0; c < VEC; ++c) s += __expf(f[c] - m);
        }
    }

    // Block merge: warps by shuffles, then warp 0 over the per-warp states.
    __shared__ float red_m[SUBS_THREADS / IMDM_WARP], red_s[SUBS_THREADS / IMDM_WARP];
    const int lane = tid % IMDM_WARP, warp = tid / IMDM_WARP;
#pragma unroll
    for (int w = IMDM_WARP / 2; w > 0; w >>= 1)
        subs_merge(m, s, __shfl_xor_sync(0xffffffffu, m, w), __shfl_xor_sync(0xffffffffu, s, w));
    if (lane == 0) red_m[warp] = m, red_s[warp] = s;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = nt / IMDM_WARP;
        m = lane < nwarps ? red_m[lane] : -FLT_MAX;
        s = lane < nwarps ? red_s[lane] : 0.f;
#pragma unroll
        for (int w = IMDM_WARP / 2; w > 0; w >>= 1)
            subs_merge(m, s, __shfl_xor_sync(0xffffffffu, m, w),
                       __shfl_xor_sync(0xffffffffu, s, w));
        if (lane == 0) {
            red_m[0] = m + logf(s);
            lse_out[blockIdx.x] = red_m[0];
        }
    }
    __syncthreads();  // also publishes the cached row
    const float lse = red_m[0];

    // Pass 2: out = x - lse (mask column: -1e6 - lse).
    for (int v = tid; v < nscalar; v += nt) {
        const int j = v < head ? v : tail + (v - head);
        const float xj = V::one(cache_row ? cache[mis + j] : x[j]);
        o[j] = (j == mask ? SUBS_NEG_INF : xj) - lse;
    }
    for (int k0 = tid; k0 < nvec; k0 += SUBS_UNROLL * nt) {
        uint4 raw[SUBS_UNROLL];
#pragma unroll
        for (int u = 0; u < SUBS_UNROLL; ++u) {
            const int k = k0 + u * nt;
            if (k < nvec) raw[u] = cache_row ? cv[k] : __ldlu(xv + k);
        }
#pragma unroll
        for (int u = 0; u < SUBS_UNROLL; ++u) {
            const int k = k0 + u * nt;
            if (k >= nvec) break;
            float f[VEC];
            V::unpack(raw[u], f);
            const int j0 = head + k * VEC;
#pragma unroll
            for (int c = 0; c < VEC; ++c) f[c] = (j0 + c == mask ? SUBS_NEG_INF : f[c]) - lse;
#pragma unroll
            for (int c = 0; c < VEC; c += 4)
                __stcs(reinterpret_cast<float4*>(o + j0 + c),
                       make_float4(f[c], f[c + 1], f[c + 2], f[c + 3]));
        }
    }
}

extern "C" __global__ void __launch_bounds__(SUBS_THREADS, 1)
subs_fwd_bf16(float* __restrict__ out, float* __restrict__ lse_out,
              const __nv_bfloat16* __restrict__ logits, const uint32_t* __restrict__ tokens,
              int vocab, int ld, uint32_t mask_index, int cache_row) {
    subs_fwd_impl<__nv_bfloat16>(out, lse_out, logits, tokens, vocab, ld, mask_index, cache_row);
}

extern "C" __global__ void __launch_bounds__(SUBS_THREADS, 1)
subs_fwd_f32(float* __restrict__ out, float* __restrict__ lse_out,
             const float* __restrict__ logits, const uint32_t* __restrict__ tokens, int vocab,
             int ld, uint32_t mask_index, int cache_row) {
    subs_fwd_impl<float>(out, lse_out, logits, tokens, vocab, ld, mask_index, cache_row);
}

// ---- fused loss + backward ---------------------------------------------------------------------

template <typename T>
struct XentIo;

template <>
struct XentIo<float> {
    using U = float4;  // one unit: 4 f32, 16 bytes
    static __device__ __forceinline__ void unpack(const float4 v, float f[4]) {
        f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
    }
    static __device__ __forceinline__ float one(float v) { return v; }
};

template <>
struct XentIo<__nv_bfloat16> {
    using U = uint2;  // one unit: 4 bf16, 8 bytes
    static __device__ __forceinline__ void unpack(const uint2 v, float f[4]) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
        f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
    }
    static __device__ __forceinline__ float one(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// Block-wide merge of the per-thread online softmax states; every thread gets lse = m + log s.
// Must be called by all threads (synchronises twice).
__device__ __forceinline__ float subs_block_lse(float m, float s, float* red_m, float* red_s) {
    const int tid = threadIdx.x, lane = tid % IMDM_WARP, warp = tid / IMDM_WARP;
#pragma unroll
    for (int w = IMDM_WARP / 2; w > 0; w >>= 1)
        subs_merge(m, s, __shfl_xor_sync(0xffffffffu, m, w), __shfl_xor_sync(0xffffffffu, s, w));
    if (lane == 0) red_m[warp] = m, red_s[warp] = s;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x / IMDM_WARP;
        m = lane < nwarps ? red_m[lane] : -FLT_MAX;
        s = lane < nwarps ? red_s[lane] : 0.f;
#pragma unroll
        for (int w = IMDM_WARP / 2; w > 0; w >>= 1)
            subs_merge(m, s, __shfl_xor_sync(0xffffffffu, m, w),
                       __shfl_xor_sync(0xffffffffu, s, w));
        if (lane == 0) red_m[0] = m + logf(s);
    }
    __syncthreads();
    return red_m[0];
}

// The gradient of one real column j (value v) given the row's lse, scale c and target t.
__device__ __forceinline__ float xent_grad(int j, float v, float lse, float c, uint32_t t,
                                           int vocab, uint32_t mask_index) {
    if (j >= vocab || (uint32_t)j == mask_index) return 0.f;
    return c * (__expf(v - lse) - ((uint32_t)j == t ? 1.f : 0.f));
}

template <typename T>
__device__ __forceinline__ void subs_bwd_impl(T* __restrict__ logits, float* __restrict__ loss,
                                              const uint32_t* __restrict__ tokens,
                                              const uint32_t* __restrict__ targets,
                                              const float* __restrict__ weight, int vocab, int ld,
                                              uint32_t mask_index, float norm, int cache_row) {
    using IO = XentIo<T>;
    using U = typename IO::U;
    const int tid = threadIdx.x, nt = blockDim.x;
    const size_t row = blockIdx.x;
    T* x = logits + row * ld;
    // The row's gradient starts at the row's first byte (see the header).
    __nv_bfloat16* g = reinterpret_cast<__nv_bfloat16*>(x);
    const bool vec = ld % 4 == 0 && imdm_aligned16(logits);
    const int nunits = vec ? ld / 4 : ld;
    const uint32_t tok = tokens[row];
    const float w = weight[row];

    if (tok != mask_index || w == 0.f) {
        if (vec) {
            for (int u = tid; u < nunits; u += nt)
                reinterpret_cast<uint2*>(g)[u] = make_uint2(0u, 0u);
        } else {
            for (int j = tid; j < ld; j += nt) g[j] = __float2bfloat16_rn(0.f);
        }
        if (tid == 0) loss[row] = 0.f;
        return;
    }

    __shared__ float red_m[SUBS_THREADS / IMDM_WARP], red_s[SUBS_THREADS / IMDM_WARP];
    __shared__ float s_xt;
    const uint32_t t = targets[row];
    const float nan = __int_as_float(0x7fc00000);
    const float c = t < (uint32_t)vocab ? w / norm : nan;
    // Read before any write of this row (the first write follows the barriers in subs_block_lse).
    if (tid == 0) s_xt = t == mask_index ? SUBS_NEG_INF : (t < (uint32_t)vocab ? IO::one(x[t]) : nan);

    U* cache = reinterpret_cast<U*>(subs_row_cache);
    const bool use_cache = vec && cache_row;

    // Pass 1: online max / sum of exp over the real, non-mask columns.
    float m = -FLT_MAX, s = 0.f;
    if (vec) {
        const U* xv = reinterpret_cast<const U*>(x);
        for (int u = tid; u < nunits; u += nt) {
            const U raw = xv[u];
            if (use_cache) cache[u] = raw;
            float f[4];
            IO::unpack(raw, f);
            float vm = -INFINITY;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int j = 4 * u + k;
                if (j >= vocab || (uint32_t)j == mask_index) f[k] = -INFINITY;
                vm = fmaxf(vm, f[k]);
            }
            if (vm > m) {
                s *= __expf(m - vm);
                m = vm;
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) s += __expf(f[k] - m);
        }
    } else {
        for (int j = tid; j < vocab; j += nt)
            subs_add(m, s, (uint32_t)j == mask_index ? -INFINITY : IO::one(x[j]));
    }
    const float lse = subs_block_lse(m, s, red_m, red_s);
    if (tid == 0) loss[row] = c * (lse - s_xt);

    // Pass 2: gradients, tile by tile (read the tile, barrier, write the tile).
    for (int base = 0; base < nunits; base += nt) {
        const int u = base + tid;
        const bool have = u < nunits;
        float f[4] = {0.f, 0.f, 0.f, 0.f};
        if (have) {
            if (vec) {
                const U raw = use_cache ? cache[u] : reinterpret_cast<const U*>(x)[u];
                IO::unpack(raw, f);
            } else {
                f[0] = IO::one(x[u]);
            }
        }
        __syncthreads();
        if (have) {
            if (vec) {
                float gr[4];
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    gr[k] = xent_grad(4 * u + k, f[k], lse, c, t, vocab, mask_index);
                uint2 o;
                *reinterpret_cast<__nv_bfloat162*>(&o.x) = __floats2bfloat162_rn(gr[0], gr[1]);
                *reinterpret_cast<__nv_bfloat162*>(&o.y) = __floats2bfloat162_rn(gr[2], gr[3]);
                reinterpret_cast<uint2*>(g)[u] = o;
            } else {
                g[u] = __float2bfloat16_rn(xent_grad(u, f[0], lse, c, t, vocab, mask_index));
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(SUBS_THREADS, 1)
subs_bwd_bf16(__nv_bfloat16* __restrict__ logits, float* __restrict__ loss,
              const uint32_t* __restrict__ tokens, const uint32_t* __restrict__ targets,
              const float* __restrict__ weight, int vocab, int ld, uint32_t mask_index,
              float norm, int cache_row) {
    subs_bwd_impl<__nv_bfloat16>(logits, loss, tokens, targets, weight, vocab, ld, mask_index,
                                 norm, cache_row);
}

extern "C" __global__ void __launch_bounds__(SUBS_THREADS, 1)
subs_bwd_f32(float* __restrict__ logits, float* __restrict__ loss,
             const uint32_t* __restrict__ tokens, const uint32_t* __restrict__ targets,
             const float* __restrict__ weight, int vocab, int ld, uint32_t mask_index, float norm,
             int cache_row) {
    subs_bwd_impl<float>(logits, loss, tokens, targets, weight, vocab, ld, mask_index, norm,
                         cache_row);
}

#define SUBS_SUM_THREADS 1024

extern "C" __global__ void __launch_bounds__(SUBS_SUM_THREADS)
subs_loss_sum_f32(float* __restrict__ out, const float* __restrict__ loss, int rows) {
    __shared__ double red[SUBS_SUM_THREADS / IMDM_WARP];
    const int tid = threadIdx.x, lane = tid % IMDM_WARP, warp = tid / IMDM_WARP;
    double s = 0.0;
    for (int r = tid; r < rows; r += blockDim.x) s += (double)loss[r];
#pragma unroll
    for (int o = IMDM_WARP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (tid == 0) {
        double t = 0.0;
        for (int k = 0; k < (int)(blockDim.x / IMDM_WARP); ++k) t += red[k];
        out[0] = (float)t;
    }
}
