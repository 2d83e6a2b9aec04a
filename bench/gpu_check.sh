#!/usr/bin/env bash
# One GPU check, under 8 minutes on a single H100/H200: the sd15 step table at 512 px, bf16, and the
# generation phase's throughput. Random-init SD-1.5 configs from bench/configs (no download).
#   bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# full SPIN, 8-bit Adam + gradient checkpointing, 1 pair per step and larger batches (largest under 16 GiB wins)
$PY bench/bench_step.py --preset sd15 --device cuda --steps 5 --warmup 2 --batch 1 2 4 8 \
  --cases spin:full:bf16:adamw8bit:gc1 --json "$OUT/gpu_spin_full.json"
# the other rows at 1 pair / 1 sample per step: LoRA SPIN, precomputed reference, full and LoRA SFT, naive
$PY bench/bench_step.py --preset sd15 --device cuda --steps 5 --warmup 2 --batch 1 \
  --cases spin:lora:bf16:adamw:gc1,spin-pre:full:bf16:adamw8bit:gc1,sft:full:bf16:adamw8bit:gc1,sft:lora:bf16:adamw:gc1,naive:full:bf16:adamw8bit:gc1 \
  --json "$OUT/gpu_rows.json"
# generation phase vs a plain pipeline loop, 50 steps as in the paper's protocol
$PY bench/bench_generate.py --preset sd15 --device cuda --dtype bf16 --prompts 32 --batch 16 --steps 50 \
  --json "$OUT/gpu_generate.json"
