#!/usr/bin/env python
"""Does self-play work? SPIN-Diffusion against continued SFT and Diffusion-DPO in the toy world, at matched
UNet compute, through the project's own scripts (train_sft.py, train_spin_diffusion.py, evaluate.py).

    python examples/toy/run.py --seeds 0 1 2 --output_dir toy_results

From theta_0 (examples/toy/build_base.py, built into --base_dir if missing), for every seed:
  sft          train_sft.py on the fine-tuning winners, as long as SPIN's three iterations cost
  spin         train_spin_diffusion.py, 3 iterations (each: generate for every prompt, then train)
  spin-long    SPIN iteration 1 continued for twice its steps (the paper's Fig. 5: more epochs inside iteration 1
               against starting iteration 2); it resumes spin's iteration 1 from its last checkpoint
  dpo          train_spin_diffusion.py --negative_source dataset (winner = the correct image, loser = the same
               caption drawn with one attribute wrong), as long as SPIN's three iterations cost
Each arm is evaluated at several checkpoints on the held-out prompts with the toy judges (toy_adherence,
toy_attributes, toy_fd). Outputs: DIR/results.json (one row per evaluated checkpoint per seed), DIR/results.md
(means with 95% CIs over seeds x prompts, and the paper's claims as paired differences), DIR/fig5_epochs.png,
DIR/fig3_iterations.png, DIR/grid.png.

Compute is counted in UNet forward-equivalents per sample (a backward costs two forwards):
  SFT step:           3 x batch                     (forward + backward)
  SPIN / DPO step:    8 x pairs                     (policy forward + backward on 2 samples, reference forward on 2)
  SPIN generation:    prompts x sampler steps x 2   (classifier-free guidance runs the UNet twice per step)
The VAE and the text encoder are not counted (they are frozen, and cost little next to the UNet here).
"""

import argparse
import json
import math
import os
import shutil
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
PRESETS = {
    "full": dict(
        base=dict(pretrain_images=6000, vae_steps=400, pretrain_steps=800),
        prompts=None,
        eval_prompts=None,
        eval_images=2,
        eval_steps=10,
        guidance=3.0,
        spin_steps=40,
        spin_batch=32,
        gen_steps=10,
        sft_batch=64,
        long_factor=2,
    ),
    "demo": dict(
        base=dict(pretrain_images=3000, vae_steps=200, pretrain_steps=250),
        prompts=256,
        eval_prompts=32,
        eval_images=1,
        eval_steps=10,
        guidance=3.0,
        spin_steps=12,
        spin_batch=32,
        gen_steps=10,
        sft_batch=64,
        long_factor=2,
    ),
    "quick": dict(
        base=dict(pretrain_images=300, vae_steps=8, pretrain_steps=4),
        prompts=16,
        eval_prompts=6,
        eval_images=1,
        eval_steps=2,
        guidance=3.0,
        spin_steps=2,
        spin_batch=4,
        gen_steps=2,
        sft_batch=8,
        long_factor=2,
    ),
}
# Tuned on seed 100 only (see the README's "Does it work?"); the reported seeds are others.
# SFT tried lr 1e-4, 3e-4, 1e-3, 3e-3; SPIN tried (lr, opponent guidance) 1e-4/3, 3e-4/3, 1e-4/1, 3e-5/3 at beta 5000;
# each picked by mean toy_attributes over its three checkpoints at SPIN-iteration compute. DPO shares SPIN's loss
# code and takes SPIN's values (no tuning of its own).
HPARAMS = {
    "sft": {"learning_rate": 1e-3},
    "spin": {"learning_rate": 3e-5, "beta": 5000.0},
    "dpo": {"learning_rate": 3e-5, "beta": 5000.0},
}
METRICS = ("toy_adherence", "toy_attributes", "toy_fd")


def log(msg):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compute_sft(steps, batch):
    return 3 * steps * batch


def compute_pairs(steps, pairs):
    return 8 * steps * pairs


def compute_generation(prompts, sampler_steps, guidance):
    return prompts * sampler_steps * (2 if guidance > 1 else 1)


