// Host shim: runs the CUDA C++ of kernels/*.cu on CPU threads (one OS thread per CUDA thread),
// simulating warp collectives (ldmatrix, mma.sync m16n8k16 bf16, shuffles) from the PTX ISA's
// fragment definitions. For checking index maths without a GPU; not for numerics or speed.
#pragma once
#include <barrier>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static __shared__ variables are rewritten by gen.py into sim::shared references.

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim, blockDim;

struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct uint2 {
    uint32_t x, y;
};
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }

struct __nv_bfloat16 {
    uint16_t v;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline uint16_t sim_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
    return (uint16_t)(u >> 16);
}
inline float sim_bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {{sim_f2bf(a)}, {sim_f2bf(b)}};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {sim_bf2f(v.x.v), sim_bf2f(v.y.v)}; }
inline float __bfloat162float(__nv_bfloat16 v) { return sim_bf2f(v.v); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {sim_f2bf(f)}; }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
inline void __sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint2float_rn(uint32_t u) { return (float)u; }
// f32 intrinsics with an explicit rounding mode (no contraction: -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
using std::isfinite;
// Fast-math intrinsics are exact here (the GPU's __expf / rsqrtf are within a few ulp).
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __uint_as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int32_t u) { return __uint_as_float((uint32_t)u); }
// Cache hints (last use, streaming) are plain loads and stores.
template <class T>
inline T __ldlu(const T* p) {
    return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
    *p = v;
}
// f64 intrinsics with an explicit rounding mode: the default (nearest) operations; the harness is
// compiled without FMA contraction (-ffp-contract=off), as the __d*_rn intrinsics promise.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
// Only for counters touched by one thread per block (blocks run one after another).
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

// ThreadSanitizer build: the simulator's own bookkeeping (the lazy allocation of static shared
// storage) must not create happens-before edges between simulated threads, or it would hide a
// missing __syncthreads.
#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char*, int);
extern "C" void AnnotateIgnoreSyncEnd(const char*, int);
extern "C" void AnnotateIgnoreReadsBegin(const char*, int);
extern "C" void AnnotateIgnoreReadsEnd(const char*, int);
extern "C" void AnnotateIgnoreWritesBegin(const char*, int);
extern "C" void AnnotateIgnoreWritesEnd(const char*, int);
#define SIM_UNTRACKED_BEGIN() \
    (AnnotateIgnoreSyncBegin(__FILE__, __LINE__), AnnotateIgnoreReadsBegin(__FILE__, __LINE__), \
     AnnotateIgnoreWritesBegin(__FILE__, __LINE__))
#define SIM_UNTRACKED_END() \
    (AnnotateIgnoreWritesEnd(__FILE__, __LINE__), AnnotateIgnoreReadsEnd(__FILE__, __LINE__), \
     AnnotateIgnoreSyncEnd(__FILE__, __LINE__))
#else
#define SIM_UNTRACKED_BEGIN() ((void)0)
#define SIM_UNTRACKED_END() ((void)0)
#endif

// ln_modulate: gen.py makes the register fast path conditional on !sim_ln_generic.
inline bool sim_ln_generic = false;

