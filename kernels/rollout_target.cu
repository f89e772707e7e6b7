// rollout_target: the target rule of the SDTT teacher rollout (spec 6.1 step 2), applied on the
// device after each teacher step k of K, right after that step's fused sampler launch
// (kernels/sample.cu with write_eps = 0, fix_eps).
//
// Maths, per flat position pos = b*L + l, with cat[pos] the outcome the sampler step just wrote
// (a token < V other than mask_index: unmasked now; mask_index: stayed; V: reset, which under
// fix_eps is a stay; SAMPLE_NONE = UINT32_MAX: already unmasked before this step):
//   unmasked = cat[pos] < V && cat[pos] != mask_index
//   at[pos]  = step                        if unmasked
//            = ROLLOUT_NONE                if step == 0 and not unmasked (step 0 initialises)
//            = at[pos] (unchanged)         otherwise
//   target[pos, 0..V) = log_p[pos, 0..V)   if unmasked,
//                                          or if last and at[pos] == ROLLOUT_NONE afterwards
// So a position takes the log-probs of the step that unmasked it, and after the last step every
// position no step unmasked (still masked, or clean in x_t) takes the last step's. This is
// `distill::rollout::teacher_rollout`'s rule with `unmasked_at` = at (ROLLOUT_NONE for None).
// Each row of the target is written exactly once over the K launches; a plain copy, bit exact.
// Shapes and dtypes: target (rows, ldt) f32, written; at (rows) u32, read and written; cat (rows)
//   u32; log_p (rows, ld) f32 (the forward's SUBS log-probs); ld, ldt >= V; columns V.. of both
//   are never read or written. The launcher checks every length.
// Thread mapping: one block of ROLLOUT_THREADS per position (grid = rows). Thread 0 reads cat
//   and at, writes at and publishes the copy decision through shared memory (one barrier); a
//   block with nothing to copy then returns. The copy moves 16-byte float4 units (the V / 4
//   units holding 4 real columns) when ld % 4 == 0, ldt % 4 == 0 and both buffers are 16-byte
//   aligned, then the last V % 4 columns one by one; otherwise every column one by one. Thread t
//   handles units (columns) t, t + T, ...
// Saved for a backward: nothing (the target is a constant of the student's loss).
// Accumulation rule: target and at are written (=), never accumulated.
#include "common.cuh"

#define ROLLOUT_THREADS 256
#define ROLLOUT_NONE 0xffffffffu

// Mirrored by `ops::rollout_target::RolloutTargetParams` (#[repr(C)], 32 bytes, asserted on both
// sides).
struct RolloutTargetParams {
    uint32_t rows;        // B*L
    uint32_t vocab;       // V
    uint32_t mask_index;  // < V
    uint32_t ld;          // row stride of log_p, >= V
    uint32_t ldt;         // row stride of target, >= V
    uint32_t step;        // teacher step k (0-based); 0 initialises at
    uint32_t last;        // 1 at step K - 1: positions no step unmasked take this step's row
    uint32_t pad_;        // 0
};
static_assert(sizeof(RolloutTargetParams) == 32, "RolloutTargetParams layout must match ops::rollout_target");

extern "C" __global__ void __launch_bounds__(ROLLOUT_THREADS)
rollout_target_f32(float* __restrict__ target, uint32_t* __restrict__ at,
                   const uint32_t* __restrict__ cat, const float* __restrict__ log_p,
                   const RolloutTargetParams p) {
    const uint32_t pos = blockIdx.x;
    if (pos >= p.rows) return;
    __shared__ uint32_t s_copy;
    if (threadIdx.x == 0) {
        const uint32_t c = cat[pos];
        const bool unmasked = c < p.vocab && c != p.mask_index;
        const uint32_t prev = p.step == 0 ? ROLLOUT_NONE : at[pos];
        const uint32_t now = unmasked ? p.step : prev;
        at[pos] = now;
        s_copy = unmasked || (p.last && now == ROLLOUT_NONE);
    }
    __syncthreads();
    if (!s_copy) return;
    const float* __restrict__ src = log_p + (size_t)pos * p.ld;
    float* __restrict__ dst = target + (size_t)pos * p.ldt;
    const uint32_t tid = threadIdx.x, nt = blockDim.x;
    const bool vec = p.ld % 4 == 0 && p.ldt % 4 == 0 && imdm_aligned16(log_p) && imdm_aligned16(target);
    uint32_t head = 0;  // columns [0, head) copied as vectors
    if (vec) {
        const uint32_t units = p.vocab / 4;
        const float4* __restrict__ s4 = reinterpret_cast<const float4*>(src);
        float4* __restrict__ d4 = reinterpret_cast<float4*>(dst);
        for (uint32_t u = tid; u < units; u += nt) d4[u] = s4[u];
        head = 4 * units;
    }
    for (uint32_t j = head + tid; j < p.vocab; j += nt) dst[j] = src[j];
}
