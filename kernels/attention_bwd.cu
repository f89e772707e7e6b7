// attention_bwd: the training backward of attention_fwd.cu on tensor cores (spec 2.3, steps 3-4);
// its SIMT fp32 reference, kept only to test it, is kernels/dev/attention_bwd_ref.cu.
//
// ---- Backward: maths, shapes, saved buffers (this file and the reference) --------------------
// Maths, per (b, h), with q', k' the forward's rotated, bf16-rounded q and k (recomputed with the
// forward's own att_rope8 and frequency formula, so bit for bit the forward's values), scale
// 1/sqrt(hd), lse the forward's saved log-sum-exp, o its bf16 output, dO = d o:
//   r_ij = q'_i.k'_j scale;  s_ij = c tanh(r_ij / c) (softcap c > 0) or r_ij;  keys as forward
//   P_ij = exp(s_ij - lse_i);  D_i = dO_i.o_i  (= sum_j P_ij dO_i.v_j, the softmax identity)
//   dV_j = sum_i P_ij dO_i;  dP_ij = dO_i.v_j;  dS_ij = P_ij (dP_ij - D_i)
//   dR_ij = dS_ij (1 - (s_ij / c)^2) (softcap) or dS_ij
//   dq'_i = scale sum_j dR_ij k'_j;  dk'_j = scale sum_i dR_ij q'_i
//   rotary backward (the transpose of the rotation; bf16 rounding passed straight through):
//   dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin for the pair (t, t + hd/2).
// Shapes and dtypes: qkv (B*L, 3*H*hd) bf16, o and dO (B*L, H*hd) bf16, lse (B, H, L) f32 (the
//   forward's); dqkv (B*L, 3*H*hd) bf16, laid out like qkv (the qkv GEMM's backward operand).
// Saved by the forward and read here: lse and o (for D); q', k', S and P are recomputed.
// Accumulation rule: dqkv is written (=) in full (q, k and v parts), each element by exactly one
//   thread (no atomics: bit-reproducible run to run); rows >= L are never written; the
//   workspaces are scratch.
//
// ---- Backward, tensor-core kernels: the training path (attention_bwd_prep_bf16,
//      attention_bwd_dkv_bf16_hd*, attention_bwd_dq_bf16_hd*) ----------------------------------
// FlashAttention-2's backward (Dao 2023, algorithm 2) on the forward's machinery: 64 x 64 tiles,
// 4 warps of 16 rows, mma.sync m16n8k16 bf16 -> fp32, ldmatrix (.trans), cp.async double
// buffering, the forward's accumulator layout (thread lane = 4g + cq holds rows g, g + 8 and
// columns 2cq, 2cq + 1 of every 16 x 8 block).
// Roundings (they set the tolerance of src/cuda/ops/attention.rs's fast_tol): every matmul operand is
//   bf16. q', k', v, dO are used as stored; P = 2^(x mul - lse2) (fp32) is rounded to bf16 for
//   dV += P^T dO, and dS dcap = P (dP - D) dcap (fp32 P, dP, D) to bf16 for dK' += dS^T Q' and
//   dQ' += dS K', as FlashAttention does. Accumulators, the P inside dS, the softcap derivative,
//   the scale and the rotary backward are fp32; one bf16 rounding at the store. (The SIMT
//   reference, kernels/dev/attention_bwd_ref.cu, keeps P and dS in fp32.)
// prep: 8 lanes per row of the padded (B*H, lpad) grid, lpad = ceil(L/64)*64, 32 rows per
//   256-thread block: q', k' (att_rope8 with the forward's frequencies: its values bit for bit)
//   into qr, kr (B*H, L, hd) bf16; lse2 = lse log2(e) and D = dO.o (fp32 sum of the bf16
//   products) into (B*H, lpad) f32, +inf and 0 in the padding rows, so a padding query gets P = 0
//   with no test and every tile reads lse2, D with 16-byte copies.
//   Why rotate in a separate pass (not in shared memory once per CTA, the first plan): kernel A
//   visits every Q tile and kernel B every K tile ceil(L/64) times, so in-kernel rotation would
//   repeat hd/2 sincos per row per visit; the bf16 copy costs one write and one read of
//   B*H*L*hd*2 bytes per tensor (100 MB in all at DiT-small OWT) and leaves the tiles plain copies.
// dkv (kernel A): grid (ceil(L/64), B*H), 128 threads; CTA kt owns keys 64kt..64kt+63, warp w
//   keys 16w..16w+15. The K' and V tiles stay in shared memory (A fragments by ldmatrix at each
//   k-step); 64-query tiles of Q', dO, lse2 and D stream through it (zero-filled beyond L). Per
//   query tile, in the transposed view (rows keys, columns queries; 16 x 64 per warp):
//     S^T = K' Q'^T, dP^T = V dO^T        B fragments: ldmatrix of Q' / dO rows (the forward's K)
//     P^T = 2^(x mul - lse2_i)            x raw or softcapped as in the forward; causal diagonal
//                                         tile: P = 0 where j > i
//     dS^T = P^T (dP^T - D_i) dcap        dcap = 1 - (x/c)^2 with softcap, else 1
//     dV += bf16(P^T) dO, dK' += bf16(dS^T) Q'   accumulators repacked into A fragments, B by
//                                         ldmatrix.trans of dO / Q' rows (the forward's P V)
//   Causal: query tiles kt..end only (kt = 0, the heaviest, is scheduled first). At the end
//   dk = rotary backward of scale dK' in registers (the pair t, t + hd/2 lies in n8 blocks nb,
//   nb + hd/16 of the same thread); dk and dv are staged as bf16 in the idle Q'[0] and dO[0]
//   buffers, then 16-byte stores of rows j < L into the k and v parts of dqkv.
// dq (kernel B): grid (ceil(L/64), B*H), 128 threads; CTA owns 64 queries (causal: heaviest
//   first, as the forward), warp w queries 16w..16w+15. Q' and dO stay in shared memory, 64-key
//   tiles of K' and V stream through it; lse2 and D of the thread's two rows sit in registers.
//   Per key tile: S = Q' K'^T, dP = dO V^T (the forward's S = Q K^T), P and dS as in kernel A
//   (P = 0 for keys j >= L or causal j > i), dQ' += bf16(dS) K' (K' by ldmatrix.trans). At the
//   end: rotary backward of scale dQ', staged in K'[0], stores of rows i < L into the q part.
//   Splitting dQ from dK, dV recomputes S and dP (7 matmuls of L x L x hd instead of FA2's 5)
//   but needs no float atomics on dQ: deterministic.
// Shared memory (dynamic, AttBwdSmem, both kernels): 6 tiles of 64 x (hd+8) bf16 (A: K', V, Q'[2],
//   dO[2]; B: Q', dO, K'[2], V[2]), lse2[2][64] and D[2][64] f32 (A only), hd/2 f32 frequencies =
//   768 (hd+8) + 1024 + 2 hd bytes: 31.1 KiB (hd 32), 55.1 (64), 79.2 (96), 103.3 (128); the
//   launcher raises the dynamic limit above 48 KiB.
#include "attention_common.cuh"

