#!/usr/bin/env python
"""Build tiny, fully offline assets for tests and for the offline demo.

Everything here is generated locally from fixed seeds (no downloads):

* a real (but very small) CLIP byte-level BPE tokenizer,
* a tiny SD-1.5-shaped ``StableDiffusionPipeline`` (random weights),
* a parquet file shaped like ``yuvalkirstain/pickapic_v2``,
* a plain image/caption parquet file readable by ``datasets``.
* a webdataset ``.tar`` copy of a Pick-a-Pic parquet, shaped like ``sayakpaul/pickapic_v2_webdataset``.

Usage as a script::

    python examples/make_tiny_assets.py --output_dir DIR [--resolution 32]

This module is standalone: it does not import the project's ``utils`` package.
Heavy libraries (torch, diffusers, transformers) are imported lazily inside the
functions that need them so that the parquet builders stay cheap to import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import re
import sys
import tarfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# A small built-in caption corpus used to learn BPE merges (and to build captions).
DEFAULT_CAPTIONS: list[str] = [
    "a photo of a cat sitting on a red chair",
    "a painting of a dog running in the park",
    "a red apple on a wooden table",
    "a blue car parked next to a tall building",
    "an astronaut riding a horse on the moon",
    "a cozy cabin in the snowy mountains at night",
    "a bowl of fruit with oranges and bananas",
    "a portrait of an old man with a beard, oil painting",
    "a futuristic city skyline at sunset, digital art",
    "a small boat floating on a calm lake",
    "a watercolor painting of flowers in a vase",
    "a cute robot holding a green umbrella in the rain",
    "a castle on a hill surrounded by clouds",
    "a close up photo of a butterfly on a leaf",
    "a bright yellow sunflower field under a blue sky",
    "a dragon flying over a medieval village",
    "a cup of coffee and a book on a rainy morning",
    "an owl sitting on a branch in a dark forest",
    "a sandy beach with palm trees and turquoise water",
    "a pixel art scene of a knight fighting a monster",
    "a sketch of a lighthouse by the sea",
    "a bowl of ramen with an egg and green onions",
    "a fox in the snow, highly detailed, 4k",
    "a colorful hot air balloon over the desert",
    "a cat wearing a tiny hat, studio lighting",
    "a mountain landscape with a river and pine trees",
    "a robot painting a picture of another robot",
    "the northern lights over a frozen lake",
    "a vintage red bicycle leaning against a brick wall",
    "a surreal melting clock in a dream landscape",
]

_ADJECTIVES = [
    "red",
    "blue",
    "tiny",
    "giant",
    "glowing",
    "ancient",
    "fluffy",
    "shiny",
    "happy",
    "sleepy",
    "golden",
    "misty",
]
_SUBJECTS = ["cat", "dog", "robot", "castle", "tree", "dragon", "car", "owl", "boat", "fox", "apple", "house"]
_SCENES = [
    "in the rain",
    "on the moon",
    "at sunset",
    "in a forest",
    "under the sea",
    "on a table",
    "in the snow",
    "in a city",
    "by the river",
    "in space",
]
_STYLES = ["oil painting", "digital art", "photo", "watercolor", "pixel art", "sketch"]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP reversible byte -> printable unicode character table.

    Printable latin-1 bytes map to themselves; the remaining bytes are shifted to code points
    starting at 256, in increasing byte order. Iteration order is CLIP's vocabulary order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    # Same order as CLIP's vocabulary: the printable bytes first, then the others.
    table: dict[int, str] = {byte: chr(byte) for byte in printable}
    for extra, byte in enumerate(b for b in range(256) if b not in table):
        table[byte] = chr(256 + extra)
    return table


# Same splitting as CLIP's tokenizer for ASCII text: words, single digits, punctuation runs.
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.UNICODE)


def _learn_bpe_merges(texts: list[str], max_merges: int) -> list[tuple[str, str]]:
    """A small, deterministic BPE learner over byte-level symbols with a '</w>' end-of-word marker."""
    b2u = _byte_to_unicode()
    word_counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        text = re.sub(r"\s+", " ", text).strip().lower()
        for word in _WORD_RE.findall(text):
            chars = [b2u[b] for b in word.encode("utf-8")]
            symbols = tuple(chars[:-1]) + (chars[-1] + "</w>",)
            word_counts[symbols] += 1

    words = list(word_counts.items())
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words:
            for pair in zip(symbols[:-1], symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        # Highest count first, ties broken lexicographically -> fully deterministic.
        best, best_count = min(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if best_count < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        new_words = []
        for symbols, count in words:
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words.append((tuple(out), count))
        words = new_words
    return merges


def build_clip_tokenizer(output_dir: Path, texts: list[str] | None = None, max_merges: int = 400) -> Path:
    """Write a tiny CLIP BPE tokenizer (openai/clip-vit-large-patch14 file layout) to ``output_dir``.

    Vocabulary order follows CLIP: the 256 byte-level unicode symbols, the same 256 symbols with a
    ``</w>`` suffix, one token per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>``
    (bos = vocab_size - 2, eos = pad = unk = vocab_size - 1). Since every byte is in the vocabulary
    (with and without ``</w>``), any text encodes without unknown tokens. Files written:
    ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``tokenizer_config.json``.
    ``texts`` defaults to a small built-in caption corpus; merges occurring fewer than twice are not
    learned and at most ``max_merges`` are kept (vocab size <= 514 + max_merges).
    Returns ``output_dir``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if texts is None:
        texts = DEFAULT_CAPTIONS + [" ".join(words) for words in (_ADJECTIVES, _SUBJECTS, _SCENES, _STYLES)]
    texts = list(texts)

    base = list(_byte_to_unicode().values())
    tokens = base + [s + "</w>" for s in base]
    merges = _learn_bpe_merges(texts, max_merges=max_merges)
    seen = set(tokens)
    for left, right in merges:
        tok = left + right
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    (output_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (output_dir / "merges.txt").write_text(merges_text, encoding="utf-8")

    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (output_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return output_dir


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------
SD15_SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _make_scheduler(name: str):
    from diffusers import DDIMScheduler, PNDMScheduler

    name = name.lower()
    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **SD15_SCHEDULER_KWARGS)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, **SD15_SCHEDULER_KWARGS)
    raise ValueError(f"unknown scheduler {name!r}; expected 'pndm' or 'ddim'")


