"""Evaluation pieces: model specs (full pipeline, UNet-only + base, LoRA + base; local or Hub, @revision),
prompt sets, win rates with bootstrap confidence intervals, and the report (markdown, plots, grid).
Needs its siblings `data.py`, `models.py` and `families.py` (with the `family_*.py` it finds)."""

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import CAPTION_FALLBACKS, DataError, column_names, find_column, load_raw_dataset
from .families import model_family
from .models import ModelError

PROMPT_SETS = {
    # name: (Hub dataset repo, how to read it)
    "pickapic_test_unique": ("yuvalkirstain/pickapic_v2", "split test_unique, column caption (or a copy)"),
    "parti": ("nateraw/parti-prompts", "split train, column Prompt"),
    "hpsv2": ("zhwang/HPDv2", "benchmark/{anime,concept-art,paintings,photo}.json, 800 each"),
}
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


class EvalError(ValueError):
    """Bad evaluation input, reported before any generation."""


# ----------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    name: str
    location: str
    revision: str | None
    kind: str  # "pipeline" | "unet" | "lora"
    unet_subfolder: str | None = None
    family: Any = None  # the family module (utils/family_*.py): the pipeline's own, or its base model's

    @property
    def is_hub(self):
        return not Path(self.location).exists()


def parse_model_arg(arg):
    """NAME=SPEC where SPEC is a local path or Hub repo id, optionally followed by @revision."""
    name, sep, spec = arg.partition("=")
    if not sep or not name or not spec:
        raise EvalError(f"--model {arg!r}: expected NAME=PATH_OR_REPO[@REVISION]")
    if Path(spec).expanduser().exists():  # a local folder whose name holds an "@"
        return name, spec, None
    location, _, revision = spec.partition("@")
    return name, location, revision or None


def list_files(location, revision=None, token=None):
    """Relative file paths of a local folder or a Hub model repo (at `revision`)."""
    path = Path(location).expanduser()
    if path.is_dir():
        return [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    if path.is_file():
        raise EvalError(f"{location}: a file; give the folder that holds it (a LoRA: its folder)")
    if path.exists() or location.startswith((".", "/", "~")) or location.count("/") > 1:
        raise EvalError(f"{location}: no such folder")
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(location, revision=revision, token=token)
    except Exception as e:
        raise EvalError(
            f"{location}{'@' + revision if revision else ''}: cannot list the repo ({type(e).__name__}: {e})"
        ) from e


def detect_kind(files):
    """What a folder/repo holds: a diffusers pipeline, LoRA weights, or a UNet (at the root or in unet/)."""
    names = set(files)  # at the root only (a SPIN output folder holds LoRAs in iter_N/: name the iteration)
    if "model_index.json" in names:
        return "pipeline", None
    if {"pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"} & names:
        return "lora", None
    if "unet/config.json" in names:
        return "unet", "unet"
    if "config.json" in names and any(f.startswith("diffusion_pytorch_model") for f in names):
        return "unet", None
    return None, None


def resolve_model(arg, token=None):
    name, location, revision = parse_model_arg(arg)
    files = list_files(location, revision, token)
    kind, sub = detect_kind(files)
    if kind is None:
        hint = (
            " (a SPIN output folder: name one iteration, e.g. .../iter_2)"
            if any(f.startswith("iter_") for f in files)
            else ""
        )
        raise EvalError(
            f"--model {arg}: neither a diffusers pipeline (model_index.json), a UNet (unet/config.json or "
            f"config.json + weights) nor LoRA weights (pytorch_lora_weights.safetensors){hint}"
        )
    family = None
    if kind == "pipeline":  # a family the scripts cannot sample is refused before anything loads
        try:
            family = model_family(location, revision, token, flag="--model", shown=f"{name}={location}")
        except ModelError as e:
            raise EvalError(str(e)) from None
    return ModelSpec(name, location, revision, kind, sub, family)


def load_pipeline(spec, base_model, dtype, device, token=None, variant=None):
    """The family's pipeline for `spec`: the pipeline itself, the base with this UNet, or the base + LoRA (a UNet
    or a LoRA takes its family from the base model)."""
    family = spec.family or model_family(base_model, token=token, flag="--base_model")
    kw = {"variant": variant} if variant else {}  # weights saved as *.fp16.safetensors and the like
    if spec.kind == "pipeline":
        pipe = family.load_pipeline(spec.location, revision=spec.revision, torch_dtype=dtype, token=token, **kw)
    elif spec.kind == "unet":
        unet = family.load_denoiser(
            spec.location, subfolder=spec.unet_subfolder, revision=spec.revision, torch_dtype=dtype, token=token, **kw
        )
        pipe = family.load_pipeline(base_model, denoiser=unet, torch_dtype=dtype, token=token, **kw)
    else:
        pipe = family.load_pipeline(base_model, torch_dtype=dtype, token=token, **kw)
        try:
            pipe.load_lora_weights(spec.location, revision=spec.revision, token=token)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or keys of another model
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()[:200]
            raise EvalError(
                f"--model {spec.name}: its LoRA does not fit --base_model {base_model} ({why}); give the base it "
                "was trained on"
            ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_config(location, filename, revision=None, token=None):
    """A JSON config file of a local folder or a Hub repo."""
    path = Path(location).expanduser()
    if not path.is_dir():
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(location, filename, revision=revision, token=token)).read_text())
    return json.loads((path / filename).read_text())


