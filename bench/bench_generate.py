#!/usr/bin/env python
"""Images/s of SPIN's generation phase (`utils.generation.generate_opponent_samples`: latents into shards,
no VAE decode) against a plain `StableDiffusionPipeline.__call__` loop with the same settings (decoded PIL
images), and what decoding the latents would cost. With --samplers, each opponent sampler at its step count:
UNet forwards per sample (counted: classifier-free guidance doubles each step's batch), per iteration of
--iteration_prompts prompts, and images/s.

    python bench/bench_generate.py --preset cpu-medium --prompts 8 --steps 10
    python bench/bench_generate.py --preset sd15 --device cuda --prompts 64 --batch 16 --dtype bf16 \
        --samplers model:50,ddim:50,dpmsolver:20,dpmsolver:10,unipc:20 [--compile]
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))


def build_pipeline(preset, device, dtype):
    from bench_step import build_models
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from make_tiny_assets import build_clip_tokenizer
    from transformers import CLIPTokenizer

    setup = build_models(preset, "cpu")
    unet, vae, text_encoder, resolution = setup.denoiser, setup.vae, setup.text.text_encoder, setup.resolution
    tokenizer = CLIPTokenizer.from_pretrained(build_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), resolution


def main():
    from utils.generation import SyntheticStore, generate_opponent_samples, sample_seed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "cpu-medium", "sd15"], default="tiny")  # the SD-1.x presets
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="Sampling steps per image.")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--samplers",
        default=None,
        help="Comma-separated SAMPLER:STEPS (SAMPLER: model, or a --gen_scheduler of train_spin_diffusion.py).",
    )
    p.add_argument("--iteration_prompts", type=int, default=50000, help="Prompts per iteration, for the forwards.")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet first (--torch_compile).")
    a = p.parse_args()
    samplers = [(n, int(k)) for n, k in (x.split(":") for x in a.samplers.split(","))] if a.samplers else []
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    result = {
        "preset": a.preset,
        "device": a.device,
        "dtype": a.dtype,
        "prompts": a.prompts,
        "batch": a.batch,
        "steps": a.steps,
    }
    errors = {}

    def measure(name, fn):
        """Run one measurement; a failure is shown with its traceback and recorded, and the others still run."""
        try:
            return fn()
        except Exception:
            errors[name] = traceback.format_exc()
            print(f"{name}: FAILED\n{errors[name]}", file=sys.stderr, flush=True)

    def sync():
        if torch.device(a.device).type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    prompts = [f"a photo of thing number {i}, oil painting" for i in range(a.prompts)]
    pipe, resolution = measure("pipeline", lambda: build_pipeline(a.preset, a.device, dtype)) or (None, None)
    store = SyntheticStore(Path(tempfile.mkdtemp()) / "synthetic", len(prompts), shard_size=a.batch)

    def generation_phase():
        # warm-up (kernels, allocator) on one batch, outside both timings
        pipe(prompts[: a.batch], num_inference_steps=2, height=resolution, width=resolution, output_type="latent")
        return a.prompts / timed(
            lambda: generate_opponent_samples(
                pipe,
                prompts,
                store,
                seed=0,
                iteration=0,
                batch_size=a.batch,
                num_inference_steps=a.steps,
                guidance_scale=a.guidance_scale,
                resolution=resolution,
                progress=False,
            )
        )

    def plain_pipeline():
        def loop():
            for start in range(0, len(prompts), a.batch):
                chunk = list(range(start, min(start + a.batch, len(prompts))))
                gens = [torch.Generator(device=a.device).manual_seed(sample_seed(0, 0, i)) for i in chunk]
                pipe(
                    [prompts[i] for i in chunk],
                    num_inference_steps=a.steps,
                    guidance_scale=a.guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=gens,
                ).images

        return a.prompts / timed(loop)

    def sampler_row(name, steps):
        """One sampler: its UNet forwards per sample (rows the UNet sees / samples), per iteration, images/s."""
        from utils.spin import sampler_from_config

        own = pipe.scheduler
        if name != "model":
            pipe.scheduler = sampler_from_config(name, own.config)
        rows = []
        hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        try:
            out = SyntheticStore(Path(tempfile.mkdtemp()) / "synthetic", len(prompts), shard_size=a.batch)
            seconds = timed(
                lambda: generate_opponent_samples(
                    pipe,
                    prompts,
                    out,
                    seed=0,
                    iteration=0,
                    batch_size=a.batch,
                    num_inference_steps=steps,
                    guidance_scale=a.guidance_scale,
                    resolution=resolution,
                    progress=False,
                )
            )
        finally:
            hook.remove()
            pipe.scheduler = own
        per_sample = sum(rows) / len(prompts)
        return {
            "sampler": name,
            "steps": steps,
            "forwards_per_sample": per_sample,
            "forwards_per_iteration": per_sample * a.iteration_prompts,
            "img_s": len(prompts) / seconds,
        }

    def vae_decode():
        latents = torch.cat([store.get(i)["gen_latents"][None] for i in range(min(a.batch, len(prompts)))]).to(
            a.device, dtype
        )
        with torch.no_grad():
            return timed(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor)) / len(latents)

    if pipe is not None and a.compile:
        pipe.unet.compile()
    if pipe is not None and samplers:
        result["samplers"] = [measure(f"sampler {n}:{k}", lambda n=n, k=k: sampler_row(n, k)) for n, k in samplers]
    if pipe is not None:
        result["generation_phase_img_s"] = measure("generation phase", generation_phase)
        result["plain_pipeline_img_s"] = measure("plain pipeline", plain_pipeline)
        if result["generation_phase_img_s"] is not None:
            result["vae_decode_s_per_image"] = measure("VAE decode", vae_decode)
    ours, plain, decode = (
        result.get(k) for k in ("generation_phase_img_s", "plain_pipeline_img_s", "vae_decode_s_per_image")
    )
    result["ratio"] = ours / plain if ours and plain else None

    def fmt(v, spec):
        return "FAILED" if v is None else format(v, spec)

    print(
        f"| preset | generation phase (latents) img/s | plain pipeline (decoded) img/s | ratio | VAE decode s/img |\n"
        f"|---|---|---|---|---|\n| {a.preset} | {fmt(ours, '.2f')} | {fmt(plain, '.2f')} | "
        f"{fmt(result['ratio'], '.2f')}{'x' * bool(result['ratio'])} | {fmt(decode, '.3f')} |"
    )
    if result.get("samplers"):
        print(
            f"\n| sampler | steps | UNet forwards / sample | per iteration ({a.iteration_prompts} prompts) | img/s |"
            "\n|---|---|---|---|---|"
        )
        for r in result["samplers"]:
            if r is not None:
                print(
                    f"| {r['sampler']} | {r['steps']} | {r['forwards_per_sample']:.0f} | "
                    f"{r['forwards_per_iteration'] / 1e6:.2f}M | {r['img_s']:.2f} |"
                )
    if errors:
        result["errors"] = {k: v.strip().splitlines()[-1] for k, v in errors.items()}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    if errors:
        sys.exit(f"error: {len(errors)} measurement(s) failed: {', '.join(errors)}")


if __name__ == "__main__":
    main()
