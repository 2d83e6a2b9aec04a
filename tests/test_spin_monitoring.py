"""What a SPIN run tells its user about itself: --sft_weight (the SFT term against likelihood drift) reaches the loss,
the args and the card; the real-image error of the policy against theta_k (real_err_rise) in metrics.json, the
summary table and the card; and one warning when the margin saturated, counted across a resume."""

import json
import math

import pytest

import train_spin_diffusion
from helpers import run_spin, spin_args
from utils.spin import is_saturated, real_error_drift, rose_or_fell, saturation_warning

LOG2 = math.log(2)
TRAJ = ["--spin_objective", "trajectory", "--gen_scheduler", "ddpm", "--gen_num_inference_steps", "4"]


def metrics(out, k=1):
    return json.loads((out / f"iter_{k}" / "metrics.json").read_text())


def test_saturation_warning_needs_more_than_half_of_the_counted_steps():
    m = {"iteration": 2, "saturated_steps": 3, "counted_steps": 4}
    text = saturation_warning(m, 5000.0, 2e-5)
    assert text.startswith(
        "the SPIN margin saturated in iteration 2 (3 of 4 steps with implicit accuracy > 0.99 and loss < 0.01)"
    )
    assert "--beta 5000 and --learning_rate 2e-05" in text
    for advice in ("a smaller --beta or --learning_rate", "fewer --max_train_steps per iteration", "--sft_weight"):
        assert advice in text
    assert saturation_warning(m | {"saturated_steps": 2}, 5000.0, 2e-5) is None  # half is not more than half
    assert saturation_warning(m | {"saturated_steps": 0, "counted_steps": 0}, 5000.0, 2e-5) is None
    assert saturation_warning({"iteration": 1}, 5000.0, 2e-5) is None  # metrics.json from before the count


def test_a_step_is_saturated_by_its_preference_term():
    assert is_saturated({"implicit_acc": 1.0, "loss": 0.005})
    assert not is_saturated({"implicit_acc": 0.99, "loss": 0.0})  # accuracy must exceed 0.99
    assert not is_saturated({"implicit_acc": 1.0, "loss": 0.01})
    # with --sft_weight the total holds the SFT term; the margin is read from the preference term alone
    assert is_saturated({"implicit_acc": 1.0, "loss": 0.8, "spin_loss": 0.001})


def test_real_error_drift_and_its_words():
    last = {"model_err_real": 0.5, "ref_err_real": 0.4}
    mean = {"model_err_real": 0.3, "ref_err_real": 0.35}
    drift = real_error_drift(last, mean)
    assert drift["real_err_rise"] == pytest.approx(0.1) and drift["real_err_rise_mean"] == pytest.approx(-0.05)
    assert real_error_drift({}, {}) == {"real_err_rise": None, "real_err_rise_mean": None}
    assert rose_or_fell(0.1) == "+1.0e-01 rose" and rose_or_fell(-0.05) == "-5.0e-02 fell"
    assert rose_or_fell(0.0) == "0 same" and rose_or_fell(None) == "n/a"


@pytest.mark.parametrize(
    "mode",
    [["--use_lora"], ["--use_lora", "--negative_source", "dataset"], ["--use_lora", *TRAJ, "--trajectory_steps", "2"]],
    ids=["spin", "dpo", "trajectory"],
)
def test_sft_weight_run_adds_the_real_error_and_reports_the_drift(assets, tmp_path, capsys, mode):
    out = tmp_path / "sft1"
    run_spin(*spin_args(assets, out, *mode, "--num_iterations", "1", "--max_train_steps", "3", "--sft_weight", "1.0"))
    m = metrics(out)
    for step in (m["first_step"], m["last_step"]):  # loss = SPIN loss + 1.0 x the policy's real-image error
        assert step["loss"] == pytest.approx(step["spin_loss"] + step["model_err_real"], rel=1e-6)
    # the first step: policy = reference, so delta is 0 everywhere (half a hit) and the SPIN loss is log 2
    assert m["first_step"]["implicit_acc"] == 0.5 and m["first_step"]["spin_loss"] == pytest.approx(LOG2, abs=1e-6)
    last, mean = m["last_step"], m["mean"]
    assert m["real_err_rise"] == pytest.approx(last["model_err_real"] - last["ref_err_real"])
    assert m["real_err_rise_mean"] == pytest.approx(mean["model_err_real"] - mean["ref_err_real"])
    assert m["counted_steps"] == 3 and 0 <= m["saturated_steps"] <= 3

    assert json.loads((out / "iter_1" / "training_args.json").read_text())["sft_weight"] == 1.0
    card = (out / "iter_1" / "README.md").read_text()
    assert "| `sft_weight` | `1.0` |" in card
    assert (
        f"Real-image error at the last step: the policy {last['model_err_real']:.4g} against theta_k's (the "
        f"reference) {last['ref_err_real']:.4g}, a change of {m['real_err_rise']:+.3g}"
    ) in card
    assert ("the error rose" if m["real_err_rise"] > 0 else "the error did not rise") in card

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("iteration  steps"))
    assert "margin(mean)  margin(last)  real_err_rise" in header
    row = next(line for line in printed.splitlines() if line.strip().startswith("1 ") and str(out) in line)
    assert f"{mean['reward_margin']:.4g}" in row and f"{last['reward_margin']:.4g}" in row
    assert rose_or_fell(m["real_err_rise"]) in row


class Killed(Exception):
    pass


