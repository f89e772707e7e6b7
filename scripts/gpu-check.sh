#!/usr/bin/env bash
# The prepared device check: one command for the GPU machine, after scripts/pack-gpu.sh packed
# .gpu/bundle.tar.gz here. It needs no Rust there, ends inside IMDM_CHECK_BUDGET_S seconds (510
# by default, so a 600 s call keeps its margin), runs every step under `timeout`, goes on after a
# failure and prints the summary table as its last lines.
#
# Steps, riskiest first (what has never run on a GPU comes first):
#   device     nvidia-smi: name, driver, memory
#   libs       libcublasLt / libcublas on the loader path or in python3's nvidia/*/lib folders,
#              exported (LD_LIBRARY_PATH) for every later step
#   probe      loads every module (SASS, else PTX by JIT) and runs each kernel against its twin
#   t-*        the library's GPU tests by family: attention (backward first), fused cross-entropy
#              (subs), GEMM forms, sampler, the other ops, the rest of the CUDA backend; the
#              families come from the test names (`cuda::ops::<op>`), so a new op's tests run
#              in t-ops-other without a change here
#   memcheck, racecheck   compute-sanitizer on one small shape of the attention backward, the
#              SUBS forward and loss, the sampler and the rollout target rule (skipped with the
#              reason where the runtime refuses the device)
#   gpu_*      every tests/gpu_*.rs binary: gpu_dit, gpu_train (gradient check, determinism),
#              gpu_distill (distillation gradients vs the CPU, resident SDTT steps, CLI resume),
#              gpu_timecond (time conditioning against the CPU backend)
#              gpu_rollout (the device teacher rollout bit for bit vs the host rollout, the loss
#              on its device target)
#   bench-*    bench kernels, forward, train --steps 3 (finite loss near ln V) and sample, at
#              both reference shapes, each with --trace; bench distill at small/OWT (device
#              teacher rollout vs student split, the reference's 3 forwards + 1 backward beside
#              it)
#   peer-*     tools/reference/peer_bench.py: our reference DiT in bf16 under torch.compile at
#              the same shapes, and the ratio to our forward
#
# Output (at most 8 files come back from $OUT): check.log (every step's full output),
# summary.txt (the table), figures.json (each step's status and figures), steps.tar.gz (each
# step's own log, bench JSONs, traces).
set -uo pipefail

root="$(pwd)"
out="${OUT:-$root/.gpu/out}"
budget="${IMDM_CHECK_BUDGET_S:-510}"
threads="${IMDM_CHECK_THREADS:-8}"
start=$(date +%s)
deadline=$((start + budget))
mkdir -p "$out"
work="$(mktemp -d)"
combined="$out/check.log"
: >"$combined"

names=() status=() notes=() secs=()
record() { # name status note seconds
  names+=("$1") status+=("$2") notes+=("$3") secs+=("${4:-0}")
  printf '[%s] %s: %s\n' "$2" "$1" "$3" | tee -a "$combined"
}
skip() { record "$1" skip "$2" 0; }
have_device=0
bundle_ok=0

# libtest counts summed over a log: "P passed, F failed, I ignored" plus the first failing names.
test_counts() {
  awk '/^test result:/ { for (i = 1; i <= NF; i++) {
           if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i;
           if ($(i+1) ~ /^ignored/) g += $i } }
       /^---- .* stdout ----$/ { if (n < 3) bad = bad " " $2; n++ }
       END { printf "%d passed, %d failed, %d ignored", p, f, g; if (n) printf "; failing:%s", bad;
             if (n > 3) printf " (+%d)", n - 3 }' "$1"
}

# step NAME CAP_S COMMAND...: runs COMMAND under timeout (CAP_S or what the budget has left),
# its output to its own log and to check.log; sets $step_rc and $step_log.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((deadline - $(date +%s)))
  step_log="$work/$name.log"
  step_rc=125
  if ((left < 20)); then
    skip "$name" "no time left in the ${budget}s budget"
    return 1
  fi
  local t=$((cap < left - 10 ? cap : left - 10))
  printf '\n===== %s (timeout %ss): %s\n' "$name" "$t" "$*" >>"$combined"
  local t0
  t0=$(date +%s)
  timeout -k 5 "$t" "$@" >"$step_log" 2>&1
  step_rc=$?
  step_secs=$(($(date +%s) - t0))
  cat "$step_log" >>"$combined"
  if ((step_rc == 124 || step_rc == 137)); then
    step_note="timed out after ${t}s"
  else
    step_note="exit $step_rc"
  fi
  return 0
}

