// attention_fwd: flash-attention-2 style forward with fused rotary and softcap (spec 2.3, steps
// 3-4). Shared helpers and constants: attention_common.cuh; backward: attention_bwd.cu.
//
// Maths, for batch b, head h and query i < L (q_i, k_j, v_j: head h of rows b*L+i, b*L+j of qkv):
//   f_t     = 10000^(-2t/hd), t < hd/2, computed in double and rounded to fp32;
//   a(p, t) = p * f_t in fp32; rotate-half (GPT-NeoX) over the full head dim, x1 = x[:hd/2],
//   x2 = x[hd/2:]: rope(x, p) = [x1 cos a - x2 sin a, x2 cos a + x1 sin a], in fp32, rounded to
//   bf16 (q' = rope(q_i, i), k'_j = rope(k_j, j); v is not rotated).
//   s_ij    = q'.k'_j / sqrt(hd);   if softcap c > 0: s_ij = c tanh(s_ij / c)
//   keys    j < L (bidirectional, no padding mask) or j <= i (causal)
//   m_i     = max_j s_ij,  l_i = sum_j exp(s_ij - m_i),  lse_i = m_i + ln l_i (natural log)
//   o_i     = sum_j bf16(exp(s_ij - m)) v_j / l_i   (P is rounded to bf16 for the tensor cores; m
//             is the running max of the online softmax, l_i sums the unrounded fp32 P)
// Shapes and dtypes: qkv (B*L, 3*H*hd) bf16, row = [q heads 0..H-1 | k heads | v heads], each
//   head hd contiguous values; o (B*L, H*hd) bf16, row = [head 0 | head 1 | ...] (the input of
//   the output projection); lse (B, H, L) f32. hd in {32, 64, 96, 128} (one template, four
//   symbols); any L >= 1.
// Saved for the backward: lse (the backward recomputes the rotation and P = exp(s - lse)).
// Thread mapping: grid (ceil(L/64), B*H); a CTA owns 64 queries of one (b, h) and runs 4 warps;
//   warp w owns query rows 16w..16w+15 (one m16 tile) across all hd columns. The CTA streams
//   64-key K/V tiles through shared memory with cp.async double buffering (zero-filled beyond L);
//   each K tile is rotated in place once per CTA before use. S = Q K^T (16 x 64 per warp) and
//   O += P V use mma.sync m16n8k16 bf16 -> fp32 with ldmatrix (.trans for V); P is re-packed from
//   the S accumulators into A fragments without touching shared memory. Online softmax in fp32
//   registers in the log2 domain (exp2 with log2e folded into the scale); each thread holds rows
//   g = lane/4 and g+8 of its warp's tile, row max by two quad shuffles, row sums per thread and
//   reduced once at the end. Causal: only key tiles 0..qt (the diagonal tile is masked), query
//   tiles scheduled heaviest first. Q is loaded with 16-byte loads, rotated and staged in the
//   second K buffer, then held in registers (hd/16 A fragments) for the whole loop.
// Shared memory (dynamic, rows padded to hd+8 elements so ldmatrix is conflict-free):
//   K[2] + V[2] tiles of 64 x (hd+8) bf16 plus hd/2 fp32 frequencies = 512*(hd+8) + 2*hd bytes:
//   20.1 KiB (hd 32), 36.1 (64), 52.2 (96), 68.3 (128); above 48 KiB the launcher raises the
//   dynamic limit. The output tile is staged in the K buffers for 16-byte coalesced stores.
// Accumulation rule: o and lse are written (=); rows i >= L are never written.
//
#include "attention_common.cuh"

