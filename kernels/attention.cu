// attention: flash-attention-2 style forward with fused rotary and softcap (spec 2.3, steps 3-4).
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
// Registers (ptxas -v, CUDA 13.0, sm_90a): 122 (hd 32), 128 (64), 168 (96), 246 (128), i.e. 4, 4,
//   3 and 2 CTAs per SM (__launch_bounds__); hd 64 and 96 spill 12-16 bytes of loop-invariant
//   addresses, reloaded from L1 once per K tile.
// Accumulation rule: o and lse are written (=); rows i >= L are never written.
//
// ---- Backward: maths, shapes, saved buffers (both implementations below) --------------------
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
// Roundings (they set the tolerance of src/ops/attention.rs's fast_tol): every matmul operand is
//   bf16. q', k', v, dO are used as stored; P = 2^(x mul - lse2) (fp32) is rounded to bf16 for
//   dV += P^T dO, and dS dcap = P (dP - D) dcap (fp32 P, dP, D) to bf16 for dK' += dS^T Q' and
//   dQ' += dS K', as FlashAttention does. Accumulators, the P inside dS, the softcap derivative,
//   the scale and the rotary backward are fp32; one bf16 rounding at the store. (The SIMT
//   reference below keeps P and dS in fp32.)
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
// Registers (ptxas -v, CUDA 13.0, sm_90a, __launch_bounds__(128, n)):
//   dkv: 168 / 238 / 255 / 255 for hd 32 / 64 / 96 / 128 (n = 3, 2, 2, 2), spilling 4 / 0 / 12 /
//        32 bytes (hd 32 at n = 4 spills 100 bytes, hd 64 at n = 3 48 bytes);
//   dq:  128 / 168 / 244 / 248 (n = 4, 3, 2, 2), no spills;  prep: 64, no spills.
//   A dkv thread holds dK and dV (2 x hd/2 floats) plus S^T and dP^T (2 x 32), hence hd 128 at
//   the 255 limit. Resident CTAs per SM (registers, then 227 KiB of shared memory): dkv 3, 2, 2,
//   2; dq 4, 3, 2, 2.
// Status: written without a GPU. Checked only by tools/ksim (a CPU simulation of the warp-level
//   PTX: index maths, masks, fragment layouts, cp.async/barrier placement, under fast_tol); the
//   GPU tests in src/ops/attention.rs and `imdm-engine bench kernels` (speed) have not run yet.
//
// ---- Backward, GPU reference (attention_bwd_prep_f32, attention_bwd_dq_hd*,
//      attention_bwd_dkv_hd*, attention_bwd_rope_bf16): correctness-first fp32 SIMT -----------
// Same maths in fp32 throughout (P and dS never rounded to bf16): the GPU-side reference the
// tensor-core kernels are tested against (attention_bwd_reference in src/ops/attention.rs).
//   Workspace (f32): qr, kr, dqr, dkr (B, H, L, hd) and dsum (B, H, L) = D.
// Thread mapping (every kernel: 256 threads = 8 warps, lanes over head dims e = lane + 32k, k <
//   hd/32, so every dot product is a warp sum and every row a coalesced 128-byte access):
//   prep:     one warp per (b, h, position): rotates q and k into qr, kr (lane it < hd/16
//             rotates pairs 8 it .. 8 it + 7 with att_rope8); D into dsum (lanes over dims).
//   dq:       grid (ceil(L/8), B*H); warp w owns query i = 8 blockIdx.x + w and keeps q'_i, dO_i,
//             dq'_i in registers; the block streams 32-key tiles of k' (from kr) and v (bf16 ->
//             f32) through shared memory (2 x 32 x hd f32); causal blocks stop at their last
//             query. Writes dqr (=).
//   dkv:      grid (ceil(L/8), B*H); warp w owns key j; the block streams 32-query tiles of q',
//             dO, lse, D; causal blocks start at the tile holding their first key and each warp
//             skips queries i < j. Writes dkr (=) and the v part of dqkv (bf16, =).
//   rope:     one warp per (b, h, position): rotates dqr, dkr back, writes the q and k parts of
//             dqkv (bf16, =).
// Cost (why this is the reference, not the training kernel): two warp sums per (query, key) pair
//   in each of dq and dkv, fp32 FMAs, no tensor cores: roughly 20 ms per DiT-small layer at
//   B = 32, L = 1024 on an H100 (estimate, not measured).
#include "common.cuh"