def tiny_clip_text(tokenizer, hidden=32, *, with_projection=False, seed=0):
    """A 2-layer CLIP text encoder of width `hidden` (CLIPTextModelWithProjection when `with_projection`: SDXL's
    second encoder, SD3's two), seeded with `seed`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden + 5,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae(resolution, seed=0, *, latent_channels=4, scaling_factor=0.18215, shift_factor=None):
    """An ``AutoencoderKL`` with two blocks (vae_scale_factor 2), seeded with `seed`; SD3 and Flux set a shift."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=resolution,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def build_tiny_pipeline(output_dir: Path, resolution: int = 32, seed: int = 0, scheduler: str = "pndm") -> Path:
    """Save a tiny random-weight SD-1.5-shaped ``StableDiffusionPipeline`` to ``output_dir``.

    Components: the tiny CLIP tokenizer (see :func:`build_clip_tokenizer`); a 2-layer
    ``CLIPTextModel`` with hidden size 32; an ``AutoencoderKL`` with two blocks (vae_scale_factor 2,
    4 latent channels, scaling_factor 0.18215); a ``UNet2DConditionModel`` with blocks (16, 32) and
    ``sample_size = resolution // 2``; SD-1.5's PNDM (default) or DDIM scheduler config. No safety
    checker / feature extractor. Saved with safetensors. Returns ``output_dir``.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    output_dir = Path(output_dir)
    vae_blocks = (8, 16)
    vae_scale_factor = 2 ** (len(vae_blocks) - 1)
    if resolution % (vae_scale_factor * 2) != 0:
        raise ValueError(f"resolution must be a multiple of {vae_scale_factor * 2}, got {resolution}")

    tok_dir = build_clip_tokenizer(output_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    text_encoder = tiny_clip_text(tokenizer, 32, seed=seed)
    vae = tiny_vae(resolution, seed + 1)

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=resolution // vae_scale_factor,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    # Re-write our own tokenizer files (same content) so the directory keeps the CLIP layout
    # (vocab.json + merges.txt) whatever the installed transformers version saves.
    build_clip_tokenizer(output_dir / "tokenizer")
    return output_dir


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
# Per-kind RGB ranges (low, high) for the two colors mixed by a pattern.
_PALETTES = {
    # bright, red dominated
    "winner": (((210, 70, 0), (255, 130, 50)), ((190, 90, 0), (245, 150, 60))),
    # dark, blue dominated
    "loser": (((0, 0, 100), (35, 35, 140)), ((5, 10, 90), (35, 35, 130))),
    # mid, green dominated
    "tie": (((40, 150, 40), (90, 210, 90)), ((50, 135, 50), (90, 185, 90))),
}


def make_image(rng: np.random.Generator, size: tuple[int, int], kind: str) -> Image.Image:
    """A simple colored pattern (gradient / stripes / checker / disc) as an RGB PIL image.

    ``size`` is (width, height). ``kind`` selects the palette:

    * ``"winner"``: bright and red dominated (mean R >= ~190, mean B <= ~60, brightness >= ~85),
    * ``"loser"``: dark and blue dominated (mean B >= ~90, mean R <= ~35, brightness <= ~70),
    * ``"tie"``: mid-bright and green dominated,
    * anything else (e.g. ``"caption"``): random colors.

    Use :func:`image_kind` to classify an image back into winner / loser / tie.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    width, height = int(size[0]), int(size[1])
    if kind in _PALETTES:
        colors = [rng.integers(lo, np.asarray(hi) + 1) for lo, hi in _PALETTES[kind]]
    else:
        colors = [rng.integers(0, 256, size=3) for _ in range(2)]
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in colors)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = int(rng.integers(0, 4))
    if pattern == 0:  # diagonal gradient
        t = (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2.0
    elif pattern == 1:  # stripes
        period = int(rng.integers(4, 12))
        t = ((xx // period) % 2).astype(np.float32)
    elif pattern == 2:  # checkerboard
        cell = int(rng.integers(4, 10))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:  # disc
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        r = rng.uniform(0.2, 0.45) * min(width, height)
        t = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.float32)
    arr = c0[None, None, :] * (1.0 - t[..., None]) + c1[None, None, :] * t[..., None]
    arr += rng.normal(0.0, 4.0, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def image_kind(image: Image.Image) -> str:
    """Classify an image made by :func:`make_image`: 'winner', 'loser', 'tie' or 'other'.

    Rule (brightness = mean over all RGB values):
    winner <=> mean R - mean B > 100 and brightness > 80;
    loser <=> mean B - mean R > 40 and brightness < 80;
    tie <=> mean G exceeds both mean R and mean B by > 30.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    r, g, b = (float(arr[..., i].mean()) for i in range(3))
    bright = (r + g + b) / 3.0
    if r - b > 100 and bright > 80:
        return "winner"
    if b - r > 40 and bright < 80:
        return "loser"
    if g - r > 30 and g - b > 30:
        return "tie"
    return "other"


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def _make_captions(rng: np.random.Generator, n: int) -> list[str]:
    combos = [(a, s, c, st) for a in _ADJECTIVES for s in _SUBJECTS for c in _SCENES for st in _STYLES]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} unique captions supported")
    idx = rng.choice(len(combos), size=n, replace=False)
    out = []
    for k, i in enumerate(idx):
        a, s, c, st = combos[int(i)]
        out.append(f"a {a} {s} {c}, {st}" if k % 3 else f"A {a.upper()} {s} {c} - {st}!")
    return out


def _uid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# ---------------------------------------------------------------------------------------------
# Parquet datasets
# ---------------------------------------------------------------------------------------------
PICKAPIC_COLUMNS = [
    "are_different",
    "best_image_uid",
    "caption",
    "created_at",
    "has_label",
    "image_0_uid",
    "image_0_url",
    "image_1_uid",
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
]

_PICKAPIC_TYPES = {
    "are_different": pa.bool_(),
    "best_image_uid": pa.string(),
    "caption": pa.string(),
    "created_at": pa.timestamp("ns"),
    "has_label": pa.bool_(),
    "image_0_uid": pa.string(),
    "image_0_url": pa.string(),
    "image_1_uid": pa.string(),
    "image_1_url": pa.string(),
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
    "model_0": pa.string(),
    "model_1": pa.string(),
    "ranking_id": pa.int64(),
    "user_id": pa.int64(),
    "num_example_per_prompt": pa.int64(),
}

CORRUPT_IMAGE_BYTES = b"this is not an image: truncated upload \x00\x01\x02\x03"


def build_pickapic_parquet(
    path: Path,
    num_rows: int = 24,
    num_ties: int = 4,
    num_corrupt: int = 0,
    seed: int = 0,
    image_size: tuple[int, int] = (40, 48),
    duplicate_prompts: int = 2,
    column_order: list[str] | None = None,
) -> Path:
    """Write a parquet file shaped like ``yuvalkirstain/pickapic_v2`` and return its path.

    * ``num_rows`` is the total number of rows.
    * Ties: ``num_ties`` rows have ``label_0 == label_1 == 0.5``, ``best_image_uid == ""`` and two
      green-dominated images (``make_image(kind="tie")``).
    * Winner / loser pixel rule for every non-tie row: the preferred image (label 1.0) is bright and
      red dominated (mean R - mean B > 100, brightness > 80), the other one (label 0.0) is dark and
      blue dominated (mean B - mean R > 40, brightness < 80); see :func:`image_kind`. Non-tie rows
      alternate (in a seeded shuffled order) between ``label_0 == 1`` and ``label_1 == 1``;
      ``best_image_uid`` is the winner's uid.
    * ``duplicate_prompts``: that many of the non-tie rows (the last ones) reuse the caption of an
      earlier non-tie row, so there are ``num_rows - duplicate_prompts`` unique captions;
      ``num_example_per_prompt`` counts the rows sharing each caption.
    * ``num_corrupt``: that many non-tie rows get :data:`CORRUPT_IMAGE_BYTES` (not decodable) in the
      WINNER's jpg column; the loser image stays valid.
    * Images are JPEG, ``image_size = (width, height)`` (non-square by default).
    * ``column_order``: listed columns come first in that order, the rest follow in the default order.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_non_tie = num_rows - num_ties
    if num_ties < 0 or n_non_tie < 0:
        raise ValueError("need 0 <= num_ties <= num_rows")
    if num_corrupt < 0 or num_corrupt > n_non_tie:
        raise ValueError("num_corrupt must be <= number of non-tie rows")
    if duplicate_prompts < 0 or (duplicate_prompts and duplicate_prompts >= n_non_tie):
        raise ValueError("duplicate_prompts must be < number of non-tie rows")

    tie_rows = set(int(i) for i in rng.choice(num_rows, size=num_ties, replace=False))
    non_tie = [i for i in range(num_rows) if i not in tie_rows]
    # Winner side alternates 0/1 over a shuffled order of the non-tie rows.
    order = rng.permutation(len(non_tie))
    winner_side = {non_tie[int(j)]: k % 2 for k, j in enumerate(order)}
    corrupt_rows = set(int(non_tie[int(j)]) for j in rng.choice(len(non_tie), size=num_corrupt, replace=False))
    dup_rows = non_tie[len(non_tie) - duplicate_prompts :] if duplicate_prompts else []

    unique_captions = _make_captions(rng, num_rows - len(dup_rows))
    captions: list[str] = []
    cap_iter = iter(unique_captions)
    for i in range(num_rows):
        if i in dup_rows:
            source = non_tie[dup_rows.index(i) % (len(non_tie) - len(dup_rows))]
            captions.append(captions[source])
        else:
            captions.append(next(cap_iter))
    per_prompt = Counter(captions)

    models = ["tiny-sd-v1", "tiny-sd-v2", "tiny-sdxl"]
    # Timestamps as integer nanoseconds since the epoch (building them from datetime objects would
    # make pyarrow import pandas, which is slow).
    base_ns = int(_dt.datetime(2023, 5, 1, 12, 0, 0, tzinfo=_dt.timezone.utc).timestamp()) * 10**9
    cols: dict[str, list] = {c: [] for c in PICKAPIC_COLUMNS}
    for i in range(num_rows):
        uid0, uid1 = _uid(rng), _uid(rng)
        if i in tie_rows:
            kinds = ("tie", "tie")
            labels = (0.5, 0.5)
            best = ""
        else:
            w = winner_side[i]
            kinds = ("winner", "loser") if w == 0 else ("loser", "winner")
            labels = (1.0, 0.0) if w == 0 else (0.0, 1.0)
            best = uid0 if w == 0 else uid1
        jpgs = [_encode(make_image(rng, image_size, k)) for k in kinds]
        if i in corrupt_rows:
            jpgs[winner_side[i]] = CORRUPT_IMAGE_BYTES
        cols["are_different"].append(True)
        cols["best_image_uid"].append(best)
        cols["caption"].append(captions[i])
        cols["created_at"].append(base_ns + (7 * 60 * i + int(rng.integers(0, 60))) * 10**9)
        cols["has_label"].append(True)
        cols["image_0_uid"].append(uid0)
        cols["image_0_url"].append(f"https://images.example.invalid/{uid0}.png")
        cols["image_1_uid"].append(uid1)
        cols["image_1_url"].append(f"https://images.example.invalid/{uid1}.png")
        cols["jpg_0"].append(jpgs[0])
        cols["jpg_1"].append(jpgs[1])
        cols["label_0"].append(labels[0])
        cols["label_1"].append(labels[1])
        cols["model_0"].append(models[int(rng.integers(0, len(models)))])
        cols["model_1"].append(models[int(rng.integers(0, len(models)))])
        cols["ranking_id"].append(100000 + i)
        cols["user_id"].append(int(rng.integers(1, 6)))
        cols["num_example_per_prompt"].append(per_prompt[captions[i]])

    names = list(PICKAPIC_COLUMNS)
    if column_order is not None:
        unknown = [c for c in column_order if c not in _PICKAPIC_TYPES]
        if unknown:
            raise ValueError(f"unknown columns in column_order: {unknown}")
        names = list(dict.fromkeys(column_order)) + [c for c in names if c not in column_order]
    table = pa.table({c: pa.array(cols[c], type=_PICKAPIC_TYPES[c]) for c in names})
    pq.write_table(table, str(path))
    return path


def build_caption_parquet(
    path: Path,
    num_rows: int = 12,
    seed: int = 0,
    image_size=(40, 48),
    image_column: str = "image",
    caption_column: str = "text",
) -> Path:
    """Write a plain image-caption parquet and return its path.

    ``image_column`` is a struct ``{bytes: binary, path: string}`` (PNG bytes) and the schema carries
    the ``huggingface`` features metadata, exactly how ``datasets`` stores an ``Image`` feature, so
    ``datasets.load_dataset("parquet", ...)`` decodes it to PIL images. ``caption_column`` holds strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = _make_captions(rng, num_rows)
    images = []
    for i in range(num_rows):
        img = make_image(rng, image_size, "caption")
        images.append({"bytes": _encode(img, "PNG"), "path": f"caption_{i:04d}.png"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {
        image_column: {"_type": "Image"},
        caption_column: {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema(
        [pa.field(image_column, image_type), pa.field(caption_column, pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    table = pa.table({image_column: pa.array(images, type=image_type), caption_column: captions}, schema=schema)
    pq.write_table(table, str(path))
    return path


LABEL_TEXT_FORMS = ("{:g}", "{:.1f}\n", " {:g}\n")  # "1", "1.0\n", " 0.5\n": label files seen in the wild


def build_pickapic_webdataset(parquet: Path, path: Path, rows: range | None = None) -> Path:
    """Write rows of a Pick-a-Pic parquet (all by default) as a webdataset shard, the layout of
    ``sayakpaul/pickapic_v2_webdataset``, and return its path.

    Sample ``k`` (its row number, 6 digits) has the members ``k.original_prompt.txt`` (the caption),
    ``k.jpg_0.jpg``, ``k.jpg_1.jpg`` (the same JPEG bytes as the parquet) and ``k.label_0.txt``,
    ``k.label_1.txt``: labels as text, in the forms of :data:`LABEL_TEXT_FORMS` by turns (ties are "0.5").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(str(parquet), columns=["caption", "jpg_0", "jpg_1", "label_0", "label_1"]).to_pylist()
    rows = range(len(table)) if rows is None else rows
    with tarfile.open(path, "w") as tar:
        for i in rows:
            row, form = table[i], LABEL_TEXT_FORMS[i % len(LABEL_TEXT_FORMS)]
            members = {
                "original_prompt.txt": row["caption"].encode(),
                "jpg_0.jpg": row["jpg_0"],
                "jpg_1.jpg": row["jpg_1"],
                "label_0.txt": form.format(row["label_0"]).encode(),
                "label_1.txt": form.format(row["label_1"]).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def build_all(output_dir: Path, resolution: int = 32) -> dict[str, Path]:
    """Build ``tiny-sd/`` (pipeline), ``pickapic.parquet`` (with ties, no corrupt rows) and
    ``captions.parquet`` under ``output_dir``; return their paths keyed by
    'pipeline' / 'pickapic' / 'captions'."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        "pipeline": build_tiny_pipeline(output_dir / "tiny-sd", resolution=resolution),
        "pickapic": build_pickapic_parquet(output_dir / "pickapic.parquet", num_corrupt=0),
        "captions": build_caption_parquet(output_dir / "captions.parquet"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build tiny offline SD assets (pipeline + parquet datasets).")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_all(args.output_dir, resolution=args.resolution)
    for name, p in paths.items():
        print(f"{name}: {p}")
    print(f"built in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
