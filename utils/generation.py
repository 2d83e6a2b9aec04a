"""Sampling with a pipeline: fixed-seed renders for validation and model cards, image grids, and the opponent's
samples of SPIN (with their stored chain steps for the trajectory objective). Needs its siblings `spin.py` and
`checkpointing.py` (and through them `losses.py` and `models.py`)."""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from .checkpointing import record_settings
from .spin import TrajectoryRecorder, choose_trajectory_steps

logger = logging.getLogger(__name__)


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


def labelled_grid(rows, row_labels, col_labels, min_cell=128, label_width=260):
    """A grid with a header row naming the columns (models) and a left column giving each row's text (prompt).
    `rows` is a list of lists of PIL images. A cell has the smallest image's size (larger ones are scaled down
    smoothly: models of other native sizes share one grid); small images are enlarged (nearest neighbour) to
    `min_cell` px."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one image")
    w, h = min((img.size for images in rows for img in images), key=lambda size: size[0] * size[1])
    scale = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    line = 12
    header_lines = [textwrap.wrap(str(c), max(4, cw // 7)) or [""] for c in col_labels]
    header = 6 + line * max(len(x) for x in header_lines)
    grid = Image.new("RGB", (label_width + cw * len(col_labels), header + ch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(header_lines):
        for k, text in enumerate(lines):
            draw.text((label_width + j * cw + 4, 3 + k * line), text, fill="black", font=font)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        top = header + i * ch
        for k, text in enumerate(textwrap.wrap(str(label), max(8, label_width // 7))[: max(1, ch // line)]):
            draw.text((4, top + 4 + k * line), text, fill="black", font=font)
        for j, img in enumerate(images):
            resample = Image.NEAREST if img.size[0] <= cw else Image.LANCZOS
            grid.paste(img.convert("RGB").resize((cw, ch), resample), (label_width + j * cw, top))
    return grid


def prompt_seed(seed, index):
    """The generation seed of prompt `index`: the same for every model, so images are comparable."""
    return (seed * 1_000_003 + index) % (2**63)


@torch.no_grad()
def render(
    pipeline, prompts, *, seed=0, num_inference_steps=30, guidance_scale=7.5, resolution=None, autocast_dtype=None
):
    """One image per prompt, prompt i seeded with `prompt_seed(seed, i)`."""
    device = pipeline.device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    images = []
    with ctx:
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=device).manual_seed(prompt_seed(seed, i))
            images.append(
                pipeline(
                    prompt,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=gen,
                ).images[0]
            )
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


# ----------------------------------------------------------------------------- opponent samples (SPIN)


def sample_seed(seed, iteration, index):
    """Seed of the opponent's sample for prompt `index` in iteration `iteration` (0-based)."""
    return (seed * 1_000_003 + iteration * 10_007_009 + index) % (2**63)


