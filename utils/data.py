"""Training data: Pick-a-Pic (ties dropped, winner selected) or plain image-caption datasets, from the
Hub (optionally streamed) or from local files, turned into (pixel_values or cached latents, token ids, size
conditioning).

Pick-a-Pic rule (Diffusion-DPO's): keep rows whose label_0 is 0 or 1 (about 12% are ties at 0.5),
the winner is image 0 when label_0 == 1, else image 1. Labels may be numbers or numeric text ("1", "0.5\\n"), as
in webdataset copies, whose columns (`jpg_0.jpg`, `label_0.txt`, `original_prompt.txt`) are mapped to the usual names.

Everything that can be checked without a model (paths, columns, empty splits) is checked by
`load_training_dataset`, which raises `DataError` with the problem named.
Needs no sibling module: it can be copied on its own.
"""

import glob
import hashlib
import io
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".tar": "webdataset",
}
CAPTION_FALLBACKS = ("original_prompt", "prompt")  # tried, in either form, when the default caption column is absent

PICKAPIC_V2 = "yuvalkirstain/pickapic_v2"
PICKAPIC_COPIES = (
    "a copy: a webdataset archive such as sayakpaul/pickapic_v2_webdataset (the Hub repo, or its .tar "
    "shards downloaded: one .tar, a folder of them or a glob), or a local folder or .parquet file"
)
COLUMN_FLAGS_HINT = (
    "If the copy names its columns differently, pass --caption_column, --image_0_column, --image_1_column "
    "and --label_0_column (webdataset names such as original_prompt.txt, jpg_0.jpg and label_0.txt are "
    "mapped automatically)."
)

