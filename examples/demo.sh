#!/usr/bin/env bash
# `make demo`: the toy world of examples/toy/ on the CPU, offline, in about 10 minutes on 2 cores.
# Builds theta_0 from scratch (a VAE, a text encoder, a UNet pretrained with train_sft.py on noisy captions),
# then runs continued SFT, 3 SPIN iterations and Diffusion-DPO through the real scripts for one seed, judges
# the held-out prompts exactly (evaluate.py --metrics toy_adherence,toy_attributes,toy_fd) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$PWD/demo_output/hf_home}"
python examples/toy/run.py --preset demo --seeds 0 --output_dir demo_output/toy
echo "demo done: demo_output/toy/results.md (table), grid.png (models x held-out prompts), fig5_epochs.png, fig3_iterations.png"
echo "the README's 'Does it work?' has the 3-seed version: python examples/toy/run.py --seeds 0 1 2 --output_dir toy_results"