#define ATT_BM 64  // queries per CTA
#define ATT_BN 64  // keys per K/V tile
#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * IMDM_WARP)

#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f

__device__ __forceinline__ uint32_t att_smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte async copy global -> shared; when !valid nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void att_cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void att_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void att_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void att_ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void att_ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// d += a (16x16 row-major) * b (16x8 col-major), bf16 in, fp32 accumulate.
__device__ __forceinline__ void att_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> bf16x2 (lo in the low half, the lower column index in the mma fragments).
__device__ __forceinline__ uint32_t att_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float att_exp2(float x) {  // 2^x, -inf -> 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// c tanh(x / c) for a raw score x, with k2 = 2 log2(e) / c: c - 2c / (1 + 2^(k2 x)). Absolute
// error ~2e-7 c; saturates correctly (2^(k2 x) -> inf gives c, -> 0 gives -c).
__device__ __forceinline__ float att_softcap(float x, float k2, float c) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.f + att_exp2(x * k2)));
    return fmaf(-2.f * c, r, c);
}

// sin and cos of an fp32 angle (|a| < ~1e5): Cody-Waite reduction to [-pi, pi] with a two-part
// 2*pi, then the SFU; absolute error ~6e-7 (the plain __sincosf loses ~1e-4 at a ~ 1000).
__device__ __forceinline__ void att_sincos(float a, float* s, float* c) {
    const float k = rintf(a * 0.15915494309189535f);
    float r = fmaf(-k, 6.28318548202514648f, a);  // float(2 pi)
    r = fmaf(-k, -1.7484555314695172e-7f, r);     // 2 pi - float(2 pi)
    __sincosf(r, s, c);
}

// Rotates 8 (x1, x2) pairs in place: x1 = bf16 x[t0..t0+7], x2 = x[hd/2+t0..], frequencies f.
__device__ __forceinline__ void att_rope8(uint4& x1, uint4& x2, const float* f, float pos) {
    __nv_bfloat162* a = reinterpret_cast<__nv_bfloat162*>(&x1);
    __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(&x2);
    const float4 f0 = *reinterpret_cast<const float4*>(f);
    const float4 f1 = *reinterpret_cast<const float4*>(f + 4);
    const float fr[8] = {f0.x, f0.y, f0.z, f0.w, f1.x, f1.y, f1.z, f1.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 u = __bfloat1622float2(a[e]), w = __bfloat1622float2(b[e]);
        float s0, c0, s1, c1;
        att_sincos(pos * fr[2 * e], &s0, &c0);
        att_sincos(pos * fr[2 * e + 1], &s1, &c1);
        a[e] = __floats2bfloat162_rn(u.x * c0 - w.x * s0, u.y * c1 - w.y * s1);
        b[e] = __floats2bfloat162_rn(w.x * c0 + u.x * s0, w.y * c1 + u.y * s1);
    }
}

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

// ---- backward, GPU reference (correctness-first fp32 SIMT; see the header) ----------------------

#define ATT_BWD_WARPS 8
#define ATT_BWD_THREADS (ATT_BWD_WARPS * IMDM_WARP)
#define ATT_BWD_TILE 32  // keys (dq) or queries (dkv) staged in shared memory per step

// The forward's frequency f_t = 10000^(-2t/hd), computed the same way (double, rounded to fp32).
__device__ __forceinline__ float att_bwd_freq(int t, int hd) {
    return (float)exp2(-(double)(2 * t) / hd * 13.287712379549449);
}

