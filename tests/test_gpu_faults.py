"""Faults that would first show on a GPU, shown on the CPU: iteration k's models still alive when k+1 loads,
an offloaded reference copied back to the host every step, and fp16 steps the grad scaler skips counted in the
learning-rate schedule and the iteration's means."""

import gc
import json
import math
import weakref

import pytest
import torch

import train_spin_diffusion
from helpers import run_spin, spin_args
from utils.models import Reference


@pytest.mark.parametrize("mode", ["full_bf16", "full_precompute_bf16", "lora_bf16"])
def test_no_model_of_iteration_k_is_reachable_when_k_plus_1_loads(assets, tmp_path, monkeypatch, mode):
    """With the automatic collector off, only the script's own clean-up can free iteration k: its prepared UNet
    (a reference cycle under mixed precision: accelerate patches its forward), the frozen reference copy, and
    the --precompute_reference closure that holds the UNet must all be gone when iteration k+1 loads theta_k+1."""
    alive, real = [], train_spin_diffusion.load_policy_and_reference
    previous = []

    def spy(args, k, frozen, device):
        alive.append([name for name, ref in previous if ref() is not None])
        unet, reference = real(args, k, frozen, device)
        previous.append((f"iteration {k + 1} UNet", weakref.ref(unet)))
        if reference is not None and reference.copy is not None:
            previous.append((f"iteration {k + 1} reference copy", weakref.ref(reference.copy)))
        return unet, reference

    monkeypatch.setattr(train_spin_diffusion, "load_policy_and_reference", spy)
    extra = {"full_bf16": [], "full_precompute_bf16": ["--precompute_reference"], "lora_bf16": ["--use_lora"]}[mode]
    gc.collect()
    gc.disable()
    try:
        run_spin(*spin_args(assets, tmp_path / mode, "--mixed_precision", "bf16", "--max_train_steps", "2", *extra))
    finally:
        gc.enable()
    assert alive == [[], []], f"still reachable when the next iteration loaded: {alive}"


