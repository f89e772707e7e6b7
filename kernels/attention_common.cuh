// attention_common.cuh: what the attention kernels share (attention_fwd.cu, attention_bwd.cu
// and the reference backward kernels/dev/attention_bwd_ref.cu): tile sizes, the mma.sync /
// ldmatrix / cp.async wrappers, exp2 and softcap in the log2 domain, and the rotary helpers
// with the forward's frequency formula, so every file rotates q and k bit for bit alike.
#pragma once

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

// Backward blocks of 8 warps (the tensor-core prep and the reference kernels).
#define ATT_BWD_WARPS 8
#define ATT_BWD_THREADS (ATT_BWD_WARPS * IMDM_WARP)

// The forward's frequency f_t = 10000^(-2t/hd), computed the same way (double, rounded to fp32).
__device__ __forceinline__ float att_bwd_freq(int t, int hd) {
    return (float)exp2(-(double)(2 * t) / hd * 13.287712379549449);
}
