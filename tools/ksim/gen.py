# kernels/X.cu -> OUT/X_sim.cpp (and each local X.cuh it includes -> OUT/X_sim.cuh): the asm
# helpers replaced by shim.h's simulations, dynamic shared memory pointed at the simulated block's
# buffer, static __shared__ variables turned into references to per-block storage that starts
# poisoned (sim::shared), like the dynamic buffer. Usage: gen.py in.cu OUT/X_sim.cpp.
# Kernels without asm need only the shared-memory rewrite; their intrinsics (__ldlu, __stcs,
# __expf, __d*_rn, ...) are plain functions in shim.h.
import os, re, sys, zlib

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'kernels')

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

R = {  # attention's asm helpers
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

def split_top(s):
    """Splits a declarator list at the commas outside brackets."""
    out, depth, cur = [], 0, ''
    for ch in s:
        if ch in '[(<': depth += 1
        elif ch in '])>': depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur.strip()); cur = ''
        else:
            cur += ch
    out.append(cur.strip())
    return out

def convert(path, out_dir, done_files):
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    src = open(path).read()
    notes = []
    # Local headers: converted too (they may hold asm helpers or static shared arrays).
    def inc(m):
        h = m.group(1)
        hp = os.path.join(os.path.dirname(path), h)
        if not os.path.exists(hp):  # kernels/dev/*.cu include kernels/*.cuh (nvcc's -I kernels)
            hp = os.path.join(KERNELS, h)
        if not os.path.exists(hp): return m.group(0)
        hs, he = os.path.splitext(os.path.basename(h))  # every generated file sits in OUT
        if hp not in done_files:
            done_files.add(hp)
            convert(hp, out_dir, done_files)
        return '#include "%s_sim%s"' % (hs, he)
    src = re.sub(r'(?m)^#include "([\w/.]+)"', inc, src)
    done = 0
    for k, v in R.items():
        if re.search(r'__device__ __forceinline__ [^\n]*\b' + k + r'\(', src):
            src = replace_fn(src, k, v)
            done += 1
    if done: notes.append('%d asm helpers' % done)
    n = src.count('extern __shared__ __align__(16) unsigned char att_smem[];')
    src = src.replace('extern __shared__ __align__(16) unsigned char att_smem[];', 'unsigned char* att_smem = sim::smem();')
    # Other dynamic shared arrays (file scope or local): a macro naming the block's buffer.
    src, n2 = re.subn(r'(?m)^\s*extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];',
                      r'#define \2 ((\1*)sim::smem())', src)
    if n + n2: notes.append('%d dynamic shared' % (n + n2))
    # Static shared variables: `__shared__ T a[N][M], b;` -> references into the block's storage,
    # one site id per declarator (sim::shared poisons it at the block's first use).
    nsite = [0]
    def stat(m):
        ind, ty, decls = m.group(1), m.group(2), m.group(3)
        lines = []
        for d in split_top(decls):
            dm = re.match(r'(\w+)\s*((?:\[[^\]]+\])*)$', d)
            assert dm, 'static shared declarator: ' + d
            site = zlib.crc32(('%s:%d' % (name, nsite[0])).encode()) & 0x7fffffff
            nsite[0] += 1
            lines.append('%sauto& %s = sim::shared<%s%s>(%du);' % (ind, dm.group(1), ty, dm.group(2), site))
        return '\n'.join(lines)
    src = re.sub(r'(?m)^(\s*)__shared__ (?:__align__\(\d+\) )?([\w:]+(?: [\w:]+)*?) ([^;=]+);', stat, src)
    if nsite[0]: notes.append('%d static shared' % nsite[0])
    assert '__shared__' not in re.sub(r'//[^\n]*', '', src), name + ': __shared__ left'
    # ln_modulate: the register fast path can be switched off at run time (sim_ln_generic) to
    # compare it bit for bit with the generic path.
    src, n3 = re.subn(r'if \(vec && d <= IMDM_WARP \* 4 \* LN_MAX_VEC\)',
                      'if (vec && d <= IMDM_WARP * 4 * LN_MAX_VEC && !sim_ln_generic)', src)
    if n3: notes.append('fast-path switch')
    assert 'asm' not in re.sub(r'//[^\n]*', '', src), name + ': asm left'
    out = os.path.join(out_dir, stem + '_sim' + (ext if ext != '.cu' else '.cpp'))
    open(out, 'w').write('#include "shim.h"\n' + src)
    print('  gen %s: %s' % (name, ', '.join(notes) or 'as is'))

if __name__ == '__main__':
    convert(sys.argv[1], os.path.dirname(os.path.abspath(sys.argv[2])), set())
