#!/usr/bin/env bash
# The GPU check, runnable as-is on an offline machine whose python3 has torch, transformers, accelerate, peft and
# huggingface_hub but not diffusers, bitsandbytes or datasets (the H200 here): those come from the wheels that
# `make gpu-wheels` put in gpu_wheels/. Planned for 6-9 minutes on one H100/H200 (not yet timed there), capped by
# BUDGET_S:
#   1. install the carried wheels (bench/gpu_wheels.txt) into a temporary folder put on PYTHONPATH
#   2. bench/check_env.py: every project module and every library import in it resolves
#   3. tests/test_cuda.py, if there
#   4. the sd15 step table at 512 px, bf16 (random-init SD-1.5 configs from bench/configs, no download), the LoRA
#      SPIN step of SDXL, SD3.5-medium and Flux.1-dev at 1024 px (and full SPIN of SDXL), and the generation
#      phase's throughput at 50 steps
# Every stage runs even when one before it failed (except that nothing runs without the wheels); any failure makes
# the exit non-zero, and its error is repeated at the end.
#   bash bench/gpu_check.sh [OUT_DIR]        # default output/gpu_check (git-ignored)
# OUT_DIR gets at most 8 files: gpu_check.log (everything printed), summary.txt, tables.md, test_cuda.txt and the
# JSONs gpu_spin_full.json, gpu_rows.json, gpu_families.json, gpu_generate.json.
# Environment: PYTHON (python3), WHEELS (gpu_wheels; "none": use the packages already there), PINS
# (bench/gpu_wheels.txt), BUDGET_S (570: the whole run's time limit; each stage gets what is left, up to its own
# cap), ENV_ONLY=1 (stop after the import check). The CPU rehearsal
# (bench/rehearse_gpu_check.sh) sets PRESET=tiny DEVICE=cpu SMALL=1: the same stages and cases on tiny models,
# with fewer steps, batches and prompts, and the rows' cases in one process.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-gpu_wheels}
PINS=${PINS:-bench/gpu_wheels.txt}
PRESET=${PRESET:-sd15}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-570}
FAMILY_CAP_S=150
if [ "${SMALL:-0}" = 1 ]; then
  # the rows' cases in one process (--in_process): on 2 CPU cores each case's own process is mostly imports
  STEPS=1 WARMUP=0 BATCHES="1" GEN="--prompts 4 --batch 2 --steps 2" ROWS_OPTS=--in_process
  FAMILY_PRESETS="tiny-sdxl tiny-sd3 tiny-flux"
else
  STEPS=5 WARMUP=2 BATCHES="1 2 4 8" GEN="--prompts 32 --batch 16 --steps 50" ROWS_OPTS=
  FAMILY_PRESETS="sdxl sd35m flux-dev"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT"/{gpu_check.log,summary.txt,tables.md,test_cuda.txt,gpu_spin_full.json,gpu_rows.json,gpu_generate.json}
rm -f "$OUT"/gpu_families.json
START=$SECONDS

# stage NAME CAP_S [--md] CMD...: run CMD under min(CAP_S, time left), its stderr live and kept, its stdout after it
# (with --md also appended to tables.md); one line in summary.txt either way.
stage() {
  local name=$1 cap=$2 md=0 left rc t0=$SECONDS
  shift 2
  if [ "$1" = --md ]; then md=1; shift; fi
  left=$((BUDGET_S - (SECONDS - START)))
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (limit ${cap} s): $*"
  if [ "$cap" -le 0 ]; then
    echo "FAIL $name: not run, the ${BUDGET_S} s budget is spent" | tee -a "$OUT/summary.txt"
    echo "not run: the ${BUDGET_S} s budget was spent" >"$WORK/$name.err"
    return 1
  fi
  local run=(timeout --kill-after=15 "$cap")
  [ "$(type -t "$1")" = function ] && run=()  # a shell function here (the install): not under timeout
  { "${run[@]}" "$@" 2>&1 1>&3 | tee "$WORK/$name.err" >&2; } 3>"$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  cat "$WORK/$name.out"
  if [ $md = 1 ]; then printf '## %s\n\n%s\n\n' "$name" "$(cat "$WORK/$name.out")" >>"$OUT/tables.md"; fi
  if [ "$rc" = 0 ]; then
    echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  else
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "timed out after ${cap} s" >>"$WORK/$name.err"
    echo "FAIL $name (exit $rc, $((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  fi
  return "$rc"
}

install_wheels() {
  if [ "$WHEELS" = none ]; then echo "WHEELS=none: using the packages already installed"; return 0; fi
  if [ ! -d "$WHEELS" ]; then
    echo "error: no wheel folder $WHEELS/. Run 'make gpu-wheels' on a machine that reaches PyPI and bring" \
         "$WHEELS/ along (with the device tool: carry [\"$WHEELS\"])." >&2
    return 1
  fi
  local missing="" name version
  while read -r name version; do  # each pin must have its wheel; pip's own message is less direct
    ls "$WHEELS/$(echo "$name" | tr 'A-Z.-' 'a-z__')-$version-"*.whl >/dev/null 2>&1 || missing="$missing $name==$version"
  done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' -e 's/==/ /' "$PINS")
  if [ -n "$missing" ]; then
    echo "error: $WHEELS/ lacks the wheel of:$missing. Run 'make gpu-wheels' where PyPI is reachable." >&2
    return 1
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --find-links "$WHEELS" --target "$WORK/site" -r "$PINS" \
    || { echo "error: installing the carried wheels from $WHEELS/ failed (above); for this Python: $("$PY" -V)" >&2; return 1; }
  echo "installed into $WORK/site: $(ls "$WORK/site" | grep -c dist-info) distributions"
}