# A test step: pass when the binary exits 0 and ran at least one test.
test_step() { # name cap binary args...
  local name="$1"
  step "$@" || return
  local c
  c="$(test_counts "$step_log")"
  if ((step_rc == 0)) && [[ "$c" != 0\ passed* ]]; then
    record "$name" pass "$c" "$step_secs"
  elif ((step_rc == 0)); then
    record "$name" fail "no test matched ($c)" "$step_secs"
  else
    record "$name" fail "$step_note; $c" "$step_secs"
  fi
}

# ---- unpack ---------------------------------------------------------------------------------
# Test binaries carry the build machine's absolute paths (fixtures, the CLI binary), so the repo
# is linked there first.
build_root="${IMDM_BUILD_ROOT:-/work/main}"
if [[ ! -f .gpu/bundle.tar.gz ]]; then
  skip bundle "no .gpu/bundle.tar.gz: run scripts/pack-gpu.sh where Rust is, carry .gpu"
else
  if [[ "$root" != "$build_root" && ! -e "$build_root" ]]; then
    mkdir -p "$(dirname "$build_root")" && ln -s "$root" "$build_root"
  fi
  rm -rf .gpu/run && mkdir -p .gpu/run
  if tar xzf .gpu/bundle.tar.gz -C .gpu/run && [[ -x .gpu/run/bin/imdm-engine ]]; then
    mkdir -p target/release && cp .gpu/run/bin/imdm-engine target/release/
    bundle_ok=1
    record bundle pass "$(ls .gpu/run/tests | wc -l) test binaries, $(du -sh .gpu/bundle.tar.gz | cut -f1)"
  else
    record bundle fail "could not unpack .gpu/bundle.tar.gz (or it holds no bin/imdm-engine)"
  fi
fi
engine="$root/target/release/imdm-engine"
lib_bin=".gpu/run/tests/imdm_engine"
export IMDM_REQUIRE_GPU=1 RUST_BACKTRACE=1

# ---- device and libraries -------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null; then
  skip device "nvidia-smi is not on PATH: no NVIDIA driver here"
elif step device 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv,noheader && ((step_rc == 0)); then
  have_device=1
  record device pass "$(head -1 "$step_log")" "$step_secs"
else
  record device fail "nvidia-smi: ${step_note:-failed}; $(head -1 "$step_log")"
fi

lib_dirs=()
for lib in libcublasLt.so libcublas.so; do
  d="$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 ~ "^"l {print $NF; exit}')"
  if [[ -z "$d" ]] && command -v python3 >/dev/null; then
    d="$(python3 - "$lib" 2>/dev/null <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for f in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib", sys.argv[1] + "*"))):
        print(f)
        raise SystemExit
PY
)"
  fi
  [[ -n "$d" ]] && lib_dirs+=("$(dirname "$d")")
