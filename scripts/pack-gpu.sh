#!/usr/bin/env bash
# Builds the release binary and the test binaries that touch the GPU, here (where Rust is),
# and packs them into .gpu/bundle.tar.gz (ignored by git) for the GPU machine, which has no Rust.
# There, `bash scripts/gpu-check.sh` runs them with IMDM_REQUIRE_GPU=1 (a skip is a failure),
# then the sanitizers, the benchmarks and the PyTorch peer, and prints a summary table.
#
# Which test binaries travel: the library's unit tests (every src/cuda/ops/* kernel test) and every
# integration test named tests/gpu_*.rs. The CPU-only suites run in CI and need no GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup-cuda.sh >/dev/null
export IMDM_EXPECT_KERNELS=1
cargo build --release --bins
json="$(cargo test --release --no-run --message-format=json 2>/dev/null)"
rm -rf .gpu && mkdir -p .gpu/bin .gpu/tests
cp target/release/imdm-engine .gpu/bin/
# Test executables: the lib unit tests and tests/gpu_*.rs.
echo "$json" | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m.get("profile", {}).get("test"):
        continue
    t = m["target"]
    if ("lib" in t["kind"]) or (t["kind"] == ["test"] and t["name"].startswith("gpu_")):
        dst = ".gpu/tests/" + t["name"]
        shutil.copy(m["executable"], dst)
        print("packed", t["name"])
'
strip .gpu/bin/* .gpu/tests/* 2>/dev/null || true
tar czf .gpu/bundle.tar.gz -C .gpu bin tests
rm -rf .gpu/bin .gpu/tests
ls -la .gpu/bundle.tar.gz
