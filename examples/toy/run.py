#!/usr/bin/env python
"""Does self-play work where the paper ran it? SPIN-Diffusion against continued SFT and Diffusion-DPO in the toy
world, from a strong start model, through the project's own scripts (train_sft.py, train_spin_diffusion.py,
evaluate.py).

    python examples/toy/run.py --seeds 0 1 2 --output_dir D            # the protocol (settings frozen by the search)
    python examples/toy/run.py --tune --seeds 100 --output_dir T        # the search that froze them

Prompts: three disjoint splits. 320 fine-tuning captions (one image each), 64 validation captions (stopping rules,
the search, choosing a "best" checkpoint) and 96 test captions (every reported number).

Per seed:
  stage 1   train_sft.py from theta_0 on the fine-tuning winners, in chunks; after each chunk the model is scored on
            the validation prompts, and training stops by a rule fixed in advance (STAGE1 below). The chosen
            checkpoint is S, the start model of every stage-2 arm (a capable model whose SFT has flattened: the
            paper's setting, SD-1.5 and Pick-a-Pic winners).
  stage 2   from S, each arm at the same compute as SPIN's iterations:
    sft         continued SFT
    spin        train_spin_diffusion.py, its iterations (each: generate for every prompt, then train)
    spin-long   SPIN iteration 1 continued for as long as iteration 2 (the paper's Fig. 5)
    dpo         --negative_source dataset (winner = the correct image, loser = the same caption with one attribute
                wrong: the world's honest pairs), reference S
    spin+sft    spin with --sft_weight (an SFT term on the real image against the likelihood drift)
    spin-eta1   spin on stochastic opponent samples (DDIM, eta 1): the approximate objective on the samples the
                trajectory objective uses
    spin-traj   the trajectory objective (--spin_objective trajectory) on that sampler, K = 4 stored chain steps
                per sample: against spin-eta1, the same sampler (each arm with its searched settings) and the other
                objective (its training costs K times more)
  secondary (--secondary_seeds): from theta_0, SFT (stage 1 itself), SPIN and DPO each run long enough to flatten;
            each arm's best checkpoint is chosen on the validation prompts and reported on the test prompts.
Every stage-2 checkpoint is scored on the validation and the test prompts. Outputs: D/results.json (one row per
checkpoint, seed and split; `claims`), D/results.md, D/fig5_epochs.png, D/fig3_iterations.png, D/grid.png.

The primary metric, fixed before any run: strict adherence (toy_adherence: the whole scene right). Attributes and FD
are secondary. A claim is a paired difference (a - b) on the same seeds and test prompts with a two-level bootstrap
95% CI (seeds, then prompts); it holds when the CI's lower end is above 0.

Compute is counted in UNet forward-equivalents per sample (a backward costs two forwards):
  SFT step:           3 x batch
  SPIN / DPO step:    8 x pairs     (policy forward + backward on 2 samples, reference forward on 2)
  trajectory step:    8 x K x pairs (the same, on each of the K stored chain steps)
  generation:         prompts x sampler steps x 2 with classifier-free guidance (x 1 without)
"""

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "examples", ROOT / "examples" / "toy"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

# The protocol's sizes. "full" is the README's experiment; "demo" is `make demo`; "quick" checks the pipeline (CI).
# stage1: SFT from theta_0 in chunks of `every` steps; after each chunk, validation adherence. Stop at the first
# chunk end n >= min_steps where (mean of the last two chunk ends) - (mean of the two chunk ends `window` steps
# earlier) < min_gain, or at max_steps. S is the model at that step. Fixed before any run.
PRESETS = {
    "full": dict(
        base=dict(pretrain_images=6000, vae_steps=400, pretrain_steps=800),
        n_val=64,
        ft_prompts=None,
        test_prompts=None,
        eval_images=2,
        eval_steps=10,
        guidance=3.0,
        stage1=dict(lr=1e-3, every=150, min_steps=600, window=300, min_gain=0.03, max_steps=1800),
        sft_batch=64,
        spin_batch=32,
        spin_steps=40,
        iterations=3,
        gen_steps=10,
        traj_steps=4,
        secondary_scale=2,
    ),
    "demo": dict(
        base=dict(pretrain_images=3000, vae_steps=200, pretrain_steps=250),
        n_val=32,
        ft_prompts=192,
        test_prompts=48,
        eval_images=1,
        eval_steps=10,
        guidance=3.0,
        stage1=dict(lr=1e-3, every=150, min_steps=600, window=300, min_gain=0.03, max_steps=1050),
        sft_batch=64,
        spin_batch=32,
        spin_steps=12,
        iterations=3,
        gen_steps=10,
        traj_steps=4,
        secondary_scale=2,
    ),
    "quick": dict(
        base=dict(pretrain_images=300, vae_steps=8, pretrain_steps=4),
        n_val=6,
        ft_prompts=16,
        test_prompts=6,
        eval_images=1,
        eval_steps=2,
        guidance=3.0,
        stage1=dict(lr=1e-3, every=2, min_steps=4, window=2, min_gain=0.03, max_steps=6),
        sft_batch=8,
        spin_batch=4,
        spin_steps=2,
        iterations=2,
        gen_steps=2,
        traj_steps=1,  # below gen_steps
        secondary_scale=2,
    ),
}
ARMS = ("sft", "spin", "spin-long", "dpo", "spin+sft", "spin-eta1", "spin-traj")
# The settings every arm runs with unless examples/toy/results/chosen.json (written by --tune) says otherwise.
DEFAULT_HPARAMS = {
    "sft": {"learning_rate": 1e-4, "lr_scheduler": "constant", "proportion_empty_prompts": 0.1},
    "spin": {"learning_rate": 3e-5, "beta": 5000.0, "gen_guidance_scale": 3.0},
    "spin+sft": {"learning_rate": 3e-5, "beta": 5000.0, "sft_weight": 1000.0, "gen_guidance_scale": 3.0},
    "spin-eta1": {"learning_rate": 3e-5, "beta": 5000.0, "gen_guidance_scale": 3.0, "gen_eta": 1.0},
    "spin-traj": {
        "learning_rate": 3e-5,
        "beta": 5000.0,
        "gen_guidance_scale": 3.0,
        "gen_eta": 1.0,
        "spin_objective": "trajectory",
    },
    "dpo": {"learning_rate": 3e-5, "beta": 5000.0},
}
CHOSEN = ROOT / "examples" / "toy" / "results" / "chosen.json"
METRICS = ("toy_adherence", "toy_attributes", "toy_fd")
PRIMARY = "toy_adherence"


def log(msg):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compute_sft(steps, batch):
    return 3 * steps * batch


def compute_pairs(steps, pairs, k=1):
    """A SPIN or DPO run's training compute; k: chain steps trained per sample (the trajectory objective)."""
    return 8 * steps * pairs * k


def compute_generation(prompts, sampler_steps, guidance):
    return prompts * sampler_steps * (2 if guidance > 1 else 1)


class Timer:
    """Wall time per phase, written to a JSON file as the run goes (one phase once took 10x longer)."""

    def __init__(self, path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name, fn):
        t = time.time()
        out = fn()
        self.data[name] = round(self.data.get(name, 0) + time.time() - t, 1)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # whole or not at all: workers share it
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)
        return out


# ----------------------------------------------------------------------------- the scripts, called as a user would


