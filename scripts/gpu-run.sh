#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, after scripts/pack-gpu.sh packed .gpu/ here:
# every packed GPU test with IMDM_REQUIRE_GPU=1, then the probe. Test binaries carry the
# build machine's absolute paths (fixtures, the CLI binary), so the repo is linked there first.
set -uo pipefail
root="$(pwd)"
build_root="${IMDM_BUILD_ROOT:-/work/main}"
if [[ "$root" != "$build_root" && ! -e "$build_root" ]]; then
  mkdir -p "$(dirname "$build_root")" && ln -s "$root" "$build_root"
fi
mkdir -p .gpu/run && tar xzf .gpu/bundle.tar.gz -C .gpu/run
mkdir -p target/release && cp .gpu/run/bin/imdm-engine target/release/
export IMDM_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0
for t in .gpu/run/tests/*; do
  echo "== $(basename "$t")"
  "$t" --test-threads=1 || status=1
done
echo "== probe"
target/release/imdm-engine probe || status=1
echo "gpu-run: exit status $status"
exit $status
