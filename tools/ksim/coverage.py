# The coverage list of `run.sh all`: every __global__ function of the kernel files (names made by
# a macro, like attention_fwd_bf16_hd##HD, expanded at each invocation of the macro) with the
# cases that launched it (coverage.tsv: "kernel<TAB>case" lines written by the harnesses).
# Exits 1 when a kernel has no case. Usage: coverage.py coverage.tsv kernels/X.cu ...
import os, re, sys
from collections import OrderedDict

def kernels(path):
    src = re.sub(r'//[^\n]*', '', open(path).read().replace('\\\n', ' '))
    names = []
    for m in re.finditer(r'__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?([\w#]+)\s*\(', src):
        name = m.group(1)
        if '##' not in name:
            names.append(name)
            continue
        # Inside a macro: the last #define before the kernel, expanded at its invocations.
        d = list(re.finditer(r'#define\s+(\w+)\(([^)]*)\)', src[:m.start()]))
        assert d, path + ': ' + name + ' outside a macro'
        macro, params = d[-1].group(1), [p.strip() for p in d[-1].group(2).split(',')]
        for inv in re.finditer(r'(?m)^\s*' + macro + r'\(([^)]*)\)', src):
            args = dict(zip(params, [a.strip() for a in inv.group(1).split(',')]))
            names.append(re.sub(r'\s*##\s*(\w+)', lambda a: args[a.group(1)], name))
    return names

cov = OrderedDict()
if os.path.exists(sys.argv[1]):
    for line in open(sys.argv[1]):
        k, _, case = line.rstrip('\n').partition('\t')
        cov.setdefault(k, []).append(case)
missing = []
print('coverage (kernel: cases that launched it)')
for f in sys.argv[2:]:
    for k in kernels(f):
        cases = cov.get(k, [])
        if not cases: missing.append(k)
        labels = [c.split(':')[0] for c in cases]  # the case's shape, without its figures
        shown = '; '.join(labels[:3]) + (' (+%d more)' % (len(labels) - 3) if len(labels) > 3 else '')
        print('  %-32s %3d  %s' % (k, len(cases), shown or 'NO CASE'))
if missing:
    print('kernels without a case: ' + ' '.join(missing))
    sys.exit(1)
print('every kernel has a case')