def test_saturated_margin_warns_once_and_the_count_survives_a_resume(assets, tmp_path, monkeypatch, caplog):
    """A huge beta and learning rate: from the second step on, every pair is told apart with loss 0. Killed right
    after checkpoint-4 and rerun, the iteration still counts the saturated steps of its first half."""
    out = tmp_path / "saturated"
    argv = spin_args(assets, out, "--num_iterations", "1", "--max_train_steps", "8", "--checkpointing_steps", "4")
    argv += ["--beta", "1e6", "--learning_rate", "1e-3"]
    real_save = train_spin_diffusion.save_checkpoint

    def save_then_die(accelerator, it_dir, step, *args, **kwargs):
        path = real_save(accelerator, it_dir, step, *args, **kwargs)
        if step == 4:
            raise Killed()
        return path

    with monkeypatch.context() as m:
        m.setattr(train_spin_diffusion, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_spin(*argv)
    carried = json.loads((out / "iter_1" / "checkpoint-4" / "spin_metrics.json").read_text())["saturated"]
    assert carried >= 1
    with caplog.at_level("WARNING"):
        run_spin(*argv)
    m = metrics(out)
    assert m["counted_steps"] == 8 and m["saturated_steps"] > 4  # more than the resumed half alone could hold
    assert m["saturated_steps"] - carried <= 4
    saturated = [r for r in caplog.records if "margin saturated" in r.getMessage()]
    assert [r.levelname for r in saturated] == ["WARNING"]  # exactly one warning
    warnings = [r.getMessage() for r in saturated]
    assert (
        f"the SPIN margin saturated in iteration 1 ({m['saturated_steps']} of 8 steps with implicit accuracy "
        "> 0.99 and loss < 0.01) at --beta 1e+06 and --learning_rate 0.001"
    ) in warnings[0]


def test_the_iteration_grid_leaves_training_unchanged(assets, tmp_path):
    """Each iteration's grid (here other prompts, more of them, more steps) changes nothing the run trains: both
    iterations' LoRA weights are the same bit for bit. The toy study's numbers were measured before iterations had
    grids; this keeps them reproducible with the grids on."""
    from helpers import tensors

    small, large = tmp_path / "small", tmp_path / "large"
    run_spin(*spin_args(assets, small, "--use_lora"))
    grid = ["--validation_prompts", "a red fox", "a blue car", "a cat", "--validation_num_inference_steps", "3"]
    run_spin(*spin_args(assets, large, "--use_lora", *grid))  # the last flag wins over spin_args' 2 steps
    for k in (1, 2):
        a, b = (tensors(out / f"iter_{k}" / "pytorch_lora_weights.safetensors") for out in (small, large))
        assert a.keys() == b.keys() and all((a[name] == b[name]).all() for name in a)
    assert (large / "iter_2" / "validation" / "002.png").exists() and not (
        small / "iter_2" / "validation" / "002.png"
    ).exists()


def test_extending_a_run_with_other_grid_flags_renders_the_grid_it_asks_for(assets, tmp_path):
    """A finished 1-iteration run extended to 2 with three other --validation_prompts: every column (theta_0 and
    iteration 1 too) is rendered again for them, and the grid labels them."""
    out = tmp_path / "out"
    run_spin(*spin_args(assets, out, "--use_lora", "--num_iterations", "1", "--num_validation_images", "2"))
    prompts = ["a purple elephant", "a green bicycle", "a red fox"]
    run_spin(*spin_args(assets, out, "--use_lora", "--validation_prompts", *prompts))
    for folder in (out / "validation_theta0", out / "iter_1" / "validation", out / "iter_2" / "validation"):
        assert sorted(p.name for p in folder.glob("*.png")) == ["000.png", "001.png", "002.png"]
        assert json.loads((folder / "settings.json").read_text())["prompts"] == prompts


def test_a_rerun_must_build_the_adapter_it_saved(assets, tmp_path, capsys):
    """Extending a LoRA run with another --rank, or without --use_lora, stops with one error line naming the flag,
    before anything is generated."""
    out = tmp_path / "out"
    run_spin(*spin_args(assets, out, "--use_lora", "--num_iterations", "1"))
    for extra, message in (
        (["--use_lora", "--rank", "8"], "have rank 4, the adapter this run builds has rank 8: rerun with the --rank"),
        ([], "iter_1 holds a LoRA adapter: this --output_dir was trained with --use_lora; rerun with --use_lora"),
    ):
        with pytest.raises(SystemExit) as e:
            train_spin_diffusion.cli(spin_args(assets, out, *extra))
        assert message in str(e.value) and str(e.value).startswith("error: ")
        assert not (out / "iter_2" / "synthetic").exists()


def test_no_grid_with_num_validation_images_0(assets, tmp_path):
    out = tmp_path / "out"
    run_spin(*spin_args(assets, out, "--use_lora", "--num_iterations", "1", "--num_validation_images", "0"))
    assert (out / "iter_1" / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "iter_1" / "validation_grid.png").exists()
    assert "validation_grid.png" not in (out / "iter_1" / "README.md").read_text()


def test_a_variant_only_model_and_a_home_relative_output_dir(assets, tmp_path, monkeypatch):
    """A pipeline folder holding only fp16-variant weights (what a variant="fp16" download leaves) runs a LoRA SPIN
    iteration to its grid with --variant fp16; "~" in --output_dir (from a config file, no shell) is the home."""
    from diffusers import StableDiffusionPipeline

    variant = tmp_path / "fp16-only"
    StableDiffusionPipeline.from_pretrained(str(assets["pipeline"])).save_pretrained(variant, variant="fp16")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    argv = spin_args(assets, "~/out", "--use_lora", "--num_iterations", "1", "--variant", "fp16")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(variant)
    run_spin(*argv)
    assert (tmp_path / "home" / "out" / "iter_1" / "validation_grid.png").exists()
