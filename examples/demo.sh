#!/usr/bin/env bash
# Offline demo: tiny SD-1.5-shaped pipeline + Pick-a-Pic-shaped parquet, built locally, trained on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$PWD/demo_output/hf_home}"
OUT=demo_output
ASSETS=$OUT/assets
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"

echo "== 1/5 building tiny assets in $ASSETS"
python examples/make_tiny_assets.py --output_dir "$ASSETS"

echo "== 2/5 SFT with LoRA on the Pick-a-Pic winners (train_sft.py)"
rm -rf "$OUT/sft-lora"
$LAUNCH train_sft.py --config examples/demo_sft.yaml \
  --pretrained_model_name_or_path "$ASSETS/tiny-sd" --dataset_name "$ASSETS/pickapic.parquet" \
  --output_dir "$OUT/sft-lora"

echo "== 3/5 loading the result with StableDiffusionPipeline + load_lora_weights"
python examples/sample_grid.py --base "$ASSETS/tiny-sd" --lora "$OUT/sft-lora" --output "$OUT/sft-lora-samples.png"

echo "== 4/5 SPIN-Diffusion, 2 iterations with LoRA (train_spin_diffusion.py)"
rm -rf "$OUT/spin-lora"
$LAUNCH train_spin_diffusion.py --config examples/demo_spin.yaml \
  --pretrained_model_name_or_path "$ASSETS/tiny-sd" --dataset_name "$ASSETS/pickapic.parquet" \
  --output_dir "$OUT/spin-lora"
python examples/sample_grid.py --base "$ASSETS/tiny-sd" --lora "$OUT/spin-lora/iter_2" --output "$OUT/spin-iter2-samples.png"

echo "== 5/5 evaluating base vs SFT vs SPIN iterations (evaluate.py, tiny scorers in the official formats)"
G=tests/golden
python evaluate.py --prompts examples/demo_prompts.txt --resolution 32 --num_inference_steps 10 \
  --model base="$ASSETS/tiny-sd" --model sft="$OUT/sft-lora" \
  --model spin-iter1="$OUT/spin-lora/iter_1" --model spin-iter2="$OUT/spin-lora/iter_2" \
  --base_model "$ASSETS/tiny-sd" --baseline base --output_dir "$OUT/eval" \
  --pickscore_model $G/clip/pickscore/model --pickscore_processor $G/clip/pickscore/processor \
  --hps_checkpoint $G/clip/hps/HPS_v2.1_compressed.pt --hps_processor $G/clip/hps/processor \
  --imagereward_checkpoint $G/imagereward --imagereward_tokenizer $G/imagereward/tokenizer \
  --aesthetic_head "$G/clip/aesthetic/sac+logos+ava1-l14-linearMSE.pth" --aesthetic_clip_model $G/clip/aesthetic/clip
echo "demo done: see $OUT/ (random tiny models: the numbers show the pipeline works, not that SPIN helps)"