#define ATT_PREP_ROWS 32  // (b, h, position) rows per block of the prep kernel: 8 lanes each
static_assert(ATT_PREP_ROWS * 8 == ATT_BWD_THREADS, "prep: 8 lanes per row");

// 8 lanes per row of the padded (B*H, lpad) grid, lpad = ceil(L/64)*64. Valid rows: rotated,
// bf16-rounded q' and k' into qr, kr ((B*H, L, hd) bf16) with the forward's own att_rope8 and
// frequency formula (so the forward's values bit for bit), lse * log2(e) into lse2 and D = dO.o
// into dsum. Padding rows p >= L: lse2 = +inf (so P = 2^(x mul - lse2) = 0) and dsum = 0.
extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS)
attention_bwd_prep_bf16(__nv_bfloat16* __restrict__ qr, __nv_bfloat16* __restrict__ kr,
                        float* __restrict__ lse2, float* __restrict__ dsum,
                        const float* __restrict__ lse, const __nv_bfloat16* __restrict__ qkv,
                        const __nv_bfloat16* __restrict__ o, const __nv_bfloat16* __restrict__ dout,
                        int batch, int len, int heads, int hd) {
    const int lane = threadIdx.x % IMDM_WARP, sub = lane & 7;
    const unsigned gmask = 0xffu << (lane & 24);  // the 8 lanes of this row
    const int lpad = (len + ATT_BM - 1) / ATT_BM * ATT_BM;
    const size_t prow = (size_t)blockIdx.x * ATT_PREP_ROWS + threadIdx.x / 8;
    if (prow >= (size_t)batch * heads * lpad) return;  // uniform over the row's 8 lanes
    const size_t bh = prow / lpad;
    const int p = (int)(prow % lpad);
    if (p >= len) {
        if (sub == 0) {
            lse2[prow] = INFINITY;
            dsum[prow] = 0.f;
        }
        return;  // uniform over the row's 8 lanes
    }
    const size_t b = bh / heads, h = bh % heads, tok = b * len + p;
    const __nv_bfloat16* q = qkv + tok * 3 * heads * hd + h * hd;
    const __nv_bfloat16* k = q + (size_t)heads * hd;
    const int half = hd / 2;
    const size_t dst = (bh * len + p) * hd;
    if (sub < hd / 16) {  // rotary item: pairs 8 sub .. 8 sub + 7, as the SIMT prep does
        const int c = sub * 8;
        __align__(16) float fr[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) fr[u] = att_bwd_freq(c + u, hd);
        uint4 x1 = *reinterpret_cast<const uint4*>(q + c);
        uint4 x2 = *reinterpret_cast<const uint4*>(q + half + c);
        att_rope8(x1, x2, fr, (float)p);
        *reinterpret_cast<uint4*>(qr + dst + c) = x1;
        *reinterpret_cast<uint4*>(qr + dst + half + c) = x2;
        x1 = *reinterpret_cast<const uint4*>(k + c);
        x2 = *reinterpret_cast<const uint4*>(k + half + c);
        att_rope8(x1, x2, fr, (float)p);
        *reinterpret_cast<uint4*>(kr + dst + c) = x1;
        *reinterpret_cast<uint4*>(kr + dst + half + c) = x2;
    }
    const __nv_bfloat16* orow = o + tok * heads * hd + h * hd;
    const __nv_bfloat16* grow = dout + tok * heads * hd + h * hd;
    float s = 0.f;
    for (int c = sub; c < hd / 8; c += 8) {  // 16-byte chunks sub, sub + 8
        float fo[8], fg[8];
        bf16x8_to_f32(*reinterpret_cast<const uint4*>(orow + 8 * c), fo);
        bf16x8_to_f32(*reinterpret_cast<const uint4*>(grow + 8 * c), fg);
#pragma unroll
        for (int u = 0; u < 8; ++u) s = fmaf(fo[u], fg[u], s);
    }
    s += __shfl_xor_sync(gmask, s, 1);
    s += __shfl_xor_sync(gmask, s, 2);
    s += __shfl_xor_sync(gmask, s, 4);
    if (sub == 0) {
        lse2[prow] = lse[bh * len + p] * ATT_LOG2E;
        dsum[prow] = s;
    }
}

