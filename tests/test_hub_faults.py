"""A Hub that misbehaves: writes retried with backoff (429 + Retry-After, 5xx, dropped connections), pushes that
still fail leave every iteration trained and saved, the run exits with the list of what is unpushed, and a rerun
of the same command pushes them without generating or training."""

import json
import time
from unittest import mock

import pytest

from helpers import reset_accelerate, run_sft, run_spin, sft_args, spin_args, tensors
from hub_server import TEST_TOKEN, WRITE_ENDPOINTS, hub_online


def test_with_retries_backs_off_honours_retry_after_and_never_retries_auth_errors(hub_server):
    from huggingface_hub import create_repo

    from utils.hub import with_retries

    sleeps = []
    with hub_online():
        hub_server.inject("POST", r"^/api/repos/create", status=429, retry_after=7, times=1)
        hub_server.inject("POST", r"^/api/repos/create", status=503, times=2)
        repo = with_retries(create_repo, "test-user/flaky", token=TEST_TOKEN, exist_ok=True, sleep=sleeps.append)
        assert repo.repo_id == "test-user/flaky" and hub_server.repo_exists("test-user/flaky")
        assert sleeps == [7.0, 4.0, 8.0]  # Retry-After first, then exponential backoff (2 s doubling per attempt)

        for status in (401, 403, 404):  # need the user, not time: raised at once
            hub_server.inject("POST", r"^/api/repos/create", status=status, times=1)
            sleeps.clear()
            with pytest.raises(Exception) as err:
                with_retries(create_repo, "test-user/refused", token=TEST_TOKEN, exist_ok=True, sleep=sleeps.append)
            assert err.value.response.status_code == status and sleeps == []

        hub_server.inject("POST", r"^/api/repos/create", status=500, times=None)
        sleeps.clear()
        with pytest.raises(Exception) as err:  # the time budget ends the retries; the last error is raised
            with_retries(
                create_repo, "test-user/down", token=TEST_TOKEN, exist_ok=True, sleep=sleeps.append, max_time=3
            )
        hub_server.clear_faults()
        assert err.value.response.status_code == 500 and sleeps == [2.0]  # a 4 s wait would pass the 3 s budget


def test_spin_run_pushes_through_429_500s_and_a_dropped_upload(assets, tmp_path, hub_server):
    """R1: one 429 on repo creation, two 500s on commits and one dropped LFS connection: both iterations are
    pushed in one run, which ends normally."""
    name = "test-user/spin-flaky"
    faults = [
        hub_server.inject("POST", r"^/api/repos/create", status=429, retry_after=1, times=1),
        hub_server.inject("POST", r"/commit/", status=500, times=2),
        hub_server.inject("PUT", r"^/lfs-upload/", drop=True, times=1),
    ]
    try:
        with hub_online():
            run_spin(
                *spin_args(
                    assets,
                    tmp_path / "out",
                    "--use_lora",
                    "--push_to_hub",
                    "--hub_model_id",
                    name,
                    "--hub_token",
                    TEST_TOKEN,
                    "--hub_retry_max_time",
                    "120",
                )
            )
    finally:
        hub_server.clear_faults()
    assert [len(f.hits) for f in faults] == [1, 2, 1]  # every fault was met
    state = json.loads((tmp_path / "out" / "spin_state.json").read_text())
    assert state["pushed"] == {"1": f"{name}-iter1", "2": f"{name}-iter2"} and not state.get("push_errors")
    for k in (1, 2):
        assert "pytorch_lora_weights.safetensors" in hub_server.files(f"{name}-iter{k}")
        assert (
            hub_server.read_file(f"{name}-iter{k}", "pytorch_lora_weights.safetensors")
            == (tmp_path / "out" / f"iter_{k}" / "pytorch_lora_weights.safetensors").read_bytes()
        )