# family_rows: bench/bench_step.py for each of FAMILY_PRESETS, one table each on stdout, all rows in one JSON
# (a shell function, so not under stage's timeout: each preset runs under what is left of FAMILY_CAP_S and the budget)
family_rows() {
  local preset cases files=() end=$((SECONDS + FAMILY_CAP_S)) budget_end=$((START + BUDGET_S))
  [ "$budget_end" -lt "$end" ] && end=$budget_end
  for preset in $FAMILY_PRESETS; do
    [ $((end - SECONDS)) -gt 0 ] || { echo "families: no time left for $preset" >&2; return 124; }
    cases=spin:lora:bf16:adamw8bit:gc1
    case $preset in *sdxl) cases=$cases,spin:full:bf16:adamw8bit:gc1 ;; esac
    # shellcheck disable=SC2086
    timeout --kill-after=15 $((end - SECONDS)) \
      "$PY" bench/bench_step.py --preset "$preset" --device "$DEVICE" --steps $STEPS --warmup $WARMUP --batch 1 \
        $ROWS_OPTS --cases "$cases" --json "$WORK/family_$preset.json" || return $?
    files+=("$WORK/family_$preset.json")
  done
  "$PY" -c 'import json, sys; json.dump([r for f in sys.argv[2:] for r in json.load(open(f))], open(sys.argv[1], "w"), indent=1)' \
    "$OUT/gpu_families.json" "${files[@]}"
}

main() {
  echo "gpu_check: $(date -u +%FT%TZ), preset $PRESET on $DEVICE, budget $BUDGET_S s, python: $(command -v "$PY")"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  if ! stage install 120 install_wheels; then
    echo "gpu_check: FAILED: the carried wheels are missing or did not install; nothing else was run." >&2
    return 1
  fi
  [ "$WHEELS" = none ] || export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  local failed=()
  stage imports 120 "$PY" bench/check_env.py --pins "$PINS" --device "$DEVICE" || failed+=(imports)
  if [ "${ENV_ONLY:-0}" = 1 ]; then finish "${failed[@]}"; return; fi
  if [ -f tests/test_cuda.py ]; then
    stage test_cuda 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py || failed+=(test_cuda)
    cp "$WORK/test_cuda.out" "$OUT/test_cuda.txt"
    cat "$WORK/test_cuda.err" >>"$OUT/test_cuda.txt"
  else
    echo "(no tests/test_cuda.py: skipped)"
  fi
  # full SPIN, 8-bit Adam + gradient checkpointing, 1 pair per step and larger batches
  # shellcheck disable=SC2086
  stage spin_full 150 --md "$PY" bench/bench_step.py --preset "$PRESET" --device "$DEVICE" --steps $STEPS \
    --warmup $WARMUP --batch $BATCHES --cases spin:full:bf16:adamw8bit:gc1 --json "$OUT/gpu_spin_full.json" \
    || failed+=(spin_full)
  # the other rows at 1 pair / 1 sample per step: LoRA SPIN, precomputed reference, full and LoRA SFT, naive
  # shellcheck disable=SC2086
  stage rows 180 --md "$PY" bench/bench_step.py --preset "$PRESET" --device "$DEVICE" --steps $STEPS \
    --warmup $WARMUP --batch 1 $ROWS_OPTS --json "$OUT/gpu_rows.json" --cases \
    spin:lora:bf16:adamw:gc1,spin-pre:full:bf16:adamw8bit:gc1,sft:full:bf16:adamw8bit:gc1,sft:lora:bf16:adamw:gc1,naive:full:bf16:adamw8bit:gc1 \
    || failed+=(rows)
  # the families beyond SD-1.5 at 1024 px, bf16, 8-bit Adam, gradient checkpointing, random weights from their
  # real configs (SDXL, SD3.5-medium, Flux.1-dev; no text encoders: their conditioning is stored, as with
  # --precompute_reference): the LoRA SPIN step of each, and full SPIN for SDXL
  stage families "$FAMILY_CAP_S" --md family_rows || failed+=(families)
  # generation phase vs a plain pipeline loop, 50 steps as in the paper's protocol
  # shellcheck disable=SC2086
  stage generate 90 --md "$PY" bench/bench_generate.py --preset "$PRESET" --device "$DEVICE" --dtype bf16 $GEN \
    --json "$OUT/gpu_generate.json" || failed+=(generate)

  finish "${failed[@]}"
}

# finish [FAILED_STAGE...]: the summary, then each failed stage's error again (the end of the output is what a
# remote run returns first), and the exit status
finish() {
  echo
  cat "$OUT/summary.txt"
  if [ $# -gt 0 ]; then
    for name in "$@"; do
      echo "---- $name failed; the end of its stderr:"
      tail -n 40 "$WORK/$name.err"
    done
    echo "gpu_check: FAILED: $* ($((SECONDS - START)) s; results in $OUT)" >&2
    return 1
  fi
  echo "gpu_check: OK ($((SECONDS - START)) s; results in $OUT)"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
