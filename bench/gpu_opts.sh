#!/usr/bin/env bash
# What --channels_last and --torch_compile buy on a GPU (sd15, 512 px, bf16, full SPIN and SFT with gradient
# checkpointing, 1 pair / 1 sample per step; fused AdamW for channels-last, 8-bit Adam for compile), beside the same
# cases without them (PART=steps, about 6 to 8 minutes on one H100/H200, most of it compiling); then the generation
# phase at batch 8, 16, 32 (model sampler at 50 steps, DPM-Solver++ 2M at 20), with and without torch.compile
# (PART=generate, not yet timed). Run after bench/gpu_check.sh when device time is left, one PART per device call.
#   PART=steps|generate|all bash bench/gpu_opts.sh [OUT_DIR]   # WHEELS=none: use the packages already installed
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-gpu_wheels}
if [ "$WHEELS" != none ]; then  # as bench/gpu_check.sh: the carried wheels (make gpu-wheels) on PYTHONPATH
  SITE=$(mktemp -d)
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --find-links "$WHEELS" --target "$SITE" -r bench/gpu_wheels.txt \
    || { echo "error: installing the carried wheels from $WHEELS/ failed (run 'make gpu-wheels' where PyPI is reachable)" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
PART=${PART:-all}
base=full:bf16:adamw8bit:gc1
cl=full:bf16:adamw:gc1  # channels-last with fused AdamW: the scripts refuse it with 8-bit Adam
if [ "$PART" != generate ]; then
$PY bench/bench_step.py --preset sd15 --device cuda --steps 5 --warmup 2 --batch 1 \
  --cases "sft:$cl,sft:$cl:cl,spin:$cl,spin:$cl:cl,sft:full:bf16:adamw:gc0,sft:full:bf16:adamw:gc0:cl" \
  --json "$OUT/gpu_channels_last.json"
# compiling takes minutes: its own call, so a timeout here keeps the rows above
timeout 300 $PY bench/bench_step.py --preset sd15 --device cuda --steps 5 --warmup 3 --batch 1 \
  --cases "spin:$base:compile" --json "$OUT/gpu_compile.json" || echo "compile case did not finish in 300 s"
fi
[ "$PART" != steps ] || exit 0
# the generation phase: SD-1.5 images/s at batch 8, 16 and 32, bf16, the model's sampler at 50 steps against
# DPM-Solver++ 2M at 20, without and with --torch_compile (each compiled call has its own timeout)
for batch in 8 16 32; do
  $PY bench/bench_generate.py --preset sd15 --device cuda --dtype bf16 --prompts $((2 * batch)) --batch $batch \
    --steps 20 --samplers model:50,dpmsolver:20 --json "$OUT/gpu_generate_b$batch.json"
  timeout 300 $PY bench/bench_generate.py --preset sd15 --device cuda --dtype bf16 --prompts $((2 * batch)) \
    --batch $batch --steps 20 --samplers model:50,dpmsolver:20 --compile --json "$OUT/gpu_generate_b${batch}_compile.json" \
    || echo "compiled generation at batch $batch did not finish in 300 s"
done