namespace sim {
// Rendezvous of the lanes in `mask` of one warp: every lane deposits `bytes` and receives all 32
// lanes' deposits.
struct WarpSync {
    std::mutex m;
    std::condition_variable cv;
    struct Group {
        int arrived = 0, departed = 0;
        bool full = false;
        uint64_t gen = 0;
        unsigned char buf[32 * 64];
    };
    std::map<uint32_t, Group> groups;
};
struct Block {
    std::barrier<>* bar;
    WarpSync warps[32];
    unsigned char* smem;
    std::mutex static_m;  // static shared storage: one exactly sized, 0xff-filled buffer per site
    std::map<uint64_t, std::unique_ptr<unsigned char[]>> statics;
};
struct Copy {
    void* dst;
    const void* src;
    int n;
};
inline thread_local Block* blk;
inline thread_local std::vector<std::vector<Copy>> committed;
inline thread_local std::vector<Copy> open;
inline bool eager = false;  // cp.async lands at issue (eager) or at the wait that needs it

inline void exchange(uint32_t mask, const void* in, size_t bytes, void* out) {
    const int lane = threadIdx.x % 32;
    if (!((mask >> lane) & 1u)) {
        fprintf(stderr, "lane %d not in mask %08x\n", lane, mask);
        abort();
    }
    WarpSync& w = blk->warps[threadIdx.x / 32];
    std::unique_lock<std::mutex> lk(w.m);
    auto& g = w.groups[mask];
    const int n = __builtin_popcount(mask);
    w.cv.wait(lk, [&] { return !g.full; });
    if (bytes) memcpy(g.buf + lane * bytes, in, bytes);
    const uint64_t my = g.gen;
    if (++g.arrived == n) {
        g.full = true;
        g.gen++;
        w.cv.notify_all();
    } else {
        w.cv.wait(lk, [&] { return g.gen != my; });
    }
    if (bytes) memcpy(out, g.buf, 32 * bytes);
    if (++g.departed == n) {
        g.arrived = g.departed = 0;
        g.full = false;
        w.cv.notify_all();
    }
}
inline unsigned char* smem() { return blk->smem; }
// The block's storage of one static __shared__ declaration (site id from gen.py), allocated
// by the first thread that reaches it and filled with 0xff (f32/bf16 NaN, u32 0xffffffff) as
// the dynamic buffer is; exactly sized, so AddressSanitizer sees any overflow.
template <class A>
A& shared(uint32_t site) {
    const uint64_t key = (uint64_t)site << 32 | (uint32_t)sizeof(A);
    SIM_UNTRACKED_BEGIN();
    unsigned char* p;
    {
        std::lock_guard<std::mutex> lk(blk->static_m);
        auto& slot = blk->statics[key];
        if (!slot) {
            slot.reset(new unsigned char[sizeof(A)]);
            memset(slot.get(), 0xff, sizeof(A));
        }
        p = slot.get();
    }
    SIM_UNTRACKED_END();
    return *reinterpret_cast<A*>(p);
}
// Coverage: the kernels launched since the last case report (names from the symbol table: the
// harness is linked with -rdynamic and the kernels are extern "C").
inline std::set<std::string> launched;
inline void record_launch(const void* f) {
    Dl_info info;
    if (dladdr(f, &info) && info.dli_sname) launched.insert(info.dli_sname);
    else launched.insert("?");
}
// Called by each case's report: appends "kernel<TAB>case" lines to $KSIM_COVERAGE.
inline void flush_coverage(const std::string& what) {
    const char* path = getenv("KSIM_COVERAGE");
    if (path) {
        FILE* f = fopen(path, "a");
        if (f) {
            for (auto& k : launched) fprintf(f, "%s\t%s\n", k.c_str(), what.c_str());
            fclose(f);
        }
    }
    launched.clear();
}
inline void land(const Copy& c) {
    if (c.n) memcpy(c.dst, c.src, 16);
    else memset(c.dst, 0, 16);
}
}  // namespace sim

inline void __syncthreads() { sim::blk->bar->arrive_and_wait(); }
inline void __syncwarp(uint32_t mask = 0xffffffffu) { sim::exchange(mask, nullptr, 0, nullptr); }
template <class T>
inline T __shfl_xor_sync(uint32_t mask, T v, int o) {
    static_assert(sizeof(T) <= 64, "exchange buffer");
    T all[32];
    sim::exchange(mask, &v, sizeof(T), all);
    return all[(threadIdx.x % 32) ^ o];
}

