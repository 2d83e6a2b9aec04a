#!/usr/bin/env python
"""Load a trained result the way a user would and write a sample grid:

python examples/sample_grid.py --base runwayml/stable-diffusion-v1-5 --lora sd15-sft-lora --output grid.png
python examples/sample_grid.py --base sd15-sft-full --output grid.png
python examples/sample_grid.py --base stabilityai/stable-diffusion-xl-base-1.0 --resolution 1024 --output grid.png
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.generation import make_grid, render  # noqa: E402

PROMPTS = [
    "a red fox in the snow",
    "a lighthouse at dusk, oil painting",
    "a bowl of ramen, studio photo",
    "an astronaut riding a horse",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="diffusers pipeline of any family (Hub id or folder)")
    p.add_argument("--lora", default=None, help="LoRA weights folder or Hub id to load on the base")
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's own).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="samples.png")
    a = p.parse_args(argv)
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Whatever the family (SD, SDXL, SD3, Flux ...): the pipeline class comes from the model's model_index.json.
    index = DiffusionPipeline.load_config(a.base)
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    pipe = DiffusionPipeline.from_pretrained(a.base, **no_checker).to(device)
    if a.lora:
        pipe.load_lora_weights(a.lora)
    pipe.set_progress_bar_config(disable=True)
    images = render(pipe, a.prompts, seed=a.seed, num_inference_steps=a.num_inference_steps, resolution=a.resolution)
    make_grid(images).save(a.output)
    print(f"wrote {a.output} ({len(a.prompts)} prompts, {type(pipe).__name__})")


if __name__ == "__main__":
    main()