// Shared layout of both tensor-core backward kernels (elements of bf16 unless said): two
// resident tiles R0, R1, then two double-buffered streams S0[2], S1[2] (all 64 x (hd+8)), then
// lse2[2][64] and D[2][64] f32 (used by the dkv kernel only) and hd/2 f32 frequencies.
template <int HD>
struct AttBwdSmem {
    static constexpr int LDS = HD + 8;
    static constexpr int TILE = ATT_BN * LDS;
    static constexpr int BYTES = 6 * TILE * 2 + 4 * ATT_BM * 4 + HD / 2 * 4;
};

// Rotary backward of a 16 x hd fp32 accumulator tile held in mma layout (rows `row0`, `row0`
// + 8; thread column pair 2cq + {0, 1} of each n8 block), after scaling by `scale`: the pair (t,
// t + hd/2) lies in blocks nb and nb + hd/16 of the same thread, so no data moves.
// dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin (the SIMT rope kernel's formula).
template <int HD>
__device__ __forceinline__ void att_bwd_unrotate(float (&acc)[HD / 8][4], const float* sf,
                                                 int row0, int cq, float scale) {
#pragma unroll
    for (int nb = 0; nb < HD / 16; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int t = nb * 8 + 2 * cq + (e & 1), pos = row0 + 8 * (e >> 1);
            float sn, cs;
            att_sincos((float)pos * sf[t], &sn, &cs);
            const float y1 = acc[nb][e] * scale, y2 = acc[nb + HD / 16][e] * scale;
            acc[nb][e] = y1 * cs + y2 * sn;
            acc[nb + HD / 16][e] = y2 * cs - y1 * sn;
        }
    }
}