STREAM_LABEL_CHECK_ROWS = 100  # a streamed Pick-a-Pic split has its labels checked on this many first rows

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with the dataset or its columns, found before any model is loaded."""


# ----------------------------------------------------------------------------- loading


def removed_dataset_note(name, flag="--dataset_name", hint=COLUMN_FLAGS_HINT):
    """What to do instead when `name` is a dataset that left the Hub (the original Pick-a-Pic, 404 since April 2025);
    "" for any other name."""
    if name.strip().lower() != PICKAPIC_V2:
        return ""
    return f" {PICKAPIC_V2} was removed from the Hugging Face Hub in 2025: point {flag} at {PICKAPIC_COPIES}. {hint}"


def load_raw_dataset(
    name,
    split="train",
    *,
    config_name=None,
    streaming=False,
    cache_dir=None,
    token=None,
    flag="--dataset_name",
    hint=COLUMN_FLAGS_HINT,
):
    """A `datasets` split from a local file (.parquet, .tar webdataset shard, ...), a glob of them, a local folder
    (data files or `save_to_disk` output) or the Hub. `flag` and `hint` word the errors."""
    import datasets

    path = Path(name).expanduser()
    try:
        if glob.has_magic(name) and not path.exists():
            files = sorted(glob.glob(str(path)))
            builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
            if not files:
                raise DataError(f"{flag} {name}: no file matches")
            if len(builders) != 1 or None in builders:
                raise DataError(f"{flag} {name}: the files must share one type among {sorted(FILE_BUILDERS)}")
            return datasets.load_dataset(
                builders.pop(), data_files={split: files}, split=split, streaming=streaming, cache_dir=cache_dir
            )
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"{flag} {name}: unsupported file type {path.suffix!r} (use one of {sorted(FILE_BUILDERS)})"
                )
            return datasets.load_dataset(
                builder, data_files={split: str(path)}, split=split, streaming=streaming, cache_dir=cache_dir
            )
        if path.is_dir():
            if (path / "model_index.json").is_file():
                raise DataError(
                    f"{flag} {name}: a diffusers pipeline folder, not a dataset (the model goes to "
                    "--pretrained_model_name_or_path)"
                )
            sidecars = caption_sidecars(path)
            if sidecars is not None:  # kohya-style: img.png beside img.txt
                ds = datasets.Dataset.from_dict(sidecars)
                return ds.to_iterable_dataset() if streaming else ds
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise DataError(f"{flag} {name}: no split {split!r}; available: {sorted(ds)}")
                    ds = ds[split]
                return ds.to_iterable_dataset() if streaming else ds
            return datasets.load_dataset(str(path), config_name, split=split, streaming=streaming, cache_dir=cache_dir)
        if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix.lower() in FILE_BUILDERS:
            raise DataError(f"{flag} {name}: no such file or folder")
        return datasets.load_dataset(
            name, config_name, split=split, streaming=streaming, cache_dir=cache_dir, token=token
        )
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        root = e
        while root.__cause__ is not None or root.__context__ is not None:  # "an error occurred" hides the cause
            root = root.__cause__ or root.__context__
        cause = f" (caused by {type(root).__name__}: {str(root).strip()[:200]})" if root is not e else ""
        cause += "; save the file as UTF-8" if "utf" in cause.lower() else ""
        raise DataError(
            f"{flag} {name} (split {split!r}) could not be loaded: {type(e).__name__}: {str(e).rstrip('.')}{cause}."
            f"{removed_dataset_note(name, flag, hint)}"
        ) from e


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def caption_sidecars(folder):
    """A folder of images with a caption file beside each (`img0.png` and `img0.txt`, as kohya and other trainers
    keep them) and no metadata file: {"image": paths, "text": captions} (an image without its .txt gets the empty
    caption), else None. Train on it with `--image_column image --caption_column text`."""
    if any((folder / f"metadata.{ext}").exists() for ext in ("jsonl", "csv", "parquet")):
        return None
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    captions = [p.with_suffix(".txt") for p in images]
    found = sum(c.is_file() for c in captions)
    if not found:
        return None
    if found < len(images):
        logger.warning(f"{folder}: {len(images) - found} of {len(images)} images have no caption file: empty prompt")
    text = [c.read_text(encoding="utf-8-sig").strip() if c.is_file() else "" for c in captions]
    return {"image": [str(p) for p in images], "text": text}


def column_names(ds):
    names = ds.column_names
    if names is None:  # some streamed datasets only know their columns after the first row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    return list(names)


def find_column(names, column, fallbacks=()):
    """`column` if the dataset has it, else its webdataset form `column.ext` (jpg_0 -> jpg_0.jpg, label_0 ->
    label_0.txt), else the first of `fallbacks` present in either form; None when none is."""
    for name in (column, *fallbacks):
        if name in names:
            return name
        forms = sorted(n for n in names if n.startswith(name + "."))
        if forms:
            return forms[0]
    return None


def resolve_columns(
    names,
    *,
    caption_column,
    image_column=None,
    image_0_column="jpg_0",
    image_1_column="jpg_1",
    label_0_column="label_0",
    dataset_name="dataset",
):
    """Decide the dataset kind from its columns: a dict {kind, caption, image | image_0, image_1, label_0} holding
    the dataset's real column names (a webdataset's `jpg_0.jpg` for `jpg_0`; logged when they differ)."""
    wanted = {"caption": caption_column}
    if image_column is not None:
        wanted["image"] = image_column
    else:
        wanted.update(image_0=image_0_column, image_1=image_1_column, label_0=label_0_column)
    found = {
        key: find_column(names, column, CAPTION_FALLBACKS if key == "caption" and column == "caption" else ())
        for key, column in wanted.items()
    }
    if image_column is None and found["image_0"] is None and found["image_1"] is None:
        raise DataError(
            f"{dataset_name} is not Pick-a-Pic-shaped (no {image_0_column!r}/{image_1_column!r} columns; it has "
            f"{sorted(names)}). For a plain image-caption dataset pass --image_column (and --caption_column)."
        )
    missing = [wanted[key] for key, column in found.items() if column is None]
    if missing:
        raise DataError(f"{dataset_name}: missing column(s) {missing}; the dataset has {sorted(names)}")
    mapped = [f"{wanted[key]} <- {column}" for key, column in found.items() if column != wanted[key]]
    if mapped:
        logger.info(f"{dataset_name}: columns mapped: {', '.join(mapped)}")
    return {"kind": "image_caption" if image_column is not None else "pickapic", **found}


def parse_label(value):
    """A Pick-a-Pic label as a float, from a number, numeric text ("1", " 0.5\\n") or bytes; None when missing.
    Raises ValueError (or TypeError) when the value is not a number."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip() or None
    return None if value is None else float(value)


