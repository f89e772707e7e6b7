# kernels/attention.cu -> attention_sim.cpp: the asm helpers replaced by shim.h's simulations.
import re, sys
src = open(sys.argv[1]).read()
def replace_fn(s, name, body_sig):
    m = re.search(r'(template <int N>\s*)?__device__ __forceinline__ [^\n]*\b' + name + r'\(', s)
    assert m, name
    i = s.index('{', m.end())
    depth, j = 0, i
    while True:
        if s[j] == '{': depth += 1
        elif s[j] == '}':
            depth -= 1
            if depth == 0: break
        j += 1
    return s[:m.start()] + body_sig + s[j + 1:]
R = {
 'att_smem_u32': 'inline uint32_t att_smem_u32(const void* p) { return sim_smem_u32(p); }',
 'att_cp_async16': 'inline void att_cp_async16(uint32_t d, const void* s, bool v) { sim_cp_async16(d, s, v); }',
 'att_cp_async_commit': 'inline void att_cp_async_commit() { sim_cp_async_commit(); }',
 'att_cp_async_wait': 'template <int N> inline void att_cp_async_wait() { sim_cp_async_wait(N); }',
 'att_ldsm_x4': 'inline void att_ldsm_x4(uint32_t (&r)[4], uint32_t a) { sim_ldsm(r, a, false); }',
 'att_ldsm_x4_t': 'inline void att_ldsm_x4_t(uint32_t (&r)[4], uint32_t a) { sim_ldsm(r, a, true); }',
 'att_mma': 'inline void att_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { sim_mma(d, a, b0, b1); }',
 'att_exp2': 'inline float att_exp2(float x) { return exp2f(x); }',
 'att_softcap': 'inline float att_softcap(float x, float k2, float c) { return fmaf(-2.f * c, 1.f / (1.f + exp2f(x * k2)), c); }',
}
for k, v in R.items():
    src = replace_fn(src, k, v)
n = src.count('extern __shared__ __align__(16) unsigned char att_smem[];')
src = src.replace('extern __shared__ __align__(16) unsigned char att_smem[];', 'unsigned char* att_smem = sim::smem();')
assert 'asm' not in re.sub(r'//[^\n]*', '', src), 'asm left'
open(sys.argv[2], 'w').write('#include "shim.h"\n' + src)
print('replaced', len(R), 'helpers,', n, 'shared declarations')
