"""Pick-a-Pic from the copies that exist (the original yuvalkirstain/pickapic_v2 is gone from the Hub since 2025):
a webdataset archive (one .tar, a folder of shards, a glob, streamed or not) and a parquet whose labels are text
train on the same winners as the numeric parquet; bad labels and the removed repo give errors that say what to do;
evaluate.py reads its Pick-a-Pic prompts from a copy, takes space-separated --metrics and checks --resolution."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from make_tiny_assets import build_pickapic_parquet, build_pickapic_webdataset

import evaluate
import train_sft
from helpers import run_sft, run_spin, sft_args, spin_args, tensors
from utils.data import (
    DataError,
    PairDataset,
    StreamingTrainDataset,
    TrainDataset,
    is_decided,
    load_training_dataset,
    winner_and_loser,
)
from utils.evaluation import EvalError

MAPPED = (
    "columns mapped: caption <- original_prompt.txt, jpg_0 <- jpg_0.jpg, jpg_1 <- jpg_1.jpg, label_0 <- label_0.txt"
)


def data_args(assets, dataset, *extra):
    return train_sft.parse_args(sft_args(assets, "unused", *extra, dataset=dataset))


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(assets["pipeline"]), subfolder="tokenizer")


@pytest.fixture(scope="module")
def copies(assets, tmp_path_factory):
    """The session's Pick-a-Pic parquet as: one webdataset .tar, a folder of two shards, a glob of them, and a
    parquet whose labels are strings ("1", "0", "0.5")."""
    root = tmp_path_factory.mktemp("copies")
    n = pq.read_table(assets["pickapic"]).num_rows
    build_pickapic_webdataset(assets["pickapic"], root / "pickapic.tar")
    build_pickapic_webdataset(assets["pickapic"], root / "shards" / "part-00000.tar", range(0, n // 2))
    build_pickapic_webdataset(assets["pickapic"], root / "shards" / "part-00001.tar", range(n // 2, n))
    table = pq.read_table(assets["pickapic"])
    for name in ("label_0", "label_1"):
        text = pa.array([f"{x:g}" for x in table.column(name).to_pylist()], pa.string())
        table = table.set_column(table.column_names.index(name), name, text)
    pq.write_table(table, root / "string_labels.parquet")
    return {
        "tar": root / "pickapic.tar",
        "shards": root / "shards",
        "glob": f"{root / 'shards'}/*.tar",
        "string_labels": root / "string_labels.parquet",
    }


@pytest.mark.parametrize(
    "label, decided, image_0_wins",
    [
        (1, True, True),
        (0.0, True, False),
        (0.5, False, None),
        ("1", True, True),
        ("0", True, False),
        ("0.5", False, None),
        ("1\n", True, True),
        (" 0.0\n", True, False),
        (b"1", True, True),
        ("1.0", True, True),
        (None, False, None),
    ],
)
def test_labels_as_numbers_or_text_decide_alike(label, decided, image_0_wins):
    assert is_decided(label) is decided
    if decided:
        spec = {"label_0": "label_0", "image_0": "jpg_0", "image_1": "jpg_1"}
        winner, _ = winner_and_loser({"label_0": label, "jpg_0": "first", "jpg_1": "second"}, spec)
        assert winner == ("first" if image_0_wins else "second")


def pairs(ds, spec, tokenizer):
    """(winner, loser) pixels of every row, center-cropped, as the training scripts see them."""
    base = TrainDataset(ds, spec, tokenizer, resolution=32, center_crop=True)
    return [(e["pixel_values"], e["loser_pixel_values"]) for e in (PairDataset(base)[i] for i in range(len(base)))]


@pytest.mark.parametrize("copy", ["tar", "shards", "glob", "string_labels"])
def test_copies_train_on_the_same_winners_as_the_numeric_parquet(assets, copies, tokenizer, caplog, copy):
    ds, spec = load_training_dataset(data_args(assets, assets["pickapic"]))
    with caplog.at_level(logging.INFO):
        copy_ds, copy_spec = load_training_dataset(data_args(assets, copies[copy]))
    assert len(copy_ds) == len(ds) == 20  # 24 rows, 4 ties dropped
    for (winner, loser), (copy_winner, copy_loser) in zip(
        pairs(ds, spec, tokenizer), pairs(copy_ds, copy_spec, tokenizer), strict=True
    ):
        assert torch.equal(winner, copy_winner) and torch.equal(loser, copy_loser)
    if copy == "string_labels":
        assert "columns mapped" not in caplog.text
    else:
        assert MAPPED in caplog.text
        assert (copy_spec["caption"], copy_spec["label_0"]) == ("original_prompt.txt", "label_0.txt")


def test_streamed_tar_skips_an_undecodable_image(assets, tmp_path, tokenizer):
    """--streaming on a webdataset: the same winners in order, and a corrupt JPEG is skipped and counted
    (our decoder sees the bytes; datasets' own decoding would crash the run)."""
    numeric = build_pickapic_parquet(
        tmp_path / "corrupt.parquet", num_rows=12, num_ties=2, num_corrupt=1, duplicate_prompts=0
    )
    tar = build_pickapic_webdataset(numeric, tmp_path / "corrupt.tar")
    ds, spec = load_training_dataset(data_args(assets, tar, "--streaming"))
    assert spec["image_0"] == "jpg_0.jpg"
    stream = StreamingTrainDataset(ds, spec, tokenizer, resolution=32, center_crop=True, shuffle_buffer=0)
    examples = list(stream)
    assert len(examples) == 9 and sum(e["num_skipped"] for e in examples) == 1  # 10 winners, 1 undecodable
    parquet_ds, parquet_spec = load_training_dataset(data_args(assets, numeric))
    expected = TrainDataset(parquet_ds, parquet_spec, tokenizer, resolution=32, center_crop=True)
    expected = [e for e in (expected.example(i) for i in range(len(expected))) if e is not None]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(examples, expected, strict=True))