def label_kind(value):
    """'decided' (label 0 or 1), 'tie' (any other number, normally 0.5), 'missing' or 'unparseable'."""
    try:
        label = parse_label(value)
    except (TypeError, ValueError):
        return "unparseable"
    if label is None:
        return "missing"
    return "decided" if label in (0.0, 1.0) else "tie"


def is_decided(label):
    """True for a Pick-a-Pic row with a winner (label_0 of 0 or 1), False for ties, missing and unparseable labels."""
    return label_kind(label) == "decided"


def describe_labels(labels, first_rows=False):
    """'of 24 rows, 4 are ties, 0 have a label that is not a number and 0 have none' (`first_rows`: a stream's
    head)."""
    kinds = Counter(label_kind(x) for x in labels)
    return (
        f"of {'the first ' if first_rows else ''}{len(labels)} rows, {kinds['tie']} are ties, "
        f"{kinds['unparseable']} have a label that is not a number and {kinds['missing']} have none"
    )


def check_labels(labels, column, dataset_name, split, first_rows=False):
    """DataError when a label is not a number (the wrong column, or a copy that words its labels), or when no row
    has a winner; both messages count the ties and the unparseable labels. `first_rows`: only a stream's head was
    read."""
    kinds = [label_kind(x) for x in labels]
    if "unparseable" in kinds:
        example = labels[kinds.index("unparseable")]
        raise DataError(
            f"{dataset_name}: column {column!r} holds labels that are not numbers, e.g. {example!r} "
            f"({describe_labels(labels, first_rows)}). Pick-a-Pic labels are 1, 0 or 0.5 (a tie), as numbers "
            f"or numeric text; if the preference is in another column, pass --label_0_column"
        )
    if "decided" not in kinds and not first_rows:
        raise DataError(
            f"{dataset_name} split {split!r}: no examples left after dropping ties ({describe_labels(labels)})"
        )


def drop_ties(ds, label_0_column):
    return ds.filter(lambda labels: [is_decided(x) for x in labels], batched=True, input_columns=[label_0_column])


def winner_and_loser(example, spec):
    """(winner image, loser image) of a Pick-a-Pic row, in whatever form the column holds them."""
    if parse_label(example[spec["label_0"]]) == 1:
        return example[spec["image_0"]], example[spec["image_1"]]
    return example[spec["image_1"]], example[spec["image_0"]]


def first_per_prompt(captions):
    """Indices of the first occurrence of each caption (as training reads it: the first of a list)."""
    seen, keep = set(), []
    for i, c in enumerate(map(caption_of, captions)):
        if c not in seen:
            seen.add(c)
            keep.append(i)
    return keep


