#!/usr/bin/env bash
# CPU simulation of the attention kernels (forward + tensor-core backward), for checking their
# index maths, masks, fragment layouts and cp.async/barrier placement on a machine without a GPU.
#
# How: gen.py copies kernels/attention.cu with its inline-PTX helpers (cp.async, ldmatrix,
# mma.sync m16n8k16, ex2/rcp) replaced by shim.h's simulations, written from the PTX ISA's
# fragment definitions; every CUDA thread is an OS thread, warp collectives rendezvous per warp,
# shared memory starts as 0xff (bf16 NaN) and outputs as NaN, AddressSanitizer watches every
# buffer. cp.async lands either at the wait that needs it (lazy) or at issue (eager), two legal
# schedules. The harness checks the forward (which was verified on an H100, so it also checks the
# simulation) and the backward against an f64 twin with the Rust tests' fast_tol bound.
#
# Not a substitute for the GPU tests: exp2/rcp/sincos are exact here, one schedule per run,
# no timing, no register pressure. Usage: tools/ksim/run.sh [hd] (all head dims by default;
# minutes: every collective is an OS-thread rendezvous). Needs g++ >= 12 (C++20).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
out="${TMPDIR:-/tmp}/imdm-ksim"
mkdir -p "$out/fake"
touch "$out/fake/cuda_bf16.h"
python3 "$here/gen.py" "$root/kernels/attention.cu" "$out/attention_sim.cpp"
cp "$here/shim.h" "$here/harness.cpp" "$out/"
g++ -std=c++20 -O1 -g -fsanitize=address -Wno-unknown-pragmas -I "$out/fake" -I "$root/kernels" \
  -o "$out/harness" "$out/harness.cpp" -lpthread
"$out/harness" lazy "${1:-}"
"$out/harness" eager "${1:-}"
