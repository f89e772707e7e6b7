#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 nvcc toolchain from PyPI wheels into .cuda/ (ignored by git).
#
# Why pinned: the GPU machine's driver (580, CUDA 13.0) cannot load PTX emitted by newer nvcc.
# Idempotent: when .cuda/ already holds the pinned versions it returns at once.
# After it, build.rs finds nvcc at .cuda/nvidia/cu13/bin/nvcc with no further setting.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
)
stamp="$dest/.installed"
want="${pins[*]}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$dest/nvidia/cu13/bin/nvcc" ]]; then
  echo "setup-cuda: nvcc already installed in $dest"
  exit 0
fi
py="$(command -v python3 || command -v python || true)"
if [[ -z "$py" ]]; then
  echo "setup-cuda: python3 with pip is required to fetch the nvcc wheels" >&2
  exit 1
fi
echo "setup-cuda: installing ${pins[*]} into $dest (about 300 MB)"
rm -rf "$dest"
mkdir -p "$dest"
if ! "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" "${pins[@]}"; then
  echo "setup-cuda: pip could not install the wheels (is PyPI reachable?)" >&2
  exit 1
fi
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [[ ! -x "$nvcc" ]]; then
  echo "setup-cuda: expected nvcc at $nvcc but it is missing" >&2
  exit 1
fi
"$nvcc" --version | tail -n 2
echo "$want" >"$stamp"
echo "setup-cuda: done; build.rs will find $nvcc"