done
if ((${#lib_dirs[@]} == 2)); then
  ld="$(printf '%s\n' "${lib_dirs[@]}" | sort -u | paste -sd:)"
  export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  record libs pass "cuBLASLt and cuBLAS from $ld"
else
  record libs fail "libcublasLt.so / libcublas.so not found (ldconfig -p, python3 nvidia/*/lib)"
fi

gpu_ready() { # name: records a skip and fails when a GPU step cannot run
  if ((!bundle_ok)); then
    skip "$1" "no unpacked bundle"
  elif ((!have_device)); then
    skip "$1" "no device"
  else
    return 0
  fi
  return 1
}

# ---- probe ----------------------------------------------------------------------------------
if gpu_ready probe && step probe 60 "$engine" probe; then
  how="$(grep -E '^modules (loaded|compiled)' "$step_log" | head -1)"
  if ((step_rc == 0)); then
    record probe pass "${how:-loaded}" "$step_secs"
  else
    record probe fail "$step_note; $(tail -1 "$step_log")" "$step_secs"
  fi
fi

# ---- the library's GPU tests by family, riskiest first --------------------------------------
if [[ -x "$lib_bin" ]]; then
  "$lib_bin" --list --format terse 2>/dev/null | sed -n 's/: test$//p' >"$work/lib_tests.txt"
fi
families=(attention subs gemm sample)
for fam in "${families[@]}"; do
  gpu_ready "t-$fam" || continue
  test_step "t-$fam" 120 "$lib_bin" --test-threads="$threads" "cuda::ops::$fam"
done
if gpu_ready t-ops-other; then
  skips=()
  for fam in "${families[@]}"; do skips+=(--skip "cuda::ops::$fam"); done
  test_step t-ops-other 120 "$lib_bin" --test-threads="$threads" "cuda::ops::" "${skips[@]}"
fi
if gpu_ready t-cuda-other; then
  test_step t-cuda-other 150 "$lib_bin" --test-threads="$threads" "cuda::" --skip "cuda::ops::"
fi

# ---- compute-sanitizer on small shapes -----------------------------------------------------
san_tests=()
for t in attention::tests::bwd::gpu_bwd_is_bitwise_deterministic \
  subs::tests::gpu_matches_twin subs::tests::gpu_xent_is_deterministic_and_sums \
  sample::tests::gpu_reset_eps_rows rollout_target::tests::gpu_matches_twin; do
  leaf="${t##*::}"
  full="$(grep -E "(^|::)$leaf\$" "$work/lib_tests.txt" 2>/dev/null | grep "${t%%::*}" | head -1)"
  [[ -n "$full" ]] && san_tests+=("$full")
done
for tool in memcheck racecheck; do
  gpu_ready "$tool" || continue
  if ! command -v compute-sanitizer >/dev/null; then
    skip "$tool" "compute-sanitizer is not on PATH"
    continue
  fi
  if ((${#san_tests[@]} == 0)); then
    skip "$tool" "none of its tests is in the library's test list"
    continue
  fi
  step "$tool" 120 compute-sanitizer --tool "$tool" --error-exitcode 3 \
    "$lib_bin" --test-threads=1 --exact "${san_tests[@]}" || continue
  if grep -qE 'Device not supported|unsupported device|error 999' "$step_log"; then
    record "$tool" skip "the runtime refused the device (gVisor does so)" "$step_secs"
  elif ((step_rc == 0)); then
    record "$tool" pass "${#san_tests[@]} tests, $(grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' "$step_log" | tail -1)" "$step_secs"
  else
    record "$tool" fail "$step_note; $(grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' "$step_log" | tail -1)" "$step_secs"
  fi
done

# ---- whole-model tests: every tests/gpu_*.rs ------------------------------------------------
for bin in .gpu/run/tests/gpu_*; do
  [[ -e "$bin" ]] || continue
  n="$(basename "$bin")"
  gpu_ready "$n" || continue
  test_step "$n" 150 "$bin" --test-threads=4
done
if ((!bundle_ok)); then
  skip "gpu_*" "no unpacked bundle"
elif ! compgen -G ".gpu/run/tests/gpu_*" >/dev/null; then
  skip "gpu_*" "the bundle holds no tests/gpu_*.rs binary"
fi

# ---- benchmarks -----------------------------------------------------------------------------
# bench NAME CAP ARGS...: writes $work/NAME.json and NAME.trace.json; figures are read by FIGS.
bench() {
  local name="$1" cap="$2"
  shift 2
  gpu_ready "$name" || return 1
  step "$name" "$cap" "$engine" bench "$@" --json "$work/$name.json" || return 1
  if ((step_rc != 0)); then
    record "$name" fail "$step_note; $(grep -m1 -i error "$step_log")" "$step_secs"
    return 1
  fi
}
figs() { # step-json kind: one line of key figures
  python3 - "$@" <<'PY' 2>/dev/null || echo "figures unreadable"
import json, math, sys
d = json.load(open(sys.argv[1])); k = sys.argv[2]
if k == "kernels":
    r = d["kernels"]; print(f"{len(r)} rows, best {max(x['pct_peak'] or 0 for x in r):.0f}% of peak")
elif k == "forward":
    f = d["forward"]; print(f"{f['ms_logits']:.2f} ms logits, {f['ms_subs']:.2f} ms +SUBS, {f['tflops']:.0f} TFLOP/s")
elif k == "train":
    t = d["train"]; lnv = math.log(t["vocab"]) if "vocab" in t else float("nan")
    print(f"{t['ms_step']:.1f} ms/step, MFU {100*t['mfu_6n']:.1f}%, loss {t['last_loss']:.3f} (ln V {lnv:.2f})")
elif k == "sample":
    s = d["sample"]; print(f"{s['ms_step']:.2f} ms/step, kernel {s['step_kernel_gbps']:.0f} GB/s")
elif k == "distill":
    s = d["distill"]
    print(f"{s['ms_step']:.0f} ms/step (rollout {s['ms_rollout']:.0f}, student {s['ms_student']:.0f}); "
          f"reference 3F+B {s['ms_reference_equiv']:.0f} ms, ratio {s['ratio']:.2f}x, loss {s['last_loss']:.3f}")
PY
}
if gpu_ready bench-kernels && bench bench-kernels 120 kernels; then
  record bench-kernels pass "$(figs "$work/bench-kernels.json" kernels)" "$step_secs"
fi
for shape in owt lm1b; do
  if bench "bench-forward-$shape" 60 forward --shape "$shape" --trace "$work/forward-$shape.trace.json"; then
    record "bench-forward-$shape" pass "$(figs "$work/bench-forward-$shape.json" forward)" "$step_secs"
  fi
done
for shape in owt lm1b; do
  n="bench-train-$shape"
  bench "$n" 90 train --shape "$shape" --steps 3 --trace "$work/train-$shape.trace.json" || continue
  # The first full-size training steps: the loss must be finite and near ln V.
  verdict="$(python3 - "$work/$n.json" <<'PY' 2>/dev/null
import json, math, sys
t = json.load(open(sys.argv[1]))["train"]
v = {"owt": 50258, "lm1b": 30522}.get(t.get("shape"), t.get("vocab", 0))
loss, lnv = t["last_loss"], math.log(v)
print("pass" if math.isfinite(loss) and abs(loss - lnv) < 0.5 * lnv else "fail")
PY
)"
  record "$n" "${verdict:-fail}" "$(figs "$work/$n.json" train)" "$step_secs"
done
for shape in owt lm1b; do
  if bench "bench-sample-$shape" 60 sample --shape "$shape" --trace "$work/sample-$shape.trace.json"; then
    record "bench-sample-$shape" pass "$(figs "$work/bench-sample-$shape.json" sample)" "$step_secs"
  fi
done
# The distillation step at the small preset, OWT shape: its figures and a finite loss.
n=bench-distill-owt
if bench "$n" 150 distill --preset small --shape owt --steps 2; then
  verdict="$(python3 -c 'import json,math,sys; d=json.load(open(sys.argv[1]))["distill"]; print("pass" if math.isfinite(d["last_loss"]) and d["ms_step"] > 0 else "fail")' \
    "$work/$n.json" 2>/dev/null)"
  record "$n" "${verdict:-fail}" "$(figs "$work/$n.json" distill)" "$step_secs"
fi

# ---- the PyTorch peer: our reference DiT in bf16 under torch.compile, same shapes -----------
for shape in owt lm1b; do
  n="peer-$shape"
  if ((!have_device)); then
    skip "$n" "no device"
    continue
  fi
  if ! python3 -c 'import torch' 2>/dev/null; then
    skip "$n" "python3 has no torch"
    continue
  fi
  step "$n" 120 env PYTHONUNBUFFERED=1 python3 tools/reference/peer_bench.py --shape "$shape" \
    --json "$work/$n.json" || continue
  if ((step_rc == 0)); then
    ours="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["forward"]["ms_logits"])' \
      "$work/bench-forward-$shape.json" 2>/dev/null)"
    peer="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ms_logits"])' "$work/$n.json" 2>/dev/null)"
    ratio="$(python3 -c "print(f'{$peer/$ours:.2f}x')" 2>/dev/null || echo "-")"
    record "$n" pass "torch.compile ${peer:-?} ms vs ours ${ours:-?} ms: $ratio" "$step_secs"
  else
    record "$n" fail "$step_note; $(tail -1 "$step_log")" "$step_secs"
  fi
done

# ---- what comes back ------------------------------------------------------------------------
{
  printf '{"budget_s": %s, "elapsed_s": %s, "steps": [' "$budget" "$(($(date +%s) - start))"
  for i in "${!names[@]}"; do
    ((i)) && printf ','
    python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "status": sys.argv[2], "note": sys.argv[3], "s": int(sys.argv[4])}), end="")' \
      "${names[$i]}" "${status[$i]}" "${notes[$i]}" "${secs[$i]}"
  done
  printf '], "bench": {'
  first=1
  for j in "$work"/bench-*.json "$work"/peer-*.json; do
    [[ -f "$j" ]] || continue
    ((first)) || printf ','
    first=0
    printf '"%s": %s' "$(basename "$j" .json)" "$(cat "$j")"
  done
  printf '}}\n'
} >"$out/figures.json"
tar czf "$out/steps.tar.gz" -C "$work" . 2>/dev/null
rm -rf "$work"

p=0 f=0 s=0
for st in "${status[@]}"; do
  case "$st" in pass) p=$((p + 1)) ;; fail) f=$((f + 1)) ;; *) s=$((s + 1)) ;; esac
done
{
  echo
  echo "gpu-check summary ($(($(date +%s) - start))s of ${budget}s; logs in $out)"
  printf '%-20s %-5s %5s  %s\n' step state secs "counts / figures / reason"
  for i in "${!names[@]}"; do
    printf '%-20s %-5s %5s  %s\n' "${names[$i]}" "${status[$i]}" "${secs[$i]}" "${notes[$i]}"
  done
  echo "gpu-check: $p pass, $f fail, $s skip"
} | tee "$out/summary.txt" | tee -a "$combined"
((f == 0))
