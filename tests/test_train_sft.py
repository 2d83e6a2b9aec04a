"""End-to-end tests of train_sft.py on the tiny assets: outputs that load, weights that change, resume
equal to an uninterrupted run, checkpoint limits, 8-bit Adam, bf16, latent cache, and YAML configs."""

import json

import pytest
import torch

import train_sft
from helpers import assert_same_tensors, max_abs_diff, mean_abs_diff, run_sft, sft_args, tensors


def base_unet(assets):
    return tensors(assets["pipeline"] / "unet")


def test_lora_run_gives_loadable_changed_adapter_card_and_args(assets, tmp_path):
    out = tmp_path / "lora"
    run_sft(*sft_args(assets, out, "--use_lora", "--rank", "4", "--hub_token", "hf_secret_never_saved"))
    lora = tensors(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    # peft's gaussian init starts B at zero: non-zero B means the adapter really trained.
    ups = [v for k, v in lora.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        assets["pipeline"], safety_checker=None, requires_safety_checker=False
    )
    before = pipe(
        "a red fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    pipe.load_lora_weights(out)
    after = pipe(
        "a red fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert abs(before - after).max() > 1e-4

    card = (out / "README.md").read_text()
    assert f"base_model: {assets['pipeline']}" in card and "lora" in card and "learning_rate" in card
    assert "validation_grid.png" in card and (out / "validation_grid.png").exists()
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["rank"] == 4 and "hub_token" not in saved
    assert not any("hf_secret_never_saved" in f.read_bytes().decode("latin-1") for f in out.rglob("*") if f.is_file())


def test_full_run_gives_loadable_pipeline_with_changed_unet_only(assets, tmp_path):
    out = tmp_path / "full"
    run_sft(*sft_args(assets, out, "--max_train_steps", "3"))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    new, old = tensors(out / "unet"), base_unet(assets)
    assert max_abs_diff(new, old) > 1e-4
    assert_same_tensors(tensors(out / "vae"), tensors(assets["pipeline"] / "vae"), atol=0, rtol=0)
    assert_same_tensors(tensors(out / "text_encoder"), tensors(assets["pipeline"] / "text_encoder"), atol=0, rtol=0)
    assert "datasets" not in (out / "README.md").read_text().split("---")[1]  # a local path is no Hub dataset


class Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def run_killed_then_resumed(monkeypatch, argv, kill_at_step):
    real_save = train_sft.save_checkpoint

    def save_then_die(accelerator, output_dir, step, total_limit=None):
        path = real_save(accelerator, output_dir, step, total_limit)
        if step == kill_at_step:
            raise Killed(path)
        return path

    with monkeypatch.context() as m:
        m.setattr(train_sft, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_sft(*argv)
    run_sft(*argv, "--resume_from_checkpoint", "latest")


@pytest.mark.parametrize("mode", ["full_ema", "lora"])
def test_killed_run_resumed_with_latest_equals_uninterrupted_run(assets, tmp_path, monkeypatch, mode):
    # 20 winners / batch 4 = 5 batches per epoch; accumulation 2 -> 3 steps per epoch; 7 steps span 3 epochs.
    # The kill at step 4 lands mid-epoch, so resuming must skip the right batches, not restart the epoch.
    # Validation renders in between must not disturb training (EMA weights swapped in and back out).
    extra = (
        ["--use_ema", "--validation_prompts", "a cat", "--validation_steps", "3"]
        if mode == "full_ema"
        else ["--use_lora"]
    )
    common = [
        *extra,
        "--max_train_steps",
        "7",
        "--gradient_accumulation_steps",
        "2",
        "--random_flip",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--lr_scheduler",
        "linear",
        "--lr_warmup_steps",
        "2",
        "--validation_num_inference_steps",
        "1",
        "--num_validation_images",
        "1",
    ]
    straight = tmp_path / "straight"
    run_sft(*sft_args(assets, straight, *common))
    resumed = tmp_path / "resumed"
    run_killed_then_resumed(monkeypatch, sft_args(assets, resumed, *common), kill_at_step=4)

    if mode == "lora":
        a, b = (
            tensors(straight / "pytorch_lora_weights.safetensors"),
            tensors(resumed / "pytorch_lora_weights.safetensors"),
        )
    else:  # the saved UNet is the EMA: equal only if EMA state was restored too
        a, b = tensors(straight / "unet"), tensors(resumed / "unet")
    assert max_abs_diff(a, b) < 1e-5
    # A run that restarted the epoch (or lost the EMA) ends elsewhere: the comparison can fail.
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    if mode == "full_ema":
        assert (straight / "validation_step_3.png").exists() and (straight / "validation_step_6.png").exists()


def test_checkpoints_total_limit_keeps_newest(assets, tmp_path):
    out = tmp_path / "limit"
    run_sft(
        *sft_args(
            assets,
            out,
            "--use_lora",
            "--max_train_steps",
            "5",
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "3",
        )
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert (out / "checkpoint-5" / "pytorch_lora_weights.safetensors").exists()


def test_8bit_adam_and_bf16_full_run(assets, tmp_path):
    out = tmp_path / "bnb"
    run_sft(
        *sft_args(
            assets,
            out,
            "--use_8bit_adam",
            "--mixed_precision",
            "bf16",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
        )
    )
    assert max_abs_diff(tensors(out / "unet"), base_unet(assets)) > 1e-5
    opt = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=False)

    def leaves(x):
        if isinstance(x, dict):
            return [t for v in x.values() for t in leaves(v)]
        return [x] if torch.is_tensor(x) else []

    assert any(t.dtype == torch.uint8 for t in leaves(opt["state"])), "8-bit Adam keeps uint8 optimizer states"
    assert json.loads((out / "training_args.json").read_text())["mixed_precision"] == "bf16"


def test_bf16_lora_run(assets, tmp_path):
    out = tmp_path / "bf16"
    run_sft(*sft_args(assets, out, "--use_lora", "--mixed_precision", "bf16", "--max_train_steps", "2"))
    lora = tensors(out / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in lora.values())
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora.up" in k)  # it trained


def test_bf16_lora_on_an_fp8_stored_base(assets, tmp_path):
    """--layerwise_casting: the adapter trains in fp32 on a base stored in fp8 and computed in bf16, and the result
    stays close to the same run on the unquantised base (fp8 rounds the frozen weights, nothing more)."""
    common = ["--use_lora", "--mixed_precision", "bf16", "--max_train_steps", "2"]
    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    run_sft(*sft_args(assets, plain, *common))
    run_sft(*sft_args(assets, fp8, *common, "--layerwise_casting", "fp8_e5m2"))
    a, b = tensors(plain / "pytorch_lora_weights.safetensors"), tensors(fp8 / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in b.values())
    assert 0 < max_abs_diff(a, b) < 0.05 * max(v.abs().max().item() for v in a.values())


def test_latent_cache_gives_same_result_as_encoding_every_step(assets, tmp_path):
    common = ["--use_lora", "--center_crop", "--max_train_steps", "3"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run_sft(*sft_args(assets, plain, *common))
    run_sft(*sft_args(assets, cached, *common, "--cache_latents"))
    assert list((cached / "latent_cache").glob("*.safetensors"))
    a, b = tensors(plain / "pytorch_lora_weights.safetensors"), tensors(cached / "pytorch_lora_weights.safetensors")
    assert max_abs_diff(a, b) < 1e-4


def test_plain_image_caption_dataset(assets, tmp_path):
    out = tmp_path / "captions"
    run_sft(
        *sft_args(
            assets,
            out,
            "--use_lora",
            "--max_train_steps",
            "2",
            "--image_column",
            "image",
            "--caption_column",
            "text",
            dataset=assets["captions"],
        )
    )
    assert all(
        v.abs().sum() > 0 for k, v in tensors(out / "pytorch_lora_weights.safetensors").items() if "lora.up" in k
    )


def test_v_prediction_is_saved_with_the_pipeline(assets, tmp_path):
    out = tmp_path / "vpred"
    run_sft(*sft_args(assets, out, "--prediction_type", "v_prediction", "--snr_gamma", "5", "--max_train_steps", "1"))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert "`prediction_type` | `v_prediction`" in (out / "README.md").read_text()


def test_yaml_config_with_command_line_override(assets, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("use_lora: true\nrank: 8\nlearning_rate: 3.0e-4\nresolution: 32\nmax_train_steps: 9\n")
    args = train_sft.parse_args(
        ["--config", str(cfg), "--rank", "2", "--pretrained_model_name_or_path", "x", "--dataset_name", "y"]
    )
    assert args.use_lora and args.learning_rate == 3e-4 and args.max_train_steps == 9
    assert args.rank == 2  # the command line wins
    cfg.write_text("use_lora: true\nranc: 8\n")
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--config", str(cfg), "--pretrained_model_name_or_path", "x", "--dataset_name", "y"])


def spy_layouts(monkeypatch, module, name):
    """Records, at every training step, whether the UNet's convolution weights are in channels-last layout."""
    seen, real = [], getattr(module, name)

    def spy(unet, *args, **kwargs):
        seen.append(
            unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            and not unet.conv_in.weight.is_contiguous()
        )
        return real(unet, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_channels_last_run_saves_checkpoints_and_matches_the_default_layout(assets, tmp_path, monkeypatch):
    """--channels_last: the steps run in channels-last layout, checkpoints and the pipeline save, and the weights
    equal a default-layout run up to float reordering."""
    common = ["--use_ema", "--max_train_steps", "3", "--checkpointing_steps", "2", "--learning_rate", "1e-4"]
    seen = spy_layouts(monkeypatch, train_sft, "sft_forward")
    run_sft(*sft_args(assets, tmp_path / "default", *common))
    assert seen == [False] * 3
    seen.clear()
    run_sft(*sft_args(assets, tmp_path / "cl", *common, "--channels_last"))
    assert seen == [True] * 3
    assert (tmp_path / "cl" / "checkpoint-2" / "unet").is_dir()
    before, a, b = base_unet(assets), tensors(tmp_path / "default" / "unet"), tensors(tmp_path / "cl" / "unet")
    # Adam turns float-reordering noise in near-zero gradients into full-size steps for a few weights: compare
    # on average, against how far training moved the weights
    assert a.keys() == b.keys() and mean_abs_diff(a, b) < 0.02 * mean_abs_diff(before, a)


def test_torch_compile_with_gradient_checkpointing_trains_like_eager(assets, tmp_path, compiled_graphs):
    """--torch_compile: the training steps run through compiled graphs (with checkpointed blocks and EMA),
    checkpoints and the pipeline save under the usual keys, and the weights equal an uncompiled run's."""
    common = [
        "--gradient_checkpointing",
        "--use_ema",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--learning_rate",
        "1e-4",
    ]
    run_sft(*sft_args(assets, tmp_path / "eager", *common))
    run_sft(*sft_args(assets, tmp_path / "compiled", *common, "--torch_compile"))
    assert True in compiled_graphs  # a graph was built for the training step
    assert (tmp_path / "compiled" / "checkpoint-1" / "unet").is_dir()
    a, b = tensors(tmp_path / "eager" / "unet"), tensors(tmp_path / "compiled" / "unet")
    assert_same_tensors(a, b, atol=1e-5, rtol=1e-4)


def test_resume_with_the_other_layout_puts_optimizer_states_in_the_parameters_layout(assets, tmp_path, monkeypatch):
    """A checkpoint saved without --channels_last and resumed with it: Adam's states follow the parameters' layout
    (fused AdamW refuses mixed layouts; 8-bit Adam would pair flat memory wrongly)."""
    import utils.checkpointing

    common = ["--learning_rate", "1e-4", "--checkpointing_steps", "2"]
    run_sft(*sft_args(assets, tmp_path / "run", *common, "--max_train_steps", "2"))
    checked = []
    real_load = utils.checkpointing.load_checkpoint

    def load_and_check(accelerator, checkpoint, optimizer, *rest):
        real_load(accelerator, checkpoint, optimizer, *rest)
        states = [
            (p, s) for g in optimizer.param_groups for p in g["params"] for s in [optimizer.state[p]] if p.dim() == 4
        ]
        checked.append(all(s["exp_avg"].stride() == p.stride() == s["exp_avg_sq"].stride() for p, s in states))
        assert states and not states[0][0].is_contiguous()  # the parameters really are channels-last

    monkeypatch.setattr(train_sft, "load_checkpoint", load_and_check)
    run_sft(
        *sft_args(
            assets,
            tmp_path / "run",
            *common,
            "--max_train_steps",
            "3",
            "--channels_last",
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert checked == [True]
