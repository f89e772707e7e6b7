#!/usr/bin/env bash
# The paper's chain of runs (spec 6.4) on any data source and preset:
#
#   1. mdlm        MDLM teacher (train, or an existing file with --mdlm)  -> OUT/mdlm/ (run dir)
#   2. imsdtt      IM-SDTT student from the MDLM (distill sdtt --imdm)     -> OUT/imsdtt/
#   3. couplings   IM-ReDi couplings from the IM-SDTT EMA (redi-data)      -> OUT/couplings.safetensors
#   4. imredi      IM-ReDi from the IM-SDTT EMA on them (redi-train)       -> OUT/imredi.safetensors
#   5. sdtt-mdlm   the MDLM+SDTT baseline (distill sdtt --mdlm)            -> OUT/sdtt-mdlm/
#
# Re-running continues where it stopped: a stage whose output is complete is skipped (a run
# directory counts as complete once its stage exited successfully, recorded in OUT/stages/),
# an interrupted run directory is resumed, and files are written atomically by the engine.
# Every command is echoed and logged to OUT/logs/STAGE.log. At the end OUT/summary.txt (a
# table) and OUT/summary.json list every stage: status, wall time, final losses, files.
#
# Usage: scripts/paper-chain.sh [--data SRC] [--preset P] [--length L] [--vocab V]
#          [--mdlm FILE] [--mdlm-steps N] [--mdlm-batch B] [--mdlm-lr LR] [--mdlm-warmup W]
#          [--orig-steps N] [--distill-steps K] [--grow-dt-every N] [--min-steps N]
#          [--sdtt-lr LR] [--sdtt-warmup W] [--sdtt-batch B] [--sdtt-micro-batch M]
#          [--pairs N] [--datagen-steps N] [--datagen-batch B]
#          [--redi-steps N] [--redi-batch B] [--redi-micro-batch M] [--redi-lr LR]
#          [--redi-warmup W] [--redi-eval-every N] [--valid-frac F] [--no-baseline]
#          [--train-args "..."] [--sdtt-args "..."] [--redi-data-args "..."]
#          [--redi-train-args "..."] [--device cpu|cuda|auto] [--seed S] [--out DIR]
#          [--bin PATH] [--smoke]
#
#   --data     synthetic, tokens:PATH or shards:DIR (as `train --data`; default synthetic)
#   --mdlm     use this MDLM weights file instead of training one (stage 1 is then skipped)
#   --smoke    a CPU configuration that runs every stage in a few minutes: tiny preset at
#              L 16, V 128, synthetic data, a few steps per stage (any flag given after
#              --smoke overrides it)
#   --*-args   extra flags passed verbatim to that command
#
# Defaults follow the reference (spec 6.1-6.4, 9): IM-SDTT lr 6e-5, warm-up 500, batch 128,
# K = 2, 1024 original steps, a round every 10,000 steps; 100,000 couplings at 1024 steps;
# IM-ReDi lr 3e-4, warm-up 2500, batch 512. Example (a GPU machine, OWT-like shards):
#
#   scripts/paper-chain.sh --device cuda --data shards:runs/owt/shards --preset small \
#     --mdlm mdlm-owt.safetensors --sdtt-micro-batch 16 --redi-micro-batch 32 --out runs/chain
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DATA=synthetic
PRESET=tiny
LENGTH=""
VOCAB=""
MDLM_FILE=""
MDLM_STEPS=10000
MDLM_BATCH=512
MDLM_LR=3e-4
MDLM_WARMUP=2500
ORIG_STEPS=1024
DISTILL_STEPS=2
GROW_DT_EVERY=10000
MIN_STEPS=1
SDTT_LR=6e-5
SDTT_WARMUP=500
SDTT_BATCH=128
SDTT_MICRO=""
PAIRS=100000
DATAGEN_STEPS=1024
DATAGEN_BATCH=256
REDI_STEPS=50000
REDI_BATCH=512
REDI_MICRO=""
REDI_LR=3e-4
REDI_WARMUP=2500
REDI_EVAL_EVERY=1000
VALID_FRAC=0.01
BASELINE=1
TRAIN_ARGS=""
SDTT_ARGS=""
REDI_DATA_ARGS=""
REDI_TRAIN_ARGS=""
DEVICE=cpu
SEED=1
OUT=""
BIN="${BIN:-$ROOT/target/release/imdm-engine}"

