"""Pick-a-Pic handling (ties, winners, unique prompts, other column names/orders, corrupt images, streaming)
and bad input that must stop with a clear message before any model is loaded."""

import logging

import pyarrow.parquet as pq
import pytest
from make_tiny_assets import build_pickapic_parquet, image_kind

import train_sft
from helpers import run_sft, sft_args, tensors
from utils.data import DataError, load_image, load_training_dataset, winner_and_loser


def data_args(assets, *extra, dataset=None):
    return train_sft.parse_args(sft_args(assets, "unused", *extra, dataset=dataset))


def test_ties_dropped_and_winner_selected(assets):
    table = pq.read_table(assets["pickapic"])
    labels = table.column("label_0").to_pylist()
    ties = sum(x == 0.5 for x in labels)
    assert ties > 0 and any(x == 1 for x in labels) and any(x == 0 for x in labels)
    ds, spec = load_training_dataset(data_args(assets))
    assert spec["kind"] == "pickapic" and len(ds) == len(labels) - ties
    for row in ds:
        winner, loser = winner_and_loser(row, spec)
        assert image_kind(load_image(winner)) == "winner"
        assert image_kind(load_image(loser)) == "loser"


def test_unique_prompts_keeps_first_of_each_caption(assets):
    ds, spec = load_training_dataset(data_args(assets, "--unique_prompts"))
    captions = ds[spec["caption"]]
    all_ds, _ = load_training_dataset(data_args(assets))
    assert len(set(captions)) == len(captions) < len(all_ds)
    assert set(captions) == set(all_ds[spec["caption"]])


def test_renamed_and_reordered_columns(assets, tmp_path):
    table = pq.read_table(assets["pickapic"])
    renamed = table.rename_columns(
        [
            {"caption": "prompt", "jpg_0": "img_a", "jpg_1": "img_b", "label_0": "pref_a"}.get(n, n)
            for n in table.column_names
        ]
    )
    path = tmp_path / "renamed.parquet"
    pq.write_table(renamed.select(list(reversed(renamed.column_names))), path)
    args = data_args(
        assets,
        "--caption_column",
        "prompt",
        "--image_0_column",
        "img_a",
        "--image_1_column",
        "img_b",
        "--label_0_column",
        "pref_a",
        dataset=path,
    )
    ds, spec = load_training_dataset(args)
    assert len(ds) == sum(x in (0, 1) for x in table.column("label_0").to_pylist())
    assert all(image_kind(load_image(winner_and_loser(r, spec)[0])) == "winner" for r in ds)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load during the test fails it: bad input must be caught before."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(train_sft, "load_frozen_components", boom)