def test_spin_trains_every_iteration_when_all_writes_fail_then_a_rerun_only_pushes(
    assets, tmp_path, hub_server, monkeypatch, capsys
):
    """R2: every write fails from the start while the token check works. Both iterations train and save, the
    run exits non-zero naming each unpushed iteration and the command; once the Hub is back, the same command
    pushes them all with no generation or training."""
    import train_spin_diffusion

    name, out = "test-user/spin-down", tmp_path / "out"
    argv = spin_args(
        assets,
        out,
        "--use_lora",
        "--push_to_hub",
        "--hub_model_id",
        name,
        "--hub_token",
        TEST_TOKEN,
        "--hub_retry_max_time",
        "1",
    )
    down = hub_server.inject(None, WRITE_ENDPOINTS, status=503, times=None)
    with hub_online():
        reset_accelerate()
        with pytest.raises(SystemExit) as exit_:
            train_spin_diffusion.cli(argv)
        hub_server.clear_faults()
        message = str(exit_.value.code)
        assert message.startswith("error: 2 iteration(s) trained and saved but not pushed")
        assert f"iteration 1: {out / 'iter_1'}" in message and f"iteration 2: {out / 'iter_2'}" in message
        assert "HTTP 503" in message and "accelerate launch train_spin_diffusion.py" in message
        assert TEST_TOKEN not in message and "--hub_token '$HF_TOKEN'" not in message and "$HF_TOKEN" in message
        assert down.hits and not hub_server.repo_exists(f"{name}-iter1")
        state = json.loads((out / "spin_state.json").read_text())
        assert state["done"] == [1, 2] and state["pushed"] == {} and set(state["push_errors"]) == {"1", "2"}
        saved = {k: tensors(out / f"iter_{k}" / "pytorch_lora_weights.safetensors") for k in (1, 2)}

        def must_not_run(*a, **k):
            raise AssertionError("a push-only rerun must not load models, generate or train")

        for fn in ("load_frozen_components", "generate_opponent_samples", "train_iteration"):
            monkeypatch.setattr(train_spin_diffusion, fn, must_not_run)
        run_spin(*argv)
    state = json.loads((out / "spin_state.json").read_text())
    assert set(state["pushed"]) == {"1", "2"} and not state["push_errors"]
    for k in (1, 2):
        assert (
            hub_server.read_file(f"{name}-iter{k}", "pytorch_lora_weights.safetensors")
            == (out / f"iter_{k}" / "pytorch_lora_weights.safetensors").read_bytes()
        )
        after = tensors(out / f"iter_{k}" / "pytorch_lora_weights.safetensors")
        assert all((saved[k][key] == after[key]).all() for key in after)


