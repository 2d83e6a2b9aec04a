"""SPIN iterations pushed to the local Hub server: one repo per iteration (or one tag per iteration),
cards whose base_model chains, pulling each iteration back. Faults and failed pushes: tests/test_hub_faults.py."""

import json
import shutil

import pytest
import torch

from helpers import run_spin, spin_args, tensors
from hub_server import TEST_TOKEN, hub_online


def card_meta(server, repo, revision="main"):
    import yaml

    text = server.read_file(repo, "README.md", revision).decode()
    return yaml.safe_load(text.split("---")[1])


def render(pipe):
    return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_full_iterations_as_repos_with_lineage(assets, tmp_path, hub_server):
    out, name = tmp_path / "repos", "test-user/spin-repos"
    with hub_online():
        run_spin(
            *spin_args(
                assets,
                out,
                "--max_train_steps",
                "2",
                "--learning_rate",
                "1e-4",
                "--push_to_hub",
                "--hub_model_id",
                name,
                "--hub_token",
                TEST_TOKEN,
                "--push_synthetic_dataset",
            )
        )
        from diffusers import StableDiffusionPipeline

        for k in (1, 2):
            repo = f"{name}-iter{k}"
            files = hub_server.files(repo)
            assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "metrics.json"} <= set(files)
            card = hub_server.read_file(repo, "README.md").decode()  # the card shows the grid the repo holds
            assert "validation_grid.png" in files and "![samples](validation_grid.png)" in card
            assert "| implicit_acc |" in card  # and the iteration's metrics table
            assert not [f for f in files if "checkpoint-" in f or "synthetic" in f]
            # the lineage: iteration 2 is based on iteration 1's repo, iteration 1 on the start model
            assert card_meta(hub_server, repo)["base_model"] == (
                str(assets["pipeline"]) if k == 1 else f"{name}-iter1"
            )
            pulled = StableDiffusionPipeline.from_pretrained(repo).unet.state_dict()
            local = tensors(out / f"iter_{k}" / "unet")
            assert all(torch.equal(pulled[key.split(":", 1)[1]], v) for key, v in local.items())
        synthetic = hub_server.files(f"{name}-iter1-synthetic", repo_type="dataset")
        assert "manifest.jsonl" in synthetic and "shard-00000.safetensors" in synthetic
    assert set(json.loads((out / "spin_state.json").read_text())["pushed"]) == {"1", "2"}


def test_lora_iterations_as_tagged_revisions(assets, tmp_path, hub_server):
    out, name = tmp_path / "revisions", "test-user/spin-revisions"
    argv = spin_args(
        assets,
        out,
        "--use_lora",
        "--push_to_hub",
        "--hub_model_id",
        name,
        "--hub_token",
        TEST_TOKEN,
        "--hub_versioning",
        "revisions",
    )
    with hub_online():
        run_spin(*argv)
        from diffusers import StableDiffusionPipeline

        assert {"iter1", "iter2"} <= {t["name"] if isinstance(t, dict) else t for t in hub_server.refs(name)["tags"]}
        pipe = StableDiffusionPipeline.from_pretrained(
            assets["pipeline"], safety_checker=None, requires_safety_checker=False
        )
        for k in (1, 2):
            rev = f"iter{k}"
            assert "pytorch_lora_weights.safetensors" in hub_server.files(name, rev)
            meta = card_meta(hub_server, name, rev)
            assert meta["base_model"] == str(assets["pipeline"])  # a LoRA applies to the start model
            pipe.load_lora_weights(name, revision=rev, adapter_name=f"hub{k}")
            pipe.set_adapters(f"hub{k}")
            from_hub = render(pipe)
            pipe.load_lora_weights(out / f"iter_{k}", adapter_name=f"disk{k}")
            pipe.set_adapters(f"disk{k}")
            assert abs(from_hub - render(pipe)).max() < 1e-6
        # a fresh run into the same repo moves the tags to its own weights
        shutil.rmtree(out)
        run_spin(*argv, "--seed", "7")
        pipe.load_lora_weights(name, revision="iter2", adapter_name="moved")
        pipe.set_adapters("moved")
        moved = render(pipe)
        pipe.load_lora_weights(out / "iter_2", adapter_name="new_disk")
        pipe.set_adapters("new_disk")
        assert abs(moved - render(pipe)).max() < 1e-6


def test_bad_token_fails_before_training(assets, tmp_path, hub_server):
    from utils.hub import HubError

    out = tmp_path / "denied"
    with hub_online(), pytest.raises(HubError, match="refused the token"):
        run_spin(
            *spin_args(
                assets, out, "--use_lora", "--push_to_hub", "--hub_model_id", "test-user/x", "--hub_token", "hf_wrong"
            )
        )
    assert not list(out.glob("iter_*"))