// ---- replacements of the asm helpers of attention_common.cuh ----
inline uint32_t sim_smem_u32(const void* p) {
    return (uint32_t)((const unsigned char*)p - sim::smem());
}
inline void sim_cp_async16(uint32_t dst, const void* src, bool valid) {
    sim::Copy c{sim::smem() + dst, src, valid ? 16 : 0};
    if (sim::eager) sim::land(c);
    else sim::open.push_back(c);
}
inline void sim_cp_async_commit() {
    sim::committed.push_back(sim::open);
    sim::open.clear();
}
inline void sim_cp_async_wait(int n) {
    while ((int)sim::committed.size() > n) {
        for (auto& c : sim::committed.front())
            if (!sim::eager) sim::land(c);
        sim::committed.erase(sim::committed.begin());
    }
}
inline uint16_t sim_bf_at(uint32_t addr) {
    uint16_t h;
    memcpy(&h, sim::smem() + addr, 2);
    return h;
}
// ldmatrix .x4: lanes 8m..8m+7 give the row addresses of matrix m; lane L receives, of each
// matrix, row L/4, columns 2(L%4), 2(L%4)+1 (non-trans) or rows 2(L%4), 2(L%4)+1 of column L/4
// (trans); the lower column (row) in the low half.
inline void sim_ldsm(uint32_t (&r)[4], uint32_t addr, bool trans) {
    uint32_t all[32];
    sim::exchange(0xffffffffu, &addr, 4, all);
    const int L = threadIdx.x % 32;
    for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {
            const uint32_t row = all[8 * m + L / 4];
            lo = sim_bf_at(row + 2 * (2 * (L % 4)));
            hi = sim_bf_at(row + 2 * (2 * (L % 4) + 1));
        } else {
            lo = sim_bf_at(all[8 * m + 2 * (L % 4)] + 2 * (L / 4));
            hi = sim_bf_at(all[8 * m + 2 * (L % 4) + 1] + 2 * (L / 4));
        }
        r[m] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    sim::exchange(0xffffffffu, nullptr, 0, nullptr);
}
// mma.sync.m16n8k16 row.col bf16 -> f32 (PTX ISA fragment layouts, g = L/4, c = L%4):
// A: a0 (g, 2c..2c+1), a1 (g+8, 2c..), a2 (g, 8+2c..), a3 (g+8, 8+2c..); B: b0 (k 2c..2c+1, n g),
// b1 (k 8+2c.., n g); C/D: d0, d1 (g, 2c..2c+1), d2, d3 (g+8, 2c..).
inline void sim_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1}, all[32 * 6];
    sim::exchange(0xffffffffu, mine, sizeof mine, all);
    float A[16][16], B[16][8];
    for (int T = 0; T < 32; ++T) {
        const int g = T / 4, c = T % 4;
        const uint32_t* f = all + 6 * T;
        auto lo = [](uint32_t x) { return sim_bf2f((uint16_t)(x & 0xffff)); };
        auto hi = [](uint32_t x) { return sim_bf2f((uint16_t)(x >> 16)); };
        A[g][2 * c] = lo(f[0]), A[g][2 * c + 1] = hi(f[0]);
        A[g + 8][2 * c] = lo(f[1]), A[g + 8][2 * c + 1] = hi(f[1]);
        A[g][8 + 2 * c] = lo(f[2]), A[g][8 + 2 * c + 1] = hi(f[2]);
        A[g + 8][8 + 2 * c] = lo(f[3]), A[g + 8][8 + 2 * c + 1] = hi(f[3]);
        B[2 * c][g] = lo(f[4]), B[2 * c + 1][g] = hi(f[4]);
        B[8 + 2 * c][g] = lo(f[5]), B[8 + 2 * c + 1][g] = hi(f[5]);
    }
    const int L = threadIdx.x % 32, g = L / 4, c = L % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        d[e] = s;
    }
    sim::exchange(0xffffffffu, nullptr, 0, nullptr);
}

// Runs kernel f over the grid, one CTA at a time, one OS thread per CUDA thread; `smem_bytes` of
// dynamic shared memory filled with 0xff (bf16 NaN) so reads of unwritten shared memory show.
template <class F, class... A>
void sim_launch(F f, Dim3 grid, Dim3 block, size_t smem_bytes, A... args) {
    sim::record_launch((const void*)f);
    gridDim = grid;
    blockDim = block;
    const int nt = block.x;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(nt);
            auto* B = new sim::Block;
            B->bar = &bar;
            std::vector<unsigned char> sm(smem_bytes ? smem_bytes : 16, 0xff);
            B->smem = sm.data();
            std::vector<std::thread> ts;
            for (int t = 0; t < nt; ++t)
                ts.emplace_back([&, t] {
                    threadIdx = {(unsigned)t, 0, 0};
                    blockIdx = {bx, by, 0};
                    sim::blk = B;
                    sim::committed.clear();
                    sim::open.clear();
                    f(args...);
                    if (!sim::open.empty() || !sim::committed.empty()) {
                        fprintf(stderr, "thread %d exits with cp.async in flight\n", t);
                        abort();
                    }
                });
            for (auto& t : ts) t.join();
            delete B;
        }
}
