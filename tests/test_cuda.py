"""Checks that need a CUDA GPU (skipped elsewhere; bench/gpu_check.sh runs them on the lent GPU): iteration k's
memory is handed back before k+1 loads, the offloaded reference sits in pinned host memory, and full SPIN with
8-bit Adam, bf16 and gradient checkpointing, and LoRA SPIN under fp16's grad scaler, train to finite weights
that start each iteration at log 2; and LoRA SPIN of each family beyond SD-1.5 over an fp8 base."""

import json
import math

import pytest
import torch

import train_spin_diffusion
from helpers import run_spin, spin_args, tensors
from utils.models import Reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def first_loss(out, k):
    return json.loads((out / f"iter_{k}" / "metrics.json").read_text())["first_step"]["loss"]


def test_iteration_memory_is_handed_back_before_the_next_loads(assets, tmp_path, monkeypatch):
    seen, real = [], train_spin_diffusion.load_policy_and_reference

    def spy(args, k, frozen, device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        unet, reference = real(args, k, frozen, device)
        seen.append((before, sum(p.numel() * p.element_size() for p in unet.parameters())))
        return unet, reference

    monkeypatch.setattr(train_spin_diffusion, "load_policy_and_reference", spy)
    out = tmp_path / "full"
    run_spin(*spin_args(assets, out, "--mixed_precision", "bf16", "--max_train_steps", "2", "--learning_rate", "1e-4"))
    (before_1, unet_bytes), (before_2, _) = seen
    # a leaked iteration would hold its UNet, its fp32 reference copy and the optimizer states: >= 4x the UNet
    assert before_2 - before_1 < 0.5 * unet_bytes, (before_1, before_2, unet_bytes)
    for k in (1, 2):
        assert first_loss(out, k) == pytest.approx(math.log(2), abs=1e-3)


def test_offloaded_reference_is_pinned_and_leaves_nothing_on_the_gpu():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    ).cuda()
    x, t, emb = (
        torch.randn(2, 4, 8, 8, device="cuda"),
        torch.tensor([10, 500], device="cuda"),
        torch.randn(2, 7, 32, device="cuda"),
    )
    resident = Reference.frozen_copy(unet, "cuda")(x, t, emb)[0]
    offloaded = Reference.frozen_copy(unet, "cuda", offload=True)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for _ in range(3):
        out = offloaded(x, t, emb)[0]
        torch.cuda.synchronize()
        assert torch.allclose(out, resident, atol=1e-5)
        del out
    assert torch.cuda.memory_allocated() == baseline  # the device copies died with each call
    weights = list(offloaded.copy.parameters()) + list(offloaded.copy.buffers())
    assert all(w.device.type == "cpu" and w.is_pinned() for w in weights)


def test_full_spin_8bit_adam_bf16_checkpointing_trains_finite(assets, tmp_path):
    out = tmp_path / "full8bit"
    run_spin(
        *spin_args(
            assets,
            out,
            "--mixed_precision",
            "bf16",
            "--use_8bit_adam",
            "--gradient_checkpointing",
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "2",
            "--learning_rate",
            "1e-4",
        )
    )
    for k in (1, 2):
        assert first_loss(out, k) == pytest.approx(math.log(2), abs=1e-3)
        weights = tensors(out / f"iter_{k}" / "unet")
        assert weights and all(torch.isfinite(w.float()).all() for w in weights.values())


def test_lora_spin_fp16_grad_scaler_trains_finite(assets, tmp_path):
    out = tmp_path / "fp16"
    run_spin(*spin_args(assets, out, "--use_lora", "--mixed_precision", "fp16", "--max_train_steps", "3"))
    for k in (1, 2):
        m = json.loads((out / f"iter_{k}" / "metrics.json").read_text())
        assert m["first_step"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert all(math.isfinite(v) for v in m["mean"].values())
        weights = tensors(out / f"iter_{k}" / "pytorch_lora_weights.safetensors")
        assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_offload_reference_full_spin_run_matches_resident(assets, tmp_path):
    for name, extra in (("resident", []), ("offload", ["--offload_reference"])):
        run_spin(
            *spin_args(
                assets,
                tmp_path / name,
                "--mixed_precision",
                "bf16",
                "--num_iterations",
                "1",
                "--max_train_steps",
                "2",
                "--learning_rate",
                "1e-4",
                *extra,
            )
        )
    a, b = tensors(tmp_path / "resident" / "iter_1" / "unet"), tensors(tmp_path / "offload" / "iter_1" / "unet")
    assert a.keys() == b.keys() and max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_lora_spin_bf16_fp8_base_trains_finite(assets, tmp_path, family):
    """Each family beyond SD-1.5 (its tiny pipeline) on the GPU: LoRA SPIN under bf16 over an fp8-stored base with
    8-bit Adam (and gradient checkpointing for the transformers) starts both iterations at log 2 and saves finite
    adapters."""
    import make_tiny_families

    model = make_tiny_families.BUILDERS[family](tmp_path / family, resolution=32)
    out = tmp_path / "out"
    argv = spin_args(
        assets, out, "--use_lora", "--mixed_precision", "bf16", "--use_8bit_adam", "--max_train_samples", "8"
    )
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(model)
    # a UNet takes the fp8 base without gradient checkpointing (the pair is refused for it), a transformer both
    argv += ["--layerwise_casting", "fp8_e4m3fn"] + (["--gradient_checkpointing"] if family != "sdxl" else [])
    run_spin(*argv, *(["--max_sequence_length", "16"] if family != "sdxl" else []))
    for k in (1, 2):
        assert first_loss(out, k) == pytest.approx(math.log(2), abs=1e-3)
        weights = tensors(out / f"iter_{k}" / "pytorch_lora_weights.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values())