def native_resolution(spec, base=None, token=None):
    """The image side `spec` renders at without --resolution, as its pipeline picks it: the family's default latent
    side (else the denoiser config's sample_size) times the VAE's scale (2 per down block). A UNet or a LoRA renders
    in its `base`'s pipeline (a ModelSpec), a UNet with its own sample_size."""
    home = spec if spec.kind == "pipeline" else base
    own = f"{spec.unet_subfolder}/config.json" if spec.unet_subfolder else "config.json"
    try:
        vae = read_config(home.location, "vae/config.json", home.revision, token)
        denoiser = (
            read_config(spec.location, own, spec.revision, token)
            if spec.kind == "unet"
            else read_config(home.location, f"{spec.family.DENOISER}/config.json", home.revision, token)
        )
    except Exception as e:
        raise EvalError(
            f"--model {spec.name}: cannot read its configs to find the size it renders at ({type(e).__name__}: "
            f"{e}); give --resolution"
        ) from e
    sample = spec.family.DEFAULT_SAMPLE_SIZE or denoiser.get("sample_size") or 128
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)


# ----------------------------------------------------------------------------- prompts


PICKAPIC_PROMPTS_HINT = (
    "Its split and caption column may be named differently: pass --pickapic_prompts_split and "
    "--prompt_column; or give your own prompts with --prompts FILE."
)


