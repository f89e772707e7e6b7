// sample: one fused sampler step (spec 5.1-5.5) over the masked positions of a batch: posterior
// weights, the float64 exponential race, the new token / stay / reset outcome, and the fresh eps
// of a reset, in one launch. Nothing of size (B, L, V+1) is ever materialised.
//
// Maths, per flat position pos = b*L + l with x[pos] == mask_index (all other positions are left
// untouched), with p_c = exp((double) log_p[pos, c]) from the f32 SUBS log-probs, the step's
// (alpha_t, alpha_s) of row b and r = alpha_t / alpha_s (all f64):
//   IMDM (kind 0), V+1 categories, the last one "reset":
//     w[c] = ((c == mask ? r - alpha_t : 0) + (alpha_s - alpha_t) p_c) / (1 - alpha_t),  c < V
//     w[V] = (1 - r)(1 - alpha_s) / (1 - alpha_t)
//   MDLM (kind 1), V categories: w[mask] = 1 - alpha_s, w[c] = p_c (alpha_s - alpha_t).
//   Temperature T != 1: w <- pow(w, 1/T) (nucleus is not done here: the driver falls back to
//   the CPU posterior when it is on).
//   The race (spec 5.5): U_c from Philox (below), E_c = 1e-10 - ln(U_c + 1e-10),
//   c* = argmax_c w[c] / E_c, ties to the first index (a NaN score never wins).
//   Greedy noise removal (greedy = 1): c* = argmax_c log_p[pos, c] (f32, ties to the first).
// This is `diffusion::posterior::sample_masked` operation for operation: every f64 operation is
// an explicit __d*_rn intrinsic so nvcc cannot contract a multiply-add into an FMA that the CPU
// does not do. The only possible differences are the last ulp of exp / log / pow (CUDA's are
// within 1-2 ulp, as are glibc's), which can flip a draw only when the two best scores agree to
// about 1e-16 relative: an expected ~1e-16 flips per position.
// Random numbers: bit-identical to `diffusion::stream::SamplerStream` (Philox4x32-10 keyed by the
// sampler seed, key = (seed lo, seed hi)):
//   race pair k (categories 2k, 2k+1): ctr = (k, pos, step, 0); U = ((hi << 32 | lo) >> 11) 2^-53
//     with (hi, lo) = (w0, w1) for 2k and (w2, w3) for 2k+1;
//   reset eps, dim d: ctr = (d/4, pos, eps_step, 1) (rand: u = (w[d%4] >> 8) 2^-24,
//     eps = (2u - 1) scale) or ctr = (d/2, pos, eps_step, 1) (randn: Box-Muller with
//     u1 = ((w0 >> 8) + 1) 2^-24, u2 = (w1 >> 8) 2^-24, cos for even d, sin for odd d), in f64,
//     rounded to f32 and then to bf16 (round to nearest even), which is what
//     `Workspace::load_inputs` does to the CPU driver's f32 eps.
// Outcome of a masked position, written to cat[pos] (UINT32_MAX at unmasked positions):
//   c* = token (c* < V, c* != mask): x[pos] = c*, counters[0] += 1;
//   c* = mask: stay masked, same eps;
//   c* = V (IMDM only): reset: counters[1] += 1 and, when write_eps, eps[pos, :] gets the fresh
//     eps of step eps_step (the CPU driver redraws a reset position's eps just before the next
//     forward, which always runs at the next step because a reset drops the cache). The driver
//     sets write_eps = 0 under fix_eps and at the last step.
// Shapes and dtypes: x (rows) u32, read and written; cat (rows) u32; eps (rows, noise_dim) bf16
//   or null; counters (2) u32, accumulated (+=): [unmasks, resets]; log_p (rows, ld) f32 with
//   ld >= V (columns V.. are padding, never read); alphas (B, 2) f64 = (alpha_t, alpha_s) per
//   batch row; rows = B*L. The launcher checks every length, V >= 2, mask < V, ld >= V,
//   rows % len == 0. An id x[pos] >= V is treated as unmasked (never read).
// Thread mapping: one block of SAMPLE_THREADS per position (grid = rows); an unmasked position
//   writes cat and returns at once. Thread t handles category pairs k = t, t + T, ... in
//   increasing order (one Philox call per pair), keeping the first best (score, index); then a
//   shuffle + shared-memory reduction picks the larger score, ties to the smaller index.
// Saved for a backward: nothing (sampling has none).
// Accumulation rule: x, cat, eps are written (=) at masked positions only; counters (+=).
#include <float.h>

