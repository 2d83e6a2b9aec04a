"""The real command line: `accelerate launch train_sft.py ...` in a subprocess, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import sft_args, tensors

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def test_accelerate_launch_lora_run(assets, tmp_path):
    out = tmp_path / "launched"
    cmd = [
        *ACCELERATE,
        str(ROOT / "train_sft.py"),
        *sft_args(
            assets,
            out,
            "--use_lora",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--report_to",
            "tensorboard",
        ),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tensors(out / "pytorch_lora_weights.safetensors")
    assert (out / "checkpoint-2").is_dir() and list((out / "logs").rglob("events.out.tfevents.*"))
    assert "sft: 100%" in proc.stderr  # the progress bar ran to the end


def test_accelerate_launch_bad_dataset_fails_fast_with_message(assets, tmp_path):
    cmd = [
        *ACCELERATE,
        str(ROOT / "train_sft.py"),
        *sft_args(assets, tmp_path / "out", dataset=tmp_path / "missing.parquet"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"error: --dataset_name {tmp_path / 'missing.parquet'}: no such file or folder" in proc.stderr
    # a message for the user, not our stack trace (accelerate's launcher adds its own for the exit status)
    assert "DataError" not in proc.stderr and 'train_sft.py", line' not in proc.stderr
