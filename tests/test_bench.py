"""The benchmarks run (CI smoke test on the tiny preset): no timing assertions, only that every mode's
step (the scripts' own step functions) and the generation comparison run and report what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_step_tiny_all_modes(tmp_path):
    out = tmp_path / "steps.json"
    cases = (
        "sft:full:fp32:adamw:gc0,spin:lora:fp32:adamw8bit:gc1,spin-pre:full:bf16:adamw:gc0,dpo:full:fp32:adamw:gc0,"
        "naive:full:fp32:adamw:gc0,sft:full:fp32:adamw:gc0:cl,spin-pre:full:fp32:adamw:gc0:emb"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_step.py"),
            "--preset",
            "tiny",
            "--cases",
            cases,
            "--steps",
            "1",
            "--warmup",
            "0",
            "--in_process",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == cases.split(",")
    assert all(r["step_s"] > 0 and r["peak_rss_gib"] > 0 for r in results)
    assert [r["unet_samples"] for r in results] == [1, 2, 2, 2, 2, 1, 2]
    assert "| spin:lora:fp32:adamw8bit:gc1 | 1 | 2 |" in proc.stdout and "/ naive" in proc.stdout
    # the text encoder's share is reported, except where the batch carries cached embeddings
    # (spin-pre and emb cases carry cached embeddings, as --precompute_reference stores them)
    assert [r["text_encoder_s"] is None for r in results] == [False, False, True, False, False, False, True]
    assert all(r["text_encoder_s"] > 0 for r in results if r["text_encoder_s"] is not None)


def test_bench_step_runs_each_family(tmp_path):
    """The families' presets (the tiny SDXL, SD3 and Flux.1 pipelines) run the LoRA SPIN step and the full SFT
    step, as gpu_check.sh's families stage does on their real configs."""
    cases = "spin:lora:fp32:adamw8bit:gc1,sft:full:fp32:adamw:gc0,spin-pre:full:fp32:adamw:gc0"
    for preset, family in (
        ("tiny-sdxl", "StableDiffusionXL"),
        ("tiny-sd3", "StableDiffusion3"),
        ("tiny-flux", "Flux"),
    ):
        out = tmp_path / f"{preset}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--preset", preset, "--cases", cases]
        cmd += ["--steps", "1", "--warmup", "0", "--in_process", "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(out.read_text())
        assert [r["case"] for r in results] == cases.split(",") and all(r["step_s"] > 0 for r in results)
        assert {r["family"] for r in results} == {f"{family}Pipeline"}


def test_bench_generate_counts_each_samplers_forwards(tmp_path):
    """--samplers: the UNet forwards per sample are counted, classifier-free guidance doubling each step."""
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_generate.py"), "--preset", "tiny", "--prompts", "2"]
    cmd += ["--batch", "2", "--steps", "2", "--samplers", "ddim:6,dpmsolver:4,unipc:3", "--json", str(out)]
    cmd += ["--iteration_prompts", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["samplers"]
    assert [(r["sampler"], r["forwards_per_sample"], r["forwards_per_iteration"]) for r in rows] == [
        ("ddim", 12, 12000),
        ("dpmsolver", 8, 8000),
        ("unipc", 6, 6000),
    ]
    assert all(r["img_s"] > 0 for r in rows) and "| dpmsolver | 4 | 8 | 0.01M |" in proc.stdout


def test_bench_rejects_a_bad_case():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_step.py"),
            "--preset",
            "tiny",
            "--cases",
            "spin:full:fp32:adamw:gc0:turbo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "OPTS" in proc.stderr


def test_bench_generate_tiny(tmp_path):
    out = tmp_path / "gen.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_generate.py"),
            "--preset",
            "tiny",
            "--prompts",
            "4",
            "--batch",
            "2",
            "--steps",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["generation_phase_img_s"] > 0 and r["plain_pipeline_img_s"] > 0 and r["vae_decode_s_per_image"] > 0