#include "common.cuh"

#define SAMPLE_THREADS 256
#define SAMPLE_NONE 0xffffffffu

// Mirrored by `ops::sample::SampleParams` (#[repr(C)], 72 bytes, asserted on both sides).
struct SampleParams {
    uint32_t rows;         // B*L
    uint32_t len;          // L: batch row of pos is pos / len
    uint32_t vocab;        // V
    uint32_t mask_index;   // < V
    uint32_t step;         // sampler step i: counter word 2 of the race
    uint32_t eps_step;     // step whose forward sees a reset's fresh eps (i + 1)
    uint32_t key_lo;       // Philox key = sampler seed
    uint32_t key_hi;
    uint32_t kind;         // 0: IMDM posterior (V+1 categories), 1: MDLM (V categories)
    uint32_t greedy;       // 1: argmax of log_p (greedy noise removal)
    uint32_t write_eps;    // 1: a reset writes fresh eps (needs eps != null)
    uint32_t noise_dim;    // columns of eps
    uint32_t noise_type;   // 0: rand, 1: randn
    float noise_scale;
    uint32_t ld;           // row stride of log_p, >= V (the forward pads rows to 64)
    uint32_t pad_;         // keeps temperature 8-byte aligned at the same offset on both sides
    double temperature;    // > 0; 1 exactly skips the power
};
static_assert(sizeof(SampleParams) == 72, "SampleParams layout must match ops::sample");

// U[0, 1) with 53 bits from two Philox words.
__device__ __forceinline__ double sample_u53(uint32_t hi, uint32_t lo) {
    const unsigned long long b = (((unsigned long long)hi << 32) | lo) >> 11;
    return __dmul_rn((double)b, 1.1102230246251565e-16);  // 2^-53, exact
}

// category_weight of diffusion::posterior, then temper.
__device__ __forceinline__ double sample_weight(const SampleParams& p, uint32_t c, double p_c,
                                                double at, double as, double r) {
    double w;
    if (p.kind == 0) {
        if (c == p.vocab) {
            w = __ddiv_rn(__dmul_rn(__dsub_rn(1.0, r), __dsub_rn(1.0, as)), __dsub_rn(1.0, at));
        } else {
            const double onehot = c == p.mask_index ? __dsub_rn(r, at) : 0.0;
            w = __ddiv_rn(__dadd_rn(onehot, __dmul_rn(__dsub_rn(as, at), p_c)),
                          __dsub_rn(1.0, at));
        }
    } else {
        w = c == p.mask_index ? __dsub_rn(1.0, as) : __dmul_rn(p_c, __dsub_rn(as, at));
    }
    if (p.temperature != 1.0) w = pow(w, __ddiv_rn(1.0, p.temperature));
    return w;
}

// Race score of category c with uniform u: w / (1e-10 - ln(u + 1e-10)).
__device__ __forceinline__ double sample_score(double w, double u) {
    return __ddiv_rn(w, __dsub_rn(1e-10, log(__dadd_rn(u, 1e-10))));
}

// Keeps (s, i) if it beats (best_s, best_i): larger score, ties to the smaller index.
__device__ __forceinline__ void sample_merge(double& best_s, uint32_t& best_i, double s,
                                             uint32_t i) {
    if (s > best_s || (s == best_s && i < best_i)) {
        best_s = s;
        best_i = i;
    }
}