// One warp per (b, h, position) row: rotated, bf16-rounded q and k into qr, kr (as the forward
// computes them) and D = dO.o into dsum.
extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS)
attention_bwd_prep_f32(float* __restrict__ qr, float* __restrict__ kr, float* __restrict__ dsum,
                       const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ o,
                       const __nv_bfloat16* __restrict__ dout, int batch, int len, int heads,
                       int hd) {
    const int lane = threadIdx.x % IMDM_WARP;
    const size_t row = (size_t)blockIdx.x * ATT_BWD_WARPS + threadIdx.x / IMDM_WARP;
    if (row >= (size_t)batch * heads * len) return;  // warp-uniform; no barrier below
    const size_t bh = row / len;
    const int p = (int)(row % len);
    const size_t b = bh / heads, h = bh % heads;
    const size_t tok = b * len + p;
    const __nv_bfloat16* q = qkv + tok * 3 * heads * hd + h * hd;
    const __nv_bfloat16* k = q + (size_t)heads * hd;
    const int half = hd / 2;
    // The forward's own rotation routine (att_rope8: 8 pairs, fp32, bf16 rounding) on the same
    // 16-byte chunks, so q' and k' are the forward kernel's values bit for bit. Lane `it` handles
    // pairs 8 it .. 8 it + 7 (hd / 16 <= 8 items; the rows are 16-byte aligned since hd % 32 ==
    // 0 and the base is).
    for (int it = lane; it < half / 8; it += IMDM_WARP) {
        const int c = it * 8;
        __align__(16) float fr[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) fr[u] = att_bwd_freq(c + u, hd);
#pragma unroll
        for (int part = 0; part < 2; ++part) {
            const __nv_bfloat16* src = part == 0 ? q : k;
            float* dst = (part == 0 ? qr : kr) + row * hd;
            uint4 x1 = *reinterpret_cast<const uint4*>(src + c);
            uint4 x2 = *reinterpret_cast<const uint4*>(src + half + c);
            att_rope8(x1, x2, fr, (float)p);
            float f1[8], f2[8];
            bf16x8_to_f32(x1, f1);
            bf16x8_to_f32(x2, f2);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                dst[c + u] = f1[u];
                dst[half + c + u] = f2[u];
            }
        }
    }
    const __nv_bfloat16* orow = o + tok * heads * hd + h * hd;
    const __nv_bfloat16* grow = dout + tok * heads * hd + h * hd;
    float s = 0.f;
    for (int e = lane; e < hd; e += IMDM_WARP)
        s += __bfloat162float(orow[e]) * __bfloat162float(grow[e]);
    s = warp_sum(s);
    if (lane == 0) dsum[row] = s;
}

// The softcapped score and the factor d s / d r (1 without a cap) of a raw score r.
__device__ __forceinline__ float att_bwd_cap(float r, float softcap, float* dcap) {
    if (softcap > 0.f) {
        const float t = tanhf(r / softcap);
        *dcap = 1.f - t * t;
        return softcap * t;
    }
    *dcap = 1.f;
    return r;
}

template <int HD>
__device__ __forceinline__ void attention_bwd_dq(float* __restrict__ dqr,
                                                 const float* __restrict__ qr,
                                                 const float* __restrict__ kr,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ dsum,
                                                 const __nv_bfloat16* __restrict__ qkv,
                                                 const __nv_bfloat16* __restrict__ dout, int len,
                                                 int heads, int causal, float softcap) {
    constexpr int NE = HD / IMDM_WARP;
    __shared__ float sk[ATT_BWD_TILE][HD], sv[ATT_BWD_TILE][HD];
    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int i = blockIdx.x * ATT_BWD_WARPS + warp;
    const bool valid = i < len;  // warp-uniform
    const size_t stride = (size_t)3 * heads * HD;
    const __nv_bfloat16* vbase = qkv + (size_t)b * len * stride + (size_t)2 * heads * HD + h * HD;
    const float scale = (float)(1.0 / sqrt((double)HD));
    float q[NE], g[NE], dq[NE];
    float lse_i = 0.f, d_i = 0.f;
#pragma unroll
    for (int k = 0; k < NE; ++k) q[k] = g[k] = dq[k] = 0.f;
    if (valid) {
        const size_t row = (size_t)bh * len + i;
        const __nv_bfloat16* grow = dout + ((size_t)b * len + i) * heads * HD + h * HD;
#pragma unroll
        for (int k = 0; k < NE; ++k) {
            q[k] = qr[row * HD + lane + IMDM_WARP * k];
            g[k] = __bfloat162float(grow[lane + IMDM_WARP * k]);
        }
        lse_i = lse[row];
        d_i = dsum[row];
    }
    const int i_last = min(len - 1, (int)blockIdx.x * ATT_BWD_WARPS + ATT_BWD_WARPS - 1);
    const int n_keys = causal ? i_last + 1 : len;  // block-uniform
    const int my_keys = causal ? i + 1 : len;      // keys of this warp's query
    for (int j0 = 0; j0 < n_keys; j0 += ATT_BWD_TILE) {
        for (int x = tid; x < ATT_BWD_TILE * HD; x += ATT_BWD_THREADS) {
            const int r = x / HD, e = x % HD, j = j0 + r;
            float kv = 0.f, vv = 0.f;
            if (j < len) {
                kv = kr[((size_t)bh * len + j) * HD + e];
                vv = __bfloat162float(vbase[(size_t)j * stride + e]);
            }
            sk[r][e] = kv;
            sv[r][e] = vv;
        }
        __syncthreads();
        if (valid) {
            const int jend = min(ATT_BWD_TILE, my_keys - j0);
            for (int r = 0; r < jend; ++r) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int k = 0; k < NE; ++k) {
                    s += q[k] * sk[r][lane + IMDM_WARP * k];
                    dp += g[k] * sv[r][lane + IMDM_WARP * k];
                }
                s = warp_sum(s) * scale;
                dp = warp_sum(dp);
                float dcap;
                s = att_bwd_cap(s, softcap, &dcap);
                const float pij = expf(s - lse_i);
                const float ds = pij * (dp - d_i) * dcap * scale;
#pragma unroll
                for (int k = 0; k < NE; ++k) dq[k] += ds * sk[r][lane + IMDM_WARP * k];
            }
        }
        __syncthreads();
    }
    if (valid) {
        const size_t row = (size_t)bh * len + i;
#pragma unroll
        for (int k = 0; k < NE; ++k) dqr[row * HD + lane + IMDM_WARP * k] = dq[k];
    }
}