class Timer:
    """Wall time per phase, written to DIR/timings.json as the run goes (one phase once took 10x longer)."""

    def __init__(self, path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name, fn):
        t = time.time()
        out = fn()
        self.data[name] = round(self.data.get(name, 0) + time.time() - t, 1)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        return out


# ----------------------------------------------------------------------------- the arms, through the scripts


def common_flags(base, cfg, seed, out):
    return [
        "--pretrained_model_name_or_path",
        str(base / "theta0"),
        "--resolution",
        str(cfg["resolution"]),
        "--center_crop",
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--adam_weight_decay",
        "0",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "5",
        "--output_dir",
        str(out),
    ]


def run_sft(base, cfg, seed, out, steps, every, hp):
    import train_sft

    if (out / "model_index.json").exists():
        return
    train_sft.main(
        train_sft.parse_args(
            common_flags(base, cfg, seed, out)
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
                "--resume_from_checkpoint",
                "latest",
                "--num_validation_images",
                "4",
                "--validation_num_inference_steps",
                str(cfg["eval_steps"]),
            ]
        )
    )


# the spin-traj arm: SPIN with the exact (trajectory) objective, one stored step of a stochastic DDIM chain per sample
TRAJECTORY_FLAGS = [
    "--spin_objective",
    "trajectory",
    "--gen_scheduler",
    "ddim",
    "--gen_eta",
    "1.0",
    "--trajectory_steps",
    "1",
]


def spin_flags(base, cfg, seed, out, steps, every, hp, iterations, negative="self", extra=()):
    return (
        common_flags(base, cfg, seed, out)
        + list(extra)
        + [
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
        ]
    )


def run_spin(base, cfg, seed, out, steps, every, hp, iterations, negative="self", extra=()):
    import train_spin_diffusion

    if (out / f"iter_{iterations}" / "model_index.json").exists():
        return
    train_spin_diffusion.main(
        train_spin_diffusion.parse_args(
            spin_flags(base, cfg, seed, out, steps, every, hp, iterations, negative, extra)
        )
    )


def run_spin_long(base, cfg, seed, spin_out, out, steps, every, hp):
    """Iteration 1 continued: the same run as spin's iteration 1 (same seed, samples and data order, constant
    learning rate), resumed from spin's iteration-1 checkpoint and trained on for `steps` in all."""
    import train_spin_diffusion

    if (out / "iter_1" / "model_index.json").exists():
        return
    src, dst = spin_out / "iter_1", out / "iter_1"
    if not dst.exists():
        for name in ["synthetic"] + [p.name for p in src.glob("checkpoint-*")]:
            shutil.copytree(src / name, dst / name)
    train_spin_diffusion.main(train_spin_diffusion.parse_args(spin_flags(base, cfg, seed, out, steps, every, hp, 1)))


def evaluate(base, cfg, models, out, seed=0):
    """evaluate.py on the held-out prompts with the toy judges; returns its results."""
    import evaluate as ev

    flags = [
        "--prompts",
        str(cfg["eval_prompts_file"]),
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
        "96",
        "--seed",
        str(seed),
        "--output_dir",
        str(out),
        "--grid_prompts",
        "8",
        "--bootstrap_resamples",
        "200",
    ]
    if cfg["eval_prompts"]:
        flags += ["--max_prompts", str(cfg["eval_prompts"])]
    for name, path in models.items():
        flags += ["--model", f"{name}={path}"]
    return ev.main(ev.parse_args(flags))


# ----------------------------------------------------------------------------- one seed


