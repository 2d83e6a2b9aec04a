"""The toy world (examples/toy/): its judges read drawings exactly, evaluate.py serves them as metrics, and the
protocol runs end to end through the real scripts in its quick mode. No claim about the method is asserted here:
the claims live in the experiment (README "Does it work?")."""

import json
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "toy"))

import world  # noqa: E402

from scorers.toy import ToyAdherence, checks, frechet_distance, parse_caption  # noqa: E402

SPEC = world.world_spec() | {"resolution": 32}


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge")
    (d / "world.json").write_text(json.dumps(SPEC))
    return d


def test_captions_parse_to_their_scene():
    caps = world.all_captions()
    assert len(caps) == 48 + 432 and len(set(caps)) == len(caps)
    assert parse_caption("a red circle above a blue square", SPEC) == {
        "objects": [("red", "circle"), ("blue", "square")],
        "relation": "above",
    }
    assert parse_caption("a green triangle on the left", SPEC) == {
        "objects": [("green", "triangle")],
        "position": "left",
    }
    assert parse_caption("an astronaut riding a horse", SPEC) is None


def test_judge_reads_real_drawings_and_rejects_wrong_ones(judge_dir):
    rng = random.Random(0)
    caps = rng.sample(world.all_captions(), 80)
    real = [Image.fromarray(world.render(c, seed=123)) for c in caps]
    wrong = [Image.fromarray(world.render(world.wrong_caption(c, rng), seed=123)) for c in caps]
    strict, soft = ToyAdherence(judge_dir), ToyAdherence(judge_dir, strict=False)
    assert sum(strict.score(real, caps)) / len(caps) >= 0.95
    assert sum(strict.score(wrong, caps)) / len(caps) <= 0.05  # one attribute changed: not what was asked
    attrs = soft.score(wrong, caps)
    assert 0.3 < sum(attrs) / len(attrs) < 0.9 and max(attrs) < 1  # much of the caption still holds, never all of it
    blank = Image.new("RGB", (32, 32), (51, 51, 51))
    assert checks(caps[0], blank, SPEC)[0] is False and strict.score([blank], caps[:1]) == [0.0]


def test_splits_hold_out_prompts_and_pairs_are_honest(tmp_path):
    import pyarrow.parquet as pq

    split = world.build_datasets(tmp_path, pretrain_images=20)
    assert not set(split["finetune"]) & set(split["held_out"])
    t = pq.read_table(tmp_path / "finetune_pickapic.parquet").to_pydict()
    spec = SPEC
    for i in range(10):
        win, lose = ("jpg_0", "jpg_1") if t["label_0"][i] == 1 else ("jpg_1", "jpg_0")
        import io

        assert all(checks(t["caption"][i], Image.open(io.BytesIO(t[win][i])), spec))
        assert not all(checks(t["caption"][i], Image.open(io.BytesIO(t[lose][i])), spec))


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    import numpy as np

    a = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a + 1.0, a) == pytest.approx(8.0, rel=0.05)


def test_toy_metrics_need_a_judge(capsys):
    import evaluate

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "a=b", "--metrics", "toy_adherence"])
    assert "--toy_judge" in capsys.readouterr().err


