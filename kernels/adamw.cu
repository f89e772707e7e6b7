// adamw: the optimizer step of GPU training, as three multi-tensor kernels (one launch each
// covers every parameter tensor, like torch's fused AdamW / multi_tensor_apply): the AdamW update
// writing the bf16/f32 working copies, the per-tensor gradient sum of squares for the global-norm
// clip, and the EMA of the weights (spec 9).
//
// Layout: each kernel receives a device table of per-tensor descriptors (raw device pointers and
// the element count n, built once by the host from buffers that live as long as the table) and a
// table of chunks: chunk c covers elements [start, min(start + MT_CHUNK, n)) of tensor
// chunks[c].tensor. One block per chunk, so a block never straddles two tensors. The host builds
// the chunk table (`ops::adamw::plan_chunks`); frozen tensors are simply not in the AdamW/norm
// tables.
//
// ---- adamw_f32 --------------------------------------------------------------------------------
// Maths, per element, torch.optim.AdamW on f32 parameters with `clip_grad_norm_` folded in, each
// operation rounded to f32 with the _rn intrinsics (no FMA contraction), exactly the operation
// sequence of `train::optim::adamw_elements` (its CPU twin, which `AdamW::step` also runs), so the
// result is bit-identical to the CPU optimizer on the same inputs:
//   g = use_clip ? g * clip_coef : g
//   p = use_decay ? p * decay : p                       decay = 1 - lr wd
//   m = m + omb1 (g - m)                                 omb1 = 1 - beta1 (torch's lerp_)
//   v = v beta2 + (omb2 g) g                             omb2 = 1 - beta2
//   p = p + (neg_step_size m) / (sqrt(v) / bc2_sqrt + eps)
//   with neg_step_size = -lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t) (host, f64 -> f32).
//   w16 = bf16_rn(p) and w32 = p when those working copies exist (null otherwise).
//   bad[tensor] |= 1 when the new p is NaN or +-Inf (the host names the tensor).
// Shapes and dtypes: p, g, m, v (n) f32; w16 (n) bf16 or null; w32 (n) f32 or null; bad (tensors)
//   int32. Accumulation rule: p, m, v, w16, w32 are written (=) in place; bad is or-ed (|=).
//
// ---- adamw_sumsq_f32 ---------------------------------------------------------------------------
// Maths: partial[c] = sum over the chunk's elements of (double)g^2 (each product exact in double);
//   the host adds the partials of each tensor in chunk order (deterministic) and takes
//   sqrt(sum over tensors) = torch's norm of the per-tensor norms up to the summation order.
//   A NaN/Inf gradient makes its tensor's sum non-finite, which is how the host finds and names
//   the first bad gradient. Shapes: g (n) f32 via the AdamW descriptors; partial (chunks) f64.
//   Thread mapping: thread t sums elements start + t, start + t + 256, ...; then a fixed-order
//   shared-memory tree. Accumulation rule: partial is written (=).
//
// ---- ema_f32 ------------------------------------------------------------------------------------
// Maths: s = copy ? p : s - omd (s - p), omd = 1 - decay_n (host), rounded as in
//   `train::ema::ema_elements`. Shapes: s, p (n) f32. Accumulation rule: s written (=) in place.
//
// Thread mapping (all three): grid = number of chunks, MT_THREADS threads; thread t handles
//   elements start + t + k MT_THREADS (coalesced). Memory-bound: AdamW moves 26-34 bytes per
//   parameter (read p, g, m, v; write p, m, v and the working copy).
#include "common.cuh"

#define MT_THREADS 256
#define MT_CHUNK 65536  // elements per chunk; must equal ops::adamw::CHUNK

struct AdamwTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    __nv_bfloat16* w16;  // nullable
    float* w32;          // nullable
    long long n;
};
static_assert(sizeof(AdamwTensor) == 56, "AdamwTensor must match ops::adamw::AdamwTensor");

struct EmaTensor {
    float* s;
    const float* p;
    long long n;
};
static_assert(sizeof(EmaTensor) == 24, "EmaTensor must match ops::adamw::EmaTensor");

struct MtChunk {
    int tensor;
    int pad;
    long long start;
};
static_assert(sizeof(MtChunk) == 16, "MtChunk must match ops::adamw::MtChunk");

struct AdamwParams {
    float neg_step_size;
    float bc2_sqrt;
    float decay;
    float omb1;
    float beta2;
    float omb2;
    float eps;
    float clip_coef;
    int use_decay;
    int use_clip;
};
static_assert(sizeof(AdamwParams) == 40, "AdamwParams must match ops::adamw::AdamwParams");

extern "C" __global__ void __launch_bounds__(MT_THREADS)
adamw_f32(int* __restrict__ bad, const AdamwTensor* __restrict__ tensors,
          const MtChunk* __restrict__ chunks, int n_chunks, AdamwParams k) {
    if ((int)blockIdx.x >= n_chunks) return;
    const MtChunk c = chunks[blockIdx.x];
    const AdamwTensor t = tensors[c.tensor];
    const long long end = c.start + MT_CHUNK < t.n ? c.start + MT_CHUNK : t.n;
    bool ok = true;
    for (long long i = c.start + threadIdx.x; i < end; i += MT_THREADS) {
        float g = t.g[i];
        if (k.use_clip) g = __fmul_rn(g, k.clip_coef);
        float p = t.p[i];
        if (k.use_decay) p = __fmul_rn(p, k.decay);
        float m = t.m[i];
        m = __fadd_rn(m, __fmul_rn(k.omb1, __fsub_rn(g, m)));
        float v = t.v[i];
        v = __fadd_rn(__fmul_rn(v, k.beta2), __fmul_rn(__fmul_rn(k.omb2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps);
        p = __fadd_rn(p, __fdiv_rn(__fmul_rn(k.neg_step_size, m), denom));
        t.p[i] = p;
        t.m[i] = m;
        t.v[i] = v;
        if (t.w16 != nullptr) t.w16[i] = __float2bfloat16_rn(p);
        if (t.w32 != nullptr) t.w32[i] = p;
        ok = ok && isfinite(p);
    }
    if (!ok) atomicOr(bad + c.tensor, 1);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
adamw_sumsq_f32(double* __restrict__ partial, const AdamwTensor* __restrict__ tensors,
                const MtChunk* __restrict__ chunks, int n_chunks) {
    __shared__ double red[MT_THREADS];
    if ((int)blockIdx.x >= n_chunks) return;
    const MtChunk c = chunks[blockIdx.x];
    const AdamwTensor t = tensors[c.tensor];
    const long long end = c.start + MT_CHUNK < t.n ? c.start + MT_CHUNK : t.n;
    double s = 0.0;
    for (long long i = c.start + threadIdx.x; i < end; i += MT_THREADS) {
        const double g = (double)t.g[i];
        s += g * g;
    }
    red[threadIdx.x] = s;
    __syncthreads();
    for (int o = MT_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
ema_f32(const EmaTensor* __restrict__ tensors, const MtChunk* __restrict__ chunks, int n_chunks,
        float omd, int copy) {
    if ((int)blockIdx.x >= n_chunks) return;
    const MtChunk c = chunks[blockIdx.x];
    const EmaTensor t = tensors[c.tensor];
    const long long end = c.start + MT_CHUNK < t.n ? c.start + MT_CHUNK : t.n;
    for (long long i = c.start + threadIdx.x; i < end; i += MT_THREADS) {
        const float p = t.p[i];
        const float s = t.s[i];
        t.s[i] = copy ? p : __fsub_rn(s, __fmul_rn(omd, __fsub_rn(s, p)));
    }
}
