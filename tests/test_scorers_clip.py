"""Fidelity of the CLIP-family scorers (PickScore, HPSv2, Aesthetic) against their reference implementations.

The fixtures under tests/golden/clip/ (tiny random models in the official file formats, 4 images, 4 prompts) and the
reference scores in tests/golden/clip/golden.json were produced ONCE, in a separate environment with open_clip,
hpsv2 and torchvision, by tests/golden/make_clip_goldens.py; its docstring gives the exact commands to regenerate
them. Here only our transformers-based scorers run, offline.
"""

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

GOLDEN = Path(__file__).resolve().parent / "golden" / "clip"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    data = json.loads((GOLDEN / "golden.json").read_text())
    data["pil_images"] = [Image.open(GOLDEN / p).convert("RGB") for p in data["images"]]
    return data


def _check(ours, ref):
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    assert len(ours) == len(ref) and diff <= TOL, f"max abs diff {diff:.3g}: ours {ours} vs reference {ref}"
    return diff


def test_hps_matches_reference(golden):
    # Reference: hpsv2 1.2.0 (its open_clip fork + preprocess_val + tokenizer) on hps/HPS_v2.1_compressed.pt.
    # Regenerate: see tests/golden/make_clip_goldens.py (runs in /tmp/refenv_clip, not in this venv).
    from scorers.hps import HPSv2

    scorer = HPSv2(
        checkpoint=str(GOLDEN / "hps"), version="v2.1", processor=str(GOLDEN / "hps" / "processor"), batch_size=3
    )
    _check(scorer.score(golden["pil_images"], golden["prompts"]), golden["hpsv2"])
    # the same file given as a path, one image per batch
    scorer = HPSv2(
        checkpoint=str(GOLDEN / "hps" / "HPS_v2.1_compressed.pt"),
        processor=str(GOLDEN / "hps" / "processor"),
        batch_size=1,
    )
    _check(scorer.score(golden["pil_images"], golden["prompts"]), golden["hpsv2"])


def test_pickscore_matches_reference(golden):
    # Reference: the PickScore model card recipe (transformers CLIPModel + CLIPProcessor, PIL image backend).
    # Regenerate: see tests/golden/make_clip_goldens.py (runs in /tmp/refenv_clip, not in this venv).
    from scorers.pickscore import PickScore

    scorer = PickScore(
        model=str(GOLDEN / "pickscore" / "model"), processor=str(GOLDEN / "pickscore" / "processor"), batch_size=3
    )
    _check(scorer.score(golden["pil_images"], golden["prompts"]), golden["pickscore"])


def test_aesthetic_matches_reference(golden):
    # Reference: LAION improved-aesthetic-predictor simple_inference.py (OpenAI CLIP preprocess via torchvision,
    # image features, numpy L2 normalisation, the official MLP layout) on aesthetic/*.pth + aesthetic/clip.
    # Regenerate: see tests/golden/make_clip_goldens.py (runs in /tmp/refenv_clip, not in this venv).
    from scorers.aesthetic import Aesthetic

    scorer = Aesthetic(head=str(GOLDEN / "aesthetic"), clip_model=str(GOLDEN / "aesthetic" / "clip"), batch_size=3)
    _check(scorer.score(golden["pil_images"], golden["prompts"]), golden["aesthetic"])
    scorer = Aesthetic(
        head=str(GOLDEN / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"),
        clip_model=str(GOLDEN / "aesthetic" / "clip"),
    )
    _check(scorer.score(golden["pil_images"], None), golden["aesthetic"])


def test_scores_move_with_the_inputs(golden):
    """The goldens must be sensitive: a different image/prompt pairing changes each score far beyond 1e-4."""
    from scorers.aesthetic import Aesthetic
    from scorers.hps import HPSv2
    from scorers.pickscore import PickScore

    images, prompts = golden["pil_images"], golden["prompts"]
    hps = HPSv2(checkpoint=str(GOLDEN / "hps"), processor=str(GOLDEN / "hps" / "processor"))
    pick = PickScore(model=str(GOLDEN / "pickscore" / "model"), processor=str(GOLDEN / "pickscore" / "processor"))
    aes = Aesthetic(head=str(GOLDEN / "aesthetic"), clip_model=str(GOLDEN / "aesthetic" / "clip"))
    for scorer, key in ((hps, "hpsv2"), (pick, "pickscore")):
        shifted = scorer.score(images, prompts[1:] + prompts[:1])
        assert max(abs(a - b) for a, b in zip(shifted, golden[key])) > 1e-2
    flipped = aes.score([im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images], prompts)
    assert max(abs(a - b) for a, b in zip(flipped, golden["aesthetic"])) > 1e-2


def test_dtype_is_honoured(golden):
    from scorers.hps import HPSv2

    scorer = HPSv2(checkpoint=str(GOLDEN / "hps"), processor=str(GOLDEN / "hps" / "processor"), dtype=torch.bfloat16)
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    scores = scorer.score(golden["pil_images"], golden["prompts"])
    assert all(isinstance(s, float) for s in scores)
    assert max(abs(a - b) for a, b in zip(scores, golden["hpsv2"])) < 0.1


class _Payload:
    """Any object a weights-only unpickler must refuse."""

    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickles_load_weights_only(tmp_path):
    from scorers.aesthetic import Aesthetic
    from scorers.hps import HPSv2

    bad = tmp_path / "HPS_v2.1_compressed.pt"
    bad.write_bytes(pickle.dumps({"state_dict": {"x": _Payload()}}))
    with pytest.raises(ValueError, match="weights_only"):
        HPSv2(checkpoint=str(bad), processor=str(GOLDEN / "hps" / "processor"))

    sd = torch.load(GOLDEN / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    buf = io.BytesIO()
    torch.save({**sd, "extra": _Payload()}, buf)
    bad = tmp_path / "head.pth"
    bad.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="weights_only"):
        Aesthetic(head=str(bad), clip_model=str(GOLDEN / "aesthetic" / "clip"))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from scorers.aesthetic import Aesthetic
    from scorers.hps import HPSv2

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        HPSv2(checkpoint=str(tmp_path / "nope.pt"), processor=str(GOLDEN / "hps" / "processor"))
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):  # a folder without the version's file
        HPSv2(checkpoint=str(GOLDEN / "hps"), version="v2.0", processor=str(GOLDEN / "hps" / "processor"))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        HPSv2(checkpoint=str(tmp_path / "missing_dir"), processor=str(GOLDEN / "hps" / "processor"))
    with pytest.raises(FileNotFoundError, match="head.pth"):
        Aesthetic(head=str(tmp_path / "head.pth"), clip_model=str(GOLDEN / "aesthetic" / "clip"))
    with pytest.raises(ValueError, match="unknown HPS version"):
        HPSv2(checkpoint=str(GOLDEN / "hps"), version="v3", processor=str(GOLDEN / "hps" / "processor"))


def test_wrong_files_are_refused(tmp_path):
    from scorers.aesthetic import Aesthetic
    from scorers.hps import HPSv2

    torch.save({"layers.0.weight": torch.zeros(4, 32)}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match="LAION aesthetic"):
        Aesthetic(head=str(tmp_path / "head.pth"), clip_model=str(GOLDEN / "aesthetic" / "clip"))
    sd = torch.load(GOLDEN / "hps" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {**sd, "visual.transformer.resblocks.5.ln_1.weight": torch.ones(32)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="no place"):
        HPSv2(checkpoint=str(tmp_path / "x.pt"), processor=str(GOLDEN / "hps" / "processor"))
