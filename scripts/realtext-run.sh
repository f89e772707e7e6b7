#!/usr/bin/env bash
# The OWT-like real-text setting end to end on the fetched corpus (scripts/fetch-corpus.sh):
#
#   1. data prepare   GPT-2 tokenizer, --length L, Persuasion held out   -> OUT/shards-gpt2-L/
#   2. train          MDLM and IMDM (--preset, default tiny) for --steps  -> OUT/runs/{mdlm,imdm}/
#   3. eval ppl       held-out NELBO / PPL on the EMA weights             -> OUT/eval/ALGO-ppl.json
#   4. sample         8, 32 and 256 steps, decoded to text, unigram entropy -> OUT/samples/ALGO-S.jsonl
#   5. plot           both runs' loss and validation NELBO                -> OUT/curves.png
#
# and OUT/summary.txt (PPL and entropy per model and step count) with every stage's wall time.
# Every command is echoed and logged to OUT/logs/. Re-running continues: shards are reused, a
# run that already has checkpoints is resumed (with --steps raised if asked), eval and samples
# are redone.
#
# Usage: scripts/realtext-run.sh [--device cpu|cuda|auto] [--train-device D] [--steps N]
#          [--length L] [--preset P] [--batch B] [--micro-batch M] [--lr LR] [--warmup W]
#          [--eval-every E] [--eval-size K] [--eval-batch B] [--eval-limit N] [--noise-dim D]
#          [--samples N] [--sample-batch B] [--sample-steps "8 32 256"] [--algos "mdlm imdm"]
#          [--corpus DIR] [--out DIR] [--bin PATH]
#
#   --device       eval and sampling device (default cpu); training uses --train-device,
#                  default the same. (`train` runs on the CPU only until GPU training lands;
#                  pass --train-device cpu with --device cuda meanwhile.)
#   --steps        optimizer steps per model (default 200 on cpu, 10000 otherwise)
#   --length       tokens per sequence (default 128 on cpu, 1024 otherwise: the OWT setting)
#   --eval-limit   evaluate only the first N held-out sequences (default: all)
#
# Defaults follow the reference where a CPU can afford it (spec 9: lr 3e-4, EMA 0.9999, clip 1);
# the warmup is shortened to min(2500, steps/10) for short runs. Example (the H100 session):
#
#   scripts/realtext-run.sh --device cuda --steps 20000 --length 1024 --batch 64 --out runs/owt-tiny
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DEVICE=cpu
TRAIN_DEVICE=""
STEPS=""
LENGTH=""
PRESET=tiny
BATCH=""
MICRO=""
LR=3e-4
WARMUP=""
EVAL_EVERY=""
EVAL_SIZE=""
EVAL_BATCH=""
EVAL_LIMIT=""
NOISE_DIM=""
SAMPLES=""
SAMPLE_BATCH=""
SAMPLE_STEPS="8 32 256"
ALGOS="mdlm imdm"
CORPUS="$ROOT/data/corpus"
OUT=""
BIN="${BIN:-$ROOT/target/release/imdm-engine}"

while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --train-device) TRAIN_DEVICE="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --length) LENGTH="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --micro-batch) MICRO="$2"; shift 2 ;;
    --lr) LR="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --eval-every) EVAL_EVERY="$2"; shift 2 ;;
    --eval-size) EVAL_SIZE="$2"; shift 2 ;;
    --eval-batch) EVAL_BATCH="$2"; shift 2 ;;
    --eval-limit) EVAL_LIMIT="$2"; shift 2 ;;
    --noise-dim) NOISE_DIM="$2"; shift 2 ;;
    --samples) SAMPLES="$2"; shift 2 ;;
    --sample-batch) SAMPLE_BATCH="$2"; shift 2 ;;
    --sample-steps) SAMPLE_STEPS="$2"; shift 2 ;;
    --algos) ALGOS="$2"; shift 2 ;;
    --corpus) CORPUS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "realtext-run: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cpu=0; [ "$DEVICE" = cpu ] && cpu=1
TRAIN_DEVICE="${TRAIN_DEVICE:-$DEVICE}"
if [ $cpu = 1 ]; then
  : "${STEPS:=200}" "${LENGTH:=128}" "${BATCH:=16}" "${EVAL_SIZE:=64}" "${EVAL_BATCH:=8}"
  : "${SAMPLES:=4}" "${SAMPLE_BATCH:=4}"
else
  : "${STEPS:=10000}" "${LENGTH:=1024}" "${BATCH:=64}" "${EVAL_SIZE:=256}" "${EVAL_BATCH:=16}"
  : "${SAMPLES:=64}" "${SAMPLE_BATCH:=16}"
fi
: "${MICRO:=$BATCH}"
: "${WARMUP:=$(( STEPS / 10 < 2500 ? STEPS / 10 : 2500 ))}"
: "${EVAL_EVERY:=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))}"
: "${OUT:=$ROOT/runs/realtext-$PRESET-L$LENGTH}"