def run_seeds_in_parallel(args, base, out):
    """One worker process per seed, `args.jobs` at a time, one torch thread each: on a small CPU, two 1-thread
    processes get more done than one 2-thread process (the toy's kernels are too small to use two cores well)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def work(seed):
        cmd = [
            sys.executable,
            __file__,
            "--seeds",
            str(seed),
            "--output_dir",
            str(out),
            "--base_dir",
            str(base),
            "--preset",
            args.preset,
            "--arms",
            ",".join(args.arms),
            "--eval_seed",
            str(args.eval_seed),
            "--threads",
            "1",
            "--resolution",
            str(args.resolution),
            "--seed_only",
        ] + (["--hparams", args.hparams] if args.hparams else [])
        logfile = out / f"seed_{seed}.log"
        with open(logfile, "w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"error: seed {seed} failed (exit {code}); see {logfile}")
        log(f"seed {seed} finished (log: {logfile})")

    todo = [s for s in args.seeds if not (out / f"seed_{s}" / "rows.json").exists()]
    log(f"running seeds {todo} in {min(args.jobs, len(todo))} parallel workers; logs in {out}/seed_N.log")
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, todo))


def run_seed(base, cfg, seed, out, timer, hparams, arms=("sft", "spin", "spin-long", "dpo"), eval_seed=0):
    """All arms for one seed; returns the result rows (one per evaluated checkpoint)."""
    n_prompts = cfg["n_finetune"]
    S, half = cfg["spin_steps"], max(1, cfg["spin_steps"] // 2)
    gen = compute_generation(n_prompts, cfg["gen_steps"], hparams["spin"].get("gen_guidance_scale", cfg["guidance"]))
    per_iter = gen + compute_pairs(S, cfg["spin_batch"])
    total = 3 * per_iter
    sft_steps = 3 * max(1, round(total / (9 * cfg["sft_batch"])))  # 3 evaluated checkpoints: one per SPIN iteration
    sft_every = max(1, sft_steps // 3)
    dpo_steps = 3 * max(1, round(total / (24 * cfg["spin_batch"])))
    dpo_every = max(1, dpo_steps // 3)
    long_steps = cfg["long_factor"] * S
    epochs_per_step = cfg["spin_batch"] / n_prompts

    d = out / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    timer.run(f"seed{seed}/sft", lambda: run_sft(base, cfg, seed, d / "sft", sft_steps, sft_every, hparams["sft"]))
    timer.run(f"seed{seed}/spin", lambda: run_spin(base, cfg, seed, d / "spin", S, half, hparams["spin"], 3))
    if "spin-long" in arms:
        timer.run(
            f"seed{seed}/spin-long",
            lambda: run_spin_long(base, cfg, seed, d / "spin", d / "spin-long", long_steps, half, hparams["spin"]),
        )
    if "spin-traj" in arms:  # the same budget as spin: steps, pairs, sampler steps; spin's hyperparameters
        timer.run(
            f"seed{seed}/spin-traj",
            lambda: run_spin(base, cfg, seed, d / "spin-traj", S, half, hparams["spin"], 3, extra=TRAJECTORY_FLAGS),
        )
    if "dpo" in arms:
        timer.run(
            f"seed{seed}/dpo",
            lambda: run_spin(base, cfg, seed, d / "dpo", dpo_steps, dpo_every, hparams["dpo"], 1, "dataset"),
        )

    # The checkpoints to evaluate: name -> (path, row fields)
    models = {"base": (base / "theta0", dict(arm="base", iteration=0, epoch=0.0, compute=0))}
    for step in range(sft_every, sft_steps + 1, sft_every):
        path = d / "sft" / f"checkpoint-{step}" if step < sft_steps else d / "sft"
        if step < sft_steps and not path.exists():
            continue
        models[f"sft-{step}"] = (
            path,
            dict(
                arm="sft",
                iteration=None,
                epoch=step * cfg["sft_batch"] / n_prompts,
                compute=compute_sft(step, cfg["sft_batch"]),
            ),
        )
    for k in (1, 2, 3):
        for step, path in ((half, d / "spin" / f"iter_{k}" / f"checkpoint-{half}"), (S, d / "spin" / f"iter_{k}")):
            models[f"spin{k}-{step}"] = (
                path,
                dict(
                    arm="spin",
                    iteration=k,
                    epoch=((k - 1) * S + step) * epochs_per_step,
                    compute=(k - 1) * per_iter + gen + compute_pairs(step, cfg["spin_batch"]),
                ),
            )
    for k in (1, 2, 3) if "spin-traj" in arms else ():  # K = 1 stored step: a pair costs what spin's does
        models[f"spintraj{k}-{S}"] = (
            d / "spin-traj" / f"iter_{k}",
            dict(arm="spin-trajectory", iteration=k, epoch=k * S * epochs_per_step, compute=k * per_iter),
        )
    for step in range(S + half, long_steps + 1, half) if "spin-long" in arms else ():
        path = d / "spin-long" / "iter_1" / f"checkpoint-{step}" if step < long_steps else d / "spin-long" / "iter_1"
        models[f"long-{step}"] = (
            path,
            dict(
                arm="spin-iter1-continued",
                iteration=1,
                epoch=step * epochs_per_step,
                compute=gen + compute_pairs(step, cfg["spin_batch"]),
            ),
        )
    for step in range(dpo_every, dpo_steps + 1, dpo_every) if "dpo" in arms else ():
        path = d / "dpo" / "iter_1" / f"checkpoint-{step}" if step < dpo_steps else d / "dpo" / "iter_1"
        models[f"dpo-{step}"] = (
            path,
            dict(
                arm="dpo", iteration=None, epoch=step * epochs_per_step, compute=compute_pairs(step, cfg["spin_batch"])
            ),
        )
    results = timer.run(
        f"seed{seed}/evaluate",
        lambda: evaluate(base, cfg, {n: p for n, (p, _) in models.items()}, d / "eval", eval_seed),
    )
    rows = []
    per_prompt = results["per_prompt"]
    for name, (_, fields) in models.items():
        metrics = {k: v.get("mean", v.get("value")) for k, v in results["summary"][name].items() if k in METRICS}
        rows.append(
            fields
            | {
                "seed": seed,
                "model": name,
                "metrics": metrics,
                "per_prompt": {k: [p["scores"][name][k] for p in per_prompt] for k in METRICS if k != "toy_fd"},
            }
        )
    return rows


# ----------------------------------------------------------------------------- statistics and report


def seeds_prompts_ci(values, resamples=2000, seed=0):
    """Mean and 95% CI of a (seeds x prompts) array, by a two-level bootstrap (seeds, then prompts within them)."""
    a = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        s = rng.integers(0, a.shape[0], a.shape[0])
        p = rng.integers(0, a.shape[1], (a.shape[0], a.shape[1]))
        stats.append(a[s[:, None], p].mean())
    return float(a.mean()), [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def seeds_ci(values):
    """Mean and 95% t-interval over seeds (for one-value-per-model metrics such as toy_fd)."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), [float("nan"), float("nan")]
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(a), 1.96)
    half = t * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), [float(a.mean() - half), float(a.mean() + half)]


