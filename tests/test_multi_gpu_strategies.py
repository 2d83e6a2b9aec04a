"""Several processes, the ways users outgrow one GPU: full SPIN under FSDP2 (the shipped example config) on 2 CPU
processes equals the same run under DDP, starts every iteration at log 2, saves pipelines that load and resumes
from its sharded checkpoints; full SFT under FSDP2 saves a loadable pipeline; the FSDP2 and DeepSpeed ZeRO-2
example configs parse with accelerate's own loader (DeepSpeed is not installed here: that config is never run).

accelerate runs an FSDP config on CPU processes as plain DDP, so the FSDP runs go through tests/fsdp_on_cpu.py,
which makes accelerate take its FSDP branch on CPU as it does on GPUs (see there)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_spin import assert_starts_at_reference, metrics

import train_spin_diffusion
from helpers import max_abs_diff, mean_abs_diff, sft_args, spin_args, tensors

ROOT = Path(__file__).resolve().parent.parent
FSDP2_CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
ZERO2_CONFIG = ROOT / "examples" / "accelerate" / "deepspeed_zero2.yaml"
ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
# Both runs: 2 processes x 2 images, 2 optimizer steps per iteration, a checkpoint after each step, gradient
# checkpointing (as examples/spin_full_8gpu.yaml).
SPIN_EXTRA = (
    "--num_iterations",
    "2",
    "--train_batch_size",
    "2",
    "--learning_rate",
    "1e-4",
    "--max_train_steps",
    "2",
    "--checkpointing_steps",
    "1",
    "--gradient_checkpointing",
)
LR = 1e-4


def ddp(script, argv, port, cwd):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        str(ROOT / script),
        *argv,
    ]
    return run(cmd, cwd)


def fsdp2(script, argv, port, cwd):
    """`accelerate launch --config_file examples/accelerate/fsdp2.yaml` with 2 CPU processes, fp32 (the file says
    bf16: fp32 makes the comparison with DDP exact up to reduction order)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP2_CONFIG),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        port,
        str(ROOT / "tests" / "fsdp_on_cpu.py"),
        str(ROOT / script),
        *argv,
    ]
    proc = run(cmd, cwd)
    assert "process 1 runs FSDP2, wrapping ['BasicTransformerBlock', 'ResnetBlock2D']" in proc.stdout
    return proc


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def spin_runs(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategies")
    ddp("train_spin_diffusion.py", spin_args(assets, tmp / "ddp", *SPIN_EXTRA), "29561", tmp)
    fsdp2("train_spin_diffusion.py", spin_args(assets, tmp / "fsdp2", *SPIN_EXTRA), "29562", tmp)
    return tmp / "ddp", tmp / "fsdp2"


def relative_mean_diff(a, b, start):
    """mean |a - b| over all weights, as a share of how far training moved them (mean |a - start|)."""
    return mean_abs_diff(a, b) / mean_abs_diff(a, start)


def test_fsdp2_full_spin_equals_ddp(assets, spin_runs):
    from diffusers import StableDiffusionPipeline

    ddp_out, fsdp_out = spin_runs
    start = tensors(assets["pipeline"] / "unet")
    for k in (1, 2):
        d, f = metrics(ddp_out, k), metrics(fsdp_out, k)
        assert_starts_at_reference(d)
        assert_starts_at_reference(f)  # the frozen reference (a plain module on each process) is theta_k
        # Clipping sees the global gradient norm, not one shard's (that would be ~1/sqrt(2) of it).
        assert f["first_step"]["grad_norm"] == pytest.approx(d["first_step"]["grad_norm"], rel=1e-5)
        assert f["steps"] == d["steps"] == 2
        assert (fsdp_out / f"iter_{k}" / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()  # sharded by FSDP2

        pipe = StableDiffusionPipeline.from_pretrained(fsdp_out / f"iter_{k}")
        assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
        assert pipe("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)

    it1_d, it1_f = tensors(ddp_out / "iter_1" / "unet"), tensors(fsdp_out / "iter_1" / "unet")
    it2_d, it2_f = tensors(ddp_out / "iter_2" / "unet"), tensors(fsdp_out / "iter_2" / "unet")
    assert (
        max_abs_diff(it1_d, start) > LR and max_abs_diff(it2_d, it1_d) > LR
    )  # both iterations trained (Adam: ~LR a step)
    # Iteration 1: the same inputs; FSDP2 sums the 2 processes' gradients in another order (per block) and
    # computes the clipping norm from shards. Measured here: max 1.1e-6, while each step moves weights by ~LR.
    assert max_abs_diff(it1_d, it1_f) < 0.2 * LR
    assert relative_mean_diff(it1_d, it1_f, start) < 1e-4  # measured 4e-7
    # Iteration 2 samples its negatives with iteration 1's weights, which differ in the last bits, and beta/2 = 2500
    # multiplies differences of the denoising errors; Adam's first steps move each weight by about +-LR whatever
    # its gradient's size, so a weight whose gradient is near 0 may move either way: the elementwise max says
    # little, the mean over all weights says whether the runs agree. Measured 4e-5 of the change.
    assert relative_mean_diff(it2_d, it2_f, start) < 1e-2


def test_fsdp2_spin_resumes_from_its_sharded_checkpoint(assets, spin_runs, tmp_path):
    """A run killed right after iteration 2's checkpoint-1, rerun: it loads the sharded weights, AdamW states, lr
    schedule and data position (accelerate.load_state) and ends where the uninterrupted run ended."""
    _, done = spin_runs
    out = tmp_path / "fsdp2"
    shutil.copytree(done, out)
    shutil.rmtree(out / "iter_2" / "checkpoint-2")
    for name in ("unet", "metrics.json"):
        path = out / "iter_2" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    state = json.loads((out / "spin_state.json").read_text())
    (out / "spin_state.json").write_text(json.dumps(state | {"done": [1], "iteration": 2, "phase": "train"}))

    proc = fsdp2("train_spin_diffusion.py", spin_args(assets, out, *SPIN_EXTRA), "29563", tmp_path)
    assert "iteration 2: resumed from" in proc.stderr and "checkpoint-1 at step 1" in proc.stderr
    resumed, straight = tensors(out / "iter_2" / "unet"), tensors(done / "iter_2" / "unet")
    assert max_abs_diff(resumed, straight) < 1e-6  # the same processes, the same state: the same arithmetic
    assert metrics(out, 2)["first_step"] == metrics(done, 2)["first_step"]  # the tally travels with the checkpoint


def test_fsdp2_full_sft_saves_a_loadable_pipeline(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sft"
    fsdp2(
        "train_sft.py",
        sft_args(
            assets,
            out,
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--learning_rate",
            "1e-4",
            "--checkpointing_steps",
            "2",
        ),
        "29564",
        tmp_path,
    )
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    trained, start = pipe.unet.state_dict(), tensors(assets["pipeline"] / "unet")
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert max_abs_diff({k: trained[k.split(":", 1)[1]] for k in start}, start) > 1e-5
    assert (out / "validation_grid.png").exists()


def launch_env(config, monkeypatch):
    """The environment `accelerate launch --config_file config` gives the script (built, not launched)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "x.py"])
    )
    if defaults.distributed_type == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return defaults


def test_example_accelerate_configs_parse(assets, monkeypatch):
    """Both files load with accelerate's config loader and carry what the README promises. The DeepSpeed one is
    also turned into the DeepSpeed config accelerate would hand to DeepSpeed (which is not installed here)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from diffusers import UNet2DConditionModel

    fsdp, zero2 = load_config_from_file(str(FSDP2_CONFIG)), load_config_from_file(str(ZERO2_CONFIG))
    assert isinstance(fsdp, ClusterConfig) and isinstance(zero2, ClusterConfig)
    assert fsdp.distributed_type == "FSDP" and zero2.distributed_type == "DEEPSPEED"
    assert fsdp.mixed_precision == zero2.mixed_precision == "bf16"
    assert fsdp.num_processes == zero2.num_processes == 8

    with monkeypatch.context() as m:
        launch_env(FSDP2_CONFIG, m)
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and not plugin.cpu_ram_efficient_loading
    unet_classes = {
        type(m).__name__ for m in UNet2DConditionModel.from_pretrained(assets["pipeline"], subfolder="unet").modules()
    }
    assert set(plugin.transformer_cls_names_to_wrap) == {"BasicTransformerBlock", "ResnetBlock2D"} <= unet_classes

    with monkeypatch.context() as m:
        launch_env(ZERO2_CONFIG, m)
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in os.environ  # it would override the script's flag
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision("bf16")
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2
    assert (
        ds["zero_optimization"]["offload_optimizer"]["device"]
        == ds["zero_optimization"]["offload_param"]["device"]
        == "none"
    )
    default_clip = train_spin_diffusion.parse_args(
        ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
    ).max_grad_norm
    assert ds["gradient_clipping"] == default_clip == 1.0
    assert ds["gradient_accumulation_steps"] == "auto" and ds["bf16"]["enabled"] is True