// Writes a warp's 16 x hd fp32 accumulator tile as bf16 into its staging rows `st` (16 x LDS),
// then 16-byte stores of the rows with position row_base + r < len to dst + (position) * stride.
template <int HD>
__device__ __forceinline__ void att_bwd_store(__nv_bfloat16* st, const float (&acc)[HD / 8][4],
                                              __nv_bfloat16* __restrict__ dst, size_t stride,
                                              int row_base, int len, int lane) {
    constexpr int LDS = HD + 8, CH = HD / 8;
    const int g = lane >> 2, cq = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int nb = 0; nb < HD / 8; ++nb)
            *reinterpret_cast<uint32_t*>(st + (g + 8 * r) * LDS + nb * 8 + 2 * cq) =
                att_pack(acc[nb][2 * r], acc[nb][2 * r + 1]);
    __syncwarp();
#pragma unroll
    for (int u = 0; u < 16 * CH / IMDM_WARP; ++u) {
        const int it = lane + u * IMDM_WARP, r = it / CH, c = (it % CH) * 8;
        if (row_base + r < len)
            *reinterpret_cast<uint4*>(dst + (size_t)(row_base + r) * stride + c) =
                *reinterpret_cast<const uint4*>(st + r * LDS + c);
    }
}

// Kernel A: one CTA per (64-key tile, b, h); warp w owns keys 16w..16w+15. K' and V stay in
// shared memory; 64-query tiles of Q', dO (and their lse2, D) stream through it. Per query tile,
// in the transposed view (rows = keys, columns = queries):
//   S^T = K' Q'^T, dP^T = V dO^T (A fragments from the resident tiles, B fragments from the
//   streamed rows, as the forward's S = Q K^T); P^T = 2^(x mul - lse2_i) (x: raw or softcapped
//   score), dS^T = P^T (dP^T - D_i) dcap;  dV += bf16(P^T) dO, dK' += bf16(dS^T) Q' (the S^T
//   accumulators repacked into A fragments, B fragments by ldmatrix.trans, as the forward's P V).
// Writes the k part (rotary backward fused, times the scale) and the v part of dqkv.
template <int HD>
__device__ __forceinline__ void attention_bwd_dkv_tc(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ qr,
    const __nv_bfloat16* __restrict__ kr, const float* __restrict__ lse2,
    const float* __restrict__ dsum, const __nv_bfloat16* __restrict__ qkv,
    const __nv_bfloat16* __restrict__ dout, int len, int heads, int causal, float softcap) {
    using L = AttBwdSmem<HD>;
    constexpr int LDS = L::LDS, TILE = L::TILE, CH = HD / 8, NB = ATT_BM / 8;
    static_assert(HD % 32 == 0 && HD <= 128, "head dim must be 32, 64, 96 or 128");
    static_assert((ATT_BN * CH) % ATT_THREADS == 0 && (16 * CH) % IMDM_WARP == 0, "");
    static_assert(ATT_BM == ATT_BN && ATT_BM == 16 * ATT_WARPS && HD / 2 <= ATT_THREADS, "");

    extern __shared__ __align__(16) unsigned char att_smem[];
    __nv_bfloat16* sk = reinterpret_cast<__nv_bfloat16*>(att_smem);  // K' (resident)
    __nv_bfloat16* sv = sk + TILE;                                      // V (resident)
    __nv_bfloat16* sq = sv + TILE;                                      // Q'[2]
    __nv_bfloat16* sg = sq + 2 * TILE;                                  // dO[2]
    float* sl = reinterpret_cast<float*>(sg + 2 * TILE);               // lse2[2][64]
    float* sd = sl + 2 * ATT_BM;                                        // D[2][64]
    float* sf = sd + 2 * ATT_BM;                                        // frequencies (hd/2)

    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int g = lane >> 2, cq = lane & 3;
    const int kt = blockIdx.x, n0 = kt * ATT_BN;  // causal: kt = 0 has the most query tiles
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const size_t stride = (size_t)3 * heads * HD, ostride = (size_t)heads * HD;
    const int n_qt = (len + ATT_BM - 1) / ATT_BM, lpad = n_qt * ATT_BM;
    const __nv_bfloat16* qrb = qr + (size_t)bh * len * HD;
    const __nv_bfloat16* krb = kr + (size_t)bh * len * HD;
    const __nv_bfloat16* vbase = qkv + (size_t)b * len * stride + (size_t)2 * heads * HD + h * HD;
    const __nv_bfloat16* gbase = dout + (size_t)b * len * ostride + (size_t)h * HD;
    const float* lb = lse2 + (size_t)bh * lpad;
    const float* db = dsum + (size_t)bh * lpad;
    const int qt0 = causal ? kt : 0;  // causal: queries i >= j only, so query tiles >= kt

    // Resident K', V (zero-filled beyond L); committed with the first query tile's group.
#pragma unroll
    for (int u = 0; u < ATT_BN * CH / ATT_THREADS; ++u) {
        const int c = tid + u * ATT_THREADS, r = c / CH, col = (c % CH) * 8;
        const bool ok = n0 + r < len;
        const int j = ok ? n0 + r : 0;
        att_cp_async16(att_smem_u32(sk + r * LDS + col), krb + (size_t)j * HD + col, ok);
        att_cp_async16(att_smem_u32(sv + r * LDS + col), vbase + (size_t)j * stride + col, ok);
    }
    auto load_q = [&](int qt, int buf) {
        const int m0 = qt * ATT_BM;
#pragma unroll
        for (int u = 0; u < ATT_BM * CH / ATT_THREADS; ++u) {
            const int c = tid + u * ATT_THREADS, r = c / CH, col = (c % CH) * 8;
            const bool ok = m0 + r < len;
            const int i = ok ? m0 + r : 0;
            att_cp_async16(att_smem_u32(sq + buf * TILE + r * LDS + col),
                           qrb + (size_t)i * HD + col, ok);
            att_cp_async16(att_smem_u32(sg + buf * TILE + r * LDS + col),
                           gbase + (size_t)i * ostride + col, ok);
        }
        // lse2 and D are padded to lpad (prep kernel): 16 chunks of 4 floats each, no bounds.
        if (tid < ATT_BM / 4)
            att_cp_async16(att_smem_u32(sl + buf * ATT_BM + 4 * tid), lb + m0 + 4 * tid, true);
        else if (tid < ATT_BM / 2)
            att_cp_async16(att_smem_u32(sd + buf * ATT_BM + 4 * (tid - ATT_BM / 4)),
                           db + m0 + 4 * (tid - ATT_BM / 4), true);
        att_cp_async_commit();
    };
    load_q(qt0, 0);
    if (tid < HD / 2) sf[tid] = att_bwd_freq(tid, HD);  // visible after the loop's first barrier

    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[nb][e] = dv[nb][e] = 0.f;
    const bool capped = softcap > 0.f;
    const float scale = (float)(1.0 / sqrt((double)HD));
    const float mul = capped ? ATT_LOG2E : scale * ATT_LOG2E;  // as the forward
    const float k2 = capped ? 2.f * ATT_LOG2E * scale / softcap : 0.f;
    const float inv_cap = capped ? 1.f / softcap : 0.f;
    const int key0 = n0 + warp * 16 + g;  // this thread's keys: key0 (e = 0, 1), key0 + 8 (2, 3)
    const uint32_t a_off = (uint32_t)((warp * 16 + (lane & 15)) * LDS + (lane >> 4) * 8);
    const uint32_t b_off =
        (uint32_t)(((lane & 7) + ((lane >> 4) << 3)) * LDS + ((lane >> 3) & 1) * 8);
    const uint32_t t_off = (uint32_t)((lane & 15) * LDS + (lane >> 4) * 8);

    for (int qt = qt0; qt < n_qt; ++qt) {
        const int buf = (qt - qt0) & 1, m0 = qt * ATT_BM;
        if (qt + 1 < n_qt) {
            load_q(qt + 1, buf ^ 1);
            att_cp_async_wait<1>();
        } else {
            att_cp_async_wait<0>();
        }
        __syncthreads();  // tile qt (and K', V, frequencies) visible to every thread

        const __nv_bfloat16* qb = sq + buf * TILE;
        const __nv_bfloat16* gb = sg + buf * TILE;
        const float* lsb = sl + buf * ATT_BM;
        const float* dsb = sd + buf * ATT_BM;

        // S^T = K' Q'^T and dP^T = V dO^T (16 keys x 64 queries per warp).
        float st[NB][4], dp[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            uint32_t ka[4], va[4];
            att_ldsm_x4(ka, att_smem_u32(sk + a_off + kk * 16));
            att_ldsm_x4(va, att_smem_u32(sv + a_off + kk * 16));
#pragma unroll
            for (int np = 0; np < NB / 2; ++np) {
                uint32_t f[4];
                att_ldsm_x4(f, att_smem_u32(qb + np * 16 * LDS + b_off + kk * 16));
                att_mma(st[2 * np], ka, f[0], f[1]);
                att_mma(st[2 * np + 1], ka, f[2], f[3]);
                att_ldsm_x4(f, att_smem_u32(gb + np * 16 * LDS + b_off + kk * 16));
                att_mma(dp[2 * np], va, f[0], f[1]);
                att_mma(dp[2 * np + 1], va, f[2], f[3]);
            }
        }

        // st[nb][e]: key key0 + 8 (e >> 1), query m0 + ql with ql = 8 nb + 2 cq + (e & 1).
        // P in place of S^T, dS in place of dP^T. Padding queries have lse2 = +inf: P = 0.
        const bool diag = causal && qt == kt;  // the only causal tile with keys j > queries i
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ql = nb * 8 + 2 * cq + (e & 1);
                float x = st[nb][e], dcap = 1.f;
                if (capped) {
                    x = att_softcap(x, k2, softcap);
                    const float t = x * inv_cap;
                    dcap = 1.f - t * t;
                }
                float p = att_exp2(fmaf(x, mul, -lsb[ql]));
                if (diag && key0 + 8 * (e >> 1) > m0 + ql) p = 0.f;
                st[nb][e] = p;
                dp[nb][e] = p * (dp[nb][e] - dsb[ql]) * dcap;
            }
        }

        // dV += bf16(P^T) dO and dK' += bf16(dS^T) Q': k-step kk covers queries 16kk..16kk+15.