def test_an_outage_costs_one_retry_budget_per_run_not_per_iteration(assets, tmp_path, hub_server):
    """C3: with every write failing, a 2-iteration run takes at most about one --hub_retry_max_time longer than the
    same run without the outage: iteration 1's retries run in the background while iteration 2 trains, and the
    end waits one budget for what is left (pushing in line would cost one budget per iteration and more)."""
    import train_spin_diffusion

    budget, pause = 8.0, 3.0

    def timed_run(out, repo):
        argv = spin_args(assets, out, "--use_lora", "--max_train_steps", "2", "--push_to_hub", "--hub_model_id")
        argv += [repo, "--hub_token", TEST_TOKEN, "--hub_retry_max_time", str(budget)]
        reset_accelerate()
        start = time.monotonic()
        try:
            train_spin_diffusion.cli(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        return time.monotonic() - start, code

    with hub_online():
        clear, code = timed_run(tmp_path / "clear", "test-user/outage-clear")
        assert code == 0
        outage = hub_server.inject(None, WRITE_ENDPOINTS, status=503, times=None)
        load, train, during = train_spin_diffusion.load_policy_and_reference, train_spin_diffusion.train_iteration, {}

        def load_counting(args, k, *rest):  # iteration 2 starts: iteration 1's push was submitted just before
            if k == 1:
                during["start"] = len(outage.hits)
            return load(args, k, *rest)

        def train_counting(args, accelerator, k, *rest, **kw):
            metrics = train(args, accelerator, k, *rest, **kw)
            if k == 1:  # a tiny iteration is quicker than the first retry's 2 s backoff: train a little longer
                time.sleep(pause)
                during["end"] = len(outage.hits)
            return metrics

        try:
            with (
                mock.patch.object(train_spin_diffusion, "load_policy_and_reference", load_counting),
                mock.patch.object(train_spin_diffusion, "train_iteration", train_counting),
            ):
                down, message = timed_run(tmp_path / "down", "test-user/outage-down")
        finally:
            hub_server.clear_faults()
    assert str(message).startswith("error: 2 iteration(s) trained and saved but not pushed")
    assert during["end"] > during["start"], during  # iteration 1's push retried while iteration 2 ran
    assert down - pause - clear < 1.25 * budget, (down, clear)  # measured: +7.5 s; pushing in line: +17.3 s


def test_spin_push_recovering_midway_is_retried_after_the_next_iteration(assets, tmp_path, hub_server):
    """Iteration 1's push fails; the Hub recovers while iteration 2 trains; the push submitted after iteration 2
    brings iterations 1 and 2 to the Hub while iteration 3 runs, not only at the end."""
    import train_spin_diffusion

    name, out = "test-user/spin-recovers", tmp_path / "out"
    down = hub_server.inject(None, WRITE_ENDPOINTS, status=500, times=None)
    real, on_hub_before = train_spin_diffusion.train_iteration, {}

    def train_then_recover(args, accelerator, k, *rest, **kw):
        if k == 2:  # the pushes run in the background: give the one submitted after iteration 2 time to land
            for _ in range(200):
                if all(hub_server.repo_exists(f"{name}-iter{i}") for i in (1, 2)):
                    break
                time.sleep(0.05)
        on_hub_before[k] = [hub_server.repo_exists(f"{name}-iter{i}") for i in (1, 2)]
        if k == 1:  # the Hub comes back during iteration 2
            hub_server.clear_faults()
        return real(args, accelerator, k, *rest, **kw)

    train_spin_diffusion.train_iteration = train_then_recover
    try:
        with hub_online():
            run_spin(
                *spin_args(
                    assets,
                    out,
                    "--use_lora",
                    "--num_iterations",
                    "3",
                    "--max_train_steps",
                    "2",
                    "--push_to_hub",
                    "--hub_model_id",
                    name,
                    "--hub_token",
                    TEST_TOKEN,
                    "--hub_retry_max_time",
                    "1",
                )
            )
    finally:
        train_spin_diffusion.train_iteration = real
        hub_server.clear_faults()
    assert down.hits
    assert on_hub_before == {0: [False, False], 1: [False, False], 2: [True, True]}
    assert set(json.loads((out / "spin_state.json").read_text())["pushed"]) == {"1", "2", "3"}


def test_sft_failed_push_keeps_result_and_rerun_only_pushes(assets, tmp_path, hub_server, monkeypatch):
    import train_sft

    name, out = "test-user/sft-down", tmp_path / "sft"
    argv = sft_args(
        assets,
        out,
        "--use_lora",
        "--push_to_hub",
        "--hub_model_id",
        name,
        "--hub_token",
        TEST_TOKEN,
        "--hub_retry_max_time",
        "1",
    )
    hub_server.inject(None, WRITE_ENDPOINTS, status=502, times=None)
    with hub_online():
        reset_accelerate()
        with pytest.raises(SystemExit) as exit_:
            train_sft.cli(argv)
        hub_server.clear_faults()
        assert str(exit_.value.code).startswith(f"error: the result is saved in {out} but the push failed (HTTP 502")
        assert "accelerate launch train_sft.py" in str(exit_.value.code)
        weights = (out / "pytorch_lora_weights.safetensors").read_bytes()
        with monkeypatch.context() as m:
            m.setattr(train_sft, "init_run", lambda *a, **k: pytest.fail("a push-only rerun must not train"))
            run_sft(*argv)
        assert hub_server.read_file(name, "pytorch_lora_weights.safetensors") == weights
        assert "sft_state.json" not in hub_server.files(name)
        # pushed: the same command trains again (as before), and other settings never reuse the old result
        run_sft(*argv[:-2], "--hub_retry_max_time", "1", "--learning_rate", "1e-4")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() != weights