smoke() {
  PRESET=tiny; LENGTH=16; VOCAB=128
  MDLM_STEPS=6; MDLM_BATCH=4; MDLM_LR=1e-3; MDLM_WARMUP=1
  ORIG_STEPS=4; GROW_DT_EVERY=2; MIN_STEPS=1; SDTT_LR=1e-3; SDTT_WARMUP=1; SDTT_BATCH=4
  PAIRS=16; DATAGEN_STEPS=8; DATAGEN_BATCH=16
  REDI_STEPS=4; REDI_BATCH=4; REDI_MICRO=2; REDI_LR=1e-3; REDI_WARMUP=1; REDI_EVAL_EVERY=2
  VALID_FRAC=0.25
}

while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --length) LENGTH="$2"; shift 2 ;;
    --vocab) VOCAB="$2"; shift 2 ;;
    --mdlm) MDLM_FILE="$2"; shift 2 ;;
    --mdlm-steps) MDLM_STEPS="$2"; shift 2 ;;
    --mdlm-batch) MDLM_BATCH="$2"; shift 2 ;;
    --mdlm-lr) MDLM_LR="$2"; shift 2 ;;
    --mdlm-warmup) MDLM_WARMUP="$2"; shift 2 ;;
    --orig-steps) ORIG_STEPS="$2"; shift 2 ;;
    --distill-steps) DISTILL_STEPS="$2"; shift 2 ;;
    --grow-dt-every) GROW_DT_EVERY="$2"; shift 2 ;;
    --min-steps) MIN_STEPS="$2"; shift 2 ;;
    --sdtt-lr) SDTT_LR="$2"; shift 2 ;;
    --sdtt-warmup) SDTT_WARMUP="$2"; shift 2 ;;
    --sdtt-batch) SDTT_BATCH="$2"; shift 2 ;;
    --sdtt-micro-batch) SDTT_MICRO="$2"; shift 2 ;;
    --pairs) PAIRS="$2"; shift 2 ;;
    --datagen-steps) DATAGEN_STEPS="$2"; shift 2 ;;
    --datagen-batch) DATAGEN_BATCH="$2"; shift 2 ;;
    --redi-steps) REDI_STEPS="$2"; shift 2 ;;
    --redi-batch) REDI_BATCH="$2"; shift 2 ;;
    --redi-micro-batch) REDI_MICRO="$2"; shift 2 ;;
    --redi-lr) REDI_LR="$2"; shift 2 ;;
    --redi-warmup) REDI_WARMUP="$2"; shift 2 ;;
    --redi-eval-every) REDI_EVAL_EVERY="$2"; shift 2 ;;
    --valid-frac) VALID_FRAC="$2"; shift 2 ;;
    --no-baseline) BASELINE=0; shift ;;
    --train-args) TRAIN_ARGS="$2"; shift 2 ;;
    --sdtt-args) SDTT_ARGS="$2"; shift 2 ;;
    --redi-data-args) REDI_DATA_ARGS="$2"; shift 2 ;;
    --redi-train-args) REDI_TRAIN_ARGS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --smoke) smoke; shift ;;
    -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "paper-chain: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
: "${SDTT_MICRO:=$SDTT_BATCH}"
: "${REDI_MICRO:=$REDI_BATCH}"
: "${OUT:=$ROOT/runs/paper-chain-$PRESET}"

say() { echo "paper-chain: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$BIN" ] || { say "building $BIN"; cargo build --release; }
[ -x "$BIN" ] || die "no binary at $BIN (cargo build --release, or --bin PATH)"
"$BIN" distill sdtt --help >/dev/null 2>&1 \
  || die "$BIN has no \`distill sdtt\` subcommand (IM-SDTT); rebuild a binary that has it"
[ -z "$MDLM_FILE" ] || [ -f "$MDLM_FILE" ] || die "--mdlm $MDLM_FILE: no such file"

mkdir -p "$OUT"/{logs,stages}
OUT="$(cd "$OUT" && pwd)"
[ -z "$MDLM_FILE" ] || MDLM_FILE="$(cd "$(dirname "$MDLM_FILE")" && pwd)/$(basename "$MDLM_FILE")"
STAGE_NAMES=()

# run STAGE CMD...: echo, log to OUT/logs/STAGE.log (stdout and stderr), time it into $WALL.
run() {
  local name="$1"; shift
  echo "+ $*" | tee -a "$OUT/logs/$name.log" >&2
  local t0=$SECONDS
  set +e
  "$@" 2>&1 | tee -a "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  WALL=$((SECONDS - t0))
  [ "$rc" = 0 ] || die "$name failed (exit $rc); see $OUT/logs/$name.log"
}

