// Shared helpers of the ksim harnesses (harness_<family>.cpp): bf16 conversions, seeded inputs,
// error ratios against f64 references, and the case report that also records coverage.
#pragma once
#include <random>
#include <string>
#include <vector>

typedef __nv_bfloat16 bf;
static inline float bf2f(bf x) { return sim_bf2f(x.v); }
static inline bf f2bf(float x) { return {sim_f2bf(x)}; }
static inline uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static int fails = 0;
// One line per case; the kernels launched since the previous report are credited to it.
static inline void report(bool ok, const std::string& what) {
    fails += !ok;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    fflush(stdout);
    sim::flush_coverage(what);
}
// |got - want| / tol, infinite when got is not finite (a NaN output never passes).
static inline double ratio(double got, double want, double tol) {
    return std::isfinite(got) ? fabs(got - want) / tol : INFINITY;
}
// 1 ulp of a bf16 near |z| (7 stored mantissa bits), at least the smallest normal's.
static inline double bf_ulp(double z) { return ldexp(1.0, std::max(ilogb(fabs(z) + 1e-30), -126) - 7); }
static inline std::vector<float> uniform(size_t n, float lo, float hi, std::mt19937_64& rng) {
    std::uniform_real_distribution<float> U(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = U(rng);
    return v;
}
static inline std::vector<bf> to_bf(const std::vector<float>& v) {
    std::vector<bf> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = f2bf(v[i]);
    return o;
}
// A copy of v shifted by `off` elements inside a larger buffer (unaligned rows when off % 4 != 0).
template <class T>
struct Shifted {
    std::vector<T> buf;
    int off;
    Shifted(const std::vector<T>& v, int o, T fill) : buf(v.size() + o + 1, fill), off(o) {
        std::copy(v.begin(), v.end(), buf.begin() + o);
    }
    T* p() { return buf.data() + off; }
    T& operator[](size_t i) { return buf[off + i]; }
};
// The ThreadSanitizer build runs several times slower (every access and synchronisation is
// tracked): there, only the cases marked for it run, chosen so every kernel and every barrier
// path (several tiles, chunks, rows) still runs at least once.
#if defined(__SANITIZE_THREAD__)
static constexpr bool KSIM_TSAN = true;
#else
static constexpr bool KSIM_TSAN = false;
#endif
static inline bool pick(bool in_tsan_set) { return !KSIM_TSAN || in_tsan_set; }
static inline int finish() {
    printf("%d failures\n", fails);
    return fails != 0;
}
