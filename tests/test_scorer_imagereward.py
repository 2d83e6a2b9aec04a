"""Fidelity of scorers/imagereward.py against the REFERENCE ImageReward code (PyPI `image-reward`, THUDM).

The golden values in tests/golden/imagereward/golden.json were computed once by the reference implementation
(`ImageReward.score(prompt, image)`) on the tiny checkpoint committed beside them (official file format:
ImageReward.pt state dict + med_config.json, tiny BERT vocab in tokenizer/). To regenerate them, follow the
docstring of tests/golden/make_imagereward_golden.py (a separate venv with torch 2.14.1, torchvision 0.29.1,
image-reward 1.5, transformers 4.36.2, timm 0.6.13, fairscale 0.4.13; then
`/tmp/refenv_ir/bin/python tests/golden/make_imagereward_golden.py` from the repository root).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from scorers.imagereward import ImageReward, preprocess

GOLDEN = Path(__file__).resolve().parent / "golden" / "imagereward"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    g = json.loads((GOLDEN / "golden.json").read_text())
    # the scores belong to exactly this checkpoint file
    assert hashlib.sha256((GOLDEN / "ImageReward.pt").read_bytes()).hexdigest() == g["checkpoint_sha256"]
    return g


@pytest.fixture(scope="module")
def scorer():
    return ImageReward(checkpoint=str(GOLDEN), tokenizer=str(GOLDEN / "tokenizer"), batch_size=4)


def _images(golden):
    return [Image.open(GOLDEN / p["image"]) for p in golden["pairs"]]


def test_tokenization_matches_reference(scorer, golden):
    prompts = [p["prompt"] for p in golden["pairs"]]
    ids = scorer.tokenize(prompts).input_ids.tolist()
    assert ids == [p["input_ids"] for p in golden["pairs"]]


def test_preprocessing_matches_reference(golden):
    for name, ref in golden["preprocess"].items():
        x = preprocess(Image.open(GOLDEN / name))
        assert list(x.shape) == ref["shape"]
        assert x.flatten()[::5003][:32].tolist() == pytest.approx(ref["samples"], abs=1e-5), name
        assert float(x.double().sum()) == pytest.approx(ref["sum"], abs=1e-2), name
        assert float(x.double().pow(2).sum()) == pytest.approx(ref["sum_sq"], abs=1e-2), name


def test_scores_match_reference(scorer, golden):
    ours = scorer.score(_images(golden), [p["prompt"] for p in golden["pairs"]])
    ref = [p["score"] for p in golden["pairs"]]
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    assert diff < TOL, f"max |ours - reference| = {diff:.3g}\nours={ours}\nref={ref}"
    # the fixture is informative: scores vary with the image and the prompt
    assert max(ref) - min(ref) > 0.5


def test_batch_size_does_not_change_scores(golden):
    one = ImageReward(checkpoint=str(GOLDEN / "ImageReward.pt"), tokenizer=str(GOLDEN / "tokenizer"), batch_size=1)
    ref = [p["score"] for p in golden["pairs"]]
    ours = one.score(_images(golden), [p["prompt"] for p in golden["pairs"]])
    assert max(abs(a - b) for a, b in zip(ours, ref)) < TOL


def test_load_scorer_by_name():
    from scorers import load_scorer

    s = load_scorer("imagereward", imagereward_checkpoint=str(GOLDEN), imagereward_tokenizer=str(GOLDEN / "tokenizer"))
    assert isinstance(s, ImageReward)


def test_bfloat16_runs(golden):
    s = ImageReward(checkpoint=str(GOLDEN), tokenizer=str(GOLDEN / "tokenizer"), dtype=torch.bfloat16)
    ours = s.score(_images(golden)[:2], [p["prompt"] for p in golden["pairs"][:2]])
    assert all(abs(a - p["score"]) < 0.3 for a, p in zip(ours, golden["pairs"]))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        ImageReward(checkpoint=str(tmp_path), tokenizer=str(GOLDEN / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="ImageReward checkpoint"):
        ImageReward(checkpoint=str(tmp_path / "no" / "such" / "dir"), tokenizer=str(GOLDEN / "tokenizer"))
    (tmp_path / "ImageReward.pt").write_bytes((GOLDEN / "ImageReward.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        ImageReward(checkpoint=str(tmp_path), tokenizer=str(GOLDEN / "tokenizer"))


class _Payload:
    """An arbitrary object: unpickling it would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pickle payload executed",))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, capsys):
    sd = torch.load(GOLDEN / "ImageReward.pt", map_location="cpu", weights_only=True)
    sd["evil"] = _Payload()
    torch.save(sd, tmp_path / "ImageReward.pt")  # a valid torch checkpoint whose pickle holds the payload
    (tmp_path / "med_config.json").write_bytes((GOLDEN / "med_config.json").read_bytes())
    with pytest.raises(ValueError, match="weights-only"):
        ImageReward(checkpoint=str(tmp_path), tokenizer=str(GOLDEN / "tokenizer"))
    assert "pickle payload executed" not in capsys.readouterr().out


def test_checkpoint_from_hub_repo(hub_server, golden):
    from huggingface_hub import create_repo, upload_folder

    from hub_server import TEST_TOKEN, hub_online

    with hub_online():
        repo = create_repo("test-user/tiny-imagereward", token=TEST_TOKEN, exist_ok=True).repo_id
        upload_folder(
            repo_id=repo,
            folder_path=str(GOLDEN),
            token=TEST_TOKEN,
            allow_patterns=["ImageReward.pt", "med_config.json"],
        )
        pairs = golden["pairs"][:3]
        for location in (repo, f"{repo}:ImageReward.pt"):
            s = ImageReward(checkpoint=location, tokenizer=str(GOLDEN / "tokenizer"))
            ours = s.score([Image.open(GOLDEN / p["image"]) for p in pairs], [p["prompt"] for p in pairs])
            assert max(abs(a - p["score"]) for a, p in zip(ours, pairs)) < TOL
        with pytest.raises(FileNotFoundError, match="ImageReward checkpoint"):
            ImageReward(checkpoint="test-user/no-such-repo", tokenizer=str(GOLDEN / "tokenizer"))