#pragma unroll
        for (int kk = 0; kk < ATT_BM / 16; ++kk) {
            const uint32_t pa[4] = {att_pack(st[2 * kk][0], st[2 * kk][1]),
                                    att_pack(st[2 * kk][2], st[2 * kk][3]),
                                    att_pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                    att_pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
            const uint32_t sa[4] = {att_pack(dp[2 * kk][0], dp[2 * kk][1]),
                                    att_pack(dp[2 * kk][2], dp[2 * kk][3]),
                                    att_pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                    att_pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < HD / 16; ++np) {
                uint32_t f[4];
                att_ldsm_x4_t(f, att_smem_u32(gb + kk * 16 * LDS + t_off + np * 16));
                att_mma(dv[2 * np], pa, f[0], f[1]);
                att_mma(dv[2 * np + 1], pa, f[2], f[3]);
                att_ldsm_x4_t(f, att_smem_u32(qb + kk * 16 * LDS + t_off + np * 16));
                att_mma(dk[2 * np], sa, f[0], f[1]);
                att_mma(dk[2 * np + 1], sa, f[2], f[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer `buf` before it is refilled
    }

    // dk = rotary backward of scale * dK'; stage in the (now idle) Q'[0] and dO[0] buffers.
    att_bwd_unrotate<HD>(dk, sf, key0, cq, scale);
    const size_t row0 = (size_t)b * len * stride + (size_t)h * HD;
    att_bwd_store<HD>(sq + warp * 16 * LDS, dk, dqkv + row0 + (size_t)heads * HD, stride,
                      n0 + warp * 16, len, lane);
    att_bwd_store<HD>(sg + warp * 16 * LDS, dv, dqkv + row0 + (size_t)2 * heads * HD, stride,
                      n0 + warp * 16, len, lane);
}

// Kernel B: one CTA per (64-query tile, b, h); warp w owns queries 16w..16w+15. Q' and dO stay
// in shared memory; 64-key tiles of K', V stream through it. Per key tile: S = Q' K'^T, dP = dO
// V^T (the forward's S = Q K^T pattern), P and dS as in kernel A (masked keys j >= L or j > i
// set to P = 0), dQ' += bf16(dS) K' (the forward's P V pattern, K' by ldmatrix.trans). Writes
// the q part of dqkv (rotary backward fused, times the scale).
template <int HD>
__device__ __forceinline__ void attention_bwd_dq_tc(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ qr,
    const __nv_bfloat16* __restrict__ kr, const float* __restrict__ lse2,
    const float* __restrict__ dsum, const __nv_bfloat16* __restrict__ qkv,
    const __nv_bfloat16* __restrict__ dout, int len, int heads, int causal, float softcap) {
    using L = AttBwdSmem<HD>;
    constexpr int LDS = L::LDS, TILE = L::TILE, CH = HD / 8, NB = ATT_BN / 8;
    static_assert(HD % 32 == 0 && HD <= 128, "head dim must be 32, 64, 96 or 128");
    static_assert((ATT_BN * CH) % ATT_THREADS == 0 && (16 * CH) % IMDM_WARP == 0, "");
    static_assert(ATT_BM == ATT_BN && ATT_BM == 16 * ATT_WARPS && HD / 2 <= ATT_THREADS, "");

    extern __shared__ __align__(16) unsigned char att_smem[];
    __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(att_smem);  // Q' (resident)
    __nv_bfloat16* sg = sq + TILE;                                      // dO (resident)
    __nv_bfloat16* sk = sg + TILE;                                      // K'[2]
    __nv_bfloat16* sv = sk + 2 * TILE;                                  // V[2]
    float* sf = reinterpret_cast<float*>(sv + 2 * TILE) + 4 * ATT_BM;  // frequencies (hd/2)

    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int g = lane >> 2, cq = lane & 3;
    const int qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // heaviest first
    const int m0 = qt * ATT_BM;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const size_t stride = (size_t)3 * heads * HD, ostride = (size_t)heads * HD;
    const int n_tiles = (len + ATT_BN - 1) / ATT_BN, lpad = n_tiles * ATT_BN;
    const int n_kt = causal ? qt + 1 : n_tiles;
    const __nv_bfloat16* qrb = qr + (size_t)bh * len * HD;
    const __nv_bfloat16* krb = kr + (size_t)bh * len * HD;
    const __nv_bfloat16* vbase = qkv + (size_t)b * len * stride + (size_t)2 * heads * HD + h * HD;
    const __nv_bfloat16* gbase = dout + (size_t)b * len * ostride + (size_t)h * HD;

    // Resident Q', dO (zero-filled beyond L); committed with key tile 0's group.
#pragma unroll
    for (int u = 0; u < ATT_BM * CH / ATT_THREADS; ++u) {
        const int c = tid + u * ATT_THREADS, r = c / CH, col = (c % CH) * 8;
        const bool ok = m0 + r < len;
        const int i = ok ? m0 + r : 0;
        att_cp_async16(att_smem_u32(sq + r * LDS + col), qrb + (size_t)i * HD + col, ok);
        att_cp_async16(att_smem_u32(sg + r * LDS + col), gbase + (size_t)i * ostride + col, ok);
    }
    auto load_kv = [&](int kt, int buf) {
        const int n0 = kt * ATT_BN;
#pragma unroll
        for (int u = 0; u < ATT_BN * CH / ATT_THREADS; ++u) {
            const int c = tid + u * ATT_THREADS, r = c / CH, col = (c % CH) * 8;
            const bool ok = n0 + r < len;
            const int j = ok ? n0 + r : 0;
            att_cp_async16(att_smem_u32(sk + buf * TILE + r * LDS + col),
                           krb + (size_t)j * HD + col, ok);
            att_cp_async16(att_smem_u32(sv + buf * TILE + r * LDS + col),
                           vbase + (size_t)j * stride + col, ok);
        }
        att_cp_async_commit();
    };
    load_kv(0, 0);
    if (tid < HD / 2) sf[tid] = att_bwd_freq(tid, HD);  // visible after the loop's first barrier

    // This thread's query rows row0 (r = 0) and row0 + 8 (r = 1): lse2 and D from the padded
    // buffers (always in bounds; padding rows give P = 0).
    const int row0 = m0 + warp * 16 + g;
    float l2[2], dd[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l2[r] = __ldg(lse2 + (size_t)bh * lpad + row0 + 8 * r);
        dd[r] = __ldg(dsum + (size_t)bh * lpad + row0 + 8 * r);
    }
    float dq[HD / 8][4];
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[nb][e] = 0.f;
    const bool capped = softcap > 0.f;
    const float scale = (float)(1.0 / sqrt((double)HD));
    const float mul = capped ? ATT_LOG2E : scale * ATT_LOG2E;
    const float k2 = capped ? 2.f * ATT_LOG2E * scale / softcap : 0.f;
    const float inv_cap = capped ? 1.f / softcap : 0.f;
    const uint32_t a_off = (uint32_t)((warp * 16 + (lane & 15)) * LDS + (lane >> 4) * 8);
    const uint32_t b_off =
        (uint32_t)(((lane & 7) + ((lane >> 4) << 3)) * LDS + ((lane >> 3) & 1) * 8);
    const uint32_t t_off = (uint32_t)((lane & 15) * LDS + (lane >> 4) * 8);

    for (int kt = 0; kt < n_kt; ++kt) {
        const int buf = kt & 1, n0 = kt * ATT_BN;
        if (kt + 1 < n_kt) {
            load_kv(kt + 1, buf ^ 1);
            att_cp_async_wait<1>();
        } else {
            att_cp_async_wait<0>();
        }
        __syncthreads();  // tile kt (and Q', dO, frequencies) visible to every thread

        const __nv_bfloat16* kb = sk + buf * TILE;
        const __nv_bfloat16* vb = sv + buf * TILE;

        // S = Q' K'^T and dP = dO V^T (16 queries x 64 keys per warp).
        float s[NB][4], dp[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            uint32_t qa[4], ga[4];
            att_ldsm_x4(qa, att_smem_u32(sq + a_off + kk * 16));
            att_ldsm_x4(ga, att_smem_u32(sg + a_off + kk * 16));
#pragma unroll
            for (int np = 0; np < NB / 2; ++np) {
                uint32_t f[4];
                att_ldsm_x4(f, att_smem_u32(kb + np * 16 * LDS + b_off + kk * 16));
                att_mma(s[2 * np], qa, f[0], f[1]);
                att_mma(s[2 * np + 1], qa, f[2], f[3]);
                att_ldsm_x4(f, att_smem_u32(vb + np * 16 * LDS + b_off + kk * 16));
                att_mma(dp[2 * np], ga, f[0], f[1]);
                att_mma(dp[2 * np + 1], ga, f[2], f[3]);
            }
        }

        // s[nb][e]: query row0 + 8 (e >> 1), key n0 + 8 nb + 2 cq + (e & 1). dS in place of dP.
        const bool need_mask = n0 + ATT_BN > len || (causal && kt == qt);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                float x = s[nb][e], dcap = 1.f;
                if (capped) {
                    x = att_softcap(x, k2, softcap);
                    const float t = x * inv_cap;
                    dcap = 1.f - t * t;
                }
                float p = att_exp2(fmaf(x, mul, -l2[r]));
                if (need_mask) {
                    const int j = n0 + nb * 8 + 2 * cq + (e & 1), i = row0 + 8 * r;
                    if (j >= len || (causal && j > i)) p = 0.f;
                }
                dp[nb][e] = p * (dp[nb][e] - dd[r]) * dcap;
            }
        }

        // dQ' += bf16(dS) K': k-step kk covers keys 16kk..16kk+15.
#pragma unroll
        for (int kk = 0; kk < ATT_BN / 16; ++kk) {
            const uint32_t sa[4] = {att_pack(dp[2 * kk][0], dp[2 * kk][1]),
                                    att_pack(dp[2 * kk][2], dp[2 * kk][3]),
                                    att_pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                    att_pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < HD / 16; ++np) {
                uint32_t f[4];
                att_ldsm_x4_t(f, att_smem_u32(kb + kk * 16 * LDS + t_off + np * 16));
                att_mma(dq[2 * np], sa, f[0], f[1]);
                att_mma(dq[2 * np + 1], sa, f[2], f[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer `buf` before it is refilled
    }

    // dq = rotary backward of scale * dQ'; stage in the (now idle) K'[0] buffer.
    att_bwd_unrotate<HD>(dq, sf, row0, cq, scale);
    att_bwd_store<HD>(sk + warp * 16 * LDS, dq,
                      dqkv + (size_t)b * len * stride + (size_t)h * HD, stride, m0 + warp * 16,
                      len, lane);
}

// Minimum resident CTAs per SM (__launch_bounds__) of dkv and dq for each head dim.
#define ATT_BWD_TC_ARGS                                                                            \
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ qr,                        \
        const __nv_bfloat16* __restrict__ kr, const float* __restrict__ lse2,                      \
        const float* __restrict__ dsum, const __nv_bfloat16* __restrict__ qkv,                     \
        const __nv_bfloat16* __restrict__ dout, int len, int heads, int causal, float softcap
#define ATT_BWD_TC_KERNELS(HD, MIN_A, MIN_B)                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, MIN_A)                               \
        attention_bwd_dkv_bf16_hd##HD(ATT_BWD_TC_ARGS) {                                           \
        attention_bwd_dkv_tc<HD>(dqkv, qr, kr, lse2, dsum, qkv, dout, len, heads, causal,          \
                                 softcap);                                                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, MIN_B)                               \
        attention_bwd_dq_bf16_hd##HD(ATT_BWD_TC_ARGS) {                                            \
        attention_bwd_dq_tc<HD>(dqkv, qr, kr, lse2, dsum, qkv, dout, len, heads, causal,           \
                                softcap);                                                          \
    }

ATT_BWD_TC_KERNELS(32, 3, 4)
ATT_BWD_TC_KERNELS(64, 2, 3)
ATT_BWD_TC_KERNELS(96, 2, 2)
ATT_BWD_TC_KERNELS(128, 2, 2)
