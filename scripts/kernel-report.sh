#!/usr/bin/env bash
# Registers, spills, stack and shared memory of every kernel, from `ptxas -v` over the PTX that
# build.rs embeds (the release build's OUT_DIR), for $IMDM_CUDA_ARCH (default sm_90a). A table
# generated from the compiler, so it never goes stale the way numbers in comments do. smem_B is
# static shared memory only: the dynamic shared memory a launcher asks for is not in ptxas output.
# Usage: scripts/kernel-report.sh [PTX_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
arch="${IMDM_CUDA_ARCH:-sm_90a}"
dir="${1:-$(ls -dt "$root"/target/release/build/imdm-engine-*/out 2>/dev/null | head -1)}"
if [[ -z "$dir" ]] || ! compgen -G "$dir/*.ptx" >/dev/null; then
  echo "kernel-report: no PTX found (build first: IMDM_EXPECT_KERNELS=1 cargo build --release)" >&2
  exit 1
fi
ptxas="${PTXAS:-$root/.cuda/nvidia/cu13/bin/ptxas}"
[[ -x "$ptxas" ]] || ptxas="$(command -v ptxas)" || {
  echo "kernel-report: ptxas not found (scripts/setup-cuda.sh installs it)" >&2
  exit 1
}
printf '%-16s %-44s %5s %7s %7s %7s %8s\n' module kernel regs stack spill_st spill_ld smem_B
for src in "$root"/kernels/*.cu "$root"/kernels/dev/*.cu; do
  mod="$(basename "$src" .cu)"
  ptx="$dir/$mod.ptx"
  [[ -f "$ptx" ]] || { echo "kernel-report: $ptx missing (rebuild)" >&2; continue; }
  "$ptxas" -arch="$arch" -v -o /dev/null "$ptx" 2>&1 | awk -v mod="$mod" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2); st = sl = fr = 0 }
    /bytes stack frame/ { fr = $1; st = $5; sl = $9 }
    /Used [0-9]+ registers/ {
      r = 0; sm = 0
      for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^registers/) r = $i; if ($(i+1) ~ /^bytes/ && $(i+2) ~ /^smem/) sm = $i }
      printf "%-16s %-44s %5s %7s %7s %7s %8s\n", mod, k, r, fr, st, sl, sm }'
done