class TinyUNet(torch.nn.Module):
    """Called like a UNet (sample, t, encoder_hidden_states, return_dict=False)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, sample, timesteps, encoder_hidden_states, return_dict=False):
        return (self.conv(sample) * self.scale + encoder_hidden_states.mean(),)


def test_offloaded_reference_is_copied_up_without_blocking_and_never_copied_back(monkeypatch):
    """The offloaded copy lives in host memory; each call copies it up with non_blocking and drops the device
    copies after. The "device" here is meta: a copy back from it would fail, so would any write to the host."""
    torch.manual_seed(0)
    unet = TinyUNet()
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 5)
    expected = Reference.frozen_copy(unet, "cpu")(x, t, emb)[0]
    offloaded = Reference.frozen_copy(unet, "cpu", offload=True)
    assert torch.equal(offloaded(x, t, emb)[0], expected)  # same numbers as a resident copy

    reference = Reference.frozen_copy(unet, "meta", offload=True)
    host = {name: (v.data_ptr(), v._version) for name, v in reference.copy.state_dict(keep_vars=True).items()}
    uploads, real_to = [], torch.Tensor.to
    xm, tm, em = x.to("meta"), t.to("meta"), emb.to("meta")

    def spy_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type == "cpu":
            uploads.append(kwargs.get("non_blocking", False))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    for _ in range(3):
        out = reference(xm, tm, em)[0]
        assert out.device.type == "meta" and out.shape == x.shape
    monkeypatch.undo()
    assert len(uploads) == 3 * len(host) and all(uploads), uploads  # every weight and buffer, each call
    after = {name: (v.data_ptr(), v._version) for name, v in reference.copy.state_dict(keep_vars=True).items()}
    assert after == host  # the same host storage, never written
    assert all(v.device.type == "cpu" for v in reference.copy.state_dict().values())


def test_fp16_overflow_skips_leave_the_schedule_and_the_means(assets, tmp_path, monkeypatch):
    """A grad scaler (fp16's, on the CPU) skips the step whose gradients overflow. That step must not advance the
    learning-rate schedule, and its infinite gradient norm must not enter the iteration's means."""
    import utils.training

    real_init, logged = utils.training.init_run, []

    def init_with_scaler(args):
        accelerator = real_init(args)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # as fp16 mixed precision on a GPU
        real_backward, calls = accelerator.backward, [0]

        def backward(loss, **kwargs):
            real_backward(loss, **kwargs)
            calls[0] += 1
            if calls[0] == 2:  # the second optimizer step's gradients overflow
                p = next(p for p in accelerator._models[0].parameters() if p.grad is not None)
                p.grad.view(-1)[0] = float("inf")

        real_log = accelerator.log
        accelerator.backward = backward
        accelerator.log = lambda values, step=None, **kw: (
            logged.append(dict(values)),
            real_log(values, step=step, **kw),
        )
        return accelerator

    monkeypatch.setattr(train_spin_diffusion, "init_run", init_with_scaler)
    out = tmp_path / "fp16"
    lr, steps = 1e-3, 4
    run_spin(
        *spin_args(
            assets,
            out,
            "--use_lora",
            "--num_iterations",
            "1",
            "--max_train_steps",
            steps,
            "--lr_scheduler",
            "linear",
            "--learning_rate",
            lr,
        )
    )
    m = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert [math.isinf(row["grad_norm"]) for row in logged] == [False, True, False, False]
    # the schedule moved on the three steps that updated the weights, not on the skipped one
    assert [row["lr"] for row in logged] == pytest.approx([lr * (1 - n / steps) for n in (1, 1, 2, 3)])
    kept = [row for row in logged if not math.isinf(row["grad_norm"])]
    assert m["steps"] == steps and math.isfinite(m["mean"]["grad_norm"])
    assert m["mean"]["grad_norm"] == pytest.approx(sum(r["grad_norm"] for r in kept) / len(kept))
    assert m["mean"]["loss"] == pytest.approx(sum(r["loss"] for r in kept) / len(kept))


def test_bench_builds_the_full_reference_as_the_script_does(assets, tmp_path, monkeypatch):
    """bench/bench_step.py's full-SPIN reference copy has the dtype and placement of the script's (fp32, the
    policy's own), so its peak memory is the script's: a bf16 copy would under-report it by ~1.6 GiB for SD-1.5."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_step

    built, real = [], Reference.frozen_copy.__func__

    def spy(cls, unet, *args, **kwargs):
        reference = real(cls, unet, *args, **kwargs)
        built.append(({p.dtype for p in reference.copy.parameters()}, {p.dtype for p in unet.parameters()}))
        return reference

    monkeypatch.setattr(Reference, "frozen_copy", classmethod(spy))
    bench_step.run_case("spin:full:bf16:adamw:gc0", "tiny", 1, 1, 0, "cpu")
    run_spin(
        *spin_args(
            assets, tmp_path / "bf16", "--mixed_precision", "bf16", "--num_iterations", "1", "--max_train_steps", "1"
        )
    )
    (bench_copy, bench_policy), (script_copy, script_policy) = built
    assert bench_copy == script_copy == bench_policy == script_policy == {torch.float32}


def test_compiled_unet_under_ddp_is_split_at_the_gradient_buckets(assets, tmp_path):
    """--torch_compile on 2 processes: inside DDP's forward, dynamo's DDP optimizer splits the compiled UNet's
    training graph at DDP's gradient-bucket boundaries (one subgraph per bucket), so each bucket's all-reduce
    still overlaps the backward; the weights equal an uncompiled 2-process run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import tensors

    root = Path(__file__).resolve().parent.parent
    outs = {}
    for name, extra, port in (("eager", [], "29541"), ("compiled", ["--torch_compile"], "29542")):
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(root / "tests" / "ddp_compile_probe.py"),
            *spin_args(
                assets,
                out,
                "--num_iterations",
                "1",
                "--train_batch_size",
                "2",
                "--max_train_steps",
                "2",
                "--gen_shard_size",
                "4",
                *extra,
            ),
        ]
        env = dict(
            os.environ,
            ACCELERATE_USE_CPU="1",
            OMP_NUM_THREADS="1",
            PROBE_OUT=str(tmp_path / f"probe-{name}"),
            PROBE_BUCKET_MB="0.25",
        )
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = out
    for rank in (0, 1):
        record = json.loads((tmp_path / "probe-compiled" / f"rank{rank}.json").read_text())
        assert record["bucket_bytes_cap"] == int(0.25 * 2**20)
        assert True in record["graphs"] and False in record["graphs"]  # training graphs, generation graphs
        assert record["ddp_splits"] and max(record["ddp_splits"]) >= 2, record  # the training graph, split per bucket
        assert not json.loads((tmp_path / "probe-eager" / f"rank{rank}.json").read_text())["graphs"]
    a, b = (tensors(outs[n] / "iter_1" / "unet") for n in ("eager", "compiled"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
