"""Sampling with a pipeline: fixed-seed renders for validation and model cards, and image grids."""

import contextlib

import torch
from PIL import Image


def make_grid(images, cols=None):
    """Paste equally sized PIL images into one grid image, row by row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def prompt_seed(seed, index):
    """The generation seed of prompt `index`: the same for every model, so images are comparable."""
    return (seed * 1_000_003 + index) % (2**63)


@torch.no_grad()
def render(pipeline, prompts, seed=0, num_inference_steps=30, guidance_scale=7.5, resolution=None, autocast_dtype=None):
    """One image per prompt, prompt i seeded with `prompt_seed(seed, i)`."""
    device = pipeline.device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    images = []
    with ctx:
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=device).manual_seed(prompt_seed(seed, i))
            images.append(pipeline(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   height=resolution, width=resolution, generator=gen).images[0])
    return images


def log_images(accelerator, images, prompts, step, tag="validation"):
    """Send images to the trackers that take them (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)
