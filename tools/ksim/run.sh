#!/usr/bin/env bash
# ksim: CPU simulation of every kernel of kernels/ (and kernels/dev/), for checking index maths,
# masks, fragment layouts, strides and barrier placement on a machine without a GPU.
#
# How: gen.py copies each kernel file (and the local headers it includes) with its inline-PTX
# helpers (cp.async, ldmatrix, mma.sync m16n8k16, ex2/rcp) replaced by shim.h's simulations,
# written from the PTX ISA's fragment definitions, its dynamic shared memory pointed at the
# simulated block's buffer and its static __shared__ variables turned into per-block storage;
# plain intrinsics (__expf, rsqrtf, __ldlu, __stcs, __d*_rn, __f*_rn, shuffles, atomics) are shim.h
# functions. Every CUDA thread is an OS thread, __syncthreads is a std::barrier per block and
# warp collectives rendezvous per warp (mutex + condition variable), so both are real
# synchronisation. All shared memory (dynamic and static) starts as 0xff (bf16/f32 NaN) and
# outputs as NaN. One harness per kernel family (harness_<family>.cpp, helpers in check.h)
# checks each kernel against a reference written from the kernel header's maths, in f64 (or a
# sequential port for integer/bitwise kernels), at awkward shapes: lengths not a multiple of the
# tile, V = 50258 with a padded row stride, batch 1, rows not a multiple of the block,
# unaligned buffers (the scalar paths).
#
# Two builds: AddressSanitizer (default: out-of-bounds and use-after-free on every buffer,
# shared memory included) and ThreadSanitizer (--tsan: a shared- or global-memory access of
# two simulated threads with no barrier, warp collective or atomic between them is reported
# whatever the schedule, so a missing __syncthreads shows deterministically). The ThreadSanitizer
# build runs several times slower, so there each harness runs the subset of its cases marked
# with pick() in check.h (every kernel, and every multi-tile / multi-chunk path, still runs).
#
# Not a substitute for the GPU tests: exp2/rcp/sincos/__expf/rsqrtf are exact here, one schedule
# per run (attention: cp.async landing lazily and eagerly), no timing, no register pressure.
#
# Usage: tools/ksim/run.sh [--tsan] [all | FAMILY [ARGS]]
#   all (default): every harness, then the coverage list (each kernel with the cases that
#     launched it); exits non-zero when a case fails or a __global__ of the kernel files has no
#     case. FAMILY: one harness (attention, adamw, embedding, gelu, kl, ln, residual, rollout,
#     sample, subs), ARGS passed to it (attention: lazy|eager [hd]; the others: a case filter, see each main).
# Needs g++ >= 12 (C++20) and python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# The kernel files: every __global__ in them must have a case (the one list, read by coverage.py).
kernel_files=("$root"/kernels/*.cu)
[ -d "$root/kernels/dev" ] && kernel_files+=("$root"/kernels/dev/*.cu)
san=address
if [ "${1:-}" = --tsan ]; then san=thread; shift; fi
what="${1:-all}"
[ $# -gt 0 ] && shift
out="${TMPDIR:-/tmp}/imdm-ksim/$san"
mkdir -p "$out/fake"
touch "$out/fake/cuda_bf16.h"
cp "$here"/shim.h "$here"/check.h "$here"/harness_*.cpp "$out/"
families=()
for h in "$here"/harness_*.cpp; do f="${h##*/harness_}"; families+=("${f%.cpp}"); done
if [ "$what" = all ]; then run=("${families[@]}")
elif [ -f "$here/harness_$what.cpp" ]; then run=("$what")
else echo "usage: $0 [--tsan] [all | FAMILY [ARGS]]; families: ${families[*]}" >&2; exit 2; fi
flags=(-std=c++20 -O1 -g -fsanitize=$san -ffp-contract=off -rdynamic -Wno-unknown-pragmas
  -I "$out/fake")
# The simulated sources a harness includes (#include "X_sim.cpp" <- the kernel file X.cu).
gen() {
  local fam="$1" k src f
  for k in $(sed -n 's/^#include "\([A-Za-z0-9_]*\)_sim\.cpp".*/\1/p' "$here/harness_$fam.cpp"); do
    src=""
    for f in "${kernel_files[@]}"; do [ "$(basename "$f" .cu)" = "$k" ] && src="$f"; done
    [ -n "$src" ] || { echo "harness_$fam.cpp includes ${k}_sim.cpp but kernels/ has no $k.cu" >&2; return 1; }
    python3 "$here/gen.py" "$src" "$out/${k}_sim.cpp"
  done
}
# Builds one harness, unless its sources (generated ones included) are those of the last build.
build() {
  local fam="$1" sum
  sum="$(cat "$out/harness_$fam.cpp" "$out"/*_sim.c* "$out/shim.h" "$out/check.h" | sha256sum)"
  if [ -x "$out/harness_$fam" ] && [ "$(cat "$out/harness_$fam.sum" 2>/dev/null)" = "$sum" ]; then
    echo "  harness_$fam: up to date"; return 0
  fi
  rm -f "$out/harness_$fam.sum"
  g++ "${flags[@]}" -o "$out/harness_$fam" "$out/harness_$fam.cpp" -lpthread
  echo "$sum" > "$out/harness_$fam.sum"
}
for fam in "${run[@]}"; do gen "$fam"; done
pids=()
status=0
for fam in "${run[@]}"; do  # two builds at a time
  build "$fam" > "$out/build_$fam.log" 2>&1 &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
for fam in "${run[@]}"; do cat "$out/build_$fam.log"; done
[ $status = 0 ] || { echo "ksim: a build failed (logs above)" >&2; exit 1; }
cov="$out/coverage.tsv"
rm -f "$cov"
fail=0
for fam in "${run[@]}"; do
  echo "== $fam ($san sanitizer)"
  start=$SECONDS
  if [ "$san" = thread ]; then export TSAN_OPTIONS="halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}"; fi
  KSIM_COVERAGE="$cov" "$out/harness_$fam" "$@" || { fail=1; echo "ksim: $fam FAILED"; }
  echo "   ($fam: $((SECONDS - start)) s)"
done
if [ "$what" = all ]; then python3 "$here/coverage.py" "$cov" "${kernel_files[@]}" || fail=1; fi
[ $fail = 0 ] && echo "ksim ($san): all passed" || echo "ksim ($san): FAILED"
exit $fail
