"""evaluate.py end to end: two tiny models, a 6-prompt file, the four tiny scorers in the official formats
(tests/golden) -> results.json, results.md, plots and the grid; a rerun reuses the generated images."""

import json
import statistics
from pathlib import Path

import pytest

import evaluate
from helpers import run_sft, sft_args

GOLDEN = Path(__file__).resolve().parent / "golden"
SCORER_FLAGS = [
    "--pickscore_model",
    GOLDEN / "clip/pickscore/model",
    "--pickscore_processor",
    GOLDEN / "clip/pickscore/processor",
    "--hps_checkpoint",
    GOLDEN / "clip/hps/HPS_v2.1_compressed.pt",
    "--hps_processor",
    GOLDEN / "clip/hps/processor",
    "--imagereward_checkpoint",
    GOLDEN / "imagereward",
    "--imagereward_tokenizer",
    GOLDEN / "imagereward/tokenizer",
    "--aesthetic_head",
    GOLDEN / "clip/aesthetic/sac+logos+ava1-l14-linearMSE.pth",
    "--aesthetic_clip_model",
    GOLDEN / "clip/aesthetic/clip",
]


def assert_per_image_scores(saved, models, metrics):
    """results.json's per_image: one entry per (prompt, image), prompt-major, each image's generation seed, and
    scores whose per-prompt means are per_prompt's values."""
    n_prompts, n_img = saved["num_prompts"], saved["num_images_per_prompt"]
    rows = saved["per_image"]
    assert len(rows) == n_prompts * n_img
    assert [(r["prompt_index"], r["image_index"]) for r in rows] == [
        (i, j) for i in range(n_prompts) for j in range(n_img)
    ]
    assert len({r["seed"] for r in rows}) == len(rows)
    for i, p in enumerate(saved["per_prompt"]):
        mine = rows[i * n_img : (i + 1) * n_img]
        assert {r["prompt"] for r in mine} == {p["prompt"]} and mine[0]["seed"] == p["seed"]
        for model in models:
            assert set(mine[0]["scores"][model]) == set(metrics)
            for k in metrics:
                mean = sum(r["scores"][model][k] for r in mine) / n_img
                assert mean == pytest.approx(p["scores"][model][k], rel=1e-12, abs=1e-12)


def test_two_models_six_prompts_all_metrics(assets, tmp_path, monkeypatch):
    lora = tmp_path / "lora"
    run_sft(*sft_args(assets, lora, "--use_lora", "--max_train_steps", "3", "--learning_rate", "5e-3"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red fox\na blue car\nthe moon over a lake\na bowl of soup\na castle on a hill\na small boat\n"
    )
    out = tmp_path / "eval"
    argv = [
        "--model",
        f"base={assets['pipeline']}",
        "--model",
        f"sft={lora}",
        "--base_model",
        str(assets["pipeline"]),
        "--baseline",
        "base",
        "--prompts",
        str(prompts),
        "--num_inference_steps",
        "3",
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
        "--bootstrap_resamples",
        "200",
        *map(str, SCORER_FLAGS),
    ]  # no --resolution or --guidance_scale: the model's own (32 px for the tiny UNet; SD's 7.5)
    results = evaluate.main(evaluate.parse_args(argv))

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"baseline", "models", "metrics", "per_prompt", "summary"} <= set(saved)
    metrics = ["pickscore", "hpsv2", "imagereward", "aesthetic"]
    assert saved["baseline"] == "base" and saved["metrics"] == metrics and set(saved["models"]) == {"base", "sft"}
    assert {(m["resolution"], m["guidance_scale"]) for m in saved["models"].values()} == {(32, 7.5)}
    assert [p["prompt"] for p in saved["per_prompt"]] == prompts.read_text().split("\n")[:6]
    assert len({p["seed"] for p in saved["per_prompt"]}) == 6
    for model in ("base", "sft"):
        for k in metrics:
            entry = saved["summary"][model][k]
            xs = [p["scores"][model][k] for p in saved["per_prompt"]]
            bs = [p["scores"]["base"][k] for p in saved["per_prompt"]]
            assert entry["mean"] == statistics.fmean(xs) and entry["median"] == statistics.median(xs)
            expected = sum(1.0 if x > b else 0.5 if x == b else 0.0 for x, b in zip(xs, bs)) / 6
            assert entry["win_rate"] == expected and 0 <= entry["win_rate"] <= 1
            lo, hi = entry["win_rate_ci"]
            assert 0 <= lo <= entry["win_rate"] <= hi <= 1
        avg = saved["summary"][model]["average"]["win_rate"]
        assert avg == statistics.fmean(saved["summary"][model][k]["win_rate"] for k in metrics)
    assert saved["summary"]["base"]["pickscore"]["win_rate"] == 0.5  # against itself: all ties
    assert_per_image_scores(saved, ["base", "sft"], metrics)
    # The LoRA changed the images, so at least one metric sees a difference on some prompt.
    assert any(p["scores"]["sft"][k] != p["scores"]["base"][k] for p in saved["per_prompt"] for k in metrics)
    md = (out / "results.md").read_text()
    assert "### Mean" in md and "### Median" in md and "Win rate against base" in md and "| sft |" in md
    for f in ("radar.png", "win_rates.png", "grid.png"):
        assert (out / f).stat().st_size > 1000
    from PIL import Image

    grid = Image.open(out / "grid.png").convert("L")
    width, height = grid.size  # 32 px images enlarged to 128 px; prompt text on the left, model names on top
    assert width == 260 + 2 * 128 and 6 * 128 < height < 6 * 128 + 60
    header = height - 6 * 128
    for row in range(6):  # each row's prompt is written in the label column
        assert grid.crop((0, header + row * 128, 260, header + (row + 1) * 128)).getextrema()[0] < 100
    assert grid.crop((260, 0, width, header)).getextrema()[0] < 100  # the model names
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 12
    mtimes = {p: p.stat().st_mtime_ns for p in images}

    def no_loading(*a, **k):
        raise AssertionError("the rerun regenerated images")

    monkeypatch.setattr(evaluate, "load_pipeline", no_loading)
    again = evaluate.main(evaluate.parse_args(argv))
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    assert again["summary"] == results["summary"]


