#!/usr/bin/env bash
# CPU simulation of kernels for checking their index maths, masks, fragment layouts, strides and
# barrier placement on a machine without a GPU: the attention forward + tensor-core backward
# (harness.cpp), and ln_modulate_fwd_bf16, subs_fwd_{f32,bf16}, sample_fwd_f32 (harness_ops.cpp).
#
# How: gen.py copies each kernels/*.cu (attention: attention_fwd.cu + attention_bwd.cu with
# attention_common.cuh, one translation unit) with its inline-PTX helpers (cp.async, ldmatrix,
# mma.sync m16n8k16, ex2/rcp) replaced by shim.h's simulations, written from the PTX ISA's
# fragment definitions, and its dynamic shared memory pointed at the simulated block's buffer;
# plain intrinsics (__expf, rsqrtf, __ldlu, __stcs, __d*_rn, shuffles, atomicAdd) are shim.h
# functions. Every CUDA thread is an OS thread, warp collectives rendezvous per warp, shared
# memory starts as 0xff (bf16/f32 NaN) and outputs as NaN, AddressSanitizer watches every buffer.
# Attention: cp.async lands either at the wait that needs it (lazy) or at issue (eager), two legal
# schedules; the forward (verified on an H100, so it also checks the simulation) and the backward
# are checked against an f64 twin with the Rust tests' fast_tol bound.
# Ops (harness_ops.cpp, references written from each kernel's header maths): ln_modulate y within
# 1 bf16 ulp of the f64 maths, mean/rstd close, and the register fast path bit-identical to the
# generic path (gen.py's sim_ln_generic switch); subs_fwd with row stride ld: out/lse vs f64,
# NaN padding logits never read, the output's padding keeps a sentinel, a NaN row for an id >= V,
# cache_row 0/1, unaligned rows; sample_fwd_f32 with ld: cat, x, counters and reset eps bits equal
# to a sequential port of the race (Philox from common.cuh), NaN padding in log_p.
# distill_kl_fwd_bwd_{f32,bf16} (harness_kl.cpp): loss and in-place bf16 gradient for the four modes
# against the header's maths in f64, at V = 50258 with padded rows and small awkward shapes; NaN
# in every padding column and the teacher's mask column; zeros at unmasked rows, the mask column
# and the padding; the f32 rows' second half untouched.
#
# Not a substitute for the GPU tests: exp2/rcp/sincos/__expf/rsqrtf are exact here, one schedule
# per run, no timing, no register pressure. Usage: tools/ksim/run.sh [att [hd] | hd | ops [ln|subs|
# sample] | kl [quick]] (everything by default; `ops` alone about 1 minute on 2 cores: every collective
# is an OS-thread rendezvous, subs runs 1024 threads per row). Needs g++ >= 12 (C++20).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
out="${TMPDIR:-/tmp}/imdm-ksim"
what="${1:-all}"
case "$what" in [0-9]*) hd="$what"; what=att ;; att) hd="${2:-}" ;; ops|kl|all) hd="" ;;
  *) echo "usage: $0 [att [hd] | hd | ops [ln|subs|sample] | kl [quick]]" >&2; exit 2 ;; esac
mkdir -p "$out/fake"
touch "$out/fake/cuda_bf16.h"
cp "$here/shim.h" "$here/harness.cpp" "$here/harness_ops.cpp" "$here/harness_kl.cpp" "$out/"
flags=(-std=c++20 -O1 -g -fsanitize=address -ffp-contract=off -Wno-unknown-pragmas -I "$out/fake" -I "$root/kernels")
if [ "$what" = att ] || [ "$what" = all ]; then
  python3 "$here/gen.py" "$root/kernels/attention_fwd.cu" "$root/kernels/attention_bwd.cu" "$out/attention_sim.cpp"
  g++ "${flags[@]}" -o "$out/harness" "$out/harness.cpp" -lpthread
  "$out/harness" lazy "$hd"
  "$out/harness" eager "$hd"
fi
if [ "$what" = ops ] || [ "$what" = all ]; then
  for k in ln_modulate subs sample; do python3 "$here/gen.py" "$root/kernels/$k.cu" "$out/${k}_sim.cpp"; done
  g++ "${flags[@]}" -o "$out/harness_ops" "$out/harness_ops.cpp" -lpthread
  "$out/harness_ops" "$([ "$what" = ops ] && echo "${2:-}" || echo "")"
fi
if [ "$what" = kl ] || [ "$what" = all ]; then
  python3 "$here/gen.py" "$root/kernels/distill_kl.cu" "$out/distill_kl_sim.cpp"
  g++ "${flags[@]}" -o "$out/harness_kl" "$out/harness_kl.cpp" -lpthread
  "$out/harness_kl" "$([ "$what" = kl ] && echo "${2:-}" || echo "")"
fi
