# kernels/X.cu -> X_sim.cpp: the asm helpers replaced by shim.h's simulations, dynamic shared
# memory declarations pointed at the simulated block's buffer. Usage: gen.py in.cu [in2.cu ...]
# out.cpp: several inputs become one translation unit, each kernels/*.cuh they include other than
# common.cuh (attention_common.cuh) pasted in once, at its first include, so its helpers are
# replaced too.
# Kernels without asm (ln_modulate, subs, sample) need only the shared-memory rewrite; their
# intrinsics (__ldlu, __stcs, __expf, __d*_rn, ...) are plain functions in shim.h.
import os, re, sys
*inputs, output = sys.argv[1:]
pasted = set()
kdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../kernels')
def expand(path):
    def inc(m):
        if m.group(1) == 'common.cuh':
            return m.group(0)
        h = os.path.normpath(os.path.join(kdir, m.group(1)))
        if h in pasted:
            return ''
        pasted.add(h)
        return expand(h)
    src = open(path).read().replace('#pragma once\n', '')
    return re.sub(r'(?m)^#include "([\w./]+\.cuh)"', inc, src)
src = '\n'.join(expand(p) for p in inputs)
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
R = {  # attention_common.cuh's helpers
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
done = 0
for k, v in R.items():
    if re.search(r'__device__ __forceinline__ [^\n]*\b' + k + r'\(', src):
        src = replace_fn(src, k, v)
        done += 1
n = src.count('extern __shared__ __align__(16) unsigned char att_smem[];')
src = src.replace('extern __shared__ __align__(16) unsigned char att_smem[];', 'unsigned char* att_smem = sim::smem();')
# Other dynamic shared arrays (file scope or local): a macro naming the block's buffer.
src, n2 = re.subn(r'(?m)^\s*extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];',
                  r'#define \2 ((\1*)sim::smem())', src)
# ln_modulate: the register fast path can be switched off at run time (sim_ln_generic) to
# compare it bit for bit with the generic path.
src, n3 = re.subn(r'if \(vec && d <= IMDM_WARP \* 4 \* LN_MAX_VEC\)',
                  'if (vec && d <= IMDM_WARP * 4 * LN_MAX_VEC && !sim_ln_generic)', src)
assert 'asm' not in re.sub(r'//[^\n]*', '', src), 'asm left'
open(output, 'w').write('#include "shim.h"\n' + src)
print(' + '.join(p.split('/')[-1] for p in inputs) + ':', 'replaced', done, 'helpers,', n + n2, 'shared declarations' + (', fast-path switch' if n3 else ''))