def group(rows):
    """model name -> rows of that checkpoint over the seeds (the same name means the same checkpoint)."""
    out = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def describe(rows_of_model):
    """{metric: (mean, ci)} over seeds x prompts (per-image metrics) or seeds (toy_fd)."""
    out = {}
    for k in METRICS:
        if k == "toy_fd":
            out[k] = seeds_ci([r["metrics"][k] for r in rows_of_model])
        else:
            out[k] = seeds_prompts_ci([r["per_prompt"][k] for r in rows_of_model])
    return out


def claim(rows, a, b, metric="toy_adherence"):
    """Paired difference a - b over the same seeds and prompts: (mean, 95% CI)."""
    g = group(rows)
    by_seed_b = {r["seed"]: r for r in g[b]}
    pairs = [(r, by_seed_b[r["seed"]]) for r in g[a] if r["seed"] in by_seed_b]
    if metric == "toy_fd":
        return seeds_ci([x["metrics"][metric] - y["metrics"][metric] for x, y in pairs])
    return seeds_prompts_ci([np.subtract(x["per_prompt"][metric], y["per_prompt"][metric]) for x, y in pairs])


def matched_sft(rows, compute):
    """The SFT checkpoint whose compute is nearest `compute`."""
    sft = {r["model"]: r["compute"] for r in rows if r["arm"] == "sft"}
    return min(sft, key=lambda m: abs(sft[m] - compute))


