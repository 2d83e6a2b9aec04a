#!/usr/bin/env bash
# `make demo`: the toy world of examples/toy/ on the CPU, offline, in about 10 minutes on 2 cores.
# Builds theta_0 from scratch (a VAE, a text encoder, a UNet pretrained with train_sft.py on noisy captions), trains
# it with SFT until its validation adherence flattens (S, the strong start model of the paper's setting), then from S
# runs continued SFT, 3 SPIN iterations, iteration 1 continued and Diffusion-DPO through the real scripts for one
# seed, judges the test prompts exactly (evaluate.py --metrics toy_adherence,toy_attributes,toy_fd) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$PWD/demo_output/hf_home}"
python examples/toy/run.py --preset demo --seeds 0 --arms sft,spin,spin-long,dpo --secondary_seeds --jobs 1 \
    --output_dir demo_output/toy
echo "demo done: demo_output/toy/results.md (table), grid.png (checkpoints x test prompts), fig5_epochs.png, fig3_iterations.png"
echo "one seed shows the pipeline, not a result: the README's 'Does it work?' has the study (3 seeds, every arm, the search)"
