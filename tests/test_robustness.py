"""Runs driven to a non-finite loss stop with a message naming the step, save and push nothing non-finite, and
keep their earlier checkpoints and iterations; a resumed run takes a lowered learning rate."""

import json

import pytest
import torch

from helpers import reset_accelerate, run_sft, sft_args, spin_args, tensors
from hub_server import TEST_TOKEN, hub_online
from utils.training import DivergedError, assert_finite_weights, check_finite_step


def all_finite(folder):
    found = tensors(folder)
    return bool(found) and all(torch.isfinite(t.float()).all() for t in found.values())


def test_spin_iteration_2_diverges_iteration_1_stays_saved_and_pushed(assets, tmp_path, hub_server, monkeypatch):
    import train_spin_diffusion

    name, out = "test-user/spin-nan", tmp_path / "nan"
    real = train_spin_diffusion.train_iteration

    def explode_in_iteration_2(args, accelerator, k, *rest, **kw):
        if k == 1:
            args.learning_rate = 1e4  # drives iteration 2 to NaN within a few steps
        return real(args, accelerator, k, *rest, **kw)

    monkeypatch.setattr(train_spin_diffusion, "train_iteration", explode_in_iteration_2)
    argv = spin_args(
        assets,
        out,
        "--use_lora",
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "1",
        "--push_to_hub",
        "--hub_model_id",
        name,
        "--hub_token",
        TEST_TOKEN,
    )
    with hub_online():
        reset_accelerate()
        with pytest.raises(SystemExit) as exit_:
            train_spin_diffusion.cli(argv)
    message = str(exit_.value.code)
    assert message.startswith("error: training diverged at iteration 2, step ")
    step = int(message.split("step ")[1].split(":")[0])
    assert f"the last finite checkpoint is {out / 'iter_2' / f'checkpoint-{step - 1}'}" in message
    assert not (out / "iter_2" / "pytorch_lora_weights.safetensors").exists()  # no result saved for iteration 2
    assert not (out / "iter_2" / f"checkpoint-{step}").exists()
    for k in range(1, step):  # every checkpoint that was saved is finite
        assert all_finite(out / "iter_2" / f"checkpoint-{k}" / "pytorch_lora_weights.safetensors")
    assert all_finite(out / "iter_1" / "pytorch_lora_weights.safetensors")
    state = json.loads((out / "spin_state.json").read_text())
    assert state["done"] == [1] and set(state["pushed"]) == {"1"}
    assert hub_server.repo_exists(f"{name}-iter1") and not hub_server.repo_exists(f"{name}-iter2")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_diverges_saves_and_pushes_nothing(assets, tmp_path, hub_server, lora):
    import train_sft

    out, name = tmp_path / "nan", f"test-user/sft-nan-{lora}"
    flags = [
        "--checkpointing_steps",
        "1",
        "--max_train_steps",
        "6",
        "--push_to_hub",
        "--hub_model_id",
        name,
        "--hub_token",
        TEST_TOKEN,
    ] + (["--use_lora"] if lora else [])
    with hub_online():
        reset_accelerate()
        with pytest.raises(SystemExit) as exit_:
            train_sft.cli(sft_args(assets, out, *flags, "--learning_rate", "1e4"))
        message = str(exit_.value.code)
        assert message.startswith("error: training diverged at step ") and "non-finite" in message
        step = int(message.split("step ")[1].split(":")[0])
        assert f"the last finite checkpoint is {out / f'checkpoint-{step - 1}'}" in message
        assert not (out / "model_index.json").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
        assert not hub_server.repo_exists(name)
        checkpoints = sorted(out.glob("checkpoint-*"))
        assert [p.name for p in checkpoints] == [f"checkpoint-{k}" for k in range(1, step)]
        assert all(all_finite(p) for p in checkpoints)


def test_resumed_run_takes_the_new_learning_rate_on_the_checkpoints_schedule(assets, tmp_path, monkeypatch):
    import train_sft

    out = tmp_path / "lr"
    flags = ["--use_lora", "--lr_scheduler", "linear", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    run_sft(*sft_args(assets, out, *flags, "--learning_rate", "1e-3"))
    seen, real = [], train_sft.optimizer_step

    def record(accelerator, model, optimizer, *a, **k):
        seen.append(optimizer.param_groups[0]["lr"])
        return real(accelerator, model, optimizer, *a, **k)

    monkeypatch.setattr(train_sft, "optimizer_step", record)
    run_sft(*sft_args(assets, out, *flags, "--learning_rate", "1e-4", "--resume_from_checkpoint", "checkpoint-2"))
    assert seen == pytest.approx([1e-4 * 2 / 4, 1e-4 * 1 / 4])  # linear decay from step 2 of 4, at the new peak


def test_fp16_overflow_skips_are_not_divergence_but_nan_weights_are_never_saved():
    check_finite_step({"loss": 0.7, "grad_norm": float("inf")}, where="step 3", last_checkpoint="x", skipped=True)
    with pytest.raises(DivergedError, match="skipped 25 steps in a row"):  # overflowing at any scale: divergence
        check_finite_step(
            {"loss": float("inf")}, where="step 30", last_checkpoint="x", skipped=True, skipped_in_a_row=25
        )
    with pytest.raises(DivergedError, match="step 3: non-finite grad_norm=inf"):
        check_finite_step({"loss": 0.7, "grad_norm": float("inf")}, where="step 3", last_checkpoint="x")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert_finite_weights(model, "the result")
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(
        DivergedError, match=r"the result: 1 parameter tensor\(s\) hold non-finite values \(e.g. 1.bias\)"
    ):
        assert_finite_weights(model, "the result")
