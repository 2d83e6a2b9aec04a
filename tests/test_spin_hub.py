"""SPIN iterations pushed to the local Hub server: one repo per iteration (or one tag per iteration),
cards whose base_model chains, pulling each iteration back, and a failed push retried by a rerun."""

import json

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


@pytest.mark.parametrize("versioning", ["repos", "revisions"])
def test_each_iteration_pushed_and_pulled(assets, tmp_path, hub_server, versioning):
    out = tmp_path / versioning
    name = f"test-user/spin-{versioning}"
    extra = ["--push_synthetic_dataset"] if versioning == "repos" else []
    with hub_online():
        run_spin(*spin_args(assets, out, "--use_lora", "--push_to_hub", "--hub_model_id", name, "--hub_token", TEST_TOKEN,
                            "--hub_versioning", versioning, *extra))
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(assets["pipeline"], safety_checker=None, requires_safety_checker=False)
        for k in (1, 2):
            repo, rev = (f"{name}-iter{k}", "main") if versioning == "repos" else (name, f"iter{k}")
            files = hub_server.files(repo, rev)
            assert "pytorch_lora_weights.safetensors" in files and "metrics.json" in files
            assert not [f for f in files if "checkpoint-" in f or "synthetic" in f]
            meta = card_meta(hub_server, repo, rev)
            if versioning == "repos":  # the lineage: iteration 2 is based on iteration 1's repo
                assert meta["base_model"] == (str(assets["pipeline"]) if k == 1 else f"{name}-iter1")
            pipe.load_lora_weights(repo, revision=rev, adapter_name=f"hub{k}")
            pipe.set_adapters(f"hub{k}")
            from_hub = render(pipe)
            pipe.load_lora_weights(out / f"iter_{k}", adapter_name=f"disk{k}")
            pipe.set_adapters(f"disk{k}")
            assert abs(from_hub - render(pipe)).max() < 1e-6
        if versioning == "repos":
            synthetic = hub_server.files(f"{name}-iter1-synthetic", repo_type="dataset")
            assert "manifest.jsonl" in synthetic and "shard-00000.safetensors" in synthetic
        else:
            assert {"iter1", "iter2"} <= {t["name"] if isinstance(t, dict) else t for t in hub_server.refs(name)["tags"]}
    state = json.loads((out / "spin_state.json").read_text())
    assert set(state["pushed"]) == {"1", "2"}


def test_bad_token_fails_before_training(assets, tmp_path, hub_server):
    out = tmp_path / "denied"
    with hub_online(), pytest.raises(Exception, match="401|[Ii]nvalid.*token"):
        run_spin(*spin_args(assets, out, "--use_lora", "--push_to_hub", "--hub_model_id", "test-user/x", "--hub_token", "hf_wrong"))
    assert not list(out.glob("iter_*"))


def test_failed_push_keeps_iteration_and_rerun_retries(assets, tmp_path, hub_server, monkeypatch):
    import train_spin_diffusion

    out = tmp_path / "retry"
    argv = spin_args(assets, out, "--use_lora", "--num_iterations", "1", "--push_to_hub", "--hub_model_id",
                     "test-user/spin-retry", "--hub_token", TEST_TOKEN)
    with hub_online():
        with monkeypatch.context() as m:
            def offline(*a, **k):
                raise ConnectionError("network down")

            m.setattr(train_spin_diffusion, "push_folder", offline)
            with pytest.raises(ConnectionError):
                run_spin(*argv)
        saved = tensors(out / "iter_1" / "pytorch_lora_weights.safetensors")
        state = json.loads((out / "spin_state.json").read_text())
        assert state["done"] == [1] and state["pushed"] == {}
        run_spin(*argv)
        assert "pytorch_lora_weights.safetensors" in hub_server.files("test-user/spin-retry-iter1")
    after = tensors(out / "iter_1" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(saved[k], after[k]) for k in saved)  # not retrained, just pushed