def common_flags(cfg, start, seed, out):
    return [
        "--pretrained_model_name_or_path",
        str(start),
        "--resolution",
        str(cfg["resolution"]),
        "--center_crop",
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--adam_weight_decay",
        "0",
        "--lr_warmup_steps",
        "5",
        "--output_dir",
        str(out),
    ]


def run_sft(cfg, start, seed, out, *, steps, every, hp):
    """train_sft.py; rerunning it with a larger `steps` continues from its last checkpoint."""
    import train_sft

    train_sft.main(
        train_sft.parse_args(
            common_flags(cfg, start, seed, out)
            + [
                "--dataset_name",
                str(cfg["finetune"]),
                "--image_column",
                "image",
                "--cache_latents",
                "--train_batch_size",
                str(cfg["sft_batch"]),
                "--max_train_steps",
                str(steps),
                "--checkpointing_steps",
                str(every),
                "--learning_rate",
                str(hp["learning_rate"]),
                "--lr_scheduler",
                "constant_with_warmup" if hp["lr_scheduler"] == "constant" else hp["lr_scheduler"],
                "--proportion_empty_prompts",
                str(hp["proportion_empty_prompts"]),
                "--resume_from_checkpoint",
                "latest",
                "--num_validation_images",
                "0",
            ]
        )
    )


def spin_flags(cfg, start, seed, out, *, hp, steps, iterations, every, negative="self"):
    flags = common_flags(cfg, start, seed, out) + [
        "--lr_scheduler",
        "constant_with_warmup",
        "--dataset_name",
        str(cfg["finetune_pickapic"]),
        "--num_iterations",
        str(iterations),
        "--negative_source",
        negative,
        "--beta",
        str(hp["beta"]),
        "--learning_rate",
        str(hp["learning_rate"]),
        "--train_batch_size",
        str(cfg["spin_batch"]),
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(every),
        "--gen_num_inference_steps",
        str(cfg["gen_steps"]),
        "--gen_guidance_scale",
        str(hp.get("gen_guidance_scale", cfg["guidance"])),
        "--gen_batch_size",
        "64",
        "--gen_shard_size",
        "512",
        "--gen_prompts_per_iteration",  # every fine-tuning prompt, as the study was measured and accounted
        "all",
        "--validation_num_inference_steps",  # each iteration's sample grid, at the evaluation's sampler steps
        str(cfg["eval_steps"]),
    ]
    if hp.get("sft_weight"):
        flags += ["--sft_weight", str(hp["sft_weight"])]
    if hp.get("gen_eta"):  # the approximate objective on stochastic samples (the trajectory objective's sampler)
        flags += ["--gen_scheduler", "ddim", "--gen_eta", str(hp["gen_eta"])]
    if hp.get("spin_objective") == "trajectory":
        flags += ["--spin_objective", "trajectory", "--trajectory_steps", str(cfg["traj_steps"])]
    return flags


def run_spin(cfg, start, seed, out, *, hp, steps, iterations, every, negative="self"):
    import train_spin_diffusion

    if (out / f"iter_{iterations}" / "model_index.json").exists():
        return
    train_spin_diffusion.main(
        train_spin_diffusion.parse_args(
            spin_flags(
                cfg, start, seed, out, hp=hp, steps=steps, iterations=iterations, every=every, negative=negative
            )
        )
    )


def run_spin_long(cfg, start, seed, spin_out, out, *, hp, steps, every):
    """Iteration 1 continued: the same run as spin's iteration 1 (same seed, samples and data order, constant
    learning rate), resumed from spin's iteration-1 checkpoint and trained on for `steps` in all."""
    if (out / "iter_1" / "model_index.json").exists():
        return
    src, dst = spin_out / "iter_1", out / "iter_1"
    if not dst.exists():  # copied whole, then renamed: a kill mid-copy leaves no half-copied iteration behind
        tmp = out / "iter_1.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in ["synthetic"] + [p.name for p in src.glob("checkpoint-*")]:
            shutil.copytree(src / name, tmp / name)
        os.replace(tmp, dst)
    run_spin(cfg, start, seed, out, hp=hp, steps=steps, iterations=1, every=every)


def evaluate(base, cfg, models, out, *, split, seed=0):
    """evaluate.py on one prompt split with the toy judges; returns its results (None when `models` is empty)."""
    import evaluate as ev

    if not models:
        return None
    flags = [
        "--prompts",
        str(cfg[f"{split}_prompts_file"]),
        "--metrics",
        ",".join(METRICS),
        "--toy_judge",
        str(base / "judge"),
        "--base_model",
        str(base / "theta0"),
        "--resolution",
        str(cfg["resolution"]),
        "--num_inference_steps",
        str(cfg["eval_steps"]),
        "--guidance_scale",
        str(cfg["guidance"]),
        "--num_images_per_prompt",
        str(cfg["eval_images"]),
        "--batch_size",
        "128",
        "--seed",
        str(seed),
        "--output_dir",
        str(out),
        "--grid_prompts",
        "8",
        "--bootstrap_resamples",
        "100",
    ]
    for name, path in models.items():
        flags += ["--model", f"{name}={path}"]
    return ev.main(ev.parse_args(flags))


def rows_from(results, models, *, seed, split, stage):
    """One result row per evaluated checkpoint: the fields the report needs, and per-prompt scores for pairing."""
    rows = []
    for name, (_, fields) in models.items():
        summary = results["summary"][name]
        rows.append(
            fields
            | {
                "name": name,
                "model": name,
                "seed": seed,
                "split": split,
                "stage": stage,
                "metrics": {k: v.get("mean", v.get("value")) for k, v in summary.items() if k in METRICS},
                "per_prompt": {
                    k: [p["scores"][name][k] for p in results["per_prompt"]] for k in METRICS if k != "toy_fd"
                },
            }
        )
    return rows


def score(base, cfg, models, d, *, seed, stage, eval_seed, splits=("validation", "test")):
    rows = []
    for split in splits:
        todo = {n: p for n, (p, _) in models.items()}
        results = evaluate(base, cfg, todo, d / f"eval_{split}", split=split, seed=eval_seed)
        if results is not None:
            rows += rows_from(results, models, seed=seed, split=split, stage=stage)
    return rows


# ------------------------------------------------------------------------ stage 1: SFT from theta_0 to its plateau


