"""--push_to_hub against the local Hub-compatible server (real huggingface_hub client), then pulling the
result back by repo id the way a user would."""

import pytest
import torch

from helpers import max_abs_diff, run_sft, sft_args, tensors
from hub_server import TEST_TOKEN, hub_online


def pushed_files(server, repo_id):
    return [f for f in server.files(repo_id) if f != ".gitattributes"]


def test_push_lora_with_hub_token_then_load_lora_weights_from_repo(assets, tmp_path, hub_server, monkeypatch):
    out = tmp_path / "sft-lora"
    hub_server.seen_tokens.clear()
    with hub_online():
        run_sft(
            *sft_args(
                assets,
                out,
                "--use_lora",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--push_to_hub",
                "--hub_model_id",
                "test-user/sft-lora",
                "--hub_token",
                TEST_TOKEN,
                "--hub_private_repo",
            )
        )
        files = pushed_files(hub_server, "test-user/sft-lora")
        assert {"pytorch_lora_weights.safetensors", "README.md", "training_args.json"} <= set(files)
        assert not [f for f in files if f.startswith(("checkpoint-", "logs/"))], files
        assert hub_server.repo_private("test-user/sft-lora")
        assert TEST_TOKEN in hub_server.seen_tokens

        from diffusers import StableDiffusionPipeline

        monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)  # the repo is private: pulling needs the token too
        pipe = StableDiffusionPipeline.from_pretrained(
            assets["pipeline"], safety_checker=None, requires_safety_checker=False
        )
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        local = pipe("a blue car", num_inference_steps=2, generator=gen(), output_type="np").images
        pipe.load_lora_weights("test-user/sft-lora")
        from_hub = pipe("a blue car", num_inference_steps=2, generator=gen(), output_type="np").images
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out))
        from_disk = pipe("a blue car", num_inference_steps=2, generator=gen(), output_type="np").images
    assert abs(from_hub - from_disk).max() < 1e-6 and abs(from_hub - local).max() > 1e-4


def test_push_full_with_cached_login_then_from_pretrained_repo(assets, tmp_path, hub_server):
    from huggingface_hub import constants

    token_file = constants.HF_TOKEN_PATH  # what `hf auth login` writes
    out = tmp_path / "sft-full"
    with hub_online():
        with open(token_file, "w") as f:
            f.write(TEST_TOKEN)
        try:
            run_sft(
                *sft_args(
                    assets,
                    out,
                    "--max_train_steps",
                    "2",
                    "--checkpointing_steps",
                    "1",
                    "--push_to_hub",
                    "--hub_model_id",
                    "test-user/sft-full",
                )
            )
        finally:
            import os

            os.remove(token_file)
        files = pushed_files(hub_server, "test-user/sft-full")
        assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= set(files)
        assert not [f for f in files if "checkpoint-" in f]
        assert not hub_server.repo_private("test-user/sft-full")

        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained("test-user/sft-full")
    trained = tensors(out / "unet")
    pulled = {f"diffusion_pytorch_model.safetensors:{k}": v for k, v in pipe.unet.state_dict().items()}
    assert max_abs_diff(trained, {k: pulled[k] for k in trained}) == 0
    assert max_abs_diff(trained, tensors(assets["pipeline"] / "unet")) > 1e-5


def test_push_with_wrong_token_fails_before_training(assets, tmp_path, hub_server):
    from utils.hub import HubError

    out = tmp_path / "sft-denied"
    with hub_online(), pytest.raises(HubError, match=r"refused the token \(HTTP 401\)"):
        run_sft(
            *sft_args(
                assets,
                out,
                "--use_lora",
                "--max_train_steps",
                "1",
                "--push_to_hub",
                "--hub_model_id",
                "test-user/denied",
                "--hub_token",
                "hf_wrong",
            )
        )
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # checked before any training