template <int HD>
__device__ __forceinline__ void attention_fwd(__nv_bfloat16* __restrict__ o,
                                              float* __restrict__ lse,
                                              const __nv_bfloat16* __restrict__ qkv, int len,
                                              int heads, int causal, float softcap) {
    constexpr int LDS = HD + 8;          // shared row stride in elements (odd multiple of 16 B)
    constexpr int TILE = ATT_BN * LDS;   // elements of one K or V tile
    constexpr int CH = HD / 8;           // 16-byte chunks per row
    constexpr int HALF = HD / 2;
    constexpr int RCH = HD / 16;         // rotary items (8 pairs) per row
    constexpr int NB = ATT_BN / 8;       // n8 blocks of S per warp
    static_assert(HD % 32 == 0 && HD <= 128, "head dim must be 32, 64, 96 or 128");
    // Every copy loop below has a whole number of trips per thread (hd % 32 == 0).
    static_assert((ATT_BN * CH) % ATT_THREADS == 0 && (ATT_BM * RCH) % ATT_THREADS == 0, "");
    static_assert((16 * CH) % IMDM_WARP == 0 && ATT_BM == ATT_BN && ATT_BM == 16 * ATT_WARPS, "");

    extern __shared__ __align__(16) unsigned char att_smem[];
    __nv_bfloat16* sk = reinterpret_cast<__nv_bfloat16*>(att_smem);  // K[2]
    __nv_bfloat16* sv = sk + 2 * TILE;                                  // V[2]
    float* sf = reinterpret_cast<float*>(sv + 2 * TILE);               // frequencies (HALF)
    __nv_bfloat16* sq = sk + TILE;  // Q staged in K buffer 1 until it is in registers

    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int g = lane >> 2, cq = lane & 3;  // mma fragment row group and column pair
    const int qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int q0 = qt * ATT_BM;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const size_t stride = (size_t)3 * heads * HD;  // qkv row stride in elements
    const __nv_bfloat16* qbase = qkv + (size_t)b * len * stride + (size_t)h * HD;
    const __nv_bfloat16* kbase = qbase + (size_t)heads * HD;
    const __nv_bfloat16* vbase = qbase + (size_t)2 * heads * HD;
    const int n_kt = causal ? qt + 1 : (len + ATT_BN - 1) / ATT_BN;

    auto load_kv = [&](int kt, int buf) {
        const int n0 = kt * ATT_BN;
#pragma unroll
        for (int u = 0; u < ATT_BN * CH / ATT_THREADS; ++u) {
            const int c = tid + u * ATT_THREADS, r = c / CH, col = (c % CH) * 8;
            const bool ok = n0 + r < len;
            const size_t off = (size_t)(ok ? n0 + r : 0) * stride + col;
            att_cp_async16(att_smem_u32(sk + buf * TILE + r * LDS + col), kbase + off, ok);
            att_cp_async16(att_smem_u32(sv + buf * TILE + r * LDS + col), vbase + off, ok);
        }
        att_cp_async_commit();
    };

    // Prologue: tile 0 in flight, then the Q loads, whose latency covers the frequency table.
    load_kv(0, 0);
    constexpr int QIT = ATT_BM * RCH / ATT_THREADS;  // rotary items of Q per thread
    uint4 qx1[QIT], qx2[QIT];
#pragma unroll
    for (int u = 0; u < QIT; ++u) {
        const int it = tid + u * ATT_THREADS, r = it / RCH, c = (it % RCH) * 8, i = q0 + r;
        qx1[u] = qx2[u] = make_uint4(0u, 0u, 0u, 0u);
        if (i < len) {
            const __nv_bfloat16* src = qbase + (size_t)i * stride;
            qx1[u] = __ldg(reinterpret_cast<const uint4*>(src + c));
            qx2[u] = __ldg(reinterpret_cast<const uint4*>(src + HALF + c));
        }
    }
    // f_t = 10000^(-2t/hd) = 2^(-(2t/hd) log2 10000) in double, rounded to fp32 (the twin's table).
    if (tid < HALF) sf[tid] = (float)exp2(-(double)(2 * tid) / HD * 13.287712379549449);
    __syncthreads();  // frequencies visible

    // Q: rotation in fp32, bf16 into shared, then A fragments into registers.
#pragma unroll
    for (int u = 0; u < QIT; ++u) {
        const int it = tid + u * ATT_THREADS, r = it / RCH, c = (it % RCH) * 8, i = q0 + r;
        if (i < len) att_rope8(qx1[u], qx2[u], sf + c, (float)i);
        *reinterpret_cast<uint4*>(sq + r * LDS + c) = qx1[u];
        *reinterpret_cast<uint4*>(sq + r * LDS + HALF + c) = qx2[u];
    }
    __syncthreads();
    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
        att_ldsm_x4(qf[kk], att_smem_u32(sq + (warp * 16 + (lane & 15)) * LDS + kk * 16 +
                                         (lane >> 4) * 8));
    __syncthreads();  // K buffer 1 is free for the prefetch of tile 1

    float acc[HD / 8][4];
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    // Logit v: the raw q.k (no softcap) or c tanh(q.k scale / c); exp2 arguments are v * mul.
    const bool capped = softcap > 0.f;
    const float scale = (float)(1.0 / sqrt((double)HD));
    const float mul = capped ? ATT_LOG2E : scale * ATT_LOG2E;
    const float k2 = capped ? 2.f * ATT_LOG2E * scale / softcap : 0.f;
    const int row0 = q0 + warp * 16 + g;                              // rows row0, row0 + 8

    for (int kt = 0; kt < n_kt; ++kt) {
        const int buf = kt & 1, n0 = kt * ATT_BN;
        if (kt + 1 < n_kt) {
            load_kv(kt + 1, buf ^ 1);
            att_cp_async_wait<1>();
        } else {
            att_cp_async_wait<0>();
        }
        __syncthreads();  // tile kt landed for every thread's copies

        __nv_bfloat16* kb = sk + buf * TILE;
        const __nv_bfloat16* vb = sv + buf * TILE;
#pragma unroll
        for (int u = 0; u < ATT_BN * RCH / ATT_THREADS; ++u) {
            const int it = tid + u * ATT_THREADS, r = it / RCH, c = (it % RCH) * 8;
            if (n0 + r < len) {
                uint4 x1 = *reinterpret_cast<uint4*>(kb + r * LDS + c);
                uint4 x2 = *reinterpret_cast<uint4*>(kb + r * LDS + HALF + c);
                att_rope8(x1, x2, sf + c, (float)(n0 + r));
                *reinterpret_cast<uint4*>(kb + r * LDS + c) = x1;
                *reinterpret_cast<uint4*>(kb + r * LDS + HALF + c) = x2;
            }
        }
        __syncthreads();  // rotated K visible

        // S = Q K^T: x4 ldmatrix of K rows gives the B fragments of two n8 blocks.
        float s[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < NB / 2; ++np) {
                uint32_t kf[4];
                const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                att_ldsm_x4(kf, att_smem_u32(kb + key * LDS + kk * 16 + ((lane >> 3) & 1) * 8));
                att_mma(s[2 * np], qf[kk], kf[0], kf[1]);
                att_mma(s[2 * np + 1], qf[kk], kf[2], kf[3]);
            }
        }

        // Softcap and mask. s[nb][e]: row row0 + 8*(e>>1), key n0 + 8nb + 2cq + (e&1).
        const bool need_mask = n0 + ATT_BN > len || (causal && kt == qt);
        if (capped || need_mask) {
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = capped ? att_softcap(s[nb][e], k2, softcap) : s[nb][e];
                    if (need_mask) {
                        const int j = n0 + nb * 8 + 2 * cq + (e & 1), i = row0 + 8 * (e >> 1);
                        if (j >= len || (causal && j > i)) x = -INFINITY;
                    }
                    s[nb][e] = x;
                }
            }
        }

        // Online softmax for rows row0 (r = 0) and row0 + 8 (r = 1); m_run is in logit units.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mt = -INFINITY;
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) mt = fmaxf(mt, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
            const float m_new = fmaxf(m_run[r], mt);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far
            const float alpha = att_exp2((m_run[r] - m_use) * mul);
            const float m_mul = m_use * mul;
            m_run[r] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                s[nb][2 * r] = att_exp2(fmaf(s[nb][2 * r], mul, -m_mul));
                s[nb][2 * r + 1] = att_exp2(fmaf(s[nb][2 * r + 1], mul, -m_mul));
                sum += s[nb][2 * r] + s[nb][2 * r + 1];
            }
            l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
            for (int nb = 0; nb < HD / 8; ++nb) {
                acc[nb][2 * r] *= alpha;
                acc[nb][2 * r + 1] *= alpha;
            }
        }

        // O += P V: the S accumulators of n8 blocks 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < ATT_BN / 16; ++kk) {
            const uint32_t pa[4] = {att_pack(s[2 * kk][0], s[2 * kk][1]),
                                    att_pack(s[2 * kk][2], s[2 * kk][3]),
                                    att_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    att_pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < HD / 16; ++np) {
                uint32_t vf[4];
                att_ldsm_x4_t(vf, att_smem_u32(vb + (kk * 16 + (lane & 15)) * LDS + np * 16 +
                                               (lane >> 4) * 8));
                att_mma(acc[2 * np], pa, vf[0], vf[1]);
                att_mma(acc[2 * np + 1], pa, vf[2], vf[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer `buf` before it is refilled
    }

    // Normalise, save lse, stage the bf16 tile in shared (K buffers), 16-byte stores to o.
    __nv_bfloat16* so = sk + warp * 16 * LDS;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = 1.f / l;
        const int i = row0 + 8 * r;
        if (cq == 0 && i < len) lse[(size_t)bh * len + i] = (m_run[r] * mul + __log2f(l)) * ATT_LN2;
#pragma unroll
        for (int nb = 0; nb < HD / 8; ++nb)
            *reinterpret_cast<uint32_t*>(so + (g + 8 * r) * LDS + nb * 8 + 2 * cq) =
                att_pack(acc[nb][2 * r] * inv, acc[nb][2 * r + 1] * inv);
    }
    __syncwarp();
    const size_t out_stride = (size_t)heads * HD;
#pragma unroll
    for (int u = 0; u < 16 * CH / IMDM_WARP; ++u) {
        const int it = lane + u * IMDM_WARP, r = it / CH, c = (it % CH) * 8;
        const int i = q0 + warp * 16 + r;
        if (i < len)
            *reinterpret_cast<uint4*>(o + ((size_t)b * len + i) * out_stride + (size_t)h * HD + c) =
                *reinterpret_cast<const uint4*>(so + r * LDS + c);
    }
}

// Minimum resident CTAs per SM for the register budget: 4 (hd <= 64), 3 (96), 2 (128).
#define ATT_KERNEL(HD, MIN_CTAS)                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, MIN_CTAS)                        \
        attention_fwd_bf16_hd##HD(__nv_bfloat16* __restrict__ o, float* __restrict__ lse,      \
                                  const __nv_bfloat16* __restrict__ qkv, int len, int heads,   \
                                  int causal, float softcap) {                                 \
        attention_fwd<HD>(o, lse, qkv, len, heads, causal, softcap);                           \
    }

ATT_KERNEL(32, 4)
ATT_KERNEL(64, 4)
ATT_KERNEL(96, 3)
ATT_KERNEL(128, 2)
