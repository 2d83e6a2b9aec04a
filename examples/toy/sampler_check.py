#!/usr/bin/env python
"""Does a faster opponent sampler change the opponent? DPM-Solver++ 2M at 20 and 10 steps against DDIM at 50, in
the toy world, on the models SPIN starts from (S, each seed's stage-1 SFT model of a finished study).

Written down before the runs (issue 19, C1):
- A. The opponent's samples. S of the first seed draws one image per fine-tuning prompt with DDIM 50 (draw a),
  DDIM 50 again with other seeds (draw b), DPM-Solver 20 and DPM-Solver 10 (seeds of their own; DPM-Solver 20
  also from draw a's noise), at the SPIN arm's chosen opponent guidance. Judged: adherence and attribute scores
  (mean, 95% CI over prompts), and the Frechet distance of the judge's drawing features to draw a. The sampler
  "draws the same distribution" when its adherence and attributes are within CI of draw a, and its FD to draw a
  is no larger than the 95th percentile of the FD between two DDIM-50 draws by chance (draws a and b with each
  prompt's pair swapped at random).
  Revised once, after the first run of part A and before part B: that run drew DPM-Solver from draw a's own
  noise (a deterministic solver then nearly retraces DDIM's images, an unfair comparison) and bounded the FD by
  a percentile bootstrap, whose resampled duplicates bias FD upward (draw b's FD fell below its own interval).
- B. One SPIN iteration from S per seed, with the chosen SPIN settings, the opponent sampled by DDIM 50 or by
  DPM-Solver 20 (same seeds, same steps). Primary metric: the iteration's gain in test adherence over S. The
  claim "the gain is equal" holds when the 95% CI of the paired difference (DPM-Solver - DDIM, seeds x prompts
  bootstrap) contains 0.
One run, no stopping rule to tune: every number below is reported.

    python examples/toy/sampler_check.py --study /work/toy/s1 --seeds 0 1 2 --output_dir OUT
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent.parent / "scorers"))

import run as protocol  # noqa: E402  (examples/toy/run.py: the study's settings, runs and evaluation)

# (sampler, steps, seed offset): each draw has its own noise, except "dpm20-same-noise", which starts from draw a's
# noise (how closely the solver follows DDIM's own trajectory)
SAMPLERS = {"ddim50-a": ("ddim", 50, 0), "ddim50-b": ("ddim", 50, 1), "dpm20": ("dpmsolver", 20, 2)}
SAMPLERS |= {"dpm10": ("dpmsolver", 10, 3), "dpm20-same-noise": ("dpmsolver", 20, 0)}


def start_model(study, seed):
    """S of `seed`: its stage-1 checkpoint at the chosen step."""
    d = Path(study) / f"seed_{seed}" / "stage1"
    return d / f"steps-{json.loads((d / 'chosen.json').read_text())['step']}"


def draw(model, name, steps, prompts, guidance, seed_offset):
    """One image per prompt from `model` with the `name` sampler (utils/spin.py SAMPLERS), prompt i seeded with
    seed_offset * 1_000_000 + i."""
    import torch
    from diffusers import DiffusionPipeline

    from utils.spin import sampler_from_config

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.scheduler = sampler_from_config(name, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start : start + 128]
        gens = [torch.Generator().manual_seed(seed_offset * 1_000_000 + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def bootstrap(values, resamples=2000, seed=0):
    a = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    stats = a[idx].mean(axis=1)
    return float(a.mean()), [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def overlaps(x, y):
    """Whether either (mean, [lo, hi]) holds the other's mean in its CI."""
    return y[1][0] <= x[0] <= y[1][1] or x[1][0] <= y[0] <= x[1][1]


def fd_null(a, b, resamples=300, seed=0):
    """The Frechet distance between two draws of one distribution, by chance: for two independent draws `a` and
    `b` of the same prompts (rows paired by prompt), the FDs after swapping each prompt's pair at random."""
    from toy import frechet_distance

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        swap = rng.random(len(a)) < 0.5
        out.append(frechet_distance(np.where(swap[:, None], b, a), np.where(swap[:, None], a, b)))
    return np.asarray(out)