def with_labels(assets, path, labels):
    table = pq.read_table(assets["pickapic"]).slice(0, len(labels))
    table = table.set_column(table.column_names.index("label_0"), "label_0", pa.array(labels, pa.string()))
    pq.write_table(table, path)
    return path


def test_non_numeric_label_names_the_column_and_a_value(assets, tmp_path):
    for labels in (["1", "0", "yes", "0.5"], ["yes", "no", "yes", "no"]):
        with pytest.raises(
            DataError,
            match=r"column 'label_0' holds labels that are not numbers, e.g. 'yes' "
            r"\(of 4 rows, \d are ties, \d have a label that is not a number",
        ):
            load_training_dataset(data_args(assets, with_labels(assets, tmp_path / "words.parquet", labels)))
    with pytest.raises(
        DataError,
        match=r"no examples left after dropping ties \(of 3 rows, 3 are ties, 0 have a label "
        r"that is not a number and 0 have none\)",
    ):
        load_training_dataset(data_args(assets, with_labels(assets, tmp_path / "ties.parquet", ["0.5", "0.5", "0.5"])))


@pytest.mark.parametrize("name", ["yuvalkirstain/pickapic_v2", "YuvalKirstain/Pickapic_V2"])
def test_removed_repo_says_where_to_look(assets, tmp_path, name):
    with pytest.raises(DataError) as e:  # offline here, as the repo is gone for everyone: the load fails
        load_training_dataset(data_args(assets, name, "--cache_dir", tmp_path / "cache"))
    message = str(e.value)
    assert f"--dataset_name {name} (split 'train') could not be loaded" in message
    assert "was removed from the Hugging Face Hub in 2025" in message
    assert "point --dataset_name at a copy" in message and "sayakpaul/pickapic_v2_webdataset" in message
    assert "--caption_column" in message and "--label_0_column" in message
    with pytest.raises(DataError) as e:
        load_training_dataset(data_args(assets, "someone/other-dataset", "--cache_dir", tmp_path / "cache"))
    assert "could not be loaded" in str(e.value) and "was removed from the Hugging Face Hub" not in str(e.value)


def eval_args(assets, tmp_path, *extra):
    return ["--model", f"a={assets['pipeline']}", "--output_dir", str(tmp_path / "eval"), "--resolution", "32", *extra]


class PromptsLoaded(Exception):
    pass