template <int HD>
__device__ __forceinline__ void attention_bwd_dkv(float* __restrict__ dkr,
                                                  __nv_bfloat16* __restrict__ dqkv,
                                                  const float* __restrict__ qr,
                                                  const float* __restrict__ kr,
                                                  const float* __restrict__ lse,
                                                  const float* __restrict__ dsum,
                                                  const __nv_bfloat16* __restrict__ qkv,
                                                  const __nv_bfloat16* __restrict__ dout, int len,
                                                  int heads, int causal, float softcap) {
    constexpr int NE = HD / IMDM_WARP;
    __shared__ float sq[ATT_BWD_TILE][HD], sg[ATT_BWD_TILE][HD];
    __shared__ float sl[ATT_BWD_TILE], sd[ATT_BWD_TILE];
    const int tid = threadIdx.x, warp = tid / IMDM_WARP, lane = tid % IMDM_WARP;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int j = blockIdx.x * ATT_BWD_WARPS + warp;
    const bool valid = j < len;  // warp-uniform
    const size_t stride = (size_t)3 * heads * HD;
    const size_t ostride = (size_t)heads * HD;
    const float scale = (float)(1.0 / sqrt((double)HD));
    float kj[NE], vj[NE], dk[NE], dv[NE];
#pragma unroll
    for (int k = 0; k < NE; ++k) kj[k] = vj[k] = dk[k] = dv[k] = 0.f;
    if (valid) {
        const __nv_bfloat16* vrow =
            qkv + ((size_t)b * len + j) * stride + (size_t)2 * heads * HD + h * HD;
#pragma unroll
        for (int k = 0; k < NE; ++k) {
            kj[k] = kr[((size_t)bh * len + j) * HD + lane + IMDM_WARP * k];
            vj[k] = __bfloat162float(vrow[lane + IMDM_WARP * k]);
        }
    }
    // Causal: queries i >= j only; start at the tile holding the block's first key.
    const int j_first = blockIdx.x * ATT_BWD_WARPS;
    const int i_begin = causal ? (j_first / ATT_BWD_TILE) * ATT_BWD_TILE : 0;  // block-uniform
    for (int i0 = i_begin; i0 < len; i0 += ATT_BWD_TILE) {
        for (int x = tid; x < ATT_BWD_TILE * HD; x += ATT_BWD_THREADS) {
            const int r = x / HD, e = x % HD, i = i0 + r;
            float qv = 0.f, gv = 0.f;
            if (i < len) {
                qv = qr[((size_t)bh * len + i) * HD + e];
                gv = __bfloat162float(dout[((size_t)b * len + i) * ostride + h * HD + e]);
            }
            sq[r][e] = qv;
            sg[r][e] = gv;
        }
        if (tid < ATT_BWD_TILE) {
            const int i = i0 + tid;
            sl[tid] = i < len ? lse[(size_t)bh * len + i] : 0.f;
            sd[tid] = i < len ? dsum[(size_t)bh * len + i] : 0.f;
        }
        __syncthreads();
        if (valid) {
            const int rbeg = causal ? max(0, j - i0) : 0;
            const int rend = min(ATT_BWD_TILE, len - i0);
            for (int r = rbeg; r < rend; ++r) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int k = 0; k < NE; ++k) {
                    s += sq[r][lane + IMDM_WARP * k] * kj[k];
                    dp += sg[r][lane + IMDM_WARP * k] * vj[k];
                }
                s = warp_sum(s) * scale;
                dp = warp_sum(dp);
                float dcap;
                s = att_bwd_cap(s, softcap, &dcap);
                const float pij = expf(s - sl[r]);
                const float ds = pij * (dp - sd[r]) * dcap * scale;
#pragma unroll
                for (int k = 0; k < NE; ++k) {
                    dv[k] += pij * sg[r][lane + IMDM_WARP * k];
                    dk[k] += ds * sq[r][lane + IMDM_WARP * k];
                }
            }
        }
        __syncthreads();
    }
    if (valid) {
        __nv_bfloat16* dvrow =
            dqkv + ((size_t)b * len + j) * stride + (size_t)2 * heads * HD + h * HD;
#pragma unroll
        for (int k = 0; k < NE; ++k) {
            dkr[((size_t)bh * len + j) * HD + lane + IMDM_WARP * k] = dk[k];
            dvrow[lane + IMDM_WARP * k] = __float2bfloat16_rn(dv[k]);
        }
    }
}

