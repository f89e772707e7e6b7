// subs: the SUBS output parameterisation (spec 4.3) as an fp32 log-softmax over the vocabulary.
//
// Maths, per row r (rows = B*L) of the logits x (rows, V), with m = mask_index:
//   masked input (tok[r] == m):
//     lse[r]    = log sum_{j != m} exp(x[r,j])        (max-shifted, fp32; the mask column is
//                                                     excluded, where the reference sets it to
//                                                     -1e6 first: the same to within exp(-1e6))
//     out[r,j]  = x[r,j] - lse[r]  (j != m),   out[r,m] = -1e6 - lse[r]
//   carry-over (tok[r] != m): out[r,:] = -1e6, out[r,tok[r]] = 0, lse[r] = 0.
// Identical to `dit_ref::subs_log_probs`. Deliberate difference from the reference code (which
// runs this on bf16 logits in bf16): the softmax, lse and output are fp32 (architecture.md 6).
// Shapes and dtypes: x (rows, V) bf16 (`subs_fwd_bf16`) or f32 (`subs_fwd_f32`); tok (rows)
//   u32; out (rows, V) f32; lse (rows) f32. mask_index < V, V >= 2 (checked by the launcher).
//   An id tok >= V (corrupt input) gives a NaN row and NaN lse, never an out-of-bounds access.
// Saved for the backward: lse (the softmax is exp(out) at masked rows; carry-over rows get no
//   gradient).
// Thread mapping: one block of SUBS_THREADS per row. The row is split into a scalar head, 16-byte
//   vectors (VEC = 8 bf16 or 4 f32) aligned on flat indices that are multiples of VEC (then the
//   f32 output is 16-byte aligned too), and a scalar tail; rows are not 16-byte aligned in
//   general (V = 50258). Pass 1 streams the row once (loads batched SUBS_UNROLL deep) keeping a
//   per-thread online (max, sum exp) in fp32, then a shuffle + shared-memory block merge. Pass 2
//   writes out with streaming (.cs) stores. When the launcher provides dynamic shared memory
//   (cache_row = 1: the row fits, as V = 50258 does for both dtypes on H100) pass 1 also copies
//   the row there, at offset (row start % VEC) so the vectors stay aligned, and pass 2 reads it
//   back, so the logits cross DRAM exactly once; otherwise pass 2 re-reads the row from global
//   memory (mostly L2 hits, last-use loads). Carry-over rows only write.
// Accumulation rule: out and lse are written (=); the backward writes d logits (=).
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
                                              uint32_t mask_index, int cache_row) {
    using V = SubsVec<T>;
    constexpr int VEC = V::N;
    const int tid = threadIdx.x, nt = blockDim.x;
    const size_t e0 = (size_t)blockIdx.x * vocab;
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
              int vocab, uint32_t mask_index, int cache_row) {
    subs_fwd_impl<__nv_bfloat16>(out, lse_out, logits, tokens, vocab, mask_index, cache_row);
}

extern "C" __global__ void __launch_bounds__(SUBS_THREADS, 1)
subs_fwd_f32(float* __restrict__ out, float* __restrict__ lse_out,
             const float* __restrict__ logits, const uint32_t* __restrict__ tokens, int vocab,
             uint32_t mask_index, int cache_row) {
    subs_fwd_impl<float>(out, lse_out, logits, tokens, vocab, mask_index, cache_row);
}