def test_push_results_adds_model_index_to_hub_card(assets, tmp_path, hub_server, monkeypatch):
    import yaml
    from huggingface_hub import HfApi

    from hub_server import TEST_TOKEN, hub_online

    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\n")
    with hub_online():
        api = HfApi(token=TEST_TOKEN)
        repo = api.create_repo("test-user/eval-card", exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(assets["pipeline"]))
        results = evaluate.main(
            evaluate.parse_args(
                [
                    "--model",
                    f"hub={repo}",
                    "--model",
                    f"local={assets['pipeline']}",
                    "--prompts",
                    str(prompts),
                    "--resolution",
                    "32",
                    "--num_inference_steps",
                    "2",
                    "--output_dir",
                    str(tmp_path / "eval"),
                    "--metrics",
                    "aesthetic,pickscore",
                    "--num_images_per_prompt",
                    "2",
                    "--push_results_to_hub",
                    *map(str, SCORER_FLAGS),
                ]
            )
        )
        card = hub_server.read_file(repo, "README.md").decode()
    meta = yaml.safe_load(card.split("---")[1])
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {k: round(results["summary"]["hub"][k]["mean"], 6) for k in ("aesthetic", "pickscore")}
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["num_images_per_prompt"] == 2 and len(saved["per_image"]) == 4
    assert_per_image_scores(saved, ["hub", "local"], ["aesthetic", "pickscore"])
    # two images per prompt: their scores differ, and per_prompt holds their mean
    assert saved["per_image"][0]["scores"]["local"] != saved["per_image"][1]["scores"]["local"]


def test_two_process_generation_splits_the_prompts(assets, tmp_path):
    import os
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\nthe moon\na bowl of soup\na castle\n")
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29541",
        str(Path(__file__).resolve().parent.parent / "evaluate.py"),
        "--model",
        f"base={assets['pipeline']}",
        "--prompts",
        str(prompts),
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        "--output_dir",
        str(out),
        "--metrics",
        "aesthetic",
        *map(str, SCORER_FLAGS),
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "images" / "base").glob("*.png")) == [f"{i:05d}_0.png" for i in range(5)]
    assert len(json.loads((out / "results.json").read_text())["per_prompt"]) == 5
    assert "generating base: 100%" in proc.stderr and "| 3/3 " in proc.stderr  # rank 0 made prompts 0, 2, 4 only