# last_num FILE KEY: the last numeric value of "KEY" in a JSON(-lines) file, or empty.
last_num() {
  [ -f "$1" ] || return 0
  grep -oE "\"$2\": ?-?[0-9][-0-9.eE+]*" "$1" | tail -1 | sed 's/.*: \{0,1\}//' || true
}
latest_dir() { sed -n 's/.*"dir": *"\([^"]*\)".*/\1/p' "$1/latest.json"; }
latest_step() { sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$1/latest.json"; }

# record STAGE STATUS WALL FILES LOSSES: OUT/stages/STAGE.json. LOSSES is "key=value ...".
record() {
  local name="$1" status="$2" wall="$3" files="$4" losses="$5" js="" kv
  for kv in $losses; do
    [ -n "${kv#*=}" ] || continue
    js="$js${js:+, }\"${kv%%=*}\": ${kv#*=}"
  done
  local fj="" f
  for f in $files; do fj="$fj${fj:+, }\"$f\""; done
  printf '{"stage": "%s", "status": "%s", "wall_s": %s, "losses": {%s}, "files": [%s]}\n' \
    "$name" "$status" "$wall" "$js" "$fj" > "$OUT/stages/$name.json.tmp"
  mv "$OUT/stages/$name.json.tmp" "$OUT/stages/$name.json"
}

# skipped STAGE: the stage was complete before this invocation; keep its record, mark it.
skipped() {
  local f="$OUT/stages/$1.json"
  say "$1: complete, skipped"
  sed -i 's/"status": "[a-z]*"/"status": "skipped (done earlier)"/' "$f"
  STAGE_NAMES+=("$1")
}

device=(--device "$DEVICE")
shape=()
[ -n "$LENGTH" ] && shape+=(--length "$LENGTH")
[ -n "$VOCAB" ] && shape+=(--vocab "$VOCAB")
say "data $DATA, preset $PRESET, device $DEVICE, out $OUT"

# 1. MDLM teacher.
MDLM_RUN="$OUT/mdlm"
if [ -n "$MDLM_FILE" ]; then
  say "mdlm: using $MDLM_FILE"
  record mdlm "given" 0 "$MDLM_FILE" ""
  STAGE_NAMES+=(mdlm)
  MDLM="$MDLM_FILE"
else
  if [ -f "$OUT/stages/mdlm.json" ] && [ -f "$MDLM_RUN/latest.json" ] \
     && [ "$(latest_step "$MDLM_RUN")" -ge "$MDLM_STEPS" ]; then
    skipped mdlm
  else
    if [ -f "$MDLM_RUN/latest.json" ]; then
      run mdlm "$BIN" train --resume "$MDLM_RUN" --steps "$MDLM_STEPS" "${device[@]}"
    else
      rm -rf "$MDLM_RUN"
      # shellcheck disable=SC2086
      run mdlm "$BIN" train --preset "$PRESET" "${shape[@]}" --algo mdlm --data "$DATA" \
        --batch "$MDLM_BATCH" --steps "$MDLM_STEPS" --lr "$MDLM_LR" --warmup "$MDLM_WARMUP" \
        --seed "$SEED" "${device[@]}" --run-dir "$MDLM_RUN" $TRAIN_ARGS
    fi
    record mdlm done "$WALL" "$MDLM_RUN/$(latest_dir "$MDLM_RUN")/ema.safetensors" \
      "loss=$(last_num "$MDLM_RUN/metrics.jsonl" loss) val_nelbo=$(last_num "$MDLM_RUN/metrics.jsonl" val_nelbo)"
    STAGE_NAMES+=(mdlm)
  fi
  MDLM="$MDLM_RUN/$(latest_dir "$MDLM_RUN")/ema.safetensors"
fi

# sdtt_stage STAGE --imdm|--mdlm: IM-SDTT or SDTT from the MDLM teacher into OUT/STAGE/.
sdtt_stage() {
  local name="$1" kind="$2" dir="$OUT/$1"
  if [ -f "$OUT/stages/$name.json" ] && [ -f "$dir/latest.json" ]; then
    skipped "$name"
    return
  fi
  if [ -f "$dir/latest.json" ]; then
    run "$name" "$BIN" distill sdtt --resume "$dir" "${device[@]}"
  else
    rm -rf "$dir"
    # shellcheck disable=SC2086
    run "$name" "$BIN" distill sdtt --teacher "$MDLM" --data "$DATA" --run-dir "$dir" "$kind" \
      --distill-steps "$DISTILL_STEPS" --orig-steps "$ORIG_STEPS" \
      --grow-dt-every "$GROW_DT_EVERY" --min-steps "$MIN_STEPS" --lr "$SDTT_LR" \
      --warmup "$SDTT_WARMUP" --global-batch "$SDTT_BATCH" --micro-batch "$SDTT_MICRO" \
      --seed "$SEED" "${device[@]}" $SDTT_ARGS
  fi
  record "$name" done "$WALL" "$dir/$(latest_dir "$dir")/ema.safetensors" \
    "loss=$(last_num "$dir/metrics.jsonl" loss) kl=$(last_num "$dir/metrics.jsonl" kl) val_kl=$(last_num "$dir/metrics.jsonl" val_kl)"
  STAGE_NAMES+=("$name")
}

# 2. IM-SDTT.
sdtt_stage imsdtt --imdm

# 3. Couplings from the IM-SDTT EMA (spec 6.2).
PAIRS_FILE="$OUT/couplings.safetensors"
if [ -f "$PAIRS_FILE" ] && [ -f "$OUT/stages/couplings.json" ]; then
  skipped couplings
else
  # shellcheck disable=SC2086
  run couplings "$BIN" distill redi-data --checkpoint "$OUT/imsdtt" --data "$DATA" \
    --pairs "$PAIRS" --steps "$DATAGEN_STEPS" --batch "$DATAGEN_BATCH" --seed 42 \
    "${device[@]}" --out "$PAIRS_FILE" $REDI_DATA_ARGS
  record couplings done "$WALL" "$PAIRS_FILE" "pairs=$PAIRS"
  STAGE_NAMES+=(couplings)
fi

# 4. IM-ReDi from the IM-SDTT EMA (spec 6.3).
REDI_FILE="$OUT/imredi.safetensors"
if [ -f "$REDI_FILE" ] && [ -f "$OUT/stages/imredi.json" ]; then
  skipped imredi
else
  # shellcheck disable=SC2086
  run imredi "$BIN" distill redi-train --init "$OUT/imsdtt" --pairs "$PAIRS_FILE" \
    --steps "$REDI_STEPS" --batch "$REDI_BATCH" --micro-batch "$REDI_MICRO" --lr "$REDI_LR" \
    --warmup "$REDI_WARMUP" --eval-every "$REDI_EVAL_EVERY" --valid-frac "$VALID_FRAC" \
    --seed "$SEED" "${device[@]}" --metrics "$OUT/imredi.metrics.jsonl" --out "$REDI_FILE" \
    $REDI_TRAIN_ARGS
  m="$OUT/imredi.metrics.jsonl"
  record imredi done "$WALL" "$REDI_FILE $m" \
    "loss=$(last_num "$m" loss) val_nelbo=$(last_num "$m" val_nelbo) val_coupling_nll=$(last_num "$m" val_coupling_nll)"
  STAGE_NAMES+=(imredi)
fi

# 5. The MDLM+SDTT baseline under identical settings.
[ "$BASELINE" = 1 ] && sdtt_stage sdtt-mdlm --mdlm

# Summary: a table and JSON from the stage records.
SUMMARY="$OUT/summary.txt"
{
  echo "paper-chain $(date -u +%Y-%m-%dT%H:%M:%SZ): data $DATA, preset $PRESET, device $DEVICE"
  printf '%-10s %-22s %8s  %-52s %s\n' stage status wall_s losses files
  for s in "${STAGE_NAMES[@]}"; do
    f="$OUT/stages/$s.json"
    st=$(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' "$f")
    w=$(sed -n 's/.*"wall_s": \([0-9]*\).*/\1/p' "$f")
    l=$(sed -n 's/.*"losses": {\([^}]*\)}.*/\1/p' "$f" | sed 's/"//g; s/: /=/g')
    fl=$(sed -n 's/.*"files": \[\([^]]*\)\].*/\1/p' "$f" | sed 's/"//g')
    printf '%-10s %-22s %8s  %-52s %s\n' "$s" "$st" "$w" "${l:--}" "$fl"
  done
} > "$SUMMARY"
{
  printf '{"date": "%s", "data": "%s", "preset": "%s", "device": "%s", "stages": [\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$DATA" "$PRESET" "$DEVICE"
  n=${#STAGE_NAMES[@]}
  for i in "${!STAGE_NAMES[@]}"; do
    sep=","; [ "$i" -eq $((n - 1)) ] && sep=""
    printf '  %s%s\n' "$(cat "$OUT/stages/${STAGE_NAMES[$i]}.json")" "$sep"
  done
  echo "]}"
} > "$OUT/summary.json.tmp"
mv "$OUT/summary.json.tmp" "$OUT/summary.json"
echo
cat "$SUMMARY"