// One reset eps component (SamplerStream::reset_eps), rounded to bf16.
__device__ __forceinline__ __nv_bfloat16 sample_reset_eps(const SampleParams& p, uint32_t pos,
                                                          uint32_t d) {
    const uint2 key = make_uint2(p.key_lo, p.key_hi);
    double z;
    if (p.noise_type == 0) {
        const uint4 w = philox4x32_10(make_uint4(d / 4, pos, p.eps_step, 1u), key);
        const uint32_t wd = (d % 4 == 0) ? w.x : (d % 4 == 1) ? w.y : (d % 4 == 2) ? w.z : w.w;
        const double u = __dmul_rn((double)(wd >> 8), 5.9604644775390625e-08);  // 2^-24
        z = __dmul_rn(__dsub_rn(__dmul_rn(2.0, u), 1.0), (double)p.noise_scale);
    } else {
        const uint4 w = philox4x32_10(make_uint4(d / 2, pos, p.eps_step, 1u), key);
        const double u1 = __dmul_rn(__dadd_rn((double)(w.x >> 8), 1.0), 5.9604644775390625e-08);
        const double u2 = __dmul_rn((double)(w.y >> 8), 5.9604644775390625e-08);
        const double r = __dsqrt_rn(__dmul_rn(-2.0, log(u1)));
        const double a = __dmul_rn(2.0 * 3.141592653589793, u2);  // (2 pi) u2, as in Rust
        z = __dmul_rn(__dmul_rn(r, d % 2 == 0 ? cos(a) : sin(a)), (double)p.noise_scale);
    }
    return __float2bfloat16_rn(__double2float_rn(z));
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_fwd_f32(uint32_t* __restrict__ x, uint32_t* __restrict__ cat,
               __nv_bfloat16* __restrict__ eps, uint32_t* __restrict__ counters,
               const float* __restrict__ log_p, const double* __restrict__ alphas,
               const SampleParams p) {
    const uint32_t pos = blockIdx.x;
    if (pos >= p.rows) return;
    const uint32_t tok = x[pos];
    if (tok != p.mask_index) {
        if (threadIdx.x == 0) cat[pos] = SAMPLE_NONE;
        return;
    }
    const float* __restrict__ row = log_p + (size_t)pos * p.ld;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid % IMDM_WARP, warp = tid / IMDM_WARP;
    double best_s = -INFINITY;
    uint32_t best_i = SAMPLE_NONE;

    if (p.greedy) {
        // First index of the largest f32 log-prob (scores compared as f32 values widened).
        for (uint32_t c = tid; c < p.vocab; c += nt) {
            const double s = (double)row[c];
            if (s > best_s) best_s = s, best_i = c;
        }
    } else {
        const uint32_t b = pos / p.len;
        const double at = alphas[2 * b], as = alphas[2 * b + 1];
        const double r = __ddiv_rn(at, as);
        const uint32_t ncat = p.kind == 0 ? p.vocab + 1 : p.vocab;
        const uint32_t npairs = (ncat + 1) / 2;
        const uint2 key = make_uint2(p.key_lo, p.key_hi);
        for (uint32_t k = tid; k < npairs; k += nt) {
            const uint4 w = philox4x32_10(make_uint4(k, pos, p.step, 0u), key);
            const double u[2] = {sample_u53(w.x, w.y), sample_u53(w.z, w.w)};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t c = 2 * k + h;
                if (c >= ncat) break;
                const double p_c = c < p.vocab ? exp((double)row[c]) : 0.0;
                const double s = sample_score(sample_weight(p, c, p_c, at, as, r), u[h]);
                if (s > best_s) best_s = s, best_i = c;
            }
        }
    }

    // Block argmax: warps by shuffles, then warp 0 over the per-warp winners.
    __shared__ double red_s[SAMPLE_THREADS / IMDM_WARP];
    __shared__ uint32_t red_i[SAMPLE_THREADS / IMDM_WARP];
#pragma unroll
    for (int o = IMDM_WARP / 2; o > 0; o >>= 1) {
        const double s2 = __shfl_xor_sync(0xffffffffu, best_s, o);
        const uint32_t i2 = __shfl_xor_sync(0xffffffffu, best_i, o);
        sample_merge(best_s, best_i, s2, i2);
    }
    if (lane == 0) red_s[warp] = best_s, red_i[warp] = best_i;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = nt / IMDM_WARP;
        best_s = lane < nwarps ? red_s[lane] : -INFINITY;
        best_i = lane < nwarps ? red_i[lane] : SAMPLE_NONE;
#pragma unroll
        for (int o = IMDM_WARP / 2; o > 0; o >>= 1) {
            const double s2 = __shfl_xor_sync(0xffffffffu, best_s, o);
            const uint32_t i2 = __shfl_xor_sync(0xffffffffu, best_i, o);
            sample_merge(best_s, best_i, s2, i2);
        }
        // Nothing above -inf (impossible for a SUBS row): the CPU race returns category 0.
        if (lane == 0) red_i[0] = best_i == SAMPLE_NONE ? 0u : best_i;
    }
    __syncthreads();
    const uint32_t c = red_i[0];

    if (tid == 0) {
        cat[pos] = c;
        if (c == p.vocab) {
            atomicAdd(&counters[1], 1u);
        } else if (c != p.mask_index) {
            x[pos] = c;
            atomicAdd(&counters[0], 1u);
        }
    }
    if (c == p.vocab && p.write_eps && eps != nullptr) {
        __nv_bfloat16* __restrict__ e = eps + (size_t)pos * p.noise_dim;
        for (uint32_t d = tid; d < p.noise_dim; d += nt) e[d] = sample_reset_eps(p, pos, d);
    }
}