def load_training_dataset(args, num_processes=1, process_index=0):
    """Load, validate and filter the training split. Returns (hf dataset, column spec).
    Raises DataError naming the problem (unknown path, missing column, nothing left after filtering)."""
    import datasets

    ds = load_raw_dataset(
        args.dataset_name,
        args.dataset_split,
        config_name=args.dataset_config_name,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
    )
    spec = resolve_columns(
        column_names(ds),
        caption_column=args.caption_column,
        image_column=args.image_column,
        image_0_column=args.image_0_column,
        image_1_column=args.image_1_column,
        label_0_column=args.label_0_column,
        dataset_name=args.dataset_name,
    )
    local = Path(args.dataset_name).expanduser()
    if local.exists():  # relative image paths in a local file are looked for beside it too
        spec["root"] = str(local if local.is_dir() else local.parent)
    keep = [spec[k] for k in ("caption", "image", "image_0", "image_1", "label_0") if k in spec]
    ds = ds.select_columns(keep)
    for key in (
        "image",
        "image_0",
        "image_1",
    ):  # webdataset images and Image features: decoded by us, a bad file is skipped
        if key in spec and isinstance((ds.features or {}).get(spec[key]), datasets.Image):
            ds = ds.cast_column(spec[key], datasets.Image(decode=False))
    if (
        spec["kind"] == "pickapic"
    ):  # a stream is checked on its head; later unparseable labels are dropped with the ties
        if args.streaming:
            labels = [row[spec["label_0"]] for row in ds.take(STREAM_LABEL_CHECK_ROWS)]
        else:
            labels = list(ds[spec["label_0"]])
        check_labels(labels, spec["label_0"], args.dataset_name, args.dataset_split, first_rows=args.streaming)
        ds = drop_ties(ds, spec["label_0"])
    if args.streaming:
        if args.max_train_samples is not None:
            ds = ds.take(args.max_train_samples)
        if next(iter(ds), None) is None:
            why = (
                f"dropping ties ({describe_labels(labels, first_rows=True)})"
                if spec["kind"] == "pickapic"
                else "loading"
            )
            raise DataError(f"{args.dataset_name} split {args.dataset_split!r}: no examples left after {why}")
        check_images_decode(ds.take(IMAGE_PROBE_ROWS), spec, args.dataset_name)
        if num_processes > 1:
            ds = datasets.distributed.split_dataset_by_node(ds, rank=process_index, world_size=num_processes)
        return ds, spec
    if args.unique_prompts:
        ds = ds.select(first_per_prompt(ds[spec["caption"]]))
    if args.max_train_samples is not None:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise DataError(
            f"{args.dataset_name} split {args.dataset_split!r}: no examples left after "
            f"{'dropping ties' if spec['kind'] == 'pickapic' else 'loading'}"
            f"{' and keeping unique prompts' if args.unique_prompts else ''}"
        )
    check_images_decode(ds.select(range(min(IMAGE_PROBE_ROWS, len(ds)))), spec, args.dataset_name)
    return ds, spec


# ----------------------------------------------------------------------------- images


def load_image(value, root=None):
    """PIL RGB image from raw bytes, a datasets Image dict ({bytes, path}), a PIL image or a path (a relative one
    that is not found from the current folder is looked for under `root`, the local dataset's folder). 16-bit
    grayscale is scaled to 8 bits, not clipped."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if root is not None and not path.is_absolute() and not path.exists():
            path = Path(root) / path
        img = Image.open(path)
    elif isinstance(value, Image.Image):
        img = value
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    img.load()
    img = ImageOps.exif_transpose(img)  # a phone photo's orientation tag: trained upright, as it is viewed
    if img.mode.startswith("I"):  # 16-bit grayscale (I;16*; older Pillow opens 16-bit PNGs as 32-bit I)
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or pixels.max() > 255:  # 0..65535 to 0..255; an 8-bit range stays
            pixels = pixels / 257.0
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def real_image_value(row, spec):
    """The row's real image as stored: the Pick-a-Pic winner, or the image column."""
    return winner_and_loser(row, spec)[0] if spec["kind"] == "pickapic" else row[spec["image"]]


IMAGE_PROBE_ROWS = 8  # rows whose image is decoded before any model loads


def check_images_decode(rows, spec, dataset_name):
    """Before any model loads: the first rows' real images must decode. When none of them does, the data cannot
    be used as given (paths that resolve nowhere, a column of something else): stop, naming the first failure.
    A few bad images among good ones are skipped and counted during training instead."""
    failures = []
    for row in rows:
        value = real_image_value(row, spec)
        try:
            load_image(value, root=spec.get("root"))
            return
        except Exception as e:
            failures.append((value, e))
    if failures:
        value, e = failures[0]
        shown = str(value) if isinstance(value, (str, Path)) else type(value).__name__
        shown = shown if len(shown) <= 120 else shown[:60] + f"... ({len(shown)} characters)"
        hint = (
            f" (a relative path is read from the current folder, then from {spec['root']})"
            if isinstance(value, (str, Path)) and spec.get("root")
            else ""
        )
        raise DataError(
            f"{dataset_name}: none of the first {len(failures)} images decodes; the first, {shown!r}: "
            f"{type(e).__name__}: {str(e).strip()[:200]}{hint}"
        )


