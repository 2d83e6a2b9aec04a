"""Golden fixtures for tests/test_scorer_imagereward.py, computed by the REFERENCE ImageReward code
(PyPI `image-reward` 1.5, THUDM) on a tiny randomly initialised model in the official file format.

Writes tests/golden/imagereward/:
  ImageReward.pt      the state dict of the reference `ImageReward.ImageReward.ImageReward` module (official key
                      names: blip.visual_encoder.*, blip.text_encoder.*, blip.vision_proj/text_proj, mlp.layers.*)
  med_config.json     the BERT/med config in the official layout, tiny sizes
  tokenizer/          a tiny BERT WordPiece vocab (vocab.txt + tokenizer_config.json) standing in for bert-base-uncased
  images/*.png        deterministic small images: several sizes, non-square, RGB / RGBA / greyscale / palette
  golden.json         prompts, image files, the reference token ids, preprocessing statistics and scores

How the reference is made to build a tiny model (nothing else of it is changed):
  * `create_vit` (BLIP's ViT factory, hard-wired to 'large' by ImageReward) is patched to a
    VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.0);
  * `MLP(768)` is built with the tiny text width instead of 768 (its 1024/128/64/16/1 layers are kept);
  * `BertTokenizer.from_pretrained('bert-base-uncased')` inside BLIP's `init_tokenizer` reads the tiny vocab
    (the reference's own [DEC] / [ENC] additions then run unchanged);
  * the package's __init__ (which imports the training code: diffusers, datasets, OpenAI `clip`) is bypassed by
    registering bare `ImageReward` / `ImageReward.models` packages, so only the model modules are imported.
All weights are then redrawn at a larger scale than the reference init (so that every part of the model moves
the score), saved, reloaded through `load_state_dict` as `ImageReward.utils.load` does, and each (image, prompt)
pair is scored with the reference `ImageReward.score(prompt, image)` in eval mode, float32, CPU.

Regenerate (a separate environment; never install these into the project venv):
    python3 -m venv /tmp/refenv_ir
    /tmp/refenv_ir/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/refenv_ir/bin/pip install --no-deps image-reward==1.5
    /tmp/refenv_ir/bin/pip install "transformers==4.36.2" "tokenizers<0.16" "huggingface_hub<0.26" timm==0.6.13 \\
        fairscale==0.4.13 pyyaml requests tqdm regex safetensors packaging filelock numpy pillow
    /tmp/refenv_ir/bin/python tests/golden/make_imagereward_golden.py
(run from the repository root; `--out DIR` writes elsewhere).
"""

import argparse
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OUT = Path(__file__).resolve().parent / "imagereward"

VISION = dict(embed_dim=128, depth=2, num_heads=2, patch_size=16, mlp_ratio=1.0)
TEXT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=40
)

PROMPTS = [
    "a red cat sitting on a blue chair",
    "A photo of an astronaut riding a horse on the moon, highly detailed, 4k",
    "sunset",
    "two dogs and a tree in the snow. Oil painting!",
    # longer than 35 tokens: exercises truncation
    (
        "a very long prompt about a small house near a big green forest with many tall trees and a river "
        "and a bridge and a boat and a red sky and birds flying over the water at night with stars"
    ),
    "Ünïcödé café — naïve résumé",
    "[ENC] a dog [DEC] and a cat",
]

WORDS = """a an the of on in at and with near over to is are by for from under
red blue green black white yellow orange purple pink gray brown gold silver
cat cats dog dogs horse tree trees house forest river bridge boat sky birds water night stars moon sun sunset
snow oil painting photo astronaut riding sitting flying chair small big tall very long many two highly detailed
prompt about cafe naive resume art style portrait landscape city""".split()


def write_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"-()[]&/#@")
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + chars
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    )
    vocab += [w for w in dict.fromkeys(WORDS) if w not in vocab]
    vocab += ["##s", "##ing", "##ed", "##ly", "##er"]
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "do_lower_case": True,
                "tokenize_chinese_chars": True,
                "strip_accents": None,
                "model_max_length": 512,
                "tokenizer_class": "BertTokenizer",
            },
            indent=2,
        )
        + "\n"
    )
    return vocab


