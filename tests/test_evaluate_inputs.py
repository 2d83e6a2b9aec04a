"""evaluate.py: model specs of every kind load (pipeline, UNet-only + base, LoRA + base, Hub repo @revision),
and bad input stops with a clear message before any generation."""

import json
import shutil

import pytest
import torch

import evaluate
from helpers import run_sft
from hub_server import TEST_TOKEN, hub_online
from utils.data import load_training_dataset
from utils.evaluation import EvalError, load_pipeline, load_prompts, resolve_model


def render(pipe):
    return pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def lora_out(assets, tmp_path_factory):
    from helpers import sft_args

    out = tmp_path_factory.mktemp("eval-lora")
    run_sft(*sft_args(assets, out, "--use_lora", "--max_train_steps", "2"))
    return out


def test_pipeline_unet_and_lora_specs_load(assets, tmp_path, lora_out):
    base = str(assets["pipeline"])
    unet_only = tmp_path / "unet-only"  # laid out like UCLA-AGI/SPIN-Diffusion-iterN: unet/ and nothing else
    shutil.copytree(assets["pipeline"] / "unet", unet_only / "unet")
    root_unet = tmp_path / "root-unet"  # a UNet saved with save_pretrained at the folder's root
    shutil.copytree(assets["pipeline"] / "unet", root_unet)
    kinds = {}
    for arg in (f"full={base}", f"unet={unet_only}", f"rootunet={root_unet}", f"lora={lora_out}"):
        spec = resolve_model(arg)
        kinds[spec.name] = spec.kind
        pipe = load_pipeline(spec, base, torch.float32, "cpu")
        kinds[spec.name + "_img"] = render(pipe)
    assert (kinds["full"], kinds["unet"], kinds["rootunet"], kinds["lora"]) == ("pipeline", "unet", "unet", "lora")
    assert abs(kinds["full_img"] - kinds["unet_img"]).max() < 1e-6  # same UNet on the same base
    assert abs(kinds["full_img"] - kinds["lora_img"]).max() > 1e-5  # the LoRA changes the result


def test_hub_repo_with_revision(assets, tmp_path, hub_server, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    with hub_online():
        api = HfApi(token=TEST_TOKEN)
        repo = api.create_repo("test-user/eval-rev", exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(assets["pipeline"] / "unet"), path_in_repo="unet")
        api.create_tag(repo, tag="v1")
        from diffusers import UNet2DConditionModel  # main moves on: a different UNet after the tag

        changed = UNet2DConditionModel.from_pretrained(assets["pipeline"], subfolder="unet")
        with torch.no_grad():
            changed.conv_in.bias += 0.5
        changed.save_pretrained(tmp_path / "changed" / "unet")
        api.upload_folder(repo_id=repo, folder_path=str(tmp_path / "changed"))
        spec = resolve_model(f"hubunet={repo}@v1")
        assert (spec.kind, spec.revision, spec.is_hub) == ("unet", "v1", True)
        at_v1 = render(load_pipeline(spec, str(assets["pipeline"]), torch.float32, "cpu"))
        at_main = render(
            load_pipeline(resolve_model(f"hubmain={repo}"), str(assets["pipeline"]), torch.float32, "cpu")
        )
    local = render(
        load_pipeline(resolve_model(f"full={assets['pipeline']}"), str(assets["pipeline"]), torch.float32, "cpu")
    )
    assert abs(at_v1 - local).max() < 1e-6 and abs(at_main - local).max() > 1e-4


@pytest.fixture
def no_generation(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded for generation before the bad input was reported")

    monkeypatch.setattr(evaluate, "load_pipeline", boom)


def eval_args(assets, tmp_path, *extra, prompts=None):
    if prompts is None:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red fox\na blue car\n")
    return [
        "--model",
        f"a={assets['pipeline']}",
        "--prompts",
        str(prompts),
        "--output_dir",
        str(tmp_path / "eval"),
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics", "pickscore,clipscore"], "unknown metric(s) ['clipscore']"),
        (["--baseline", "zzz"], "--baseline zzz is not among the models"),
        (["--model", "a=elsewhere/x"], "--model names must be unique"),
    ],
)
def test_bad_flags(assets, tmp_path, capsys, no_generation, extra, message):
    with pytest.raises(SystemExit):
        evaluate.main(evaluate.parse_args(eval_args(assets, tmp_path, *extra)))
    assert message in capsys.readouterr().err


def test_model_that_does_not_load_and_empty_prompts(assets, tmp_path, no_generation):
    with pytest.raises(EvalError, match="no such folder"):
        evaluate.main(evaluate.parse_args(eval_args(assets, tmp_path, "--model", f"b={tmp_path / 'nothing'}")))
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "hello.txt").write_text("hi")
    with pytest.raises(EvalError, match="neither a diffusers pipeline"):
        evaluate.main(evaluate.parse_args(eval_args(assets, tmp_path, "--model", f"b={not_a_model}")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(EvalError, match="no prompts found"):
        evaluate.main(evaluate.parse_args(eval_args(assets, tmp_path, prompts=empty)))


def test_prompt_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "caption": ["x", "y", "z"]}), path)
    assert load_prompts(str(path)) == ["x", "y", "z"]
    assert load_prompts(str(path), max_prompts=2) == ["x", "y"]
    with pytest.raises(EvalError, match="no column"):
        load_prompts(str(path), prompt_column="text")