class SyntheticStore:
    """Opponent samples as latents in safetensors shards `shard-00000.safetensors` (tensor `latents` (n, C, h, w)
    fp16 and `index` (n,)) with a JSON manifest per shard ({index, caption, seed} rows). A shard appears only
    when complete (written under a temporary name, then renamed), so a rerun regenerates nothing finished."""

    def __init__(self, directory, num_prompts, shard_size=256, settings=None):
        self.dir = Path(directory)
        self.num_prompts, self.shard_size = num_prompts, shard_size
        self._cache = {}
        self.settings = {"num_prompts": num_prompts, "shard_size": shard_size, **(settings or {})}

    def claim(self, write=True):
        """Record what these samples are (prompt count, shard size, captions hash, generation settings) in
        `store.json`, or check that an existing store was made with the same: reusing shards made for other
        prompts or settings would silently pair prompts with the wrong samples. Raises ValueError on a mismatch.
        Every process checks; only the one with `write` records."""

        diff = record_settings(self.dir / "store.json", self.settings, write)
        if diff:
            raise ValueError(
                f"{self.dir} holds samples made with other settings ({', '.join(diff)} differ): "
                f"delete that folder to regenerate, or use the original command"
            )

    @property
    def num_shards(self):
        return (self.num_prompts + self.shard_size - 1) // self.shard_size

    def shard_path(self, k):
        return self.dir / f"shard-{k:05d}.safetensors"

    def shard_indices(self, k):
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_prompts))

    def missing_shards(self, process_index=0, num_processes=1):
        """This process's shards still to generate. A shard that does not read back whole (e.g. truncated by a
        full disk) is renamed to `*.corrupt`, named in a warning, and generated again."""
        missing = []
        for k in range(process_index, self.num_shards, num_processes):
            path = self.shard_path(k)
            if path.exists():
                problem = self.shard_problem(k)
                if problem is None:
                    continue
                logger.warning(f"synthetic shard {path} is unusable ({problem}): regenerating it")
                os.replace(path, path.with_suffix(".corrupt"))
            missing.append(k)
        return missing

    def shard_problem(self, k):
        """None if shard `k` reads back with the rows it should hold, else what is wrong."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.shard_path(k)), framework="pt") as f:
                index = f.get_tensor("index").tolist()
                rows = f.get_slice("latents").get_shape()[0]
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if index != list(self.shard_indices(k)) or rows != len(index):
            return f"holds rows {index[:3]}... ({rows} latents), expected prompts {self.shard_indices(k)}"
        return None

    def complete(self):
        return not self.missing_shards()

    def write_shard(self, k, tensors, rows):
        """`tensors`: {"latents": (n, C, h, w), ...per-sample extras (n, ...)}; `rows`: the manifest rows."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        out = {name: t.contiguous().cpu() for name, t in tensors.items()}
        out["latents"] = out["latents"].to(torch.float16)
        out["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.int64)
        tmp = self.shard_path(k).with_suffix(".tmp")
        save_file(out, str(tmp))
        self.shard_path(k).with_suffix(".json").write_text(json.dumps(rows, indent=0))
        os.replace(tmp, self.shard_path(k))

    def write_manifest(self):
        """One `manifest.jsonl` for the whole store, from the per-shard manifests."""
        with open(self.dir / "manifest.jsonl", "w") as f:
            for k in range(self.num_shards):
                for row in json.loads(self.shard_path(k).with_suffix(".json").read_text()):
                    f.write(json.dumps(row) + "\n")

    def get(self, index):
        """{"gen_latents": the opponent's latent, plus any per-sample extras stored with it} for prompt `index`."""
        from safetensors import safe_open

        k, j = divmod(index, self.shard_size)
        if k not in self._cache:
            self._cache = {k: safe_open(str(self.shard_path(k)), framework="pt")}
        f = self._cache[k]
        stored_index = int(f.get_slice("index")[j])
        if stored_index != index:
            raise ValueError(f"{self.shard_path(k)} row {j} holds prompt {stored_index}, not {index}")
        out = {
            ("gen_latents" if name == "latents" else name): f.get_slice(name)[j]
            for name in f.keys()
            if name != "index"
        }
        out["gen_latents"] = out["gen_latents"].float()
        return out

    def has(self, name):
        from safetensors import safe_open

        with safe_open(str(self.shard_path(0)), framework="pt") as f:
            return name in f.keys()


@torch.no_grad()
def generate_opponent_samples(
    pipeline,
    captions,
    store,
    *,
    seed,
    iteration,
    batch_size=8,
    num_inference_steps=50,
    guidance_scale=7.5,
    resolution=512,
    eta=None,
    process_index=0,
    num_processes=1,
    autocast_dtype=None,
    to_latents=None,
    stop=None,
    progress=True,
    extras=None,
    trajectory=None,
):
    """The opponent (theta_k) draws one latent per training prompt, prompt i seeded with
    `sample_seed(seed, iteration, i)`. Each process fills its own shards (k = process_index mod num_processes);
    finished shards are skipped. `eta` goes to the sampler (DDIM's; DDPM ignores it; None: not passed, for
    pipelines without one). `to_latents(pipeline, latents, height, width)` turns the pipeline's latent output into
    the (B, C, h, w) layout training reads (the family's `pipeline_latents`; None: it is that already).
    `stop()`, asked after each shard is written, ends the call early (a preemption).
    `trajectory = (table, K)` (the trajectory objective) also stores, per sample, K steps of its sampling chain
    drawn from its seed (`traj_t`, `traj_x_t`, `traj_x_prev`, fp32). `extras(indices, seeds, outputs) -> {name:
    (n, ...) tensor}` adds per-sample tensors computed while the opponent is loaded (SPIN's precomputed reference
    errors); `outputs` holds the chunk's `latents` and its trajectory tensors. Returns the number of samples
    generated by this call."""
    from tqdm.auto import tqdm

    todo = store.missing_shards(process_index, num_processes)
    total = sum(len(store.shard_indices(k)) for k in todo)
    device = pipeline.device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    bar = tqdm(
        total=total, desc=f"generating (iteration {iteration + 1})", unit="img", disable=not progress or total == 0
    )
    for k in todo:
        indices = list(store.shard_indices(k))
        latents, rows, more = [], [], {}
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            seeds = [sample_seed(seed, iteration, i) for i in chunk]
            gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            prompts = [captions[i] for i in chunk]
            chosen = choose_trajectory_steps(trajectory[0], seeds, trajectory[1]) if trajectory else []
            with ctx, TrajectoryRecorder(pipeline.scheduler, chosen) as recorder:
                out = pipeline(
                    prompts,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=gens,
                    output_type="latent",
                    **({"eta": eta} if eta is not None else {}),
                )
            images = to_latents(pipeline, out.images, resolution, resolution) if to_latents else out.images
            outputs = {"latents": images.float()} | (recorder.tensors() if trajectory else {})
            latents.append(outputs["latents"].cpu())
            for name, t in outputs.items():
                if name != "latents":
                    more.setdefault(name, []).append(t.cpu())
            if extras is not None:
                for name, t in extras(chunk, seeds, outputs).items():
                    more.setdefault(name, []).append(t.cpu())
            rows += [
                {"index": i, "caption": p, "seed": s, "process": process_index}
                for i, p, s in zip(chunk, prompts, seeds)
            ]
            bar.update(len(chunk))
        store.write_shard(k, {"latents": torch.cat(latents), **{n: torch.cat(ts) for n, ts in more.items()}}, rows)
        if stop is not None and stop():  # a preemption: this shard is written, the next ones are left to the rerun
            break
    bar.close()
    return total


def iteration_grid(
    output_dir, k, prompts, load, *, seed, num_inference_steps, guidance_scale, resolution, device, autocast_dtype=None
):
    """SPIN's Fig. 2 for a run: the validation prompts rendered by theta_0 (into `output_dir/validation_theta0/`) and
    by each iteration j (into `iter_j/validation/`), the same seed per prompt, then the grid of every iteration so
    far (theta_0 first, one column each; one row per prompt) written to `iter_k/validation_grid.png`. `load(j)` gives
    iteration j's pipeline (0: the start model). A column on disk is reused when it was rendered with the same
    prompts and settings (its `settings.json`), else rendered again: a rerun that extends a run with other
    validation flags gets a grid of what it asked for. Returns (the grid, iteration k's images)."""
    output_dir = Path(output_dir)
    wanted = {
        "prompts": list(prompts),
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
    }
    folders = [output_dir / ("validation_theta0" if j == 0 else f"iter_{j}/validation") for j in range(k + 1)]
    for j, folder in enumerate(folders):
        files = [folder / f"{i:03d}.png" for i in range(len(prompts))]
        settings = folder / "settings.json"
        if all(f.exists() for f in files) and settings.exists() and not record_settings(settings, wanted):
            continue
        pipeline = load(j).to(device)
        pipeline.set_progress_bar_config(disable=True)
        images = render(
            pipeline,
            prompts,
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            resolution=resolution,
            autocast_dtype=autocast_dtype,
        )
        del pipeline
        if folder.exists():
            shutil.rmtree(folder)  # a column of other prompts or settings
        folder.mkdir(parents=True)
        for image, f in zip(images, files):
            image.save(f)
        record_settings(settings, wanted)
    columns = [[Image.open(folder / f"{i:03d}.png").convert("RGB") for i in range(len(prompts))] for folder in folders]
    rows = [[column[i] for column in columns] for i in range(len(prompts))]
    grid = labelled_grid(rows, prompts, ["theta_0"] + [f"iteration {j}" for j in range(1, k + 1)])
    grid.save(output_dir / f"iter_{k}" / "validation_grid.png")
    return grid, columns[-1]


def iteration_pipeline(args, family, j):
    """Iteration j's pipeline (0: the start model): a LoRA iteration is its adapter on the start model."""
    start = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    if j > 0 and not args.use_lora:
        return family.load_pipeline(str(Path(args.output_dir) / f"iter_{j}"), args.prediction_type)
    pipeline = family.load_pipeline(args.pretrained_model_name_or_path, args.prediction_type, **start)
    if j > 0:
        pipeline.load_lora_weights(str(Path(args.output_dir) / f"iter_{j}"))
    return pipeline