#define ATT_BWD_KERNELS(HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS) attention_bwd_dq_hd##HD(      \
        float* __restrict__ dqr, const float* __restrict__ qr, const float* __restrict__ kr,    \
        const float* __restrict__ lse, const float* __restrict__ dsum,                          \
        const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ dout, int len, \
        int heads, int causal, float softcap) {                                                 \
        attention_bwd_dq<HD>(dqr, qr, kr, lse, dsum, qkv, dout, len, heads, causal, softcap);   \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS) attention_bwd_dkv_hd##HD(     \
        float* __restrict__ dkr, __nv_bfloat16* __restrict__ dqkv,                              \
        const float* __restrict__ qr, const float* __restrict__ kr,                             \
        const float* __restrict__ lse, const float* __restrict__ dsum,                          \
        const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ dout, int len, \
        int heads, int causal, float softcap) {                                                 \
        attention_bwd_dkv<HD>(dkr, dqkv, qr, kr, lse, dsum, qkv, dout, len, heads, causal,      \
                              softcap);                                                         \
    }

ATT_BWD_KERNELS(32)
ATT_BWD_KERNELS(64)
ATT_BWD_KERNELS(96)
ATT_BWD_KERNELS(128)

// One warp per (b, h, position) row: the rotary backward of dq' and dk' into the q and k parts
// of dqkv (bf16).
extern "C" __global__ void __launch_bounds__(ATT_BWD_THREADS)
attention_bwd_rope_bf16(__nv_bfloat16* __restrict__ dqkv, const float* __restrict__ dqr,
                        const float* __restrict__ dkr, int batch, int len, int heads, int hd) {
    const int lane = threadIdx.x % IMDM_WARP;
    const size_t row = (size_t)blockIdx.x * ATT_BWD_WARPS + threadIdx.x / IMDM_WARP;
    if (row >= (size_t)batch * heads * len) return;
    const size_t bh = row / len;
    const int p = (int)(row % len);
    const size_t b = bh / heads, h = bh % heads;
    __nv_bfloat16* dq = dqkv + (b * len + p) * 3 * heads * hd + h * hd;
    __nv_bfloat16* dk = dq + (size_t)heads * hd;
    const int half = hd / 2;
    for (int t = lane; t < half; t += IMDM_WARP) {
        float sn, cs;
        att_sincos((float)p * att_bwd_freq(t, hd), &sn, &cs);
        const float q1 = dqr[row * hd + t], q2 = dqr[row * hd + t + half];
        const float k1 = dkr[row * hd + t], k2 = dkr[row * hd + t + half];
        dq[t] = __float2bfloat16_rn(q1 * cs + q2 * sn);
        dq[t + half] = __float2bfloat16_rn(q2 * cs - q1 * sn);
        dk[t] = __float2bfloat16_rn(k1 * cs + k2 * sn);
        dk[t + half] = __float2bfloat16_rn(k2 * cs - k1 * sn);
    }
}

// ---- backward, tensor-core kernels (attention_bwd_prep_bf16, attention_bwd_dkv_bf16_hd*,
//      attention_bwd_dq_bf16_hd*; see the header) ------------------------------------------------

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

// Minimum resident CTAs per SM for the register budget (see the header).
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