def test_images_from_other_settings_are_not_reused(assets, tmp_path, no_generation):
    folder = tmp_path / "eval" / "images" / "a"
    folder.mkdir(parents=True)
    (folder / "generation.json").write_text('{"seed": 99}')
    with pytest.raises(EvalError, match="holds images made with other settings"):
        evaluate.main(evaluate.parse_args(eval_args(assets, tmp_path)))


def test_spin_output_folder_is_not_taken_for_a_lora(tmp_path):
    (tmp_path / "spin" / "iter_1").mkdir(parents=True)
    (tmp_path / "spin" / "iter_1" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    with pytest.raises(EvalError, match="name one iteration"):
        resolve_model(f"m={tmp_path / 'spin'}")
    assert resolve_model(f"m={tmp_path / 'spin' / 'iter_1'}").kind == "lora"


def test_named_prompt_sets_from_the_hub(tmp_path, hub_server, monkeypatch):
    """`--prompts hpsv2`, `parti` and `pickapic_test_unique` read the benchmark repos through the real Hub and
    datasets code (here from the local server, with repos shaped like the real ones)."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    with hub_online():
        api = HfApi(token=TEST_TOKEN)
        api.create_repo("zhwang/HPDv2", repo_type="dataset", exist_ok=True)
        for style in ("anime", "concept-art", "paintings", "photo"):
            api.upload_file(
                repo_id="zhwang/HPDv2",
                repo_type="dataset",
                path_in_repo=f"benchmark/{style}.json",
                path_or_fileobj=_json.dumps([f"{style} {i}" for i in range(3)]).encode(),
            )
        assert load_prompts("hpsv2") == [
            f"{s} {i}" for s in ("anime", "concept-art", "paintings", "photo") for i in range(3)
        ]
        pq.write_table(
            pa.table({"Prompt": ["p1", "p2", "p3"], "Category": ["a", "b", "c"]}), tmp_path / "train.parquet"
        )
        api.create_repo("nateraw/parti-prompts", repo_type="dataset", exist_ok=True)
        api.upload_file(
            repo_id="nateraw/parti-prompts",
            repo_type="dataset",
            path_in_repo="data/train-00000-of-00001.parquet",
            path_or_fileobj=str(tmp_path / "train.parquet"),
        )
        assert load_prompts("parti", max_prompts=2) == ["p1", "p2"]
        pq.write_table(pa.table({"caption": ["c1", "c2"], "jpg_0": [b"x", b"y"]}), tmp_path / "tu.parquet")
        pq.write_table(pa.table({"caption": ["t1"], "jpg_0": [b"z"]}), tmp_path / "tr.parquet")
        api.create_repo("yuvalkirstain/pickapic_v2", repo_type="dataset", exist_ok=True)
        for split, f in (("test_unique", "tu"), ("train", "tr")):
            api.upload_file(
                repo_id="yuvalkirstain/pickapic_v2",
                repo_type="dataset",
                path_or_fileobj=str(tmp_path / f"{f}.parquet"),
                path_in_repo=f"data/{split}-00000-of-00001.parquet",
            )
        assert load_prompts("pickapic_test_unique") == ["c1", "c2"]


def test_each_model_renders_at_its_own_size_and_guidance_unless_one_is_given(assets, lora_out, tmp_path, monkeypatch):
    """Without --resolution / --guidance_scale the pipeline gets the model's own (the tiny SD UNet: 32 px, SD: 7.5;
    a LoRA: its base's); given, they apply to every model. A default run and one that names the same values reuse
    each other's images; another guidance is refused."""
    calls = []

    class Rendered(Exception):
        pass

    class Pipeline:
        def __call__(self, prompts, **kw):
            calls.append((kw["height"], kw["width"], kw["guidance_scale"]))
            raise Rendered  # the values are what this test is after: no scoring

    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: Pipeline())

    def run(out, *extra):
        argv = eval_args(assets, tmp_path, "--output_dir", str(out), *extra)
        del argv[argv.index("--resolution") : argv.index("--resolution") + 2]
        with pytest.raises(Rendered):
            evaluate.main(evaluate.parse_args(argv))
        return calls[-1]

    lora = ["--model", f"l={lora_out}", "--base_model", str(assets["pipeline"]), "--baseline", "a"]
    assert run(tmp_path / "own", *lora) == (32, 32, 7.5)
    recorded = json.loads((tmp_path / "own" / "images" / "l" / "generation.json").read_text())
    assert (recorded["resolution"], recorded["guidance_scale"]) == (32, 7.5)  # the LoRA's, from its base
    assert run(tmp_path / "own", "--resolution", "32", "--guidance_scale", "7.5") == (32, 32, 7.5)
    with pytest.raises(EvalError, match="guidance_scale differ"):
        run(tmp_path / "own", "--guidance_scale", "3")
    assert run(tmp_path / "given", "--resolution", "48", "--guidance_scale", "3") == (48, 48, 3.0)