say() { echo "realtext-run: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$BIN" ] || { say "building $BIN"; cargo build --release; }
[ -x "$BIN" ] || die "no binary at $BIN (cargo build --release, or --bin PATH)"
ls "$CORPUS"/*.jsonl >/dev/null 2>&1 \
  || die "no corpus in $CORPUS: run scripts/fetch-corpus.sh first (it needs the package registries)"

mkdir -p "$OUT"/{logs,eval,samples,runs}
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
SHARDS="$OUT/shards-gpt2-$LENGTH"
STAGES=()

# run NAME CMD...: echo, log to OUT/logs/NAME.log (stdout and stderr), time it.
run() {
  local name="$1"; shift
  echo "+ $*" | tee "$OUT/logs/$name.log" >&2
  local t0=$SECONDS
  set +e
  "$@" 2>&1 | tee -a "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  STAGES+=("$(printf '%-22s %6ds' "$name" $((SECONDS - t0)))")
  [ "$rc" = 0 ] || die "$name failed (exit $rc); see $OUT/logs/$name.log"
}

latest_dir() { sed -n 's/.*"dir": *"\([^"]*\)".*/\1/p' "$1/latest.json"; }
latest_step() { sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$1/latest.json"; }

say "device $DEVICE (training $TRAIN_DEVICE), $PRESET, L $LENGTH, $STEPS steps of batch $BATCH, out $OUT"

# 1. Shards (reused when present with this length).
if [ -f "$SHARDS/manifest.json" ]; then
  say "reusing $SHARDS"
  run info "$BIN" data info "$SHARDS"
else
  run prepare "$BIN" data prepare --tokenizer gpt2 --input "$CORPUS" --out "$SHARDS" \
    --length "$LENGTH" --heldout-prefix austen/persuasion/
fi

# 2. Training (a run with checkpoints is resumed).
for algo in $ALGOS; do
  dir="$OUT/runs/$algo"
  if [ -f "$dir/latest.json" ]; then
    run "train-$algo" "$BIN" train --resume "$dir" --steps "$STEPS" --device "$TRAIN_DEVICE"
  else
    extra=()
    [ "$algo" = imdm ] && [ -n "$NOISE_DIM" ] && extra+=(--noise-dim "$NOISE_DIM")
    run "train-$algo" "$BIN" train --preset "$PRESET" --algo "$algo" "${extra[@]}" \
      --data "shards:$SHARDS" --batch "$BATCH" --micro-batch "$MICRO" --steps "$STEPS" \
      --lr "$LR" --warmup "$WARMUP" --eval-every "$EVAL_EVERY" --eval-size "$EVAL_SIZE" \
      --save-every "$EVAL_EVERY" --log-every "$(( EVAL_EVERY / 5 > 0 ? EVAL_EVERY / 5 : 1 ))" \
      --device "$TRAIN_DEVICE" --run-dir "$dir"
  fi
done

# 3-4. Held-out PPL and samples from each run's last EMA weights.
{
  echo "realtext-run $(date -u +%Y-%m-%dT%H:%M:%SZ): $PRESET, gpt2 L $LENGTH, $STEPS steps x batch $BATCH, device $DEVICE (training $TRAIN_DEVICE)"
  echo "shards: $SHARDS"
} > "$SUMMARY"
for algo in $ALGOS; do
  dir="$OUT/runs/$algo"
  ema="$dir/$(latest_dir "$dir")/ema.safetensors"
  limit=()
  [ -n "$EVAL_LIMIT" ] && limit=(--limit "$EVAL_LIMIT")
  run "eval-$algo" "$BIN" eval ppl --checkpoint "$ema" --data "$SHARDS" --batch "$EVAL_BATCH" \
    "${limit[@]}" --device "$DEVICE" --json "$OUT/eval/$algo-ppl.json"
  echo "$algo (step $(latest_step "$dir")): $(grep -m1 '^NELBO' "$OUT/logs/eval-$algo.log")" >> "$SUMMARY"
  for s in $SAMPLE_STEPS; do
    run "sample-$algo-$s" "$BIN" sample --checkpoint "$ema" --steps "$s" \
      --num-samples "$SAMPLES" --batch "$SAMPLE_BATCH" --seed 42 --decode "$SHARDS" \
      --device "$DEVICE" --out "$OUT/samples/$algo-$s.jsonl"
    h=$(sed -n 's/.*mean unigram entropy \([0-9.]*\) nats.*/\1/p' "$OUT/logs/sample-$algo-$s.log")
    echo "  $s steps: mean unigram entropy $h nats ($SAMPLES samples, $OUT/samples/$algo-$s.jsonl)" >> "$SUMMARY"
  done
done

# 5. Curves.
runs=()
for algo in $ALGOS; do runs+=("$OUT/runs/$algo"); done
run plot "$BIN" plot "${runs[@]}" --out "$OUT/curves.png"

{
  echo "curves: $OUT/curves.png"
  echo "stage wall times:"
  printf '  %s\n' "${STAGES[@]}"
} >> "$SUMMARY"
echo
cat "$SUMMARY"
