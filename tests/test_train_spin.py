"""End-to-end SPIN-Diffusion on the tiny assets: two iterations (LoRA and full), the reference of each
iteration, loading every iteration, Diffusion-DPO mode, and resuming after kills at three points."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_spin_diffusion
from helpers import consumed_only, max_abs_diff, mean_abs_diff, run_spin, spin_args, tensors
from utils.data import caption_of
from utils.families import lora_state_dict
from utils.generation import SyntheticStore

ROOT = Path(__file__).resolve().parent.parent
LOG2 = math.log(2)


def spy_references(monkeypatch):
    """Record (iteration, policy UNet, Reference) as train_spin_diffusion builds them, before any training."""
    seen = []
    real = train_spin_diffusion.load_policy_and_reference

    def spy(args, k, frozen, device):
        unet, ref = real(args, k, frozen, device)
        snapshot = {"k": k, "ref": ref, "params": sum(p.numel() for p in unet.parameters())}
        if ref is None:
            pass
        elif ref.copy is not None:
            snapshot["ref_weights"] = {key: v.detach().clone() for key, v in ref.copy.state_dict().items()}
        elif ref.adapter is not None:
            snapshot["ref_weights"] = {
                key: v.detach().clone() for key, v in lora_state_dict(unet, ref.adapter).items()
            }
        seen.append(snapshot)
        return unet, ref

    monkeypatch.setattr(train_spin_diffusion, "load_policy_and_reference", spy)
    return seen


def metrics(out, k):
    return json.loads((out / f"iter_{k}" / "metrics.json").read_text())


def assert_starts_at_reference(m):
    """At the first step policy == reference: loss log 2, margin 0 (catches a wrong reference or dtype)."""
    assert m["first_step"]["loss"] == pytest.approx(LOG2, abs=1e-3)
    assert abs(m["first_step"]["reward_margin"]) < 1e-3


def test_two_lora_iterations(assets, tmp_path, monkeypatch):
    out = tmp_path / "spin-lora"
    seen = spy_references(monkeypatch)
    run_spin(*spin_args(assets, out, "--use_lora"))
    it1, it2 = (
        tensors(out / "iter_1" / "pytorch_lora_weights.safetensors"),
        tensors(out / "iter_2" / "pytorch_lora_weights.safetensors"),
    )
    assert all(v.abs().sum() > 0 for k, v in it1.items() if "lora.up" in k)  # iteration 1 trained (B starts at 0)
    assert max_abs_diff(it1, it2) > 1e-5  # iteration 2 changed it again
    # Iteration 1's reference is the base (adapters off); iteration 2's is iteration 1's saved adapter.
    assert seen[0]["ref"].adapter is None and seen[1]["ref"].adapter == "reference"
    ref2 = {f"unet.{k}": v for k, v in seen[1]["ref_weights"].items()}
    assert max_abs_diff(ref2, it1) == 0
    # One UNet: the reference is the policy UNet itself, and the extra adapter is all it adds.
    assert all(s["ref"].copy is None and s["ref"].unet is not None for s in seen)
    adapter = sum(v.numel() for v in it1.values())
    assert seen[1]["params"] - seen[0]["params"] == adapter
    for k in (1, 2):
        assert_starts_at_reference(metrics(out, k))
        synthetic = SyntheticStore(out / f"iter_{k}" / "synthetic", 20, 8)
        assert synthetic.complete()
        rows = [json.loads(line) for line in (synthetic.dir / "manifest.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(20)) and len({r["seed"] for r in rows}) == 20

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        assets["pipeline"], safety_checker=None, requires_safety_checker=False
    )
    images = []
    for k in (1, 2):
        pipe.load_lora_weights(out / f"iter_{k}", adapter_name=f"iter{k}")
        pipe.set_adapters(f"iter{k}")
        images.append(
            pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        )
    assert abs(images[0] - images[1]).max() > 1e-5
    card = (out / "iter_2" / "README.md").read_text()
    assert "SPIN-Diffusion iteration 2" in card and "spin-diffusion" in card


def test_two_full_iterations(assets, tmp_path, monkeypatch):
    out = tmp_path / "spin-full"
    seen = spy_references(monkeypatch)
    run_spin(*spin_args(assets, out, "--max_train_steps", "2", "--learning_rate", "1e-4", "--offload_reference"))
    base, it1, it2 = (tensors(p / "unet") for p in (assets["pipeline"], out / "iter_1", out / "iter_2"))
    assert max_abs_diff(base, it1) > 1e-6 and max_abs_diff(it1, it2) > 1e-6
    ref2 = {f"diffusion_pytorch_model.safetensors:{k}": v for k, v in seen[1]["ref_weights"].items()}
    assert max_abs_diff(ref2, it1) == 0  # iteration 2's reference is iteration 1's saved UNet
    for k in (1, 2):
        assert_starts_at_reference(metrics(out, k))
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(out / f"iter_{k}")
        assert pipe("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_dpo_mode_trains_against_the_dataset_loser(assets, tmp_path, monkeypatch):
    out = tmp_path / "dpo"
    negatives = []
    import utils.spin

    real_encode = utils.spin.encode_images

    def spy(vae, batch, generator, dtype):
        if set(batch) == {"pixel_values"}:  # the negative's call: only the loser pixels are passed
            negatives.append(batch["pixel_values"].float())
        return real_encode(vae, batch, generator, dtype)

    monkeypatch.setattr(utils.spin, "encode_images", spy)
    run_spin(*spin_args(assets, out, "--use_lora", "--negative_source", "dataset", "--num_iterations", "3"))
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_1"]  # one iteration, whatever --num_iterations says
    assert not (out / "iter_1" / "synthetic").exists()
    assert len(negatives) == 3
    for px in negatives:  # the tiny Pick-a-Pic losers are dark and blue, winners bright and red
        red, blue = px[:, 0].mean(dim=(1, 2)), px[:, 2].mean(dim=(1, 2))
        assert (blue > red).all()
    assert_starts_at_reference(metrics(out, 1))
    assert "diffusion-dpo" in (out / "iter_1" / "README.md").read_text()


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("spin-straight")
    run_spin(*spin_args(assets, out, "--use_lora", "--max_train_steps", "4", "--checkpointing_steps", "2"))
    return tensors(out / "iter_2" / "pytorch_lora_weights.safetensors")


class Killed(Exception):
    pass


def kill_on(monkeypatch, obj, name, when):
    """Make obj.name raise Killed (after doing its work, if `after`) the first time `when(*args)` holds."""
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            raise Killed(name)
        return result

    monkeypatch.setattr(obj, name, wrapper)


def shard_mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.glob("iter_*/synthetic/shard-*.safetensors")}


@pytest.mark.parametrize("where", ["generation", "training_checkpoint", "between_iterations"])
def test_killed_then_rerun_equals_uninterrupted(assets, tmp_path, monkeypatch, uninterrupted, where):
    out = tmp_path / where
    argv = spin_args(assets, out, "--use_lora", "--max_train_steps", "4", "--checkpointing_steps", "2")
    with monkeypatch.context() as m:
        if where == "generation":  # after 2 of iteration 2's 3 shards
            kill_on(m, SyntheticStore, "write_shard", lambda self, k, *a: "iter_2" in str(self.dir) and k == 1)
        elif where == "training_checkpoint":  # iteration 2, right after checkpoint-2
            kill_on(
                m,
                train_spin_diffusion,
                "save_checkpoint",
                lambda acc, d, step, *a, **k: "iter_2" in str(d) and step == 2,
            )
        else:  # iteration 1 saved, iteration 2 not started
            kill_on(m, train_spin_diffusion, "load_policy_and_reference", lambda args, k, *a: k == 1)
        with pytest.raises(Killed):
            run_spin(*argv)
    before = shard_mtimes(out)
    state = json.loads((out / "spin_state.json").read_text())
    assert state["done"] == [1] and state["iteration"] == 2
    run_spin(*argv)  # the same command again
    after = shard_mtimes(out)
    assert all(after[p] == t for p, t in before.items()), "finished shards must not be regenerated"
    final = tensors(out / "iter_2" / "pytorch_lora_weights.safetensors")
    assert max_abs_diff(final, uninterrupted) < 1e-5


def test_two_process_cpu_run_generates_each_prompt_once(assets, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(ROOT / "train_spin_diffusion.py"),
        *spin_args(
            assets,
            out,
            "--use_lora",
            "--num_iterations",
            "1",
            "--train_batch_size",
            "2",
            "--gen_shard_size",
            "4",
            "--checkpointing_steps",
            "2",
        ),
    ]  # a checkpoint: both processes agree its weights are finite
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "iter_1" / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(20))
    assert {r["process"] for r in rows} == {0, 1}
    assert metrics(out, 1)["steps"] == 3 and (out / "iter_1" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "iter_1" / "checkpoint-2").is_dir()


def test_precomputed_reference_run_holds_no_reference(assets, tmp_path, monkeypatch):
    out = tmp_path / "pre"
    seen = spy_references(monkeypatch)
    cached = []  # per training step: whether the batch carried its text conditioning (no text encoder ran)
    real_conditions = train_spin_diffusion.batch_conditions

    def spy(text, batch):
        cached.append(all(key in batch for key in text.COND_KEYS))
        return real_conditions(text, batch)

    monkeypatch.setattr(train_spin_diffusion, "batch_conditions", spy)
    run_spin(*spin_args(assets, out, "--precompute_reference", "--max_train_steps", "2", "--learning_rate", "1e-4"))
    assert [s["ref"] for s in seen] == [None, None]  # full fine-tuning without a frozen UNet copy
    assert cached and all(cached)  # the training steps read the stored text embeddings
    store = SyntheticStore(out / "iter_2" / "synthetic", 20, 8)
    assert {"real_latents", "timesteps", "noise_seed", "ref_err_real", "ref_err_gen", "prompt_embeds"} <= set(
        store.get(0)
    )
    for k in (1, 2):
        assert_starts_at_reference(metrics(out, k))
    assert max_abs_diff(tensors(out / "iter_1" / "unet"), tensors(out / "iter_2" / "unet")) > 1e-7


def test_channels_last_full_iterations(assets, tmp_path, monkeypatch):
    """--channels_last: both iterations start at their reference and save loadable weights close to the default
    layout."""
    argv = ["--max_train_steps", "2", "--learning_rate", "1e-4"]
    run_spin(*spin_args(assets, tmp_path / "default", *argv))
    seen = []
    real_forward = train_spin_diffusion.spin_forward

    def spy(unet, reference, *args, **kwargs):  # the policy and the reference's frozen copy are channels-last
        seen.append(
            all(
                m.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                and not m.conv_in.weight.is_contiguous()
                for m in (unet, reference.copy)
            )
        )
        return real_forward(unet, reference, *args, **kwargs)

    monkeypatch.setattr(train_spin_diffusion, "spin_forward", spy)
    run_spin(*spin_args(assets, tmp_path / "cl", *argv, "--channels_last"))
    assert seen == [True] * 4
    before = tensors(assets["pipeline"] / "unet")
    for k in (1, 2):
        assert_starts_at_reference(metrics(tmp_path / "cl", k))
        a, b = tensors(tmp_path / "default" / f"iter_{k}" / "unet"), tensors(tmp_path / "cl" / f"iter_{k}" / "unet")
        # Adam turns float-reordering noise in near-zero gradients into full-size steps for a few weights,
        # so the runs are compared on average, against how far training moved the weights
        assert mean_abs_diff(a, b) < 0.02 * mean_abs_diff(before, a)


def test_channels_last_lora_on_convolutions_saves(assets, tmp_path):
    """LoRA adapters on 3x3 convolutions are 4-D: under --channels_last they must still save (and load)."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora_conv"
    run_spin(
        *spin_args(
            assets,
            out,
            "--use_lora",
            "--lora_target_modules",
            "to_q,to_v,conv1",
            "--channels_last",
            "--num_iterations",
            "1",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "1",
        )
    )
    saved = tensors(out / "iter_1" / "pytorch_lora_weights.safetensors")
    assert any("conv1.lora_A" in k and v.dim() == 4 for k, v in saved.items())
    assert (out / "iter_1" / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(assets["pipeline"], safety_checker=None)
    pipe.load_lora_weights(out / "iter_1")


@pytest.mark.parametrize("mode", ["lora", "full_precompute"])
def test_torch_compile_iterations_equal_eager(assets, tmp_path, compiled_graphs, mode):
    """--torch_compile: generation and training run through compiled graphs, over two iterations (LoRA: the
    reference is the same compiled UNet with theta_1's adapter switched in), and the weights equal an uncompiled
    run's."""
    argv = [
        "--num_iterations",
        "2",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-4",
        *(["--use_lora"] if mode == "lora" else ["--precompute_reference"]),
    ]
    run_spin(*spin_args(assets, tmp_path / "eager", *argv))
    run_spin(*spin_args(assets, tmp_path / "compiled", *argv, "--torch_compile"))
    assert True in compiled_graphs and False in compiled_graphs  # training steps (grad) and generation (no grad)
    for k in (1, 2):
        a, b = tensors(tmp_path / "eager" / f"iter_{k}"), tensors(tmp_path / "compiled" / f"iter_{k}")
        assert a.keys() == b.keys() and max_abs_diff(a, b) < 1e-5


def test_synthetic_store_refuses_samples_made_for_other_settings(tmp_path):
    store = SyntheticStore(tmp_path / "s", 20, 8, settings={"seed": 0, "captions_sha256": "abc"})
    store.claim()
    SyntheticStore(tmp_path / "s", 20, 8, settings={"seed": 0, "captions_sha256": "abc"}).claim()  # same: fine
    for other in (
        SyntheticStore(tmp_path / "s", 20, 4, settings={"seed": 0, "captions_sha256": "abc"}),
        SyntheticStore(tmp_path / "s", 20, 8, settings={"seed": 1, "captions_sha256": "abc"}),
    ):
        with pytest.raises(ValueError, match="other settings"):
            other.claim()


def test_bf16_full_iteration_starts_at_the_reference(assets, tmp_path):
    out = tmp_path / "bf16"
    run_spin(
        *spin_args(
            assets,
            out,
            "--mixed_precision",
            "bf16",
            "--num_iterations",
            "2",
            "--max_train_steps",
            "2",
            "--learning_rate",
            "1e-4",
        )
    )
    for k in (1, 2):  # the frozen copy keeps the policy's fp32 weights: same computation under autocast
        assert_starts_at_reference(metrics(out, k))


def test_full_ema_iteration_resumed_after_checkpoint(assets, tmp_path, monkeypatch):
    argv = [
        "--use_ema",
        "--num_iterations",
        "1",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "1e-4",
    ]
    run_spin(*spin_args(assets, tmp_path / "straight", *argv))
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        kill_on(m, train_spin_diffusion, "save_checkpoint", lambda acc, d, step, *a, **k: step == 2)
        with pytest.raises(Killed):
            run_spin(*spin_args(assets, out, *argv))
    run_spin(*spin_args(assets, out, *argv))
    assert max_abs_diff(tensors(tmp_path / "straight" / "iter_1" / "unet"), tensors(out / "iter_1" / "unet")) < 1e-6
    m_straight, m_resumed = metrics(tmp_path / "straight", 1), metrics(out, 1)
    assert m_resumed["first_step"] == m_straight["first_step"]  # the running metrics came back with the checkpoint
    assert m_resumed["mean"]["loss"] == pytest.approx(m_straight["mean"]["loss"], abs=1e-6)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_latest_checkpoint_and_shard_are_replaced_and_rerun_equals_uninterrupted(
    assets, tmp_path, monkeypatch, uninterrupted, caplog
):
    """A truncated newest checkpoint: resume from the previous complete one, with a warning naming the bad one. A
    truncated synthetic shard: generated again, with a warning naming it. The result equals an uninterrupted run."""
    out = tmp_path / "corrupt"
    argv = spin_args(assets, out, "--use_lora", "--max_train_steps", "4", "--checkpointing_steps", "1")
    with monkeypatch.context() as m:  # iteration 2, right after checkpoint-3
        kill_on(
            m, train_spin_diffusion, "save_checkpoint", lambda acc, d, step, *a, **k: "iter_2" in str(d) and step == 3
        )
        with pytest.raises(Killed):
            run_spin(*argv)
    bad_checkpoint, bad_shard = (
        out / "iter_2" / "checkpoint-3",
        out / "iter_2" / "synthetic" / "shard-00001.safetensors",
    )
    truncate(bad_checkpoint / "pytorch_lora_weights.safetensors")
    good_shard = bad_shard.read_bytes()
    truncate(bad_shard)
    with caplog.at_level("WARNING"):
        run_spin(*argv)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"checkpoint {bad_checkpoint} is unusable" in warnings
    assert f"synthetic shard {bad_shard} is unusable" in warnings
    assert bad_shard.read_bytes() == good_shard  # regenerated: the same seeds give the same samples
    final = tensors(out / "iter_2" / "pytorch_lora_weights.safetensors")
    assert max_abs_diff(final, uninterrupted) < 1e-5


def test_lora_on_an_fp8_stored_base_starts_at_log2_and_learns(assets, tmp_path, monkeypatch):
    """--layerwise_casting fp8_e4m3fn: the frozen UNet weights live in fp8 through both iterations, the adapters in
    fp32; policy and reference (the adapter switched) still agree at each iteration's first step, and training
    moves the adapter."""
    import train_spin_diffusion

    out, stored = tmp_path / "spin-fp8", []
    real = train_spin_diffusion.load_policy_and_reference

    def spy(args, k, frozen, device):
        unet, ref = real(args, k, frozen, device)
        frozen_dtypes = [p.dtype for p in unet.parameters() if not p.requires_grad]
        stored.append(
            (
                sum(d == torch.float8_e4m3fn for d in frozen_dtypes) / len(frozen_dtypes),
                {p.dtype for p in unet.parameters() if p.requires_grad},
            )
        )
        return unet, ref

    monkeypatch.setattr(train_spin_diffusion, "load_policy_and_reference", spy)
    run_spin(*spin_args(assets, out, "--use_lora", "--layerwise_casting", "fp8_e4m3fn"))
    assert len(stored) == 2
    for share_fp8, trainable in stored:
        assert share_fp8 > 0.5 and trainable == {torch.float32}  # most frozen tensors in fp8; norms etc. stay
    for k in (1, 2):
        m = metrics(out, k)
        assert_starts_at_reference(m)
        assert math.isfinite(m["last_step"]["loss"])
    first, second = (tensors(out / f"iter_{k}" / "pytorch_lora_weights.safetensors") for k in (1, 2))
    assert any(not torch.equal(first[key], second[key]) for key in first)  # iteration 2 trained the adapter on


def test_an_iteration_generates_only_the_prompts_it_trains_on(assets, tmp_path, monkeypatch):
    """20 prompts, 3 steps of 2 pairs: each iteration draws 6 prompts of its own (none twice), generates for those
    alone and trains on exactly those pairs; --gen_prompts_per_iteration all generates for every prompt."""
    from utils.data import PairDataset

    generated, trained = [], []
    real_generate, real_example = train_spin_diffusion.generate_opponent_samples, PairDataset.example

    def generate(pipeline, captions, store, **kw):
        generated.append(list(captions))
        return real_generate(pipeline, captions, store, **kw)

    def example(self, index):
        trained.append((len(generated), caption_of(self.base.ds[index][self.base.spec["caption"]])))
        return real_example(self, index)

    monkeypatch.setattr(train_spin_diffusion, "generate_opponent_samples", generate)
    monkeypatch.setattr(PairDataset, "example", example)
    argv = ["--use_lora", "--train_batch_size", "2", "--max_train_steps", "3", "--gen_shard_size", "4"]
    run_spin(*consumed_only(spin_args(assets, tmp_path / "consumed", *argv)))
    assert [len(c) for c in generated] == [6, 6] and all(len(set(c)) == 6 for c in generated)
    assert generated[0] != generated[1]  # drawn anew each iteration
    for k, captions in enumerate(generated, 1):
        assert sorted(c for it, c in trained if it == k) == sorted(captions)  # one epoch over exactly those pairs
        store = json.loads((tmp_path / "consumed" / f"iter_{k}" / "synthetic" / "store.json").read_text())
        assert store["prompts"] == "6 of 20"
    generated.clear()
    run_spin(
        *spin_args(assets, tmp_path / "all", *argv, "--num_iterations", "1", "--gen_prompts_per_iteration", "all")
    )
    assert [len(c) for c in generated] == [20]  # forwards per iteration: 20 / 6 of the default's
