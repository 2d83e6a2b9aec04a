#!/usr/bin/env bash
# What --channels_last and --torch_compile buy on a GPU (sd15, 512 px, bf16, full SPIN and SFT with gradient
# checkpointing, 1 pair / 1 sample per step; fused AdamW for channels-last, 8-bit Adam for compile), beside the same
# cases without them. About 6 to 8 minutes on one
# H100/H200, most of it compiling. Run after bench/gpu_check.sh when device time is left.
#   bash bench/gpu_opts.sh [OUT_DIR]        # WHEELS=none: use the packages already installed
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
base=full:bf16:adamw8bit:gc1
cl=full:bf16:adamw:gc1  # channels-last with fused AdamW: the scripts refuse it with 8-bit Adam
$PY bench/bench_step.py --preset sd15 --device cuda --steps 5 --warmup 2 --batch 1 \
  --cases "sft:$cl,sft:$cl:cl,spin:$cl,spin:$cl:cl,sft:full:bf16:adamw:gc0,sft:full:bf16:adamw:gc0:cl" \
  --json "$OUT/gpu_channels_last.json"
# compiling takes minutes: its own call, so a timeout here keeps the rows above
timeout 300 $PY bench/bench_step.py --preset sd15 --device cuda --steps 5 --warmup 3 --batch 1 \
  --cases "spin:$base:compile" --json "$OUT/gpu_compile.json" || echo "compile case did not finish in 300 s"