def prompts_of(monkeypatch, argv):
    """The prompts evaluate.py's main would render for `argv` (it stops before loading a model for generation)."""
    seen = {}
    real = evaluate.load_prompts

    def spy(*args, **kwargs):
        seen["prompts"] = real(*args, **kwargs)
        return seen["prompts"]

    def stop(*args, **kwargs):
        raise PromptsLoaded

    monkeypatch.setattr(evaluate, "load_prompts", spy)
    monkeypatch.setattr(evaluate, "load_pipeline", stop)
    with pytest.raises(PromptsLoaded):
        evaluate.main(evaluate.parse_args(argv))
    return seen["prompts"]


def test_evaluate_reads_pickapic_prompts_from_a_copy(assets, copies, tmp_path, monkeypatch):
    captions = list(dict.fromkeys(pq.read_table(assets["pickapic"]).column("caption").to_pylist()))  # unique, in order
    assert len(captions) == 22
    for copy in ("pickapic", "tar"):  # any split name reads a single local file
        argv = eval_args(
            assets,
            tmp_path / copy,
            "--prompts",
            "pickapic_test_unique",
            "--pickapic_prompts_dataset",
            str(copies.get(copy, assets["pickapic"])),
        )
        assert prompts_of(monkeypatch, argv) == captions
    argv = eval_args(
        assets,
        tmp_path / "shards",
        "--pickapic_prompts_dataset",
        str(copies["shards"]),
        "--pickapic_prompts_split",
        "train",
        "--prompt_column",
        "original_prompt",
        "--max_prompts",
        "5",
    )
    assert prompts_of(monkeypatch, argv) == captions[:5]


def test_evaluate_on_the_removed_repo_says_what_to_pass(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(EvalError) as e:
        evaluate.main(evaluate.parse_args(eval_args(assets, tmp_path, "--prompts", "pickapic_test_unique")))
    message = str(e.value)
    assert "--pickapic_prompts_dataset yuvalkirstain/pickapic_v2 (split 'test_unique') could not be loaded" in message
    assert "was removed from the Hugging Face Hub in 2025" in message and "--prompts FILE" in message
    assert "point --pickapic_prompts_dataset at a copy" in message
    with pytest.raises(EvalError, match=r"--pickapic_prompts_dataset .*: no column 'Prompt'"):
        evaluate.main(
            evaluate.parse_args(
                eval_args(
                    assets,
                    tmp_path,
                    "--pickapic_prompts_dataset",
                    str(assets["pickapic"]),
                    "--prompt_column",
                    "Prompt",
                )
            )
        )


@pytest.mark.parametrize(
    "flags, metrics",
    [
        (["pickscore", "hpsv2"], ["pickscore", "hpsv2"]),
        (["pickscore,hpsv2"], ["pickscore", "hpsv2"]),
        (["pickscore,hpsv2", "aesthetic"], ["pickscore", "hpsv2", "aesthetic"]),
    ],
)
def test_metrics_space_or_comma_separated(assets, tmp_path, flags, metrics):
    assert evaluate.parse_args(eval_args(assets, tmp_path, "--metrics", *flags)).metrics == metrics


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics", "pickscore", "clipscore"], "--metrics: unknown metric(s) ['clipscore']"),
        (["--resolution", "30"], "--resolution must be a multiple of 8, got 30"),
    ],
)
def test_evaluate_bad_flags_fail_at_parse_time(assets, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(eval_args(assets, tmp_path, *extra))
    assert e.value.code == 2
    assert any(message in line and "error:" in line for line in capsys.readouterr().err.splitlines())


def trained_lora(path):
    ups = [v for k, v in tensors(path).items() if "lora.up" in k]
    return bool(ups) and all(v.abs().sum() > 0 for v in ups)


def test_sft_trains_on_a_webdataset_tar(assets, copies, tmp_path):
    out = tmp_path / "sft"
    run_sft(*sft_args(assets, out, "--use_lora", "--max_train_steps", "2", dataset=copies["tar"]))
    assert trained_lora(out / "pytorch_lora_weights.safetensors")


def test_spin_trains_on_a_webdataset_tar(assets, copies, tmp_path):
    out = tmp_path / "spin"
    run_spin(
        *spin_args(
            assets,
            out,
            "--num_iterations",
            "1",
            "--use_lora",
            "--max_train_steps",
            "2",
            "--dataset_name",
            copies["tar"],
        )
    )
    assert trained_lora(out / "iter_1" / "pytorch_lora_weights.safetensors")
    assert not (out / "iter_2").exists()