def part_a(study, base, prompts, guidance, seed):
    from toy import ToyAdherence, drawing_features, load_world

    world = load_world(base / "judge")
    strict, partial = ToyAdherence(base / "judge"), ToyAdherence(base / "judge", strict=False)
    model, out, features = start_model(study, seed), {}, {}
    for key, (name, steps, offset) in SAMPLERS.items():
        t0 = time.time()
        images = draw(model, name, steps, prompts, guidance, offset)
        features[key] = np.stack([drawing_features(im, world) for im in images])
        out[key] = {
            "sampler": name,
            "steps": steps,
            "forwards_per_sample": steps * (2 if guidance > 1 else 1),
            "adherence": bootstrap(strict.score(images, prompts)),
            "attributes": bootstrap(partial.score(images, prompts)),
            "seconds": round(time.time() - t0, 1),
        }
        protocol.log(f"A. {key}: {out[key]}")
    from toy import frechet_distance

    null = fd_null(features["ddim50-a"], features["ddim50-b"])
    out["fd_null_95"] = float(np.percentile(null, 95))  # two DDIM-50 draws are this far apart 95% of the time
    for key in SAMPLERS:
        if key != "ddim50-a":
            out[key]["fd_to_ddim50_a"] = frechet_distance(features[key], features["ddim50-a"])
    for key in ("dpm20", "dpm10"):
        r, ref = out[key], out["ddim50-a"]
        within = all(overlaps(r[m], ref[m]) for m in ("adherence", "attributes"))
        r["same_distribution"] = bool(within and r["fd_to_ddim50_a"] <= out["fd_null_95"])
    return out


def part_b(study, base, cfg, hp, seeds, out):
    iterations, steps = protocol.spin_shape(cfg, hp)
    rows = {}
    for seed in seeds:
        start = start_model(study, seed)
        models = {"S": start}
        for key, (name, n) in {"ddim50": ("ddim", 50), "dpm20": ("dpmsolver", 20)}.items():
            run_dir = out / f"seed_{seed}" / key
            if not (run_dir / "iter_1" / "metrics.json").exists():
                import train_spin_diffusion

                flags = protocol.spin_flags(cfg, start, seed, run_dir, hp=hp, steps=steps, iterations=1, every=steps)
                flags += ["--gen_scheduler", name, "--gen_num_inference_steps", str(n)]
                t0 = time.time()
                train_spin_diffusion.main(train_spin_diffusion.parse_args(flags))
                protocol.log(f"B. seed {seed} {key}: one SPIN iteration in {time.time() - t0:.0f} s")
            models[key] = run_dir / "iter_1"
        results = protocol.evaluate(base, cfg, models, out / f"seed_{seed}" / "eval", split="test", seed=0)
        rows[seed] = {name: [p["scores"][name][protocol.PRIMARY] for p in results["per_prompt"]] for name in models}
    gains = {
        key: protocol.seeds_prompts_ci([np.subtract(rows[s][key], rows[s]["S"]) for s in seeds])
        for key in ("ddim50", "dpm20")
    }
    diff = protocol.seeds_prompts_ci([np.subtract(rows[s]["dpm20"], rows[s]["ddim50"]) for s in seeds])
    return {
        "steps": steps,
        "hparams": hp,
        "gain_ddim50": gains["ddim50"],
        "gain_dpm20": gains["dpm20"],
        "dpm20_minus_ddim50": diff,
        "equal_within_ci": bool(diff[1][0] <= 0 <= diff[1][1]),
        "per_seed": {str(s): {k: float(np.mean(v)) for k, v in rows[s].items()} for s in seeds},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="A finished run.py output folder (its base, splits and S).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--preset", default="full", choices=sorted(protocol.PRESETS))
    p.add_argument("--prompts", type=int, default=512, help="Fine-tuning prompts drawn from in part A.")
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    a = p.parse_args(argv)
    import datasets

    study, out = Path(a.study), Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = study / "base"
    cfg = dict(protocol.PRESETS[a.preset], resolution=32) | protocol.prepare_splits(
        base, study, protocol.PRESETS[a.preset]
    )
    hp = json.loads(protocol.CHOSEN.read_text())["hparams"]["spin"]
    hp = protocol.DEFAULT_HPARAMS["spin"] | hp
    guidance = hp.get("gen_guidance_scale", cfg["guidance"])
    result_file = out / "sampler_check.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if a.part in ("a", "both") and "opponent_samples" not in result:
        captions = list(datasets.load_dataset("parquet", data_files=str(cfg["finetune"]), split="train")["caption"])
        result["opponent_samples"] = part_a(study, base, captions[: a.prompts], guidance, a.seeds[0])
        result["opponent_samples"]["model"] = str(start_model(study, a.seeds[0]))
        result_file.write_text(json.dumps(result, indent=2) + "\n")
    if a.part in ("b", "both"):
        result["spin_iteration"] = part_b(study, base, cfg, hp, a.seeds, out)
        result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
