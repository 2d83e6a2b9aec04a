#!/usr/bin/env python
"""Evaluate text-to-image models as the SPIN-Diffusion paper does: every model renders the same prompts with
the same seed per prompt, four reward models score the images (PickScore, HPSv2, ImageReward, Aesthetic),
and the report gives means, medians and win rates against a baseline with bootstrap 95% CIs.

    accelerate launch evaluate.py --prompts pickapic_test_unique \\
        --model sd15=runwayml/stable-diffusion-v1-5 \\
        --model spin-iter1=UCLA-AGI/SPIN-Diffusion-iter1 --model spin-iter3=UCLA-AGI/SPIN-Diffusion-iter3 \\
        --base_model runwayml/stable-diffusion-v1-5 --baseline sd15 --output_dir eval-spin

A model is a diffusers pipeline, a UNet-only repo/folder (on --base_model) or LoRA weights (on --base_model),
local or on the Hub, with an optional @revision. Images are saved per model and reused by a rerun.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from scorers import ALL_METRICS, METRICS, TOY_METRICS, load_scorer
from utils.checkpointing import record_settings
from utils.evaluation import (
    PROMPT_SETS,
    EvalError,
    load_pipeline,
    load_prompts,
    markdown_report,
    native_resolution,
    plot_radar,
    plot_win_rates,
    read_config,
    resolve_model,
    summarize,
)
from utils.families import family_name, resolution_problem
from utils.generation import labelled_grid, prompt_seed
from utils.hub import with_retries
from utils.models import WEIGHT_DTYPES


def parse_args(input_args=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("models")
    g.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="Repeatable. SPEC: Hub repo id or local folder, optionally @revision: a pipeline, a UNet or a LoRA.",
    )
    g.add_argument(
        "--base_model",
        default=None,
        help="Base pipeline for UNet-only and LoRA models. Default: the one their training_args.json names (this "
        "project's outputs), else runwayml/stable-diffusion-v1-5 (the authors' UNet-only iterations).",
    )
    g.add_argument(
        "--baseline", default=None, help="NAME of the model win rates are computed against (default: the first)."
    )
    g.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompts",
        default="pickapic_test_unique",
        help=f"One of {sorted(PROMPT_SETS)}, or a .txt (one prompt per line), .parquet, .csv or .json file.",
    )
    g.add_argument(
        "--prompt_column",
        default=None,
        help="Column of a prompt file (default: prompt, caption, Prompt or text), or of "
        "--pickapic_prompts_dataset (default: caption, else original_prompt or prompt, also as caption.txt ...).",
    )
    g.add_argument(
        "--pickapic_prompts_dataset",
        default=PROMPT_SETS["pickapic_test_unique"][0],
        help="Where --prompts pickapic_test_unique reads from: the original repo (removed from the Hub in 2025) "
        "or a copy: a Hub repo, a local folder, .parquet, webdataset .tar or glob of shards.",
    )
    g.add_argument("--pickapic_prompts_split", default="test_unique", help="Split of --pickapic_prompts_dataset.")
    g.add_argument("--max_prompts", type=int, default=None)
    g = p.add_argument_group("generation")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Default: each model's pipeline's own (SD 7.5, as the paper evaluates; SDXL 5; SD3 7; Flux.1 3.5, its "
        "guidance embedding). Give it to render every model at one value.",
    )
    g.add_argument("--num_images_per_prompt", type=int, default=1)
    g.add_argument(
        "--variant", default=None, help="Weights variant of the models and the base (fp16: *.fp16.safetensors)."
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image side. Default: each model's own (its denoiser's sample size: 512 for SD-1.5, 768 for SD-2.1, "
        "1024 for SDXL, SD3.5 and Flux.1).",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="Image j of prompt i uses seed f(seed, i, j), the same for every model."
    )
    g.add_argument("--batch_size", type=int, default=8, help="Prompts per generation batch.")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="Generation dtype.")
    g = p.add_argument_group("scoring")
    g.add_argument(
        "--metrics",
        nargs="+",
        default=list(METRICS),
        help=f"Subset of {','.join(ALL_METRICS)}, space- or comma-separated (the toy_* judges are for "
        "examples/toy/; toy_fd is one value per model, lower is better).",
    )
    g.add_argument("--score_batch_size", type=int, default=16)
    g.add_argument("--pickscore_model", default=None, help="Default yuvalkirstain/PickScore_v1.")
    g.add_argument("--pickscore_processor", default=None, help="Default laion/CLIP-ViT-H-14-laion2B-s32B-b79K.")
    g.add_argument(
        "--hps_checkpoint", default=None, help="Default xswu/HPSv2 (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)."
    )
    g.add_argument(
        "--hps_version", choices=["v2.0", "v2.1"], default="v2.1", help="v2.0 and v2.1 scores are not comparable."
    )
    g.add_argument(
        "--hps_processor",
        default=None,
        help="Tokenizer and ViT-H-14 config for HPS (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K).",
    )
    g.add_argument(
        "--imagereward_checkpoint", default=None, help="Default THUDM/ImageReward (ImageReward.pt + med_config.json)."
    )
    g.add_argument("--imagereward_tokenizer", default=None, help="Default bert-base-uncased.")
    g.add_argument(
        "--aesthetic_head", default=None, help="LAION sac+logos+ava1-l14-linearMSE.pth (file, folder or repo:file)."
    )
    g.add_argument("--aesthetic_clip_model", default=None, help="Default openai/clip-vit-large-patch14.")
    g.add_argument(
        "--toy_judge",
        default=None,
        help="toy_* metrics: the judge folder of examples/toy/build_base.py (world.json, ...).",
    )
    g = p.add_argument_group("report")
    g.add_argument("--output_dir", default="eval")
    g.add_argument("--grid_prompts", type=int, default=8, help="Prompts (rows) in the image grid.")
    g.add_argument("--bootstrap_resamples", type=int, default=1000)
    g.add_argument(
        "--push_results_to_hub",
        action="store_true",
        help="Add the metrics to the model cards of Hub models (model-index).",
    )
    args = p.parse_args(input_args)

    if not args.model:
        p.error("give at least one --model NAME=SPEC")
    args.metrics = [m.strip() for item in args.metrics for m in item.split(",") if m.strip()]
    unknown = [m for m in args.metrics if m not in ALL_METRICS]
    if unknown or not args.metrics:
        p.error(f"--metrics: unknown metric(s) {unknown}; choose from {','.join(ALL_METRICS)}")
    toy = [m for m in args.metrics if m in TOY_METRICS]
    if toy and not (args.toy_judge and (Path(args.toy_judge) / "world.json").is_file()):
        p.error(
            f"--metrics {','.join(toy)} needs --toy_judge DIR holding world.json "
            "(built by examples/toy/build_base.py); "
            f"got {args.toy_judge!r}"
        )
    names = [m.partition("=")[0] for m in args.model]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n)]
    if bad:
        p.error(f"--model names must be letters, digits, _ . + -: {bad}")
    if len(set(names)) != len(names):
        p.error(f"--model names must be unique: {names}")
    args.baseline = args.baseline or names[0]
    if args.baseline not in names:
        p.error(f"--baseline {args.baseline} is not among the models {names}")
    if args.resolution is not None and args.resolution < 1:
        p.error("--resolution must be >= 1")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        p.error(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    for name in (
        "num_inference_steps",
        "num_images_per_prompt",
        "batch_size",
        "score_batch_size",
        "grid_prompts",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.resolution is not None and args.resolution % 8:
        p.error(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        p.error("--mixed_precision fp16 needs a GPU; use bf16 or no")
    return args


def main(args):
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # GPUs, or CPU processes under torchrun
    out = Path(args.output_dir)
    # 1. Everything that can be wrong is checked before generating anything.
    specs = [resolve_model(m, args.hub_token) for m in args.model]
    needs_base, base = [s.name for s in specs if s.kind != "pipeline"], None
    if needs_base:
        args.base_model = args.base_model or trained_base([s for s in specs if s.kind != "pipeline"], args.hub_token)
        base = resolve_model(f"base={args.base_model}", args.hub_token)
        for s in specs:  # a UNet or a LoRA is sampled in its base model's pipeline
            s.family = s.family or base.family
    for s in specs:
        untileable = resolution_problem(s.family, args.resolution)
        if untileable:
            raise EvalError(
                f"--resolution {args.resolution}: --model {s.name} ({s.family.PIPELINE_CLASSES[0]}): {untileable}"
            )
    prompts = load_prompts(
        args.prompts,
        prompt_column=args.prompt_column,
        max_prompts=args.max_prompts,
        token=args.hub_token,
        pickapic_dataset=args.pickapic_prompts_dataset,
        pickapic_split=args.pickapic_prompts_split,
    )
    n_img = args.num_images_per_prompt
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"{len(prompts)} prompts x {n_img} image(s) x {len(specs)} models; "
            + ", ".join(f"{s.name}: {s.kind}" for s in specs)
        )

    # 2. Generation: same seed per (prompt, image) for every model; existing images are kept.
    dtype = WEIGHT_DTYPES.get(args.mixed_precision, torch.float32)
    settings = {
        k: getattr(args, k)
        for k in (
            "seed",
            "num_inference_steps",
            "guidance_scale",
            "resolution",
            "num_images_per_prompt",
            "mixed_precision",
            "variant",
        )
    }
    settings["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    # each model renders at its own pipeline's guidance and size unless --guidance_scale / --resolution set one
    guidance = {s.name: s.family.GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale for s in specs}
    size = {s.name: args.resolution or native_resolution(s, base, args.hub_token) for s in specs}
    for spec in specs:  # images on disk are reused only if they were made by this model with these settings
        folder = out / "images" / spec.name
        check_or_write_settings(
            folder,
            dict(
                settings,
                guidance_scale=guidance[spec.name],
                resolution=size[spec.name],
                model=spec.location,
                revision=spec.revision,
                base_model=args.base_model if spec.kind != "pipeline" else None,
            ),
            write=state.is_main_process,
        )
    state.wait_for_everyone()
    for spec in specs:
        folder = out / "images" / spec.name
        todo = [
            i
            for i in range(state.process_index, len(prompts), state.num_processes)
            if not all(image_path(folder, i, j).exists() for j in range(n_img))
        ]
        if not todo:
            continue
        pipe = load_pipeline(spec, args.base_model, dtype, state.device, args.hub_token, args.variant)
        bar = tqdm(
            total=len(todo) * n_img,
            desc=f"generating {spec.name}",
            unit="img",
            disable=not state.is_local_main_process,
        )
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            jobs = [(i, j) for i in chunk for j in range(n_img)]
            gens = [
                torch.Generator(device=state.device).manual_seed(prompt_seed(args.seed, i * n_img + j))
                for i, j in jobs
            ]
            with torch.no_grad():
                images = pipe(
                    [prompts[i] for i, _ in jobs],
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=guidance[spec.name],
                    height=size[spec.name],
                    width=size[spec.name],
                    generator=gens,
                ).images
            for (i, j), image in zip(jobs, images):  # written whole, then renamed: a kill never leaves half a PNG
                tmp = image_path(folder, i, j).with_suffix(".tmp.png")
                image.save(tmp)
                os.replace(tmp, image_path(folder, i, j))
            bar.update(len(jobs))
        bar.close()
        del pipe
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    # 3. Scoring: one reward model in memory at a time.
    names = [s.name for s in specs]
    raw = {name: {} for name in names}  # name -> metric -> per-image scores (prompt-major)
    dist = {name: {} for name in names}  # name -> distribution metric -> one value from all its images
    locations = {
        k: getattr(args, k)
        for k in (
            "pickscore_model",
            "pickscore_processor",
            "hps_checkpoint",
            "hps_version",
            "hps_processor",
            "imagereward_checkpoint",
            "imagereward_tokenizer",
            "aesthetic_head",
            "aesthetic_clip_model",
            "toy_judge",
        )
    }
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n_img)]
    for metric in args.metrics:
        scorer = load_scorer(metric, device=state.device, batch_size=args.score_batch_size, **locations)
        for name in tqdm(names, desc=f"scoring {metric}"):
            images = [Image.open(image_path(out / "images" / name, i, j)).convert("RGB") for i, j in jobs]
            if getattr(scorer, "kind", None) == "distribution":
                dist[name][metric] = float(scorer.distribution(images, [prompts[i] for i, _ in jobs]))
            else:
                raw[name][metric] = [float(s) for s in scorer.score(images, [prompts[i] for i, _ in jobs])]
        del scorer
    per_image = [k for k in args.metrics if k not in dist[names[0]]]
    distribution = [k for k in args.metrics if k in dist[names[0]]]

    # 4. Report.
    per_prompt = []
    for i, prompt in enumerate(prompts):
        scores = {
            name: {k: sum(raw[name][k][i * n_img : (i + 1) * n_img]) / n_img for k in per_image} for name in names
        }
        per_prompt.append({"prompt": prompt, "seed": prompt_seed(args.seed, i * n_img), "scores": scores})
    # Every image's own scores (prompt-major, the order of `jobs`), for per-image analyses; per_prompt keeps the means.
    image_rows = [
        {
            "prompt_index": i,
            "prompt": prompts[i],
            "image_index": j,
            "seed": prompt_seed(args.seed, i * n_img + j),
            "scores": {name: {k: raw[name][k][n] for k in per_image} for name in names},
        }
        for n, (i, j) in enumerate(jobs)
    ]
    summary = (
        summarize(
            per_prompt, names, per_image, baseline=args.baseline, resamples=args.bootstrap_resamples, seed=args.seed
        )
        if per_image
        else {name: {} for name in names}
    )
    for name in names:
        summary[name] |= {k: {"value": dist[name][k]} for k in distribution}
    results = {
        "baseline": args.baseline,
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "num_images_per_prompt": n_img,
        "models": {
            s.name: dict(vars(s), family=family_name(s.family))
            | {"guidance_scale": guidance[s.name], "resolution": size[s.name]}
            for s in specs
        },
        "metrics": args.metrics,
        "per_image_metrics": per_image,
        "distribution_metrics": distribution,
        "generation": {  # guidance_scale / resolution null: each model's own, in "models"
            k: getattr(args, k)
            for k in ("num_inference_steps", "guidance_scale", "resolution", "seed", "mixed_precision")
        },
        "summary": summary,
        "per_prompt": per_prompt,
        "per_image": image_rows,  # one entry per (prompt, image); distribution metrics (toy_fd) are not per image
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    prompts_name = Path(args.prompts).stem if Path(args.prompts).is_file() else args.prompts
    md = markdown_report(
        summary,
        names,
        per_image,
        baseline=args.baseline,
        prompts_name=prompts_name,
        n_prompts=len(prompts),
        distribution=distribution,
    )
    (out / "results.md").write_text(md)
    written = ["results.json", "results.md"]
    if per_image:
        plot_radar(summary, names, per_image, out / "radar.png")
        plot_win_rates(summary, names, per_image, out / "win_rates.png")
        written += ["radar.png", "win_rates.png"]
    rows = range(min(args.grid_prompts, len(prompts)))
    grid = [[Image.open(image_path(out / "images" / name, i, 0)) for name in names] for i in rows]
    labelled_grid(grid, [prompts[i] for i in rows], names).save(out / "grid.png")
    print(md)
    print(f"wrote {', '.join(written)} and grid.png (columns: {', '.join(names)}) in {out}")
    if args.push_results_to_hub:
        push_results(specs, summary, args.metrics, prompts_name, args.hub_token)
    return results


def image_path(folder, i, j):
    return folder / f"{i:05d}_{j}.png"


def trained_base(specs, token=None):
    """The base model of UNet-only and LoRA `specs` when --base_model is not given: the one their
    training_args.json names (every one that has it must agree), else SD-1.5 (the authors' iterations)."""
    named = {}
    for spec in specs:
        try:
            named[spec.name] = read_config(spec.location, "training_args.json", spec.revision, token)[
                "pretrained_model_name_or_path"
            ]
        except Exception:  # none there (the authors' UNet repos) or unreadable: no say
            continue
    if len(set(named.values())) > 1:
        raise EvalError(f"the models were trained on different bases ({named}): evaluate them in separate runs")
    if named:
        base = next(iter(named.values()))
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
            raise EvalError(
                f"the training_args.json of {', '.join(named)} names the base {base}, a folder not found here: give "
                "--base_model"
            )
        print(f"--base_model {base} (from the training_args.json of {', '.join(named)})")
        return base
    return "runwayml/stable-diffusion-v1-5"


def check_or_write_settings(folder, settings, write=True):
    """images/NAME/generation.json: what the images there were made with. A different model, prompt set or
    generation setting under the same NAME and --output_dir is an error, not a silent reuse of stale images."""
    diff = record_settings(folder / "generation.json", settings, write)
    if diff:
        raise EvalError(
            f"{folder} holds images made with other settings ({', '.join(diff)} differ): use another "
            f"--output_dir or model name, or delete that folder"
        )


def push_results(specs, summary, metrics, prompts_name, token):
    """Add this evaluation to the model-index of every Hub model's card (local models are skipped)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    for spec in specs:
        if not spec.is_hub:
            continue
        if spec.revision:  # a card lives on a branch; a tag or commit cannot take a new commit
            print(
                f"skipped the card of {spec.location}@{spec.revision}: results are pushed for specs without @revision"
            )
            continue
        try:
            card = ModelCard.load(spec.location, token=token)
        except Exception:
            card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# {spec.location}\n")
        card.data.model_name = card.data.model_name or spec.location.split("/")[-1]
        keep = [r for r in (card.data.eval_results or []) if r.dataset_name != prompts_name]
        card.data.eval_results = keep + [
            EvalResult(
                task_type="text-to-image",
                dataset_type=prompts_name,
                dataset_name=prompts_name,
                metric_type=k,
                metric_name=f"{k} (mean)" if "mean" in summary[spec.name][k] else k,
                metric_value=round(summary[spec.name][k].get("mean", summary[spec.name][k].get("value")), 6),
            )
            for k in metrics
        ]
        with_retries(
            card.push_to_hub,
            spec.location,
            token=token,
            what=f"adding results to {spec.location}'s card",
            commit_message=f"Add {prompts_name} evaluation (evaluate.py)",
        )
        print(f"results added to the model card of {spec.location}")


def cli(argv=None):
    """The command line: bad input ends with one `error:` line, before anything is generated."""
    try:
        main(parse_args(argv))
    except EvalError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