def copy_pipeline(src, dst):
    """The pipeline train_sft.py saved in `src`, without its checkpoints, as a start model of its own."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "*.png", "README.md"))
    os.replace(tmp, dst)


def stage1_stop(curve, rule):
    """The stopping rule: the first chunk end n >= min_steps whose two-point mean validation adherence gains less
    than min_gain over the two-point mean `window` steps earlier; None while training should go on."""
    every = rule["every"]
    assert rule["window"] % every == 0 and rule["min_steps"] % every == 0, rule
    for n in sorted(curve):
        if n < rule["min_steps"] or n - rule["window"] - every < every:
            continue
        now = (curve[n] + curve[n - every]) / 2
        before = (curve[n - rule["window"]] + curve[n - rule["window"] - every]) / 2
        if now - before < rule["min_gain"]:
            return n
    return max(curve) if curve and max(curve) >= rule["max_steps"] else None


def run_stage1(base, cfg, seed, d, timer, eval_seed):
    """SFT from theta_0 in chunks until the stopping rule fires; returns (S's path, its step, the curve)."""
    rule, hp = (
        cfg["stage1"],
        {
            "learning_rate": cfg["stage1"]["lr"],
            "lr_scheduler": "constant",
            "proportion_empty_prompts": 0.1,
        },
    )
    s1 = d / "stage1"
    s1.mkdir(parents=True, exist_ok=True)
    curve_path = s1 / "curve.json"
    curve = {int(k): v for k, v in json.loads(curve_path.read_text()).items()} if curve_path.exists() else {}
    n = max(curve) if curve else 0
    while stage1_stop(curve, rule) is None:
        n += rule["every"]
        step_dir = s1 / f"steps-{n}"
        if not step_dir.exists():
            timer.run(
                "stage1/train",
                lambda: run_sft(cfg, base / "theta0", seed, s1 / "run", steps=n, every=rule["every"], hp=hp),
            )
            copy_pipeline(s1 / "run", step_dir)
        results = timer.run(
            "stage1/validate",
            lambda: evaluate(base, cfg, {f"s1-{n}": step_dir}, s1 / f"val-{n}", split="validation", seed=eval_seed),
        )
        curve[n] = results["summary"][f"s1-{n}"][PRIMARY]["mean"]
        curve_path.write_text(json.dumps(curve, indent=2) + "\n")
        log(f"seed {seed} stage 1: step {n}, validation adherence {curve[n]:.3f}")
    chosen = stage1_stop(curve, rule)
    (s1 / "chosen.json").write_text(json.dumps({"step": chosen, "curve": curve}, indent=2) + "\n")
    return s1 / f"steps-{chosen}", chosen, curve


# ----------------------------------------------------------------------------- stage 2: the arms from S


def budget(cfg, spin_hp):
    """The matched compute of stage 2: that of the SPIN configuration `spin_hp` (its iterations, steps per
    iteration and opponent guidance), and the SFT and DPO steps at it, with one checkpoint at each SPIN
    iteration's compute. The search uses SPIN's default configuration (its runs are in parallel); the protocol
    uses the chosen one."""
    iterations, steps = spin_shape(cfg, spin_hp)
    gen = compute_generation(cfg["n_finetune"], cfg["gen_steps"], spin_hp.get("gen_guidance_scale", cfg["guidance"]))
    per_iter = gen + compute_pairs(steps, cfg["spin_batch"])
    return {
        "iterations": iterations,
        "per_iteration": per_iter,
        "total": iterations * per_iter,
        "sft_steps": iterations * max(1, round(per_iter / (3 * cfg["sft_batch"]))),
        "dpo_steps": iterations * max(1, round(per_iter / (8 * cfg["spin_batch"]))),
    }


def spin_shape(cfg, hp):
    """(iterations, steps per iteration) of a SPIN configuration; "iterations": 6 with half the steps keeps the
    training compute of the default 3 (the opponent's generation then costs twice as much)."""
    iterations = hp.get("iterations", cfg["iterations"])
    steps = max(1, round(cfg["spin_steps"] * cfg["iterations"] / iterations))
    return iterations, steps


def run_arm(arm, cfg, start, seed, d, hp, *, budget_hp, spin_dir=None, prefix="", scale=1, start_compute=0):
    """Train one arm from `start`; returns its checkpoints {name: (path, row fields)}. SFT and DPO get the compute
    of the SPIN configuration `budget_hp`; `scale` multiplies it (the secondary design's longer runs)."""
    b = budget(cfg, budget_hp)
    out = d / (prefix + arm)
    n_ft = cfg["n_finetune"]
    models = {}
    if arm == "sft":
        steps = b["sft_steps"] * scale
        every = steps // (b["iterations"] * scale)
        run_sft(cfg, start, seed, out, steps=steps, every=every, hp=hp)
        for step in range(every, steps + 1, every):
            path = out / f"checkpoint-{step}" if step < steps else out
            epoch, compute = step * cfg["sft_batch"] / n_ft, start_compute + compute_sft(step, cfg["sft_batch"])
            models[f"{prefix}sft-{step}"] = (
                path,
                dict(arm=prefix + "sft", iteration=None, epoch=epoch, compute=compute),
            )
    elif arm == "dpo":
        steps = b["dpo_steps"] * scale
        every = steps // (b["iterations"] * scale)
        run_spin(cfg, start, seed, out, hp=hp, steps=steps, iterations=1, every=every, negative="dataset")
        for step in range(every, steps + 1, every):
            path = out / "iter_1" / f"checkpoint-{step}" if step < steps else out / "iter_1"
            models[f"{prefix}dpo-{step}"] = (
                path,
                dict(
                    arm=prefix + "dpo",
                    iteration=None,
                    epoch=step * cfg["spin_batch"] / n_ft,
                    compute=start_compute + compute_pairs(step, cfg["spin_batch"]),
                ),
            )
    elif arm == "spin-long":  # iteration 1 continued to as many steps as two iterations
        iterations, steps = spin_shape(cfg, hp)
        half = max(1, steps // 2)
        run_spin_long(cfg, start, seed, spin_dir, out, hp=hp, steps=2 * steps, every=half)
        gen = compute_generation(n_ft, cfg["gen_steps"], hp.get("gen_guidance_scale", cfg["guidance"]))
        for step in range(steps + half, 2 * steps + 1, half):
            path = out / "iter_1" / f"checkpoint-{step}" if step < 2 * steps else out / "iter_1"
            models[f"spin-long-{step}"] = (
                path,
                dict(
                    arm="spin-long",
                    iteration=1,
                    epoch=step * cfg["spin_batch"] / n_ft,
                    compute=start_compute + gen + compute_pairs(step, cfg["spin_batch"]),
                ),
            )
    else:  # spin, spin+sft, spin-eta1, spin-traj
        iterations, steps = spin_shape(cfg, hp)
        k_traj = cfg["traj_steps"] if hp.get("spin_objective") == "trajectory" else 1
        iterations *= scale
        half = max(1, steps // 2)
        run_spin(cfg, start, seed, out, hp=hp, steps=steps, iterations=iterations, every=half)
        gen = compute_generation(n_ft, cfg["gen_steps"], hp.get("gen_guidance_scale", cfg["guidance"]))
        for k in range(1, iterations + 1):
            points = [(steps, out / f"iter_{k}")]
            if arm == "spin" and not prefix and half < steps:  # the Fig. 5 curve: mid-iteration points too
                points.insert(0, (half, out / f"iter_{k}" / f"checkpoint-{half}"))
            for step, path in points:
                name = f"{prefix}{arm}-it{k}" + ("" if step == steps else f"-{step}")
                models[name] = (
                    path,
                    dict(
                        arm=prefix + arm,
                        iteration=k,
                        epoch=((k - 1) * steps + step) * cfg["spin_batch"] / n_ft,
                        compute=start_compute
                        + (k - 1) * (gen + compute_pairs(steps, cfg["spin_batch"], k_traj))
                        + gen
                        + compute_pairs(step, cfg["spin_batch"], k_traj),
                    ),
                )
    return models


def run_seed(base, cfg, seed, out, hparams, *, arms, eval_seed, secondary):
    """Stage 1 and stage 2 for one seed (and the secondary design when asked); returns the result rows."""
    d = out / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    timer = Timer(d / "timings.json")
    start, s_step, curve = run_stage1(base, cfg, seed, d, timer, eval_seed)
    log(f"seed {seed}: S = SFT step {s_step} (validation adherence {curve[s_step]:.3f})")

    models = {"S": (start, dict(arm="S", iteration=0, epoch=0.0, compute=0))}
    for arm in [a for a in ARMS if a in arms]:
        hp = hparams["spin" if arm == "spin-long" else arm]
        models |= timer.run(
            f"stage2/{arm}",
            lambda arm=arm, hp=hp: run_arm(
                arm, cfg, start, seed, d / "stage2", hp, budget_hp=hparams["spin"], spin_dir=d / "stage2" / "spin"
            ),
        )
    rows = timer.run(
        "stage2/evaluate",
        lambda: score(base, cfg, models, d / "stage2", seed=seed, stage="from_sft", eval_seed=eval_seed),
    )
    if secondary:
        rows += run_secondary(base, cfg, seed, d, hparams, curve, s_step, timer, eval_seed)
    return rows


def run_secondary(base, cfg, seed, d, hparams, curve, s_step, timer, eval_seed):
    """From theta_0, each arm long enough to flatten: SFT is stage 1 (its chunk ends), SPIN runs
    `secondary_scale` times its stage-2 budget and DPO likewise; all scored on both splits."""
    s1 = d / "stage1"
    models = {"theta0": (base / "theta0", dict(arm="theta0", iteration=0, epoch=0.0, compute=0))}
    for n in sorted(curve):
        epoch, compute = n * cfg["sft_batch"] / cfg["n_finetune"], compute_sft(n, cfg["sft_batch"])
        models[f"sft0-{n}"] = (s1 / f"steps-{n}", dict(arm="sft0", iteration=None, epoch=epoch, compute=compute))
    scale = cfg["secondary_scale"]
    for arm in ("spin", "dpo"):
        hp = hparams[arm]
        models |= timer.run(
            f"secondary/{arm}",
            lambda arm=arm, hp=hp: run_arm(
                arm,
                cfg,
                base / "theta0",
                seed,
                d / "secondary",
                hp,
                budget_hp=hparams["spin"],
                prefix="from0-",
                scale=scale,
            ),
        )
    return timer.run(
        "secondary/evaluate",
        lambda: score(base, cfg, models, d / "secondary", seed=seed, stage="from_theta0", eval_seed=eval_seed),
    )


# ----------------------------------------------------------------------------- the search (--tune)


def grids(cfg):
    """Each arm's 8 configurations: a coarse grid of 6, then 2 refinements of the best coarse one (chosen by
    validation adherence). Written down before any tuning run."""
    betas = (500.0, 2000.0, 5000.0)
    spin_coarse = [{"beta": b, "learning_rate": lr} for b, lr in itertools.product(betas, (1e-5, 3e-5))]
    spin_refine = [{"gen_guidance_scale": 1.0}, {"iterations": 2 * cfg["iterations"]}]  # no CFG; 2x, half the steps
    return {
        "sft": (
            [
                {"learning_rate": lr, "lr_scheduler": s, "proportion_empty_prompts": p}
                for lr, s, p in itertools.product((1e-4, 1e-3), ("constant", "cosine"), (0.0, 0.1))
            ],
            [],
        ),
        "spin": (spin_coarse, spin_refine),
        "spin-eta1": (spin_coarse, spin_refine),
        "spin-traj": (spin_coarse, spin_refine),
        "spin+sft": (
            [
                {"beta": b, "sft_weight": w, "learning_rate": 3e-5}
                for b, w in itertools.product(betas, (100.0, 1000.0))
            ],
            [{"learning_rate": 1e-5}, {"learning_rate": 1e-4}],
        ),
        "dpo": (
            [{"beta": b, "learning_rate": lr} for b, lr in itertools.product(betas, (1e-5, 3e-5))],
            [{"learning_rate": 1e-4}, {"learning_rate": 3e-6}],
        ),
    }


ARM_BASE = {  # what every configuration of an arm shares
    "sft": {},
    "spin": {"gen_guidance_scale": 3.0},
    "spin-eta1": {"gen_guidance_scale": 3.0, "gen_eta": 1.0},
    "spin-traj": {"gen_guidance_scale": 3.0, "gen_eta": 1.0, "spin_objective": "trajectory"},
    "spin+sft": {"gen_guidance_scale": 3.0},
    "dpo": {},
}


def tune_arm(base, cfg, seed, d, start, arm, eval_seed):
    """The arm's 8 configurations from S, each scored at the end of its budget on the validation prompts."""
    coarse, refine = grids(cfg)[arm]
    table_path = d / f"search_{arm}.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else []

    def trial(i, hp):
        if i < len(table):
            if table[i]["hparams"] != json.loads(json.dumps(hp)):
                raise SystemExit(f"error: {table_path} row {i} was made with {table[i]['hparams']}, not {hp}")
            return table[i]
        t = time.time()
        trial_dir = d / "search" / f"{arm}-{i}"
        made = {"hparams": json.loads(json.dumps(hp)), "eval_seed": eval_seed}
        marker = trial_dir / "trial.json"
        if marker.exists() and json.loads(marker.read_text()) != made:  # its trained models are another trial's
            raise SystemExit(
                f"error: {trial_dir} holds a run made with {json.loads(marker.read_text())}, not {made}; remove "
                "it or use another --output_dir"
            )
        trial_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(made) + "\n")
        models = run_arm(arm, cfg, start, seed, trial_dir, hp, budget_hp=ARM_BASE["spin"])
        last = list(models)[-1]
        res = evaluate(
            base,
            cfg,
            {last: models[last][0]},
            trial_dir / "eval",
            split="validation",
            seed=eval_seed,
        )
        s = res["summary"][last]
        row = {
            "arm": arm,
            "config": i,
            "stage": "coarse" if i < len(coarse) else "refine",
            "hparams": hp,
            "checkpoint": last,
            "compute": models[last][1]["compute"],
            "validation": {k: s[k].get("mean", s[k].get("value")) for k in METRICS},
            "seconds": round(time.time() - t, 1),
        }
        table.append(row)
        table_path.write_text(json.dumps(table, indent=2) + "\n")
        log(f"search {arm} #{i} {hp}: validation adherence {row['validation'][PRIMARY]:.3f}")
        return row

    rows = [trial(i, ARM_BASE[arm] | hp) for i, hp in enumerate(coarse)]
    best = max(rows, key=lambda r: r["validation"][PRIMARY])
    for j, change in enumerate(refine):
        rows.append(trial(len(coarse) + j, best["hparams"] | change))
    return rows


def run_tune(args, base, cfg, out):
    """--tune: stage 1 on the tuning seed, then every arm's search; writes search.json/.md and chosen.json."""
    seed = args.seeds[0]
    d = out / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    timer = Timer(d / "timings.json")
    start, s_step, curve = run_stage1(base, cfg, seed, d, timer, args.eval_seed)
    arms = [a for a in grids(cfg) if a in args.arms or (a == "spin" and "spin-long" in args.arms)]
    if args.tune_arms:
        arms = [a for a in arms if a in args.tune_arms]
    if args.jobs > 1 and len(arms) > 1 and not args.seed_only:  # arms split over worker processes
        groups = [arms[i :: args.jobs] for i in range(args.jobs)]
        procs = []
        for g in groups:
            cmd = [sys.executable, __file__] + args.argv
            cmd += ["--seeds", str(seed), "--seed_only", "--jobs", "1", "--tune_arms", ",".join(g)]
            f = open(out / f"tune_{'_'.join(g)}.log", "w")
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=one_thread_env()), g))
        for p, g in procs:
            if p.wait():
                raise SystemExit(f"error: the search of {g} failed; see {out}/tune_{'_'.join(g)}.log")
    else:
        for arm in arms:
            timer.run(f"search/{arm}", lambda arm=arm: tune_arm(base, cfg, seed, d, start, arm, args.eval_seed))
    if args.seed_only:
        return None
    searched = [a for a in grids(cfg) if (d / f"search_{a}.json").exists()]
    table = [r for arm in searched for r in json.loads((d / f"search_{arm}.json").read_text())]
    chosen = {}
    md = [
        f"# The search: tuning seed {seed}, validation prompts, evaluation seed {args.eval_seed}\n",
        f"S = SFT from theta_0 at step {s_step} (validation adherence {curve[s_step]:.3f}). Every arm: 8 "
        "configurations (SFT a full grid; the others 6 coarse and then 2 refinements of the best coarse one), each "
        "run from S for the stage-2 budget (SFT and DPO at the compute of SPIN's default configuration; a SPIN "
        "configuration's own compute follows its shape and guidance, see the compute column) and scored at its end "
        "on the validation prompts. Criterion, fixed before the runs: validation strict adherence. Bold: chosen. "
        f"Validation is {cfg['n_val']} prompts x {cfg['eval_images']} images: one configuration's adherence has a "
        "standard error of about 0.04, so configurations within 0.08 of each other are not told apart.\n",
        "| arm | # | stage | configuration | compute (k) | adherence | attributes | FD | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in searched:
        rows = [r for r in table if r["arm"] == arm]
        best = max(rows, key=lambda r: r["validation"][PRIMARY])
        chosen[arm] = best["hparams"]
        for r in rows:
            b = "**" if r is best else ""
            v = r["validation"]
            md.append(
                f"| {arm} | {r['config']} | {r['stage']} | {b}{describe_hp(r['hparams'])}{b} | "
                f"{r['compute'] / 1e3:.0f} | "
                f"{b}{v['toy_adherence']:.3f}{b} | {v['toy_attributes']:.3f} | {v['toy_fd']:.2f} | "
                f"{r['seconds'] / 60:.1f} |"
            )
    (out / "search.md").write_text("\n".join(md) + "\n")
    (out / "search.json").write_text(json.dumps({"seed": seed, "s_step": s_step, "runs": table}, indent=2) + "\n")
    tuned_on = {"seed": seed, "eval_seed": args.eval_seed, "split": "validation", "s_step": s_step}
    (out / "chosen.json").write_text(json.dumps({"tuned_on": tuned_on, "hparams": chosen}, indent=2) + "\n")
    print((out / "search.md").read_text())
    return chosen


def describe_hp(hp):
    short = {
        "learning_rate": "lr",
        "lr_scheduler": "",
        "proportion_empty_prompts": "caption dropout",
        "gen_guidance_scale": "guidance",
        "sft_weight": "lambda",
        "gen_eta": "eta",
        "spin_objective": "objective",
    }
    parts = []
    for k, v in hp.items():
        if k == "iterations":
            parts.append(f"{v} iterations")
        elif k == "lr_scheduler":
            parts.append(str(v))
        else:
            parts.append(f"{short.get(k, k)} {v:g}" if isinstance(v, float) else f"{short.get(k, k)} {v}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- statistics and report


def seeds_prompts_ci(values, resamples=2000, seed=0):
    """Mean and 95% CI of a (seeds x prompts) array, by a two-level bootstrap (seeds, then prompts within them).
    With one seed the interval is over prompts only."""
    a = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    s = rng.integers(0, a.shape[0], (resamples, a.shape[0]))
    p = rng.integers(0, a.shape[1], (resamples, a.shape[0], a.shape[1]))
    stats = a[s[:, :, None], p].mean(axis=(1, 2))
    return float(a.mean()), [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def seeds_ci(values):
    """Mean and 95% t-interval over seeds (for one-value-per-model metrics such as toy_fd); None with one seed."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), None
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(a), 1.96)
    half = t * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), [float(a.mean() - half), float(a.mean() + half)]


def group(rows, split="test"):
    """checkpoint name -> its rows over the seeds, on one split."""
    out = {}
    for r in rows:
        if r["split"] == split:
            out.setdefault(r["name"], []).append(r)
    return out


def describe(rows_of_model):
    out = {}
    for k in METRICS:
        if k == "toy_fd":
            out[k] = seeds_ci([r["metrics"][k] for r in rows_of_model])
        else:
            out[k] = seeds_prompts_ci([r["per_prompt"][k] for r in rows_of_model])
    return out


def paired(rows, a, b, metric=PRIMARY, split="test"):
    """Paired difference a - b over the same seeds and prompts: (mean, 95% CI or None)."""
    g = group(rows, split)
    by_seed_b = {r["seed"]: r for r in g[b]}
    pairs = [(r, by_seed_b[r["seed"]]) for r in g[a] if r["seed"] in by_seed_b]
    if metric == "toy_fd":
        return seeds_ci([x["metrics"][metric] - y["metrics"][metric] for x, y in pairs])
    return seeds_prompts_ci([np.subtract(x["per_prompt"][metric], y["per_prompt"][metric]) for x, y in pairs])


def fmt(v, ci, d=3):
    if ci is None:
        return f"{v:.{d}f} (one seed: no interval)"
    return (
        f"{v:+.{d}f} [{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]"
        if v < 0 or ci[0] < 0
        else f"{v:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"
    )


def nearest(rows, arm, compute):
    """The checkpoint of `arm` whose compute is nearest `compute`."""
    c = {r["name"]: r["compute"] for r in rows if r["arm"] == arm and r["split"] == "test"}
    return min(c, key=lambda m: abs(c[m] - compute)) if c else None


def best_on_validation(rows, arm):
    """The arm's checkpoint with the highest mean validation adherence over the seeds (chosen on validation,
    reported on test)."""
    g = group([r for r in rows if r["arm"] == arm], "validation")
    return max(g, key=lambda m: np.mean([r["metrics"][PRIMARY] for r in g[m]])) if g else None


def last_of(rows, arm):
    c = {r["name"]: r["compute"] for r in rows if r["arm"] == arm and r["split"] == "test"}
    return max(c, key=c.get) if c else None


def claims_of(rows, cfg, hparams):
    """The paper's claims as (text, a, b) on test-split checkpoint names."""
    g = group(rows)
    out = []
    if "spin-it1" in g:
        sft = nearest(rows, "sft", g["spin-it1"][0]["compute"])
        if sft:
            out.append(("SPIN iteration 1 beats continued SFT at the same compute", "spin-it1", sft))
    spin_last = last_of(rows, "spin")
    sft_last = nearest(rows, "sft", g[spin_last][0]["compute"]) if spin_last else None
    if spin_last and sft_last and spin_last != "spin-it1":
        out.append(("SPIN's last iteration beats continued SFT at the same compute", spin_last, sft_last))
    if "spin-it2" in g:
        out.append(("iteration 2 beats iteration 1", "spin-it2", "spin-it1"))
    if "spin-it3" in g:
        out.append(("iteration 3 beats iteration 2", "spin-it3", "spin-it2"))
    long_last = last_of(rows, "spin-long")
    if long_last and "spin-it2" in g:
        out.append(("Fig. 5: iteration 2 beats iteration 1 continued for as many epochs", "spin-it2", long_last))
    spin_best, dpo_best = best_on_validation(rows, "spin"), best_on_validation(rows, "dpo")
    if spin_best and dpo_best:
        out.append(("SPIN's best beats Diffusion-DPO's best (each chosen on validation)", spin_best, dpo_best))
    for arm, text in (  # each at the end of its own iterations (the shapes may differ; the compute columns say)
        ("spin+sft", "spin+sft (the SFT term) beats spin, each at its last iteration"),
        ("spin-eta1", "spin-eta1 (stochastic opponent samples) beats spin, each at its last iteration"),
    ):
        last = last_of(rows, arm)
        if last and spin_last:
            out.append((text, last, spin_last))
    traj_last, eta1_last = last_of(rows, "spin-traj"), last_of(rows, "spin-eta1")
    if traj_last and eta1_last:  # the same stochastic sampler (each arm's searched guidance): the objective differs
        text = "spin-traj (the trajectory objective) beats spin-eta1 (the approximate one), both on DDIM eta-1 samples"
        out.append((text, traj_last, eta1_last))
    for arm in ("sft0", "from0-spin", "from0-dpo"):  # the secondary design: each arm's best, chosen on validation
        if best_on_validation(rows, arm) is None:
            return out
    s0, sp0, dp0 = (best_on_validation(rows, a) for a in ("sft0", "from0-spin", "from0-dpo"))
    sp0_last = last_of(rows, "from0-spin")
    out += [
        ("from theta_0: SPIN's best beats SFT's best (each chosen on validation)", sp0, s0),
        ("from theta_0: SPIN's best beats DPO's best (each chosen on validation)", sp0, dp0),
        (
            "from theta_0: SPIN's last iteration beats SFT at the same compute",
            sp0_last,
            nearest(rows, "sft0", g[sp0_last][0]["compute"]),
        ),
    ]
    return out


def report(rows, out, cfg, seeds, hparams):
    fields = {r["name"]: r for r in rows}
    order = sorted(
        {r["name"] for r in rows if r["split"] == "test"},
        key=lambda m: (fields[m]["stage"] != "from_sft", fields[m]["arm"], fields[m]["compute"]),
    )
    n_test = len(group(rows)[order[0]][0]["per_prompt"][PRIMARY])
    md = [
        f"# SPIN-Diffusion in the toy world: seeds {', '.join(map(str, seeds))}\n",
        f"{cfg['n_finetune']} fine-tuning prompts (one image each), {cfg['n_val']} validation and {n_test} test "
        f"prompts x {cfg['eval_images']} images. Test split. Means with 95% CIs: two-level bootstrap over seeds and "
        "prompts (adherence, attributes), t-interval over seeds (FD, lower is better; no interval from one seed). "
        "Compute: UNet forward-equivalents per sample, generation included, counted from the stage's start model "
        "(see run.py). Primary metric: strict adherence.\n",
        "| checkpoint | stage | arm | iteration | epochs | compute (k) | adherence | attributes | FD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    g = group(rows)
    for m in order:
        r0, d = g[m][0], describe(g[m])
        md.append(
            f"| {m} | {r0['stage']} | {r0['arm']} | {r0['iteration'] if r0['iteration'] is not None else '-'} | "
            f"{r0['epoch']:.1f} | {r0['compute'] / 1e3:.0f} | {fmt(*d['toy_adherence'])} | "
            f"{fmt(*d['toy_attributes'])} | {fmt(*d['toy_fd'], d=2)} |"
        )
    md += [
        "",
        "## The claims, as paired differences (a - b) on the same seeds and test prompts",
        "",
        "A claim holds when the 95% CI of its strict-adherence difference is above 0 (the primary metric, fixed "
        "before the runs); attributes and FD are reported beside it.",
        "",
        "| claim | a | b | compute a / b | seeds | adherence a - b | attributes a - b | FD a - b (negative: a better) "
        "| holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    claim_rows = []
    for text, a, b in claims_of(rows, cfg, hparams):
        diffs = {k: paired(rows, a, b, k) for k in METRICS}
        v, ci = diffs[PRIMARY]
        n_seeds = len({r["seed"] for r in g[a]} & {r["seed"] for r in g[b]})
        holds = bool(n_seeds >= 2 and ci[0] > 0)  # one seed's interval covers prompts only: exploratory, never "holds"
        ca, cb = g[a][0]["compute"], g[b][0]["compute"]
        claim_rows.append(
            {
                "claim": text,
                "metric": PRIMARY,
                "a": a,
                "b": b,
                "diff": v,
                "ci_low": ci[0],
                "ci_high": ci[1],
                "holds": holds,
                "n_seeds": n_seeds,
                "compute_a": ca,
                "compute_b": cb,
                "secondary": {k: {"diff": diffs[k][0], "ci95": diffs[k][1]} for k in METRICS if k != PRIMARY},
            }
        )
        verdict = "yes" if holds else "no" if n_seeds >= 2 else "one seed: not tested"
        md.append(
            f"| {text} | {a} | {b} | {ca / 1e3:.0f}k / {cb / 1e3:.0f}k | {n_seeds} | {fmt(*diffs['toy_adherence'])} "
            f"| {fmt(*diffs['toy_attributes'])} | {fmt(*diffs['toy_fd'], d=2)} | {verdict} |"
        )
    plateau = secondary_table(rows)
    if plateau:
        md += [
            "",
            "## The secondary design: from theta_0, each arm's best checkpoint on validation",
            "",
            "A best checkpoint that is its arm's last means the arm had not flattened within its budget.",
            "",
        ] + plateau
    drift = drift_table(out, seeds)
    if drift:
        md += [
            "",
            "## Inside the SPIN iterations (train_spin_diffusion.py's metrics.json, mean over seeds)",
            "",
        ] + drift
    (out / "results.md").write_text("\n".join(md) + "\n")
    return claim_rows


def secondary_table(rows):
    """Per arm of the secondary design: its validation curve's best checkpoint, its compute, and whether it is
    the arm's last checkpoint (then the arm was still improving when its budget ran out)."""
    lines = ["| arm | best on validation | its compute (k) | validation adherence | last checkpoint | flattened |"]
    lines.append("|---|---|---|---|---|---|")
    for arm in ("sft0", "from0-spin", "from0-dpo"):
        best, last = best_on_validation(rows, arm), last_of(rows, arm)
        if best is None:
            return []
        g = group([r for r in rows if r["arm"] == arm], "validation")
        v = np.mean([r["metrics"][PRIMARY] for r in g[best]])
        lines.append(
            f"| {arm} | {best} | {g[best][0]['compute'] / 1e3:.0f} | {v:.3f} | {last} | "
            f"{'no (best = last)' if best == last else 'yes'} |"
        )
    return lines


def readme_claim_row(c):
    """One claim of results.json as the README's "Does it work?" table shows it (a test checks they agree)."""
    verdict = "**yes**" if c["holds"] else "no" if c["n_seeds"] >= 2 else "one seed: not tested"
    return (
        f"| {c['claim']} | `{c['a']}` - `{c['b']}` | {c['compute_a'] / 1e3:.0f}k / {c['compute_b'] / 1e3:.0f}k | "
        f"{c['n_seeds']} | {fmt(c['diff'], [c['ci_low'], c['ci_high']])} | {verdict} |"
    )


def drift_table(out, seeds):
    """Per SPIN arm and iteration: implicit accuracy, last-step margin, and the policy's error on the real images
    against theta_k's (the likelihood drift), averaged over seeds."""
    lines = [
        "| arm | iteration | implicit acc (mean) | margin (last step) | real-image error rise vs theta_k (last) |",
        "|---|---|---|---|---|",
    ]
    found = False
    for arm in ("spin", "spin+sft", "spin-eta1", "spin-traj"):
        for k in range(1, 13):
            ms = []
            for s in seeds:
                p = out / f"seed_{s}" / "stage2" / arm / f"iter_{k}" / "metrics.json"
                if p.exists():
                    ms.append(json.loads(p.read_text()))
            if not ms:
                continue
            found = True
            acc = np.mean([m["mean"].get("implicit_acc", np.nan) for m in ms])
            margin = np.mean([m["last_step"].get("reward_margin", np.nan) for m in ms])
            rise = np.mean(
                [m["last_step"].get("model_err_real", np.nan) - m["last_step"].get("ref_err_real", np.nan) for m in ms]
            )
            lines.append(f"| {arm} | {k} | {acc:.3f} | {margin:.1f} | {rise:+.4f} |")
    return lines if found else []


def plots(rows, out, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group(rows)
    if "S" not in g:
        return

    def point(name, metric):
        v, ci = describe(g[name])[metric]
        return v, (ci if ci is not None else [v, v])

    # Fig. 5: SPIN's iterations against iteration 1 continued, by epochs over the fine-tuning prompts.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric, label in (
        (axes[0], "toy_adherence", "strict adherence, test prompts (primary)"),
        (axes[1], "toy_attributes", "prompt attributes right, test prompts"),
    ):
        for arm, colour, text in (("spin", "C0", "SPIN iterations"), ("spin-long", "C1", "iteration 1 continued")):
            names = sorted((m for m in g if g[m][0]["arm"] == arm), key=lambda m: g[m][0]["epoch"])
            if arm == "spin":
                names = ["S"] + names
            elif "spin-it1" in g:
                names = ["spin-it1"] + names
            if len(names) < 2:
                continue
            xs = [g[m][0]["epoch"] for m in names]
            pts = [point(m, metric) for m in names]
            ys = [p[0] for p in pts]
            ax.errorbar(
                xs,
                ys,
                yerr=[[y - p[1][0] for y, p in zip(ys, pts)], [p[1][1] - y for y, p in zip(ys, pts)]],
                marker="o",
                capsize=3,
                color=colour,
                label=text,
            )
        ax.set_xlabel("epochs over the fine-tuning prompts (from S)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("Starting iteration 2 against training iteration 1 longer (cf. the paper's Fig. 5); 95% CIs")
    fig.savefig(out / "fig5_epochs.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    # Fig. 3: each arm at the compute of each SPIN iteration.
    its = sorted(
        int(m.rsplit("it", 1)[1])
        for m in g
        if g[m][0]["arm"] == "spin" and m.startswith("spin-it") and "-" not in m[7:]
    )
    if not its:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    arms = [
        a for a in ("sft", "dpo", "spin", "spin+sft", "spin-eta1", "spin-traj") if any(g[m][0]["arm"] == a for m in g)
    ]
    width = 0.8 / len(arms)
    for ax, metric, label in (
        (axes[0], "toy_adherence", "strict adherence, test prompts (primary)"),
        (axes[1], "toy_attributes", "prompt attributes right, test prompts"),
    ):
        for j, arm in enumerate(arms):
            xs, ys, lo, hi = [], [], [], []
            for k in its:
                compute = g[f"spin-it{k}"][0]["compute"]
                m = f"{arm}-it{k}" if arm.startswith("spin") else nearest(rows, arm, compute)
                if m not in g:
                    continue
                v, ci = point(m, metric)
                xs.append(k + (j - (len(arms) - 1) / 2) * width)
                ys.append(v)
                lo.append(v - ci[0])
                hi.append(ci[1] - v)
            ax.bar(
                xs,
                ys,
                width,
                yerr=[lo, hi],
                capsize=2,
                label={"sft": "continued SFT", "dpo": "Diffusion-DPO"}.get(arm, arm),
            )
        ax.axhline(point("S", metric)[0], color="gray", linestyle="--", linewidth=1, label="S (start)")
        ax.set_xticks(its, [f"iteration {k}" for k in its])
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("From S, at the compute of each SPIN iteration (cf. the paper's Fig. 3); 95% CIs")
    fig.savefig(out / "fig3_iterations.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def one_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_seeds_in_parallel(args, out):
    """One worker process per seed, `args.jobs` at a time, one torch thread each: on a small CPU, two 1-thread
    processes get more done than one 2-thread process (the toy's kernels are too small to use two cores well)."""
    from concurrent.futures import ThreadPoolExecutor

    def work(seed):
        cmd = [sys.executable, __file__] + args.argv + ["--seeds", str(seed), "--seed_only", "--jobs", "1"]
        cmd += ["--secondary_seeds"] + [str(s) for s in args.secondary_seeds]  # decided here, not by the worker
        logfile = out / f"seed_{seed}.log"
        with open(logfile, "w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=one_thread_env())
        if code:
            raise SystemExit(f"error: seed {seed} failed (exit {code}); see {logfile}")
        log(f"seed {seed} finished (log: {logfile})")

    todo = [s for s in args.seeds if not (out / f"seed_{s}" / "rows.json").exists()]
    if todo:
        log(f"running seeds {todo} in {min(args.jobs, len(todo))} parallel workers; logs in {out}/seed_N.log")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(work, todo))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--base_dir",
        default=None,
        help="Where theta_0 and the judge are (built there if missing). Default: OUTPUT_DIR/base.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument(
        "--tune",
        action="store_true",
        help="Run the search on the first of --seeds (a tuning seed, never a reported one): every arm's 8 "
        "configurations from S, scored on the validation prompts; writes search.md, search.json and chosen.json.",
    )
    p.add_argument(
        "--hparams",
        default=None,
        help=f"JSON file of frozen settings {{arm: {{...}}}} (default: {CHOSEN.relative_to(ROOT)}, from --tune).",
    )
    p.add_argument(
        "--secondary_seeds",
        type=int,
        nargs="*",
        default=None,
        help="Seeds that also run the secondary design (every arm from theta_0 to its plateau). Default: the first "
        "seed of --seeds.",
    )
    p.add_argument(
        "--resolution", type=int, default=32, help="Image size of the world (a multiple of 8; latents are 1/4 of it)."
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--arms", default=",".join(ARMS), help=f"Comma-separated stage-2 arms (of {', '.join(ARMS)}).")
    p.add_argument(
        "--eval_seed", type=int, default=0, help="Seed of the evaluation images (the same for every model)."
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="Parallel worker processes of one thread each (seeds, or arms with --tune).",
    )
    p.add_argument("--seed_only", action="store_true", help=argparse.SUPPRESS)  # a worker: its share, no report
    p.add_argument("--tune_arms", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage1_only", action="store_true", help="Run stage 1 (S) for each seed, then stop.")
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    for flag in ("--seeds", "--jobs", "--tune_arms"):  # a worker's command line sets these itself
        while flag in args.argv:
            i = args.argv.index(flag)
            j = i + 1
            while j < len(args.argv) and not args.argv[j].startswith("--"):
                j += 1
            del args.argv[i:j]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        p.error(f"--arms: unknown {sorted(unknown)}; the arms are {', '.join(ARMS)}")
    if "spin-long" in args.arms and "spin" not in args.arms:
        p.error("--arms: spin-long continues spin's iteration 1, so it needs spin")
    args.tune_arms = args.tune_arms.split(",") if args.tune_arms else None
    if args.resolution < 16 or args.resolution % 8:
        p.error(f"--resolution must be a multiple of 8 and at least 16, got {args.resolution}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    if args.tune and args.seeds == [0, 1, 2]:
        args.seeds = [100]  # the tuning seed: never one of the reported ones
    if args.secondary_seeds is None:
        args.secondary_seeds = args.seeds[:1]
    if args.hparams and not Path(args.hparams).exists():
        p.error(f"--hparams {args.hparams}: no such file")
    return args


def prepare_splits(base, out, preset):
    """The three prompt splits: validation carved from the fine-tuning captions (fixed, seed 0), test = the
    world's held-out captions. Writes the fine-tuning parquets without the validation captions."""
    import random

    import datasets

    data = base / "data"
    ft = datasets.load_dataset("parquet", data_files=str(data / "finetune.parquet"), split="train")
    pick = datasets.load_dataset("parquet", data_files=str(data / "finetune_pickapic.parquet"), split="train")
    captions = list(ft["caption"])
    val_idx = set(random.Random(0).sample(range(len(captions)), preset["n_val"]))
    keep = [i for i in range(len(captions)) if i not in val_idx][: preset["ft_prompts"] or None]
    test = [t for t in (data / "eval_prompts.txt").read_text().split("\n") if t][: preset["test_prompts"] or None]
    splits = out / "splits"
    if not (splits / "test_prompts.txt").exists():  # written once (workers of --jobs reuse it), the last file last
        tmp = out / "splits.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ft.select(keep).to_parquet(tmp / "finetune.parquet")
        pick.select(keep).to_parquet(tmp / "finetune_pickapic.parquet")
        (tmp / "validation_prompts.txt").write_text("\n".join(captions[i] for i in sorted(val_idx)) + "\n")
        (tmp / "test_prompts.txt").write_text("\n".join(test) + "\n")
        os.replace(tmp, splits)
    assert not set(test) & {captions[i] for i in keep} and not val_idx & set(keep)
    return {
        "finetune": splits / "finetune.parquet",
        "finetune_pickapic": splits / "finetune_pickapic.parquet",
        "validation_prompts_file": splits / "validation_prompts.txt",
        "test_prompts_file": splits / "test_prompts.txt",
        "n_finetune": len(keep),
        "n_val": len(val_idx),
        "n_test": len(test),
    }


def frozen_settings(args):
    """(hparams per arm, where they were tuned): DEFAULT_HPARAMS overridden by --hparams or chosen.json. The
    protocol refuses to report a seed the settings were tuned on."""
    hparams = json.loads(json.dumps(DEFAULT_HPARAMS))
    frozen = Path(args.hparams) if args.hparams else CHOSEN
    if args.tune or not frozen.exists():
        return hparams, None
    saved = json.loads(frozen.read_text())
    values, tuned_on = (saved["hparams"], saved.get("tuned_on")) if "hparams" in saved else (saved, None)
    for arm, v in values.items():
        hparams[arm] = hparams.get(arm, {}) | v
    if tuned_on and tuned_on["seed"] in args.seeds and not args.stage1_only:
        raise SystemExit(
            f"error: seed {tuned_on['seed']} is the seed {frozen} was tuned on; report other seeds (S3: claims are "
            "measured on seeds not used for tuning)"
        )
    return hparams, tuned_on


def main(args):
    import build_base
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base_dir) if args.base_dir else out / "base"
    preset = PRESETS[args.preset]
    hparams, tuned_on = frozen_settings(args)
    timer = Timer(out / "timings.json")
    t0 = time.time()
    built = timer.run("base", lambda: build_base.build(base, args.resolution, seed=0, **preset["base"]))
    cfg = dict(preset, resolution=args.resolution) | prepare_splits(base, out, preset)
    log(
        f"theta_0 ready in {base}; {cfg['n_finetune']} fine-tuning, {cfg['n_val']} validation, {cfg['n_test']} test "
        f"prompts; seeds {args.seeds}"
    )
    if args.tune:
        return run_tune(args, base, cfg, out)
    if args.stage1_only:  # S for each seed, ahead of the search's results (stage 1 does not depend on them)
        for seed in args.seeds:
            d = out / f"seed_{seed}"
            d.mkdir(parents=True, exist_ok=True)
            run_stage1(base, cfg, seed, d, Timer(d / "timings.json"), args.eval_seed)
        return None

    if args.jobs > 1 and len(args.seeds) > 1 and not args.seed_only:
        run_seeds_in_parallel(args, out)
    made_with = {"preset": args.preset, "resolution": args.resolution, "hparams": hparams, "arms": args.arms}
    made_with |= {"secondary_seeds": args.secondary_seeds}
    made_with |= {"eval_seed": args.eval_seed, "base": str(base.resolve())}
    rows = []
    for seed in args.seeds:
        done = out / f"seed_{seed}" / "rows.json"  # a seed's rows: written when it is complete (a rerun skips it)
        if not done.exists():
            seed_rows = run_seed(
                base,
                cfg,
                seed,
                out,
                hparams,
                arms=args.arms,
                eval_seed=args.eval_seed,
                secondary=seed in args.secondary_seeds,
            )
            done.write_text(json.dumps({"made_with": made_with, "rows": seed_rows}) + "\n")
        saved = json.loads(done.read_text())
        if saved["made_with"] != json.loads(json.dumps(made_with)):
            raise SystemExit(
                f"error: {done} was made with other settings ({saved['made_with']}); use another --output_dir"
            )
        rows += saved["rows"]
        timer.data |= {
            f"seed{seed}/{k}": v for k, v in json.loads((out / f"seed_{seed}" / "timings.json").read_text()).items()
        }
        log(f"seed {seed} done ({time.time() - t0:.0f} s so far)")
    if args.seed_only:
        return None
    claims = report(rows, out, cfg, args.seeds, hparams)
    plots(rows, out, cfg)
    grid = out / f"seed_{args.seeds[0]}" / "stage2" / "eval_test" / "grid.png"
    if grid.exists():
        shutil.copy(grid, out / "grid.png")
    results = {
        "seeds": args.seeds,
        "preset": args.preset,
        "hparams": hparams,
        "hparams_tuned_on": tuned_on,
        "base": built,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()},
        "budget": budget(cfg, hparams["spin"]),
        "primary_metric": PRIMARY,
        "compute_unit": "UNet forward-equivalents per sample (backward = 2 forwards); SFT step 3 x batch; "
        "SPIN/DPO step 8 x pairs; generation prompts x steps x 2 (CFG); counted from the stage's start model",
        "stage1": {
            s: json.loads((out / f"seed_{s}" / "stage1" / "chosen.json").read_text())
            for s in args.seeds
            if (out / f"seed_{s}" / "stage1" / "chosen.json").exists()
        },
        "runs": [
            {k: r[k] for k in ("name", "stage", "split", "arm", "seed", "iteration", "epoch", "compute", "metrics")}
            for r in rows
        ],
        "per_prompt": [{k: r[k] for k in ("name", "seed", "split", "per_prompt")} for r in rows],
        "claims": claims,
        "timings_s": timer.data,
        "wall_s": round(time.time() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print((out / "results.md").read_text())
    print(
        f"wrote {out}/results.json, results.md, fig5_epochs.png, fig3_iterations.png, grid.png "
        f"in {time.time() - t0:.0f} s"
    )
    return results


if __name__ == "__main__":
    main(parse_args())