def test_quick_protocol_writes_results_plots_and_a_labelled_grid(tmp_path):
    """run.py --preset quick: theta_0 built from scratch, stage 1 to its stopping rule, every stage-2 arm from S and
    the secondary design through the scripts, 2 seeds, both splits, all outputs. No claim is asserted."""
    import run

    out = tmp_path / "toy"
    results = run.main(run.parse_args(["--preset", "quick", "--seeds", "0", "1", "--output_dir", str(out)]))
    saved = json.loads((out / "results.json").read_text())
    rows = saved["runs"]
    assert rows == results["runs"]
    assert {r["split"] for r in rows} == {"validation", "test"}
    assert {r["stage"] for r in rows} == {"from_sft", "from_theta0"}
    assert {r["arm"] for r in rows if r["stage"] == "from_sft"} == {"S", *run.ARMS}
    assert {r["arm"] for r in rows if r["stage"] == "from_theta0"} == {"theta0", "sft0", "from0-spin", "from0-dpo"}
    assert {r["seed"] for r in rows if r["stage"] == "from_theta0"} == {0}  # the secondary design: first seed only
    for seed in (0, 1):
        for split in ("validation", "test"):
            names = [r["name"] for r in rows if r["seed"] == seed and r["split"] == split and r["stage"] == "from_sft"]
            assert len(names) == len(set(names)) >= 12  # unique within a seed and split
            rendered = {p.name for p in (out / f"seed_{seed}" / "stage2" / f"eval_{split}" / "images").iterdir()}
            assert set(names) == rendered  # each row is a checkpoint evaluate.py rendered
        s1 = json.loads((out / f"seed_{seed}" / "stage1" / "chosen.json").read_text())
        assert s1["step"] == run.stage1_stop(
            {int(k): v for k, v in s1["curve"].items()}, run.PRESETS["quick"]["stage1"]
        )
    same = lambda seed: {r["name"] for r in rows if r["seed"] == seed and r["stage"] == "from_sft"}  # noqa: E731
    assert same(0) == same(1)  # the same names across seeds
    for r in rows:
        assert set(r["metrics"]) == {"toy_adherence", "toy_attributes", "toy_fd"}
        assert 0 <= r["metrics"]["toy_adherence"] <= 1 and r["metrics"]["toy_fd"] >= 0
    test_names = {r["name"] for r in rows if r["split"] == "test"}
    assert len(saved["claims"]) >= 7
    for c in saved["claims"]:
        assert set(c) >= {"claim", "metric", "a", "b", "diff", "ci_low", "ci_high", "holds"}
        assert c["a"] in test_names and c["b"] in test_names and c["metric"] == "toy_adherence"
        assert c["ci_low"] <= c["diff"] <= c["ci_high"]
    spin = max(r["compute"] for r in rows if r["arm"] == "spin" and r["stage"] == "from_sft")
    sft = max(r["compute"] for r in rows if r["arm"] == "sft")
    assert abs(sft - spin) / spin < 0.25  # continued SFT gets SPIN's compute (generation included)
    md = (out / "results.md").read_text()
    assert "| claim |" in md and "SPIN iteration 1 beats continued SFT" in md and "nan" not in md
    for name in ("fig5_epochs.png", "fig3_iterations.png", "grid.png"):
        assert Image.open(out / name).size[0] > 300
    n_models = len({r["name"] for r in rows if r["seed"] == 0 and r["split"] == "test" and r["stage"] == "from_sft"})
    width, height = Image.open(out / "grid.png").size
    assert width == 260 + 128 * n_models  # prompt labels on the left, one column per model
    assert height > 128 * 6  # a header row with the model names above the 6 prompt rows
    # the sampler check (issue 19, C1) on this study: both parts run and report what they promise
    import sampler_check

    argv = ["--study", str(out), "--seeds", "0", "1", "--preset", "quick", "--prompts", "8"]
    sampler_check.main(argv + ["--output_dir", str(tmp_path / "samplers")])
    check = json.loads((tmp_path / "samplers" / "sampler_check.json").read_text())
    samples, spin = check["opponent_samples"], check["spin_iteration"]
    assert samples["ddim50-a"]["forwards_per_sample"] == 2.5 * samples["dpm20"]["forwards_per_sample"]
    assert samples["fd_null_95"] >= 0
    assert all(isinstance(samples[k]["same_distribution"], bool) for k in ("dpm20", "dpm10"))
    low, high = spin["dpm20_minus_ddim50"][1]
    assert low <= spin["dpm20_minus_ddim50"][0] <= high and spin["equal_within_ci"] == (low <= 0 <= high)


def test_stage1_rule_stops_where_validation_flattens():
    import run

    rule = dict(every=100, min_steps=400, window=200, min_gain=0.03, max_steps=1000)
    rising = {n: n / 1000 for n in range(100, 1100, 100)}  # +0.2 per 200 steps: never flat, stops at max_steps
    assert run.stage1_stop({n: v for n, v in rising.items() if n <= 600}, rule) is None
    assert run.stage1_stop(rising, rule) == 1000
    flat_after_500 = {n: min(n, 500) / 1000 for n in range(100, 1100, 100)}
    # at 700: mean(700, 600) - mean(500, 400) = 0.5 - 0.45 = 0.05; at 800: 0.5 - 0.5 = 0 < 0.03
    assert run.stage1_stop(flat_after_500, rule) == 800


def test_one_seed_intervals_are_shown_as_such_never_as_nan():
    import run

    mean, ci = run.seeds_ci([7.5])
    assert mean == 7.5 and ci is None
    assert run.fmt(mean, ci, d=2) == "7.50 (one seed: no interval)"
    mean, ci = run.seeds_prompts_ci([[1.0, 0.0, 1.0, 1.0]])  # one seed: an interval over the prompts
    assert ci[0] < mean < ci[1] and "nan" not in run.fmt(mean, ci)


def test_readme_quotes_the_committed_results():
    """The README's claims table is examples/toy/results/results.json's `claims`, row for row, and every claim it
    says holds rests on 2 or more seeds with a CI above 0."""
    import run

    results = json.loads((ROOT / "examples" / "toy" / "results" / "results.json").read_text())
    section = (ROOT / "README.md").read_text().split("## Does it work?")[1].split("\n## ")[0]
    assert results["claims"], "results.json has no claims"
    for c in results["claims"]:
        assert run.readme_claim_row(c) in section, c["claim"]
        assert c["holds"] == (c["n_seeds"] >= 2 and c["ci_low"] > 0)
        assert c["metric"] == "toy_adherence"
    names = {(r["name"], r["seed"]) for r in results["runs"] if r["split"] == "test"}
    assert all((c["a"], s) in names and (c["b"], s) in names for c in results["claims"] for s in results["seeds"][:1])


def test_search_refuses_a_trial_folder_made_with_other_settings(tmp_path):
    """A search trial's trained models are reused on rerun only when its folder was made with the same settings
    and evaluation seed; otherwise the search stops before training or scoring anything."""
    import run

    cfg = dict(run.PRESETS["quick"])
    first = run.ARM_BASE["spin-traj"] | run.grids(cfg)["spin-traj"][0][0]
    trial = tmp_path / "search" / "spin-traj-0"
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text(json.dumps({"hparams": first, "eval_seed": 1}))  # another evaluation seed
    with pytest.raises(SystemExit, match="error: .*spin-traj-0 holds a run made with"):
        run.tune_arm(None, cfg, 100, tmp_path, None, "spin-traj", 0)
    assert not (tmp_path / "search_spin-traj.json").exists()