def load_prompts(
    source,
    *,
    prompt_column=None,
    max_prompts=None,
    token=None,
    pickapic_dataset=PROMPT_SETS["pickapic_test_unique"][0],
    pickapic_split="test_unique",
):
    """Prompts from a named benchmark (PROMPT_SETS) or a local .txt (one per line), .parquet, .csv or .json(l).
    pickapic_test_unique reads the unique captions of `pickapic_dataset` (the Hub repo or a copy of it: a repo, a local
    folder, .parquet or webdataset .tar) at `pickapic_split`."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".txt":
            try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first prompt
                text = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise EvalError(
                    f"--prompts {source}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); save it "
                    "as UTF-8"
                ) from None
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            prompts = _column_prompts(path, prompt_column)
    elif source == "hpsv2":
        from huggingface_hub import hf_hub_download

        prompts = []
        for style in HPS_STYLES:
            f = hf_hub_download(PROMPT_SETS["hpsv2"][0], f"benchmark/{style}.json", repo_type="dataset", token=token)
            prompts += json.loads(Path(f).read_text())
    elif source == "pickapic_test_unique":
        prompts = pickapic_prompts(pickapic_dataset, pickapic_split, prompt_column or "caption", max_prompts, token)
    elif source == "parti":
        import datasets

        try:
            ds = datasets.load_dataset(PROMPT_SETS["parti"][0], split="train", streaming=True, token=token)
            prompts = [row["Prompt"] for row in ds.select_columns(["Prompt"])]
        except Exception as e:
            raise EvalError(
                f"--prompts parti: {PROMPT_SETS['parti'][0]} could not be read: {type(e).__name__}: {e}"
            ) from e
    else:
        raise EvalError(f"--prompts {source}: not a file and not one of {sorted(PROMPT_SETS)}")
    prompts = [str(p) for p in prompts if p is not None and str(p).strip()]
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise EvalError(f"--prompts {source}: no prompts found")
    return prompts


def pickapic_prompts(dataset, split, column="caption", max_prompts=None, token=None):
    """The unique captions of a Pick-a-Pic split, streamed (up to `max_prompts`). A copy's webdataset column names
    (caption.txt, original_prompt.txt) are found as in training."""

    flag = "--pickapic_prompts_dataset"
    try:
        ds = load_raw_dataset(dataset, split, streaming=True, token=token, flag=flag, hint=PICKAPIC_PROMPTS_HINT)
        names = column_names(ds)
        found = find_column(names, column, CAPTION_FALLBACKS if column == "caption" else ())
        if found is None:
            raise EvalError(f"{flag} {dataset}: no column {column!r} (columns: {sorted(names)}); pass --prompt_column")
        prompts = {}  # insertion-ordered set
        for row in ds.select_columns([found]):
            if row[found] is not None and str(row[found]).strip():
                prompts.setdefault(row[found])
            if max_prompts and len(prompts) >= max_prompts:
                break
        return list(prompts)
    except DataError as e:
        raise EvalError(str(e)) from e
    except EvalError:
        raise
    except Exception as e:  # a stream can fail after it opened
        raise EvalError(f"{flag} {dataset} (split {split!r}) could not be read: {type(e).__name__}: {e}") from e


def _column_prompts(path, column):
    import datasets

    builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix.lower())
    if builder is None:
        raise EvalError(f"--prompts {path}: unsupported file type (use .txt, .parquet, .csv, .json or .jsonl)")
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    candidates = [column] if column else ["prompt", "caption", "Prompt", "text"]
    found = next((c for c in candidates if c in ds.column_names), None)
    if found is None:
        raise EvalError(
            f"--prompts {path}: no column {candidates if column else 'named prompt/caption/Prompt/text'} "
            f"(columns: {ds.column_names}); pass --prompt_column"
        )
    return ds[found]


# ----------------------------------------------------------------------------- statistics


def win_rate(model_scores, baseline_scores):
    """Share of prompts where the model scores higher than the baseline (a tie counts one half)."""
    wins = [1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model_scores, baseline_scores)]
    return sum(wins) / len(wins)


def bootstrap_ci(values_fn, n, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap CI of a statistic: `values_fn(indices)` computes it on a resample of prompt indices."""
    rng = random.Random(seed)
    stats = sorted(values_fn([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    lo, hi = stats[int((1 - level) / 2 * resamples)], stats[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return [lo, hi]


def summarize(per_prompt, models, metrics, *, baseline, resamples=1000, seed=0):
    """{model: {metric: {mean, median, win_rate, win_rate_ci}, "average": {win_rate, win_rate_ci}}}."""
    n = len(per_prompt)
    col = {(m, k): [p["scores"][m][k] for p in per_prompt] for m in models for k in metrics}
    out = {}
    for m in models:
        out[m] = {}
        for k in metrics:
            xs, bs = col[(m, k)], col[(baseline, k)]
            out[m][k] = {
                "mean": statistics.fmean(xs),
                "median": statistics.median(xs),
                "win_rate": win_rate(xs, bs),
                "win_rate_ci": bootstrap_ci(
                    lambda idx: win_rate([xs[i] for i in idx], [bs[i] for i in idx]), n, resamples, seed
                ),
            }

        def average(idx, m=m):
            return statistics.fmean(
                win_rate([col[(m, k)][i] for i in idx], [col[(baseline, k)][i] for i in idx]) for k in metrics
            )

        out[m]["average"] = {"win_rate": average(range(n)), "win_rate_ci": bootstrap_ci(average, n, resamples, seed)}
    return out


# ----------------------------------------------------------------------------- report


def markdown_report(summary, models, metrics, *, baseline, prompts_name, n_prompts, distribution=()):
    """Means, medians and win rates of the per-image metrics; one value per model for distribution metrics."""

    def table(title, cell):
        head = "| model | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
        rows = "".join(f"| {m} | " + " | ".join(cell(m, k) for k in metrics) + " |\n" for m in models)
        return f"### {title}\n\n{head}{rows}\n"

    md = f"# Evaluation on {prompts_name} ({n_prompts} prompts)\n\n"
    if metrics:
        md += f"Baseline for win rates: `{baseline}`.\n\n"
        md += table("Mean", lambda m, k: f"{summary[m][k]['mean']:.4f}")
        md += table("Median", lambda m, k: f"{summary[m][k]['median']:.4f}")
        md += table(f"Win rate against {baseline} (95% bootstrap CI)", lambda m, k: _rate(summary[m][k]))
        md += "| model | average win rate |\n|---|---|\n" + "".join(
            f"| {m} | {_rate(summary[m]['average'])} |\n" for m in models
        )
    if distribution:
        head = "| model | " + " | ".join(distribution) + " |\n|---|" + "---|" * len(distribution) + "\n"
        rows = "".join(
            f"| {m} | " + " | ".join(f"{summary[m][k]['value']:.4f}" for k in distribution) + " |\n" for m in models
        )
        md += f"\n### Distribution metrics (one value per model from all its images; lower is better)\n\n{head}{rows}"
    return md


def _rate(entry):
    lo, hi = entry["win_rate_ci"]
    return f"{100 * entry['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def plot_radar(summary, models, metrics, path):
    """Radar chart of each model's win rate per metric (all on the same 0-1 scale)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = [2 * math.pi * i / len(metrics) for i in range(len(metrics))] + [0.0]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(polar=True)
    for m in models:
        values = [summary[m][k]["win_rate"] for k in metrics]
        ax.plot(angles, values + values[:1], label=m)
        ax.fill(angles, values + values[:1], alpha=0.1)
    ax.set_xticks(angles[:-1], metrics)
    ax.set_ylim(0, 1)
    ax.set_title("win rate against the baseline")
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_win_rates(summary, models, metrics, path):
    """Grouped bars of win rates with their 95% CIs, one group per metric plus the average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(metrics) + ["average"]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    for j, m in enumerate(models):
        rates = [summary[m][g]["win_rate"] for g in groups]
        err = [
            [r - summary[m][g]["win_rate_ci"][0] for r, g in zip(rates, groups)],
            [summary[m][g]["win_rate_ci"][1] - r for r, g in zip(rates, groups)],
        ]
        ax.bar([i + j * width for i in range(len(groups))], rates, width, yerr=err, capsize=3, label=m)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
