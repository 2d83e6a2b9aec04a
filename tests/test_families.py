"""Model families beyond SD-1.5: tiny SDXL, SD3 and Flux.1 pipelines built offline (examples/make_tiny_families.py)
load with diffusers' own DiffusionPipeline and render; the scripts tell their family from model_index.json and
stop with one error line on a family they do not train, before any weights load."""

import json

import make_tiny_families
import pytest
import torch

CLASSES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Each family at a width and resolution the SD-1.5 assets do not use (24 px, CLIP hidden 24, T5 48)."""
    root = tmp_path_factory.mktemp("families")
    return {
        name: build(root / name, resolution=24, width=24, seed=1)
        for name, build in make_tiny_families.BUILDERS.items()
    }


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_tiny_family_pipeline_loads_with_diffusers_and_renders(families, family):
    from diffusers import DiffusionPipeline

    path = families[family]
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == CLASSES[family]
    pipe = DiffusionPipeline.from_pretrained(str(path))
    assert type(pipe).__name__ == CLASSES[family]
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"max_sequence_length": 16} if family != "sdxl" else {}
    out = pipe(
        ["a red circle above a blue square", "a green triangle"],
        num_inference_steps=2,
        height=24,
        width=24,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images
    assert out.shape == (2, 24, 24, 3) and float(out.std()) > 0  # two different, non-blank images
    assert not (out[0] == out[1]).all()


def test_t5_tokenizer_ends_every_sequence_and_encodes_any_text(tmp_path):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(make_tiny_families.build_t5_tokenizer(tmp_path / "t5", ["a cat"])))
    ids = tok("a cat on a zebra!").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.unk_token_id not in ids  # unseen words fall back to characters
    assert tok.decode(ids, skip_special_tokens=True) == "a cat on a zebra!"


def test_a_family_the_scripts_do_not_train_stops_before_loading(tmp_path, monkeypatch):
    import train_spin_diffusion
    import utils.families

    def loaded(*a, **k):
        raise AssertionError("the family must be refused before any weights load")

    for module in utils.families.family_modules().values():
        for name in ("load_components", "load_denoiser", "load_pipeline"):
            monkeypatch.setattr(module, name, loaded)
    model = tmp_path / "qwen"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(SystemExit) as exit_:
        train_spin_diffusion.cli(
            [
                "--pretrained_model_name_or_path",
                str(model),
                "--dataset_name",
                "x.parquet",
                "--output_dir",
                str(tmp_path),
            ]
        )
    message = str(exit_.value.code)  # the entry point exits with it: one line on stderr, status 1
    assert message.startswith("error: ") and "\n" not in message, message
    assert "a QwenImagePipeline, which these scripts do not train; supported: " in message
    for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert cls in message


def test_a_family_is_one_file_found_by_name(tmp_path, monkeypatch):
    """utils/families.py finds every family_*.py in its folder: a new family's file is all the registry needs, and
    the refusal of an unknown class lists what the files declare."""
    import sys

    import utils.families as families
    from utils.models import ModelError

    assert set(families.family_modules()) == {"family_sd", "family_sdxl", "family_sd3", "family_flux"}
    (tmp_path / "family_fake.py").write_text(
        'PIPELINE_CLASSES = ("FakePipeline",)\nDESCRIPTION = "a family made up for this test"\n'
    )
    monkeypatch.setattr(families, "FAMILY_DIR", tmp_path)
    monkeypatch.delitem(sys.modules, "utils.family_fake", raising=False)
    try:
        assert families.supported() == {"FakePipeline": "a family made up for this test"}
        assert families.family_for_class("FakePipeline").DESCRIPTION == "a family made up for this test"
        index = tmp_path / "model_index.json"
        index.write_text('{"_class_name": "StableDiffusionPipeline"}')
        with pytest.raises(ModelError, match="supported: FakePipeline \\(a family made up for this test\\)"):
            families.family_of_index("m", index)
    finally:
        sys.modules.pop("utils.family_fake", None)


@pytest.mark.parametrize("family", ["sd", *sorted(CLASSES)])
def test_sample_grid_renders_a_model_of_any_family(assets, families, family, tmp_path, capsys):
    import sample_grid
    from PIL import Image

    base = assets["pipeline"] if family == "sd" else families[family]
    out = tmp_path / "grid.png"
    argv = ["--base", str(base), "--prompts", "a red circle", "a blue square", "--num_inference_steps", "2"]
    sample_grid.main(argv + ["--resolution", "24", "--output", str(out)])
    assert Image.open(out).size[0] >= 48  # two images side by side
    assert CLASSES.get(family, "StableDiffusionPipeline") in capsys.readouterr().out


def test_a_scheduler_that_predicts_what_no_loss_trains(assets, tmp_path):
    """A pipeline whose scheduler predicts "sample": one error naming it, unless --prediction_type overrides."""
    import json
    import shutil

    from utils import family_sd
    from utils.models import ModelError

    model = tmp_path / "sample-model"
    shutil.copytree(assets["pipeline"], model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "sample"}))
    with pytest.raises(
        ModelError, match="its scheduler predicts 'sample'; these scripts train epsilon or v_prediction"
    ):
        family_sd.load_components(str(model), with_unet=False)
    assert (
        family_sd.load_components(str(model), with_unet=False, prediction_type="epsilon")[3].config.prediction_type
        == "epsilon"
    )
