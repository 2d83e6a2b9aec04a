"""Preemption: SIGTERM (or SLURM's SIGUSR1) during training, during generation or during a push stops the run at the
next safe point (the optimizer step under way, the shard under way, the push under way), saves, exits with status
75 and one line saying what was saved; rerunning the same command ends with the weights of an uninterrupted run.
One process in-process, two processes through torchrun."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_sft
import train_spin_diffusion
import utils.hub
from helpers import reset_accelerate, run_sft, run_spin, sft_args, spin_args, tensors
from hub_server import TEST_TOKEN, hub_online
from utils.generation import SyntheticStore
from utils.training import PREEMPTED_EXIT

ROOT = Path(__file__).resolve().parent.parent
ARGV = ["--use_lora", "--max_train_steps", "4", "--checkpointing_steps", "1000"]
LORA = "iter_2/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_spin(*spin_args(assets, out, *ARGV))
    return tensors(out / LORA)


def signal_self(name="SIGTERM"):
    os.kill(os.getpid(), getattr(signal, name))


def run_cli(cli, argv, capsys):
    """(exit status, stderr) of an in-process command line."""
    reset_accelerate()
    try:
        cli(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_equal_weights(a, b):
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), "weights differ"


@pytest.mark.parametrize("where", ["training", "generation", "push"])
def test_signal_stops_saves_and_the_rerun_ends_as_uninterrupted(
    assets, tmp_path, monkeypatch, capsys, uninterrupted, hub_server, where
):
    out = tmp_path / where
    argv = spin_args(assets, out, *ARGV)
    calls = []
    with monkeypatch.context() as m:
        if where == "training":  # SIGTERM in iteration 2's second optimizer step (SLURM's SIGUSR1 there)
            real = train_spin_diffusion.optimizer_step

            def step(*a, **k):
                result = real(*a, **k)
                calls.append(1)
                if len(calls) == 6:
                    signal_self("SIGUSR1")
                return result

            m.setattr(train_spin_diffusion, "optimizer_step", step)
        elif where == "generation":  # while iteration 2 writes the first of its two shards
            real = SyntheticStore.write_shard

            def write_shard(self, k, *a, **kw):
                if "iter_2" in str(self.dir) and k == 0:
                    signal_self()
                return real(self, k, *a, **kw)

            m.setattr(SyntheticStore, "write_shard", write_shard)
        else:  # while iteration 1 is pushed
            argv += ["--push_to_hub", "--hub_model_id", "test-user/preempted", "--hub_token", TEST_TOKEN]
            real = utils.hub.push_folder

            def push(*a, **k):
                signal_self()
                return real(*a, **k)

            m.setattr(utils.hub, "push_folder", push)
        with hub_online():
            code, err = run_cli(train_spin_diffusion.cli, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("preempted: ")]
    assert code == PREEMPTED_EXIT and len(lines) == 1, err[-2000:]
    assert "rerun the same command to continue" in lines[0]
    if where == "training":
        assert "SIGUSR1" in lines[0] and (out / "iter_2" / "checkpoint-2").is_dir()  # saved at the step it was in
    if where == "generation":
        assert "shards are kept" in lines[0]
        assert [p.name for p in (out / "iter_2" / "synthetic").glob("shard-*.safetensors")] == [
            "shard-00000.safetensors"
        ]
    if where == "push":  # the push runs in the background: the run stops in iteration 2, the push finished first
        assert "iteration 2" in lines[0] and hub_server.repo_exists("test-user/preempted-iter1")
    with hub_online():
        code, err = run_cli(train_spin_diffusion.cli, argv, capsys)  # the same command again
    assert code == 0, err[-2000:]
    assert_equal_weights(tensors(out / LORA), uninterrupted)


def test_sft_signal_saves_a_checkpoint_and_the_resumed_run_ends_as_uninterrupted(
    assets, tmp_path, monkeypatch, capsys
):
    argv = [
        "--use_lora",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "1000",
        "--resume_from_checkpoint",
        "latest",
    ]
    run_sft(*sft_args(assets, tmp_path / "straight", *argv))
    out = tmp_path / "stopped"
    calls, real = [], train_sft.optimizer_step

    def step(*a, **k):
        result = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            signal_self()
        return result

    with monkeypatch.context() as m:
        m.setattr(train_sft, "optimizer_step", step)
        code, err = run_cli(train_sft.cli, sft_args(assets, out, *argv), capsys)
    assert code == PREEMPTED_EXIT and "preempted: stopped on SIGTERM: saved at step 2" in err, err[-2000:]
    assert (out / "checkpoint-2").is_dir()
    code, err = run_cli(train_sft.cli, sft_args(assets, out, *argv), capsys)
    assert code == 0, err[-2000:]
    name = "pytorch_lora_weights.safetensors"
    assert_equal_weights(tensors(out / name), tensors(tmp_path / "straight" / name))


def two_process_run(assets, out, signal_at=None):
    """torchrun with 2 CPU processes; `signal_at`: rank 0 sends itself SIGTERM after that many optimizer steps
    (rank 1 learns of it through the processes' agreement)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    cmd += [str(ROOT / "tests" / "preempt_at.py"), *spin_args(assets, out, *ARGV, "--train_batch_size", "2")]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PREEMPT_AT_STEP=str(signal_at or 0))
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_stop_together_and_resume(assets, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = two_process_run(assets, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = two_process_run(assets, stopped, signal_at=6)
    assert proc.returncode != 0 and "preempted: stopped on SIGTERM" in proc.stderr, proc.stderr[-3000:]
    assert "preempted: stopped on another process's signal" in proc.stderr  # rank 1 stopped with rank 0
    assert (stopped / "iter_2" / "checkpoint-2").is_dir()
    proc = two_process_run(assets, stopped)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_weights(tensors(stopped / LORA), tensors(straight / LORA))


def test_two_sft_processes_stop_together_at_one_checkpoint(assets, tmp_path):
    """train_sft.py's stop flag rides its loss all-reduce: rank 0 is signalled after step 2, rank 1 stops with it,
    after the same step, and the checkpoint written there is complete. (The rerun's equality is the one-process
    test's.)"""
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29548"]
    cmd += [str(ROOT / "tests" / "preempt_at.py"), *sft_args(assets, out, "--use_lora", "--max_train_steps", "4")]
    cmd += ["--train_batch_size", "2", "--checkpointing_steps", "100"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PREEMPT_AT_STEP="2", PREEMPT_SCRIPT="sft")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "preempted: stopped on SIGTERM: saved at step 2" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert "preempted: stopped on another process's signal: saved at step 2" in proc.stderr
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_the_stop_flag_rides_any_mean_or_max_reduce():
    import torch

    from utils.training import Preemption

    quiet, signalled = Preemption(install=False), Preemption(install=False)
    signalled.signal_name = "SIGTERM"
    like = torch.zeros(3, dtype=torch.bfloat16)
    assert quiet.flag(like).tolist() == [0.0] and signalled.flag(like).tolist() == [1.0]
    assert quiet.flag(like).dtype == torch.bfloat16
    assert not quiet.agreed(0.0) and quiet.signal_name is None
    assert quiet.agreed(0.5) and quiet.signal_name == "another process's signal"  # the mean over 2: one signalled
    assert signalled.agreed(1.0) and signalled.signal_name == "SIGTERM"