@pytest.mark.parametrize(
    "extra, dataset_key, message",
    [
        (["--caption_column", "prompt"], "pickapic", r"missing column\(s\) \['prompt'\]"),
        ([], "missing", r"no such file or folder"),
        ([], "captions", r"not Pick-a-Pic-shaped.*--image_column"),
        (["--image_column", "picture", "--caption_column", "text"], "captions", r"missing column\(s\) \['picture'\]"),
        ([], "all_ties", r"no examples left after dropping ties"),
    ],
)
def test_bad_data_stops_before_models_with_named_problem(
    assets, tmp_path, no_model_loading, extra, dataset_key, message
):
    datasets = dict(
        assets,
        missing=tmp_path / "nope" / "pickapic.parquet",
        all_ties=build_pickapic_parquet(tmp_path / "ties.parquet", num_rows=4, num_ties=4, duplicate_prompts=0),
    )
    with pytest.raises(DataError, match=message):
        run_sft(*sft_args(assets, tmp_path / "out", *extra, dataset=datasets[dataset_key]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--use_ema", "--use_lora"], "--use_ema and --use_lora conflict"),
        (["--streaming", "--cache_latents"], "--streaming and --cache_latents conflict"),
        (["--mixed_precision", "fp16"], "use --mixed_precision bf16"),
        (["--resume_from_checkpoint", "checkpoint-99"], "no such checkpoint folder"),
        (["--validation_steps", "5"], "--validation_steps needs --validation_prompts"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1"),
        (["--lr_scheduler", "cosine_warm"], "invalid choice: 'cosine_warm'"),
        (["--resume_from_checkpoint", "."], "not a checkpoint-N folder"),
    ],
)
def test_bad_flags_exit_with_message(assets, tmp_path, capsys, no_model_loading, extra, message):
    with pytest.raises(SystemExit) as e:
        run_sft(*sft_args(assets, tmp_path / "out", *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_corrupt_images_are_replaced_counted_and_steps_complete(assets, tmp_path, caplog):
    data = build_pickapic_parquet(
        tmp_path / "corrupt.parquet", num_rows=12, num_ties=2, num_corrupt=3, duplicate_prompts=0
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):  # 10 winners / batch 2 = one epoch of 5 steps
        run_sft(
            *sft_args(
                assets,
                out,
                "--use_lora",
                "--max_train_steps",
                "5",
                "--train_batch_size",
                "2",
                "--checkpointing_steps",
                "5",
                dataset=data,
            )
        )
    assert "replaced 3 undecodable images" in caplog.text
    assert (out / "checkpoint-5").is_dir()  # every requested step ran: no batch was dropped
    assert trained_lora(out)


def trained_lora(out):
    """True when the saved adapter moved away from its init (peft's gaussian init starts B at zero)."""
    ups = [v for k, v in tensors(out / "pytorch_lora_weights.safetensors").items() if "lora.up" in k]
    return bool(ups) and all(v.abs().sum() > 0 for v in ups)


def test_streaming_run(assets, tmp_path):
    out = tmp_path / "stream"
    run_sft(
        *sft_args(
            assets, out, "--use_lora", "--streaming", "--max_train_steps", "3", "--validation_prompts", "a red apple"
        )
    )
    assert trained_lora(out) and (out / "validation_grid.png").exists()


def test_proportion_empty_prompts_drops_captions_reproducibly(assets):
    """--proportion_empty_prompts: about that share of the examples trains on the empty prompt, the same ones for
    the same (seed, epoch, index), other ones in another epoch; 1.0 or more is refused."""
    from transformers import CLIPTokenizer

    from utils.data import TrainDataset

    args = data_args(assets, "--proportion_empty_prompts", "0.5")
    ds, spec = load_training_dataset(args)
    tokenizer = CLIPTokenizer.from_pretrained(str(assets["pipeline"]), subfolder="tokenizer")
    empty = tokenizer(
        [""], max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt"
    ).input_ids[0]

    def dropped(epoch):
        train = TrainDataset(ds, spec, tokenizer, resolution=32, center_crop=True, seed=0, empty_prompt_prob=0.5)
        train.set_epoch(epoch)
        return [bool((train[i]["input_ids"] == empty).all()) for i in range(len(train))]

    first = dropped(0)
    assert 0 < sum(first) < len(first) and dropped(0) == first and dropped(1) != first
    plain = TrainDataset(ds, spec, tokenizer, resolution=32, center_crop=True, seed=0)
    assert not any(bool((plain[i]["input_ids"] == empty).all()) for i in range(len(plain)))
    with pytest.raises(SystemExit):
        data_args(assets, "--proportion_empty_prompts", "1.0")


def test_image_paths_relative_to_the_dataset_file_and_16_bit_images(assets, tmp_path, monkeypatch):
    """A CSV whose image column holds paths relative to its own folder trains from any working folder; a path that
    resolves nowhere stops before any model loads, naming it; a 16-bit grayscale PNG keeps its gray."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.fromarray(np.full((40, 48), 32768, dtype=np.uint16)).save(data / "images" / "gray16.png")
    Image.new("RGB", (40, 48), (200, 10, 10)).save(data / "images" / "red.png")
    (data / "rel.csv").write_text("text,image\na gray square,images/gray16.png\na red square,images/red.png\n")
    (data / "missing.csv").write_text("text,image\na fox,pics/0.png\na car,pics/1.png\n")
    monkeypatch.chdir(tmp_path / "data" / "images")  # neither the dataset's folder nor the paths' base
    flags = ["--image_column", "image", "--caption_column", "text"]
    ds, spec = load_training_dataset(data_args(assets, *flags, dataset=str(data / "rel.csv")))
    gray, red = (np.asarray(load_image(row["image"], root=spec["root"])) for row in ds)
    assert abs(int(gray[0, 0, 0]) - 127) <= 1 and tuple(red[0, 0]) == (200, 10, 10)
    assert load_image(Image.fromarray(np.full((4, 4), 200, np.int32))).getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(DataError, match=r"none of the first 2 images decodes; the first, 'pics/0.png'"):
        load_training_dataset(data_args(assets, *flags, dataset=str(data / "missing.csv")))


def test_unique_prompts_reads_a_list_of_captions_as_training_does():
    from utils.data import first_per_prompt

    assert first_per_prompt([["a fox", "a red fox"], ["a fox"], "a car", None, "", ("a car",)]) == [0, 2, 3]


def test_phone_photos_upright_and_long_values_shortened_in_messages(tmp_path):
    """A JPEG whose EXIF tag says "rotate 90" trains as it is viewed (portrait); an undecodable base64 value is
    shown shortened in the error line."""
    import io

    from PIL import Image

    from utils.data import check_images_decode

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was held upright
    buf = io.BytesIO()
    Image.new("RGB", (60, 30), "white").save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (30, 60)
    rows = [{"text": "a", "image": "iVBORw0KGgo" + "A" * 5000}]
    with pytest.raises(DataError) as e:
        check_images_decode(rows, {"kind": "image_caption", "image": "image"}, "b64.jsonl")
    assert len(str(e.value)) < 400 and "(5011 characters)" in str(e.value)


def test_a_folder_of_images_with_caption_files_beside_them(assets, tmp_path):
    """kohya-style: img.png + img.txt pairs (one image without its .txt) load as image + text columns."""
    from PIL import Image

    folder = tmp_path / "kohya" / "10_fox"
    folder.mkdir(parents=True)
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (40, 40), colour).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("\ufeffa red square\n")
    (folder / "img1.txt").write_text("a blue square")
    args = data_args(assets, "--image_column", "image", "--caption_column", "text", dataset=str(tmp_path / "kohya"))
    ds, spec = load_training_dataset(args)
    assert [row["text"] for row in ds] == ["a red square", "a blue square", ""]
    assert load_image(ds[1]["image"], root=spec["root"]).getpixel((0, 0)) == (0, 0, 255)