def make_images(folder):
    """name -> PIL image; deterministic, small, varied sizes and modes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    imgs = {}
    yy, xx = np.mgrid[0:48, 0:64]
    imgs["gradient_64x48.png"] = Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8))
    imgs["noise_40x90.png"] = Image.fromarray(rng.integers(0, 256, (90, 40, 3), dtype=np.uint8))
    board = ((np.indices((60, 60)).sum(0) // 6) % 2 * 255).astype(np.uint8)
    imgs["checker_60x60.png"] = Image.fromarray(np.stack([board, 255 - board, board // 2], -1))
    yy, xx = np.mgrid[0:30, 0:250]
    imgs["wide_250x30.png"] = Image.fromarray(
        np.stack([(np.sin(xx / 7.0) * 127 + 128), yy * 8, (np.cos(yy / 3.0) * 127 + 128) + 0 * xx], -1).astype(
            np.uint8
        )
    )
    rgba = rng.integers(0, 256, (36, 52, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 52, dtype=np.uint8)[None, :]
    imgs["rgba_52x36.png"] = Image.fromarray(rgba, "RGBA")
    yy, xx = np.mgrid[0:70, 0:33]
    imgs["grey_33x70.png"] = Image.fromarray(((xx * yy) % 256).astype(np.uint8), "L")
    imgs["palette_45x45.png"] = Image.fromarray(rng.integers(0, 256, (45, 45, 3), dtype=np.uint8)).quantize(16)
    for name, im in imgs.items():
        im.save(folder / name)
    # Reread from disk so both sides start from the same decoded files.
    return {name: Image.open(folder / name) for name in imgs}


def import_reference():
    """Import ImageReward's model modules without its package __init__ (training code, OpenAI clip)."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        sys.exit("image-reward is not installed in this environment (see the docstring)")
    root = Path(spec.submodule_search_locations[0])
    for name, path in (("ImageReward", root), ("ImageReward.models", root / "models")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    import ImageReward.ImageReward as ir_mod
    import ImageReward.models.BLIP.blip as blip_mod
    import ImageReward.models.BLIP.blip_pretrain as pretrain_mod
    import ImageReward.models.BLIP.vit as vit_mod

    return ir_mod, blip_mod, pretrain_mod, vit_mod


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "LayerNorm" in name or ".norm" in name or name.startswith("blip.visual_encoder.norm"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith("mlp."):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith(("cls_token", "pos_embed")) or "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / fan_in**0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    ir_mod, blip_mod, pretrain_mod, vit_mod = import_reference()
    tok_dir = out / "tokenizer"
    vocab = write_tokenizer(tok_dir)

    # --- patches that make the reference build the tiny model -----------------------------------------------
    ref_from_pretrained = blip_mod.BertTokenizer.from_pretrained

    class TinyBertTokenizer(blip_mod.BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *a, **k):
            assert name == "bert-base-uncased", name  # what the reference asks for
            return ref_from_pretrained(str(tok_dir), *a, **k)

    blip_mod.BertTokenizer = TinyBertTokenizer

    def tiny_create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        assert vit == "large" and image_size == 224, (vit, image_size)
        enc = vit_mod.VisionTransformer(
            img_size=image_size,
            patch_size=VISION["patch_size"],
            embed_dim=VISION["embed_dim"],
            depth=VISION["depth"],
            num_heads=VISION["num_heads"],
            mlp_ratio=VISION["mlp_ratio"],
            use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer,
            drop_path_rate=0.1,
        )
        return enc, VISION["embed_dim"]

    pretrain_mod.create_vit = tiny_create_vit
    ref_mlp = ir_mod.MLP
    ir_mod.MLP = lambda input_size: ref_mlp(TEXT["hidden_size"])

    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TEXT["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate_size"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": TEXT["max_position_embeddings"],
        "model_type": "bert",
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab) + 2,  # + [DEC], [ENC]
        "encoder_width": VISION["embed_dim"],
        "add_cross_attention": True,
    }
    (out / "med_config.json").write_text(json.dumps(med_config, indent=2) + "\n")

    # --- build, randomise, save in the official format, reload as ImageReward.utils.load does ------------------
    model = ir_mod.ImageReward(med_config=str(out / "med_config.json"), device="cpu")
    assert len(model.blip.tokenizer) == med_config["vocab_size"], len(model.blip.tokenizer)
    randomize_(model)
    torch.save(model.state_dict(), out / "ImageReward.pt")
    model = ir_mod.ImageReward(med_config=str(out / "med_config.json"), device="cpu")
    msg = model.load_state_dict(torch.load(out / "ImageReward.pt", map_location="cpu"), strict=False)
    assert not msg.missing_keys and not msg.unexpected_keys, msg
    model.eval()

    # --- inputs and reference scores ---------------------------------------------------------------------------
    images = make_images(out / "images")
    names = list(images)
    pairs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(len(PROMPTS))]
    pairs += [(names[0], PROMPTS[1]), (names[3], PROMPTS[0])]  # the same image / prompt in other pairs
    scores, input_ids, pixel_stats = [], [], {}
    with torch.no_grad():
        for name, prompt in pairs:
            scores.append(float(model.score(prompt, images[name])))
            ids = model.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
            input_ids.append(ids["input_ids"])
        for name in names:
            x = model.preprocess(images[name])
            pixel_stats[name] = {
                "shape": list(x.shape),
                "sum": float(x.double().sum()),
                "sum_sq": float(x.double().pow(2).sum()),
                "samples": [float(v) for v in x.flatten()[::5003][:32]],
            }

    from importlib.metadata import version

    import timm
    import torchvision
    import transformers

    golden = {
        "description": "reference ImageReward.score(prompt, image) on the tiny checkpoint in this folder",
        "generator": "tests/golden/make_imagereward_golden.py",
        "reference": {
            "image-reward": version("image-reward"),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "timm": timm.__version__,
            "fairscale": version("fairscale"),
        },
        "vision": VISION,
        "text": TEXT,
        "checkpoint_sha256": hashlib.sha256((out / "ImageReward.pt").read_bytes()).hexdigest(),
        "pairs": [
            {"image": f"images/{n}", "prompt": p, "input_ids": ids, "score": s}
            for (n, p), ids, s in zip(pairs, input_ids, scores)
        ],
        "preprocess": {f"images/{n}": v for n, v in pixel_stats.items()},
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB); scores: {[round(s, 4) for s in scores]}")


if __name__ == "__main__":
    main()