def report(rows, out, cfg, seeds):
    g = group(rows)
    order = sorted(
        g,
        key=lambda m: (
            ["base", "sft", "spin", "spin-trajectory", "spin-iter1-continued", "dpo"].index(g[m][0]["arm"]),
            g[m][0]["compute"],
        ),
    )
    fmt = lambda v, ci, d=3: f"{v:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"  # noqa: E731
    md = [
        f"# SPIN-Diffusion in the toy world: seeds {', '.join(map(str, seeds))}\n",
        f"{cfg['n_finetune']} fine-tuning prompts (one image each), {cfg['n_eval']} held-out prompts x "
        f"{cfg['eval_images']} images. Means with 95% CIs: two-level bootstrap over seeds and prompts "
        "(adherence, attributes), t-interval over seeds (FD, lower is better). Compute: UNet forward-equivalents "
        "per sample, generation included (see run.py).\n",
        "| checkpoint | arm | iteration | epochs | compute (k) | adherence | attributes | FD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in order:
        r0, d = g[m][0], describe(g[m])
        md.append(
            f"| {m} | {r0['arm']} | {r0['iteration'] if r0['iteration'] is not None else '-'} | {r0['epoch']:.1f} | "
            f"{r0['compute'] / 1e3:.0f} | {fmt(*d['toy_adherence'])} | {fmt(*d['toy_attributes'])} | "
            f"{fmt(*d['toy_fd'], d=2)} |"
        )
    S = cfg["spin_steps"]
    last = lambda k: f"spin{k}-{S}"  # noqa: E731
    claims = []
    for k in (1, 2, 3):
        sft = matched_sft(rows, g[last(k)][0]["compute"])
        claims.append((f"SPIN iteration {k} beats SFT at matched compute ({last(k)} vs {sft})", last(k), sft))
    dpo = {r["model"]: r["compute"] for r in rows if r["arm"] == "dpo"}
    if dpo:
        near = min(dpo, key=lambda m: abs(dpo[m] - g[last(3)][0]["compute"]))
        claims.append(
            (f"SPIN iteration 3 beats Diffusion-DPO at matched compute ({last(3)} vs {near})", last(3), near)
        )
    claims += [
        ("iteration 2 beats iteration 1", last(2), last(1)),
        ("iteration 3 beats iteration 2", last(3), last(2)),
    ]
    for k in (1, 2, 3):
        if f"spintraj{k}-{S}" in g:
            claims.append(
                (
                    f"the trajectory objective beats the approximate one, iteration {k}, matched compute",
                    f"spintraj{k}-{S}",
                    last(k),
                )
            )
    long_end = f"long-{cfg['long_factor'] * S}"
    if long_end in g:
        claims += [
            ("Fig. 5: iteration 1 continued improves on iteration 1 (no plateau if > 0)", long_end, last(1)),
            ("Fig. 5: iteration 2 beats iteration 1 continued, same epochs", last(2), long_end),
        ]
    md += [
        "",
        "## The paper's claims, as paired differences (a - b) on the same seeds and prompts",
        "",
        "A claim holds when the 95% CI of its attributes difference is above 0 "
        "(the primary metric: strict adherence is "
        "near its floor for every model at this size); the other columns are reported beside it.",
        "",
        "| claim | attributes a - b | adherence a - b | FD a - b (negative: a better) | holds |",
        "|---|---|---|---|---|",
    ]
    claim_rows = []
    for text, a, b in claims:
        diffs = {k: claim(rows, a, b, k) for k in METRICS}
        holds = diffs["toy_attributes"][1][0] > 0
        claim_rows.append(
            {
                "claim": text,
                "a": a,
                "b": b,
                "diff": {k: {"mean": v[0], "ci95": v[1]} for k, v in diffs.items()},
                "holds": holds,
            }
        )
        md.append(
            f"| {text} | {fmt(*diffs['toy_attributes'])} | {fmt(*diffs['toy_adherence'])} | "
            f"{fmt(*diffs['toy_fd'], d=2)} | {'yes' if holds else 'no'} |"
        )
    (out / "results.md").write_text("\n".join(md) + "\n")
    return claim_rows


def plots(rows, out, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group(rows)

    def series(arm, key):
        names = sorted((m for m in g if g[m][0]["arm"] == arm), key=lambda m: g[m][0][key])
        xs = [g[m][0][key] for m in names]
        stats = [describe(g[m]) for m in names]
        return names, xs, stats

    # Fig. 5: adherence against epochs; iteration 1 continued against iterations 2 and 3.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric, label in (
        (axes[0], "toy_attributes", "prompt attributes right (held-out)"),
        (axes[1], "toy_fd", "FD (lower is better)"),
    ):
        base = describe(g["base"])[metric][0]
        for arm, colour in (("spin", "C0"), ("spin-iter1-continued", "C1")):
            names, xs, stats = series(arm, "epoch")
            if arm == "spin-iter1-continued":  # starts where spin's iteration 1 ends
                first = [m for m in g if m == f"spin1-{cfg['spin_steps']}"]
                names, xs, stats = first + names, [g[first[0]][0]["epoch"]] + xs, [describe(g[first[0]])] + stats
            ys = [s[metric][0] for s in stats]
            err = [[y - s[metric][1][0] for y, s in zip(ys, stats)], [s[metric][1][1] - y for y, s in zip(ys, stats)]]
            ax.errorbar(
                [0] + xs if arm == "spin" else xs,
                [base] + ys if arm == "spin" else ys,
                yerr=[[0] + err[0], [0] + err[1]] if arm == "spin" else err,
                marker="o",
                capsize=3,
                color=colour,
                label="SPIN (iterations 1, 2, 3)" if arm == "spin" else "SPIN iteration 1 continued",
            )
        per_iter = cfg["spin_steps"] * cfg["spin_batch"] / cfg["n_finetune"]
        for k in (1, 2):
            ax.axvline(k * per_iter, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("epochs over the fine-tuning prompts")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(
        "More epochs in iteration 1 against starting iteration 2 (cf. the paper's Fig. 5); dotted: iteration ends"
    )
    fig.savefig(out / "fig5_epochs.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    # Fig. 3: metric per iteration per arm (SFT and DPO at the compute of each SPIN iteration).
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    S = cfg["spin_steps"]
    dpo = {m: g[m][0]["compute"] for m in g if g[m][0]["arm"] == "dpo"}
    for ax, metric, label in (
        (axes[0], "toy_attributes", "prompt attributes right (held-out)"),
        (axes[1], "toy_fd", "FD (lower is better)"),
    ):
        width = 0.27
        for j, (arm, colour) in enumerate((("sft", "C2"), ("dpo", "C3"), ("spin", "C0"))):
            xs, ys, lo, hi = [], [], [], []
            for k in (1, 2, 3):
                compute = g[f"spin{k}-{S}"][0]["compute"]
                m = {
                    "spin": f"spin{k}-{S}",
                    "sft": matched_sft(rows, compute),
                    "dpo": min(dpo, key=lambda n: abs(dpo[n] - compute)) if dpo else None,
                }[arm]
                if m is None:
                    continue
                v, ci = describe(g[m])[metric]
                xs.append(k + (j - 1) * width)
                ys.append(v)
                lo.append(v - ci[0])
                hi.append(ci[1] - v)
            ax.bar(
                xs,
                ys,
                width,
                yerr=[lo, hi],
                capsize=3,
                color=colour,
                label={"sft": "continued SFT", "dpo": "Diffusion-DPO", "spin": "SPIN"}[arm],
            )
        ax.axhline(describe(g["base"])[metric][0], color="gray", linestyle="--", linewidth=1, label="theta_0")
        ax.set_xticks([1, 2, 3], ["iteration 1", "iteration 2", "iteration 3"])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Per iteration, at the compute of each SPIN iteration (cf. the paper's Fig. 3); 95% CIs")
    fig.savefig(out / "fig3_iterations.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- main


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
        "--hparams", default=None, help="JSON file overriding HPARAMS ({arm: {learning_rate, beta}}), for tuning runs."
    )
    p.add_argument(
        "--resolution", type=int, default=32, help="Image size of the world (a multiple of 8; latents are 1/4 of it)."
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument(
        "--arms", default="sft,spin,spin-long,dpo", help="Comma-separated arms to run (tuning runs use sft,spin)."
    )
    p.add_argument(
        "--eval_seed", type=int, default=0, help="Seed of the evaluation images (the same for every model)."
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=3,
        help="Seeds run in parallel worker processes of one thread each (1: in this process).",
    )
    p.add_argument(
        "--seed_only", action="store_true", help=argparse.SUPPRESS
    )  # a worker of --jobs: its seeds, no report
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - {"sft", "spin", "spin-long", "dpo", "spin-traj"}
    if unknown or "sft" not in args.arms or "spin" not in args.arms:
        p.error(f"--arms: sft and spin are required; the others are spin-long, dpo, spin-traj (got {args.arms})")
    if args.resolution < 16 or args.resolution % 8:
        p.error(f"--resolution must be a multiple of 8 and at least 16, got {args.resolution}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(args):
    import build_base
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base_dir) if args.base_dir else out / "base"
    preset = PRESETS[args.preset]
    hparams = json.loads(json.dumps(HPARAMS))
    if args.hparams:
        for arm, values in json.loads(Path(args.hparams).read_text()).items():
            hparams[arm] |= values
    timer = Timer(out / "timings.json")
    t0 = time.time()
    built = timer.run("base", lambda: build_base.build(base, args.resolution, seed=0, **preset["base"]))
    data = base / "data"
    cfg = dict(
        preset,
        resolution=args.resolution,
        finetune=data / "finetune.parquet",
        finetune_pickapic=data / "finetune_pickapic.parquet",
    )
    eval_prompts = (data / "eval_prompts.txt").read_text().split("\n")
    eval_prompts = [p for p in eval_prompts if p][: preset["eval_prompts"] or None]
    cfg["eval_prompts_file"] = data / "eval_prompts.txt"
    n_finetune = len(__import__("datasets").load_dataset("parquet", data_files=str(cfg["finetune"]), split="train"))
    if preset["prompts"]:  # demo and quick modes: a subset of the fine-tuning prompts
        import datasets

        for key in ("finetune", "finetune_pickapic"):
            small = out / f"{key}_{preset['prompts']}.parquet"
            datasets.load_dataset("parquet", data_files=str(cfg[key]), split="train").select(
                range(preset["prompts"])
            ).to_parquet(small)
            cfg[key] = small
        n_finetune = preset["prompts"]
    cfg |= {"n_finetune": n_finetune, "n_eval": len(eval_prompts)}
    log(f"theta_0 ready in {base}; {n_finetune} fine-tuning prompts, {len(eval_prompts)} held-out; seeds {args.seeds}")

    if args.jobs > 1 and len(args.seeds) > 1:
        run_seeds_in_parallel(args, base, out)
    rows = []
    made_with = {
        "preset": args.preset,
        "resolution": args.resolution,
        "hparams": hparams,
        "arms": args.arms,
        "eval_seed": args.eval_seed,
        "base": str(base.resolve()),
    }
    for seed in args.seeds:
        done = out / f"seed_{seed}" / "rows.json"  # a seed's rows: written when it is complete (a rerun skips it)
        if not done.exists():
            seed_rows = run_seed(
                base, cfg, seed, out, Timer(out / f"seed_{seed}" / "timings.json"), hparams, args.arms, args.eval_seed
            )
            done.write_text(json.dumps({"made_with": made_with, "rows": seed_rows}) + "\n")
        saved = json.loads(done.read_text())
        if saved["made_with"] != json.loads(json.dumps(made_with)):
            raise SystemExit(
                f"error: {done} was made with other settings ({saved['made_with']}); use another --output_dir"
            )
        rows += saved["rows"]
        timer.data |= json.loads((out / f"seed_{seed}" / "timings.json").read_text())  # keys: seedN/phase
        log(f"seed {seed} done ({time.time() - t0:.0f} s so far)")
    if args.seed_only:
        return None
    claims = report(rows, out, cfg, args.seeds)
    plots(rows, out, cfg)
    shutil.copy(out / f"seed_{args.seeds[0]}" / "eval" / "grid.png", out / "grid.png")
    results = {
        "seeds": args.seeds,
        "preset": args.preset,
        "hparams": hparams,
        "base": built,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()},
        "compute_unit": "UNet forward-equivalents per sample (backward = 2 forwards); SFT step 3 x batch; "
        "SPIN/DPO step 8 x pairs; generation prompts x steps x 2 (CFG)",
        "runs": [
            {k: r[k] for k in ("arm", "seed", "iteration", "epoch", "compute", "metrics", "model")} for r in rows
        ],
        "per_prompt": [{k: r[k] for k in ("model", "seed", "per_prompt")} for r in rows],
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