def test_a_lora_renders_on_the_base_it_was_trained_on(assets, lora_out, tmp_path, no_generation, capsys):
    """Without --base_model a LoRA's base is the one its training_args.json names; on another family's base it
    stops with one error naming the model; a LoRA file is answered with its folder."""
    from evaluate import trained_base
    from utils.evaluation import resolve_model

    assert trained_base([resolve_model(f"l={lora_out}")]) == str(assets["pipeline"])
    unnamed = tmp_path / "unnamed"
    shutil.copytree(lora_out, unnamed, ignore=shutil.ignore_patterns("training_args.json"))
    assert trained_base([resolve_model(f"u={unnamed}")]) == "runwayml/stable-diffusion-v1-5"
    with pytest.raises(EvalError, match="a file; give the folder that holds it"):
        resolve_model(f"f={lora_out / 'pytorch_lora_weights.safetensors'}")


def test_lora_on_a_base_of_another_shape_is_one_error(assets, lora_out, tmp_path):
    import make_tiny_families

    other = make_tiny_families.BUILDERS["sdxl"](tmp_path / "sdxl")
    spec = resolve_model(f"l={lora_out}")
    spec.family = resolve_model(f"b={other}").family
    with pytest.raises(EvalError, match=r"--model l: its LoRA does not fit --base_model .*sdxl"):
        load_pipeline(spec, str(other), torch.float32, "cpu")


def test_prompt_files_in_other_encodings(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red fox\na caf\u00e9\n".encode())
    assert load_prompts(str(bom)) == ["a red fox", "a caf\u00e9"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(EvalError, match=r"latin.txt: not UTF-8 text \(byte 0xe9 at offset 6\); save it as UTF-8"):
        load_prompts(str(latin))


def test_a_local_folder_with_an_at_sign_is_not_a_revision(tmp_path):
    from utils.evaluation import parse_model_arg

    (tmp_path / "model@v2").mkdir()
    assert parse_model_arg(f"m={tmp_path / 'model@v2'}") == ("m", str(tmp_path / "model@v2"), None)
    assert parse_model_arg("m=someone/model@v2") == ("m", "someone/model", "v2")


def test_a_variant_only_model_and_a_model_folder_given_as_data(assets, tmp_path):
    """evaluate.py --variant fp16 renders a folder holding only fp16-variant weights; a training script given the
    model folder as --dataset_name says what it is."""
    from diffusers import StableDiffusionPipeline

    import train_sft
    from helpers import sft_args
    from utils.data import DataError

    variant = tmp_path / "fp16-only"
    StableDiffusionPipeline.from_pretrained(str(assets["pipeline"])).save_pretrained(variant, variant="fp16")
    pipe = load_pipeline(resolve_model(f"v={variant}"), None, torch.float32, "cpu", variant="fp16")
    assert render(pipe).shape == (1, 32, 32, 3)
    args = train_sft.parse_args(sft_args(assets, tmp_path / "out", dataset=str(assets["pipeline"])))
    with pytest.raises(DataError, match="a diffusers pipeline folder, not a dataset"):
        load_training_dataset(args)


def test_a_size_a_model_cannot_tile_is_refused_before_rendering(assets, tmp_path, no_generation):
    flux = tmp_path / "flux-model"
    flux.mkdir()
    (flux / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    argv = eval_args(assets, tmp_path, "--model", f"f={flux}", "--baseline", "a", "--resolution", "40")
    with pytest.raises(EvalError, match=r"--model f \(FluxPipeline\): its images tile in 16 px steps; use e.g. 32"):
        evaluate.main(evaluate.parse_args(argv))