def preprocess_image(img, resolution, center_crop=True, flip=False, rng=None):
    """Resize the shorter side to `resolution` (bilinear), crop a square (center or `rng`-random), flip if
    asked; returns a float tensor (3, H, W) in [-1, 1]."""
    return preprocess_with_size(img, resolution, center_crop, flip, rng)[0]


def preprocess_with_size(img, resolution, center_crop=True, flip=False, rng=None):
    """`preprocess_image`, and the image's size conditioning as SDXL trains it: (original height, original width,
    crop top, crop left, target height, target width), the crop in the resized image (its left edge mirrored
    when flipped), as an int64 tensor (6,)."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    if center_crop or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = nw - resolution - left
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    size = torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.int64)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), size


def generated_size(resolution):
    """The size conditioning of an image generated at `resolution` (no crop)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.int64)


def sample_rng(seed, epoch, index):
    """A per-sample RNG: crops and flips depend on (seed, epoch, index) only, so a resumed run sees the
    same augmentations as an uninterrupted one, whatever the worker count."""
    return random.Random(f"{seed}-{epoch}-{index}")


def caption_of(value):
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def tokenizer_ids(tokenizer, captions, max_length=None):
    """Token ids (B, max_length) of `captions`, padded and truncated (`max_length` None: the tokenizer's own)."""
    return tokenizer(
        captions,
        max_length=max_length or tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def tokenize(tokenizer, captions):
    """{name: token ids (B, L)} of `captions`: a family's `Tokenizers` (utils/family_*.py) gives one entry per
    text encoder; a plain tokenizer gives {"input_ids": ...}."""
    if hasattr(tokenizer, "ids"):
        return tokenizer.ids(captions)
    return {"input_ids": tokenizer_ids(tokenizer, captions)}


def first(ids):
    """The first row of each entry of `tokenize`'s output."""
    return {name: t[0] for name, t in ids.items()}


# ----------------------------------------------------------------------------- torch datasets


class TrainDataset(torch.utils.data.Dataset):
    """Map-style training examples: {"pixel_values" or "latent_params", "input_ids", "num_skipped"}; a row
    whose image does not decode is replaced by the next decodable one and counted (`with_replacement`)."""

    def __init__(
        self,
        ds,
        spec,
        tokenizer,
        *,
        resolution,
        center_crop=False,
        random_flip=False,
        seed=0,
        latent_cache=None,
        empty_prompt_prob=0.0,
    ):
        self.ds, self.spec, self.tokenizer = ds, spec, tokenizer
        self.empty_prompt_prob = empty_prompt_prob
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.latent_cache = latent_cache
        self.epoch = 0

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def image_value(self, row):
        return real_image_value(row, self.spec)

    def __getitem__(self, index):
        return with_replacement(self.example, index, len(self))

    def example(self, index):
        """The training example of row `index`, or None if its image does not decode."""
        if self.latent_cache is None:
            return self.example_from_row(self.ds[index], index)
        flip = self.random_flip and sample_rng(self.seed, self.epoch, index).random() < 0.5
        params = self.latent_cache.get(index, flip)
        if params is None:
            return None
        caption = self.caption(self.ds[index], index)
        return {"latent_params": params, **first(tokenize(self.tokenizer, [caption]))}

    def caption(self, row, index):
        """The row's caption, or the empty prompt for a share `empty_prompt_prob` of the (epoch, index) pairs."""
        if (
            self.empty_prompt_prob
            and random.Random(f"{self.seed}-{self.epoch}-{index}-caption").random() < self.empty_prompt_prob
        ):
            return ""
        return caption_of(row[self.spec["caption"]])

    def pixels(self, value, index):
        """Decode and augment one image; the crop and flip depend on (seed, epoch, index) only, so two
        images of one row (winner and loser) get the same ones. (pixels, size conditioning
        (`preprocess_with_size`)), or None if the image does not decode."""
        rng = sample_rng(self.seed, self.epoch, index)
        flip = self.random_flip and rng.random() < 0.5
        try:
            img = load_image(value, root=self.spec.get("root"))
        except Exception:
            return None
        return preprocess_with_size(img, self.resolution, self.center_crop, flip, rng)

    def example_from_row(self, row, index):
        decoded = self.pixels(self.image_value(row), index)
        if decoded is None:
            return None
        caption = self.caption(row, index)
        return {"pixel_values": decoded[0], "image_size": decoded[1], **first(tokenize(self.tokenizer, [caption]))}


def with_replacement(make, index, length):
    """`make(i)` -> example or None. The example of `index`, or, when its image does not decode, the next
    decodable one (wrapping around), with `num_skipped` = 1 if row `index` itself was bad (so an epoch counts
    each bad row once). Batches stay full: the run makes exactly the optimizer steps asked for and resumes
    at the right batch."""
    for attempt in range(length):
        example = make((index + attempt) % length)
        if example is not None:
            example["num_skipped"] = int(attempt > 0)
            return example
    raise DataError("no image in the training data could be decoded")


class PairDataset(torch.utils.data.Dataset):
    """(real, negative) pairs for SPIN and Diffusion-DPO: the real example of `base` plus either the
    opponent's latent from a `SyntheticStore` (`gen_latents`) or, without a store, the Pick-a-Pic loser
    image with the winner's crop and flip (`loser_pixel_values`)."""

    def __init__(self, base, store=None):
        self.base, self.store = base, store
        self.store_has_real = store is not None and store.has("real_latents")

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __getitem__(self, index):
        return with_replacement(self.example, index, len(self))

    def example(self, index):
        if self.store is not None and self.store_has_real:  # precomputed: nothing to decode
            stored = self.store.get(index)
            if not bool(stored.pop("valid", True)):
                return None
            caption = caption_of(self.base.ds[index][self.base.spec["caption"]])
            size = {"negative_image_size": generated_size(self.base.resolution)}
            return {**first(tokenize(self.base.tokenizer, [caption])), **stored, **size}
        example = self.base.example(index)
        if example is None:
            return None
        if self.store is not None:
            example.update(self.store.get(index))
            example["negative_image_size"] = generated_size(self.base.resolution)
            return example
        loser = self.base.pixels(winner_and_loser(self.base.ds[index], self.base.spec)[1], index)
        if loser is None:
            return None
        example["loser_pixel_values"], example["negative_image_size"] = loser
        return example


class StreamingTrainDataset(torch.utils.data.IterableDataset):
    """The same examples from a streamed (iterable) `datasets` split, shuffled with a buffer per epoch."""

    def __init__(
        self,
        ds,
        spec,
        tokenizer,
        *,
        resolution,
        center_crop=False,
        random_flip=False,
        seed=0,
        shuffle_buffer=1000,
        empty_prompt_prob=0.0,
    ):
        self.item = TrainDataset(
            ds,
            spec,
            tokenizer,
            resolution=resolution,
            center_crop=center_crop,
            random_flip=random_flip,
            seed=seed,
            empty_prompt_prob=empty_prompt_prob,
        )
        self.ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.item.set_epoch(epoch)
        self.ds.set_epoch(epoch)

    def __iter__(self):
        skipped = 0
        for i, row in enumerate(self.ds):
            example = self.item.example_from_row(row, i)
            if example is None:  # undecodable: the stream simply moves on; counted on the next example
                skipped += 1
                continue
            example["num_skipped"], skipped = skipped, 0
            yield example


def collate(examples):
    """Stack examples into a batch (every tensor entry: images or latents, token ids, stored tensors);
    `num_skipped` counts the undecodable rows that were replaced."""
    batch = {"num_skipped": sum(e["num_skipped"] for e in examples)}
    for key, value in examples[0].items():
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([e[key] for e in examples])
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order that depends only on (seed, epoch), so `skip_first_batches` after a resume lands on
    exactly the batches an uninterrupted run would have seen next."""

    def __init__(self, length, seed=0, shuffle=True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


def set_epoch(loader, dataset, sampler, epoch):
    """Set the epoch everywhere the data order and augmentations read it. accelerate's loaders call
    `set_epoch(own iteration count)` when iterated, so a fresh skip-batches loader must be told too."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    dataset.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)


# ----------------------------------------------------------------------------- latent cache


class LatentCache:
    """VAE latent distributions (mean and log-variance, the `DiagonalGaussianDistribution` parameters) of
    every training image, in safetensors shards under `cache_dir`. Built once, resumable shard by shard,
    and rebuilt when the dataset, resolution or cropping change. Crops are fixed per image (from the seed);
    with random_flip both orientations are cached."""

    SHARD = 256

    def __init__(self, cache_dir, num_examples, key):
        self.dir = Path(cache_dir)
        self.num_examples = num_examples
        self.key = key
        self._open = {}

    @staticmethod
    def make_key(**fields):
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def shard_path(self, k):
        return self.dir / f"{self.key}-{k:05d}.safetensors"

    @property
    def num_shards(self):
        return math.ceil(self.num_examples / self.SHARD)

    def build(self, dataset, encode, *, batch_size, process_index=0, num_processes=1, progress=True):
        """`dataset` is a TrainDataset without cache; `encode(pixels) -> params` runs the VAE. Each process
        builds shards process_index, process_index + num_processes, ... and skips finished ones."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        self.dir.mkdir(parents=True, exist_ok=True)
        todo = [k for k in range(process_index, self.num_shards, num_processes) if not self.shard_path(k).exists()]
        bar = tqdm(total=len(todo) * self.SHARD, desc="caching latents", unit="img", disable=not progress or not todo)
        flips = [False, True] if dataset.random_flip else [False]
        for k in todo:
            indices = range(k * self.SHARD, min((k + 1) * self.SHARD, self.num_examples))
            out = {f"flip{int(f)}": [] for f in flips}
            valid = []
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                rows = [dataset.ds[i] for i in chunk]
                imgs = []
                for i, row in zip(chunk, rows):
                    try:
                        imgs.append(load_image(dataset.image_value(row), root=dataset.spec.get("root")))
                        valid.append(True)
                    except Exception:
                        imgs.append(None)
                        valid.append(False)
                for f in flips:
                    pix = [
                        preprocess_image(
                            im, dataset.resolution, dataset.center_crop, f, sample_rng(dataset.seed, 0, i)
                        )
                        if im is not None
                        else None
                        for i, im in zip(chunk, imgs)
                    ]
                    ok = [p for p in pix if p is not None]
                    params = encode(torch.stack(ok)).float().cpu() if ok else None
                    it = iter(params) if params is not None else iter(())
                    for p in pix:
                        out[f"flip{int(f)}"].append(next(it) if p is not None else None)
                bar.update(len(chunk))
            shape = next((p.shape for p in out["flip0"] if p is not None), (1, 1, 1))
            tensors = {
                name: torch.stack([p if p is not None else torch.zeros(shape) for p in ps]) for name, ps in out.items()
            }
            tensors["valid"] = torch.tensor(valid, dtype=torch.bool)
            tmp = self.shard_path(k).with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.rename(self.shard_path(k))
        bar.close()

    def get(self, index, flip=False):
        from safetensors import safe_open

        k, j = divmod(index, self.SHARD)
        if k not in self._open:
            self._open = {k: safe_open(str(self.shard_path(k)), framework="pt")}
        f = self._open[k]
        if not bool(f.get_slice("valid")[j]):
            return None
        name = "flip1" if flip and "flip1" in f.keys() else "flip0"
        return f.get_slice(name)[j]
