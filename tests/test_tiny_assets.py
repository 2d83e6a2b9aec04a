"""Tests for examples/make_tiny_assets.py (tiny offline tokenizer / pipeline / parquet assets)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_module():
    name = "make_tiny_assets"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mta = _load_module()

PICKAPIC_COLUMNS = {
    "are_different",
    "best_image_uid",
    "caption",
    "created_at",
    "has_label",
    "image_0_uid",
    "image_1_uid",
    "image_0_url",
    "image_1_url",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "ranking_id",
    "user_id",
    "num_example_per_prompt",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return mta.build_all(tmp_path_factory.mktemp("tiny_assets"), resolution=32)


@pytest.fixture
def torch_one_thread():
    """Tiny models run fastest single-threaded; OpenMP threads thrash on a busy 2-core box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return mta.build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_files(tokenizer_dir):
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (tokenizer_dir / name).is_file(), name
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) < 1000
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(merges) > 20
    for line in merges[1:]:
        left, right = line.split(" ")
        assert left + right in vocab


def test_tokenizer_deterministic(tmp_path, tokenizer_dir):
    other = mta.build_clip_tokenizer(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt"):
        assert (other / name).read_bytes() == (tokenizer_dir / name).read_bytes()


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_tokenizer_loads_and_round_trips(tokenizer_dir, assets, cls_name):
    import transformers

    cls = getattr(transformers, cls_name)
    for directory in (tokenizer_dir, assets["pipeline"] / "tokenizer"):
        tok = cls.from_pretrained(str(directory))
        assert tok.model_max_length == 77
        assert tok.convert_ids_to_tokens(tok.bos_token_id) == "<|startoftext|>"
        assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"
        assert tok.pad_token_id == tok.eos_token_id

        caption = "a photo of a cat sitting on a red chair"
        ids = tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert len(ids) == 77
        n_words = len(caption.split())
        assert ids[0] == tok.bos_token_id
        content = ids[1 : ids.index(tok.eos_token_id)]
        assert n_words <= len(content) < 30
        assert all(i == tok.eos_token_id for i in ids[1 + len(content) :])
        assert tok.decode(ids, skip_special_tokens=True) == caption

        # arbitrary ASCII / unicode: no unknown tokens (unk == eos) and the characters survive
        weird = "Résumé: 日本の猫 🐱 ~{x_y}@#$%^&* 42"
        ids = tok(weird).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ids[1:-1]
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == weird.lower().replace(" ", "")


# ------------------------------------------------------------------------------------------ pipeline
def test_pipeline_loads_and_generates(assets, torch_one_thread):
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    path = assets["pipeline"]
    assert (path / "model_index.json").is_file()
    assert list(path.glob("unet/*.safetensors")) and list(path.glob("vae/*.safetensors"))
    assert list(path.glob("text_encoder/*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, PNDMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.num_train_timesteps == 1000 and cfg.skip_prk_steps and cfg.steps_offset == 1
    assert cfg.set_alpha_to_one is False
    assert pipe.vae_scale_factor == 2
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 32
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red apple", num_inference_steps=2, generator=generator, height=32, width=32)
    image = out.images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (32, 32)
    # default height/width come from unet.sample_size * vae_scale_factor
    image = pipe(["a cat", "a dog"], num_inference_steps=2, output_type="np").images
    assert image.shape == (2, 32, 32, 3)


def test_ddim_variant(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = mta.build_tiny_pipeline(tmp_path / "sd", resolution=32, scheduler="ddim")
    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_start == 0.00085 and pipe.scheduler.config.clip_sample is False


# ------------------------------------------------------------------------------------------ parquet
def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _stats(img):
    arr = np.asarray(img, dtype=np.float32)
    r, g, b = (arr[..., i].mean() for i in range(3))
    return r, g, b, arr.mean()


def test_pickapic_parquet(assets):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(assets["pickapic"]), split="train")
    assert PICKAPIC_COLUMNS <= set(ds.column_names)
    assert len(ds) == 24
    rows = ds.to_list()
    ties = [r for r in rows if r["label_0"] == 0.5]
    assert len(ties) == 4
    assert all(r["label_1"] == 0.5 for r in ties)
    non_ties = [r for r in rows if r["label_0"] != 0.5]
    assert {(r["label_0"], r["label_1"]) for r in non_ties} == {(1.0, 0.0), (0.0, 1.0)}
    assert len({r["caption"] for r in rows}) == 24 - 2
    for r in rows:
        assert r["num_example_per_prompt"] == sum(o["caption"] == r["caption"] for o in rows)
        img0, img1 = _decode(r["jpg_0"]), _decode(r["jpg_1"])
        assert img0.size == img1.size == (40, 48)
        if r["label_0"] == 0.5:
            continue
        win, lose = (img0, img1) if r["label_0"] == 1.0 else (img1, img0)
        assert r["best_image_uid"] == (r["image_0_uid"] if r["label_0"] == 1.0 else r["image_1_uid"])
        wr, _, wb, wbright = _stats(win)
        lr, _, lb, lbright = _stats(lose)
        assert wr - wb > 100 and wbright > 80, (wr, wb, wbright)
        assert lb - lr > 40 and lbright < 80, (lr, lb, lbright)
        assert mta.image_kind(win) == "winner" and mta.image_kind(lose) == "loser"


def test_pickapic_corrupt_and_column_order(tmp_path):
    import pyarrow.parquet as pq

    order = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    path = mta.build_pickapic_parquet(
        tmp_path / "p.parquet",
        num_rows=10,
        num_ties=2,
        num_corrupt=3,
        seed=1,
        image_size=(24, 16),
        duplicate_prompts=1,
        column_order=order,
    )
    table = pq.read_table(path)
    assert table.column_names[: len(order)] == order
    assert set(table.column_names) == PICKAPIC_COLUMNS
    rows = table.to_pylist()
    n_corrupt = 0
    for r in rows:
        if r["label_0"] == 0.5:
            continue
        win_key, lose_key = ("jpg_0", "jpg_1") if r["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        assert _decode(r[lose_key]).size == (24, 16)
        try:
            _decode(r[win_key])
        except Exception:
            n_corrupt += 1
    assert n_corrupt == 3
    again = pq.read_table(
        mta.build_pickapic_parquet(
            tmp_path / "q.parquet",
            num_rows=10,
            num_ties=2,
            num_corrupt=3,
            seed=1,
            image_size=(24, 16),
            duplicate_prompts=1,
            column_order=order,
        )
    )
    assert again.equals(table)


def test_caption_parquet(assets, tmp_path):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(assets["captions"]), split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == 12
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (40, 48)
    assert isinstance(row["text"], str) and row["text"]

    path = mta.build_caption_parquet(tmp_path / "c.parquet", num_rows=3, image_column="img", caption_column="prompt")
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert set(ds.column_names) == {"img", "prompt"}
    assert isinstance(ds[2]["img"], Image.Image)
