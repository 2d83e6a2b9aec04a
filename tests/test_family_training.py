"""SPIN, SFT and Diffusion-DPO on the families beyond SD-1.5 (tiny SDXL, SD3 and Flux.1 pipelines built offline at
a width and resolution no other test uses): every iteration starts at its reference (loss log 2), every result
loads with diffusers' own DiffusionPipeline (on the base, for LoRA) and renders, evaluate.py scores them, a killed
flow-matching run resumes to the uninterrupted result, and a pushed iteration comes back from the test Hub."""

import json
import math

import make_tiny_families
import pytest
import torch
from test_evaluate import SCORER_FLAGS

from helpers import max_abs_diff, run_sft, run_spin, sft_args, spin_args, tensors

FAMILIES = ("sdxl", "sd3", "flux")
RESOLUTION = 32


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Each family at CLIP width 16 (T5 32), 32 px, seed 2: shapes the other tests do not build."""
    root = tmp_path_factory.mktemp("train-families")
    return {
        name: build(root / name, resolution=RESOLUTION, width=16, seed=2)
        for name, build in make_tiny_families.BUILDERS.items()
    }


def family_spin_args(assets, families, family, out, *extra):
    argv = spin_args(assets, out, *extra)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(families[family])
    flow = ["--max_sequence_length", "16"] if family != "sdxl" else []
    return argv + ["--max_train_samples", "8"] + flow


def first_loss(out, k):
    return json.loads((out / f"iter_{k}" / "metrics.json").read_text())["first_step"]["loss"]


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, generator=gen).images[0]


def pixels(image):
    import numpy as np

    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_spin_lora_two_iterations_and_full_one_load_with_diffusers(assets, families, family, tmp_path):
    from diffusers import DiffusionPipeline

    lora, full = tmp_path / "lora", tmp_path / "full"
    run_spin(*family_spin_args(assets, families, family, lora, "--use_lora"))
    run_spin(*family_spin_args(assets, families, family, full, "--num_iterations", "1"))
    for out, k in ((lora, 1), (lora, 2), (full, 1)):
        assert first_loss(out, k) == pytest.approx(math.log(2), abs=1e-3), (out, k)

    base = DiffusionPipeline.from_pretrained(str(families[family]))
    plain = pixels(render(base))
    for k in (1, 2):  # each iteration is an adapter on the start model, in the format its pipeline loads
        base.load_lora_weights(str(lora / f"iter_{k}"), adapter_name=f"it{k}")
        base.set_adapters(f"it{k}")
        assert abs(pixels(render(base)) - plain).max() > 0, k
    tuned = DiffusionPipeline.from_pretrained(str(full / "iter_1"))
    assert type(tuned) is type(base) and abs(pixels(render(tuned)) - plain).max() > 0
    card = (full / "iter_1" / "README.md").read_text()
    assert type(base).__name__ in card  # the card says which pipeline class loads it


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_lora_and_full_load_with_diffusers(assets, families, family, tmp_path):
    from diffusers import DiffusionPipeline

    def sft(out, *extra):
        argv = sft_args(assets, out, "--max_train_steps", "2", *extra)
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(families[family])
        argv[argv.index("--resolution") + 1] = str(RESOLUTION)
        run_sft(*argv, *(["--max_sequence_length", "16"] if family != "sdxl" else []))

    sft(tmp_path / "lora", "--use_lora", "--learning_rate", "1e-3")
    sft(tmp_path / "full", "--learning_rate", "1e-4")
    pipe = DiffusionPipeline.from_pretrained(str(families[family]))
    plain = pixels(render(pipe))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert abs(pixels(render(pipe)) - plain).max() > 0
    full = DiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    assert type(full) is type(pipe) and abs(pixels(render(full)) - plain).max() > 0


def test_dpo_on_a_flow_model(assets, families, tmp_path):
    dpo = tmp_path / "dpo"
    run_spin(*family_spin_args(assets, families, "sd3", dpo, "--use_lora", "--negative_source", "dataset"))
    assert first_loss(dpo, 1) == pytest.approx(math.log(2), abs=1e-3)
    assert not (dpo / "iter_2").exists()  # Diffusion-DPO: one iteration against the start model


class Killed(Exception):
    pass


@pytest.mark.parametrize("family,kind", [("flux", "lora"), ("sd3", "full")])
def test_flow_run_killed_mid_iteration_resumes_to_the_uninterrupted_result(
    assets, families, tmp_path, monkeypatch, family, kind
):
    """Killed right after iteration 2's checkpoint-2 (Flux.1 LoRA), or iteration 1's (SD3 full with EMA): the same
    command again ends with the uninterrupted run's weights."""
    import train_spin_diffusion

    argv = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--weighting_scheme", "logit_normal"]
    argv += ["--use_lora"] if kind == "lora" else ["--num_iterations", "1", "--use_ema", "--learning_rate", "1e-4"]
    killed_in = "iter_2" if kind == "lora" else "iter_1"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_spin(*family_spin_args(assets, families, family, straight, *argv))
    real = train_spin_diffusion.save_checkpoint

    def save_then_die(accelerator, it_dir, step, *a, **k):
        path = real(accelerator, it_dir, step, *a, **k)
        if killed_in in str(it_dir) and step == 2:
            raise Killed
        return path

    with monkeypatch.context() as m:
        m.setattr(train_spin_diffusion, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_spin(*family_spin_args(assets, families, family, killed, *argv))
    assert json.loads((killed / "spin_state.json").read_text())["done"] == ([1] if kind == "lora" else [])
    run_spin(*family_spin_args(assets, families, family, killed, *argv))  # the same command again
    last = "iter_2/pytorch_lora_weights.safetensors" if kind == "lora" else "iter_1/transformer"
    assert max_abs_diff(tensors(killed / last), tensors(straight / last)) < 1e-5


def test_evaluate_scores_a_model_of_each_family(assets, families, tmp_path):
    """Each family's pipeline, and a LoRA on a Flux.1 base, rendered and scored."""
    import evaluate

    lora = tmp_path / "flux-lora"
    argv = sft_args(assets, lora, "--use_lora", "--max_train_steps", "2", "--max_sequence_length", "16")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(families["flux"])
    argv[argv.index("--resolution") + 1] = str(RESOLUTION)
    run_sft(*argv)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\n")
    argv = [arg for family in FAMILIES for arg in ("--model", f"{family}={families[family]}")]
    argv += ["--model", f"flux-lora={lora}", "--base_model", str(families["flux"]), "--baseline", "sdxl"]
    argv += ["--prompts", str(prompts)]
    argv += ["--resolution", str(RESOLUTION), "--num_inference_steps", "2", "--output_dir", str(tmp_path / "eval")]
    argv += ["--metrics", "pickscore,aesthetic", "--bootstrap_resamples", "50", *map(str, SCORER_FLAGS)]
    evaluate.main(evaluate.parse_args(argv))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {name: m["family"] for name, m in saved["models"].items()} == {f: f for f in FAMILIES} | {
        "flux-lora": "flux"
    }
    # without --guidance_scale each renders at its own pipeline's: the paper's 7.5 would be Flux's embedding value
    guidance = {name: m["guidance_scale"] for name, m in saved["models"].items()}
    assert guidance == {"sdxl": 5.0, "sd3": 7.0, "flux": 3.5, "flux-lora": 3.5}
    for family in (*FAMILIES, "flux-lora"):
        assert all(math.isfinite(p["scores"][family]["pickscore"]) for p in saved["per_prompt"])


def test_pushed_flow_iterations_come_back_from_the_hub(assets, families, tmp_path, hub_server):
    """Flux.1 LoRA iterations pushed as repos are pulled and loaded on the base; a full SD3 iteration pulls as
    its pipeline with the transformer it trained."""
    from diffusers import DiffusionPipeline

    from hub_server import TEST_TOKEN, hub_online

    lora, full = tmp_path / "lora", tmp_path / "full"
    hub = ["--push_to_hub", "--hub_token", TEST_TOKEN, "--hub_model_id"]
    with hub_online():
        run_spin(*family_spin_args(assets, families, "flux", lora, "--use_lora", *hub, "test-user/flux-spin"))
        run_spin(*family_spin_args(assets, families, "sd3", full, "--num_iterations", "1", *hub, "test-user/sd3-spin"))
        base = DiffusionPipeline.from_pretrained(str(families["flux"]))
        plain = pixels(render(base))
        for k in (1, 2):
            assert "pytorch_lora_weights.safetensors" in hub_server.files(f"test-user/flux-spin-iter{k}")
            base.load_lora_weights(f"test-user/flux-spin-iter{k}", adapter_name=f"hub{k}")
            base.set_adapters(f"hub{k}")
            assert abs(pixels(render(base)) - plain).max() > 0
        pulled = DiffusionPipeline.from_pretrained("test-user/sd3-spin-iter1")
        assert type(pulled).__name__ == "StableDiffusion3Pipeline"
        local = tensors(full / "iter_1" / "transformer")
        weights = pulled.transformer.state_dict()
        assert all(torch.equal(weights[key.split(":", 1)[1]], v) for key, v in local.items())


def test_sdxl_size_conditioning_follows_each_image_and_the_generation_size():
    """SDXL's six size ids: each real image's original size and crop (the crop mirrored by a flip), the generation
    size for the opponent's samples, in the order the UNet reads them (real rows, then negative rows)."""
    from PIL import Image

    from utils import family_sdxl
    from utils.data import generated_size, preprocess_with_size
    from utils.spin import pair_conditions

    image = Image.new("RGB", (64, 48))  # landscape: the shorter side (48) goes to 32, the width to 43
    assert preprocess_with_size(image, 32, center_crop=True)[1].tolist() == [48, 64, 0, 5, 32, 32]
    assert preprocess_with_size(image, 32, center_crop=True, flip=True)[1].tolist() == [48, 64, 0, 6, 32, 32]
    real = torch.stack(
        [preprocess_with_size(image, 32)[1], preprocess_with_size(image.rotate(90, expand=True), 32)[1]]
    )
    batch = {"image_size": real, "negative_image_size": torch.stack([generated_size(32)] * 2)}
    cond = pair_conditions({"prompt_embeds": torch.zeros(2, 3, 8), "pooled_prompt_embeds": torch.zeros(2, 4)}, batch)
    seen = {}

    def unet(noisy, t, emb, added_cond_kwargs, return_dict):
        seen.update(added_cond_kwargs)
        return (noisy,)

    family_sdxl.forward(unet, torch.zeros(4, 4, 2, 2), torch.zeros(4), cond)
    assert seen["time_ids"].tolist() == [
        [48, 64, 0, 5, 32, 32],
        [64, 48, 5, 0, 32, 32],
        [32, 32, 0, 0, 32, 32],
        [32, 32, 0, 0, 32, 32],
    ]
    assert seen["text_embeds"].shape == (4, 4)


def test_sdxl_vae_runs_in_fp32_unless_a_fixed_one_is_given(families, tmp_path):
    """Under bf16 the text encoders and a replacement VAE run in bf16; SDXL's own VAE stays in fp32. The replacement
    (other weights than the pipeline's) is the VAE that gets used."""
    import argparse

    import make_tiny_assets

    from utils import family_sdxl
    from utils.training import load_frozen_components

    class Accelerator:
        device, mixed_precision = torch.device("cpu"), "bf16"

    args = argparse.Namespace(
        pretrained_model_name_or_path=str(families["sdxl"]),
        revision=None,
        variant=None,
        prediction_type=None,
        cache_dir=None,
        max_sequence_length=None,
        pretrained_vae_model_name_or_path=None,
    )
    frozen = load_frozen_components(args, Accelerator(), family_sdxl)
    assert frozen.vae.dtype == torch.float32 and frozen.text.text_encoder_2.dtype == torch.bfloat16
    fixed = make_tiny_assets.tiny_vae(32, seed=123, scaling_factor=0.13025)
    fixed.save_pretrained(tmp_path / "fixed-vae")
    args.pretrained_vae_model_name_or_path = str(tmp_path / "fixed-vae")
    replaced = load_frozen_components(args, Accelerator(), family_sdxl).vae
    assert replaced.dtype == torch.bfloat16
    own, new = frozen.vae.state_dict(), replaced.state_dict()
    assert any(not torch.equal(own[name].to(torch.bfloat16), new[name]) for name in own)
    assert all(torch.equal(fixed.state_dict()[name].to(torch.bfloat16), new[name]) for name in new)
