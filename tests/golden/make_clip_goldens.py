"""Build the tiny CLIP-family scorer fixtures under tests/golden/clip/ and their REFERENCE scores.

Runs in a separate reference environment (never in the project's venv, which must stay free of torchvision and
open_clip). To regenerate, from the repository root:

    python3 -m venv /tmp/refenv_clip
    /tmp/refenv_clip/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/refenv_clip/bin/pip install open_clip_torch transformers requests clint einops
    /tmp/refenv_clip/bin/pip install --no-deps hpsv2==1.2.0        # its pins (pytest 7.2, protobuf<4) are not needed
    # hpsv2 ships without the BPE vocab its tokenizer module opens at import; take open_clip's identical file:
    S=$(/tmp/refenv_clip/bin/python -c "import open_clip, os; print(os.path.dirname(open_clip.__file__))")
    cp $S/bpe_simple_vocab_16e6.txt.gz $S/../hpsv2/src/open_clip/
    /tmp/refenv_clip/bin/python tests/golden/make_clip_goldens.py

(Versions used for the committed goldens: torch 2.14.1, torchvision 0.29.1, open_clip_torch 3.3.0, hpsv2 1.2.0,
transformers 5.24.0.) The output is deterministic (fixed seeds). Everything is written to tests/golden/clip/:

* tokenizer: a tiny CLIP byte-level BPE learned from the prompts, written both as transformers' CLIP tokenizer
  files (vocab.json, merges.txt, ...) and as open_clip's `bpe_simple_vocab`-style `bpe.txt.gz`, with the same ids
  (512 byte symbols, the merges, then start/end of text), so both sides tokenize identically.
* images/*.png (4 RGB images: landscape, portrait, a square of exactly SIZE, a small upscaled one) and prompts.json
  (one prompt longer than 77 tokens, to exercise truncation).
* hps/: HPS_v2.1_compressed.pt (`{"state_dict": open_clip CLIP state dict}`, the layout hpsv2 loads) of a tiny
  open_clip CLIP (model config hps/open_clip_config.json), plus processor/ (CLIPConfig + tokenizer) for our side.
  Reference: hpsv2 1.2.0's open_clip fork `create_model_and_transforms(..., light_augmentation=True,
  output_dict=True)`, its preprocess_val, its `tokenize`, `model(image, text)` features -> diagonal of
  image_features @ text_features.T (hpsv2.img_score.score, without CUDA autocast).
* pickscore/: model/ (tiny CLIPModel, safetensors) and processor/ (CLIPImageProcessor config + tokenizer).
  Reference: the PickScore model card recipe run with transformers, image processor on the PIL backend
  (the CLIPImageProcessor the recipe was published with); the torchvision-backend values are kept for information.
* aesthetic/: clip/ (tiny CLIPModel, quick_gelu as OpenAI's) and sac+logos+ava1-l14-linearMSE.pth (the LAION MLP
  state dict, official keys layers.{0,2,4,6,7}, official hidden sizes, input = the tiny projection dim).
  Reference: the LAION simple_inference.py recipe: OpenAI CLIP preprocess (torchvision Resize(bicubic) +
  CenterCrop + ToTensor + Normalize), image features, numpy L2 `normalized`, MLP.
* golden.json: the reference scores per scorer.
"""

import gzip
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OUT = Path(__file__).resolve().parent / "clip"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

PROMPTS = [
    "a red fox sitting in the snow, digital art",
    "an ancient castle on a hill at sunset, oil painting",
    "a tiny robot watering plants on the moon",
    "a watercolor of a sleepy cat " + " ".join(["and a very fluffy dog"] * 18),  # > 77 tokens: truncated
]
SIZE = 64  # the tiny models' input resolution (224 for the real ones; the recipes are size-generic)
# (width, height, kind). Portrait 180x245: shorter side -> 64, longer int(64*245/180)=87, crop excess 23:
# CenterCrop offset round(11.5)=12, not floor 11. The square one is exactly SIZE (hpsv2: no resize, no pad).
IMAGES = [(320, 240, "landscape"), (180, 245, "portrait"), (SIZE, SIZE, "square"), (48, 32, "small")]


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(texts, max_merges=150):
    """Greedy BPE on the words of `texts` (CLIP style: the last symbol of a word carries `</w>`)."""
    b2u = bytes_to_unicode()
    words = Counter(w for t in texts for w in t.lower().replace(",", " ").split())
    seqs = {w: [b2u[b] for b in w.encode("utf-8")] for w in words}
    for w in seqs:
        seqs[w][-1] += "</w>"
    merges, made = [], set()
    while len(merges) < max_merges:
        pairs = Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += words[w]
        best = [p for p, c in pairs.most_common() if c >= 2 and "".join(p) not in made]
        if not best:
            break
        a, b = best[0]
        merges.append((a, b))
        made.add(a + b)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tokenizer(folder, merges):
    folder.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(set(tokens)) == len(tokens), "duplicate merge results would shift open_clip's ids"
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
                **special,
            },
            indent=1,
        )
    )
    return len(tokens)


def write_open_clip_bpe(path, merges):
    # open_clip reads lines[1 : 49152-256-2+1]: no trailing newline, or an empty "merge" would shift the ids.
    text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------
def make_image(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 2 * math.pi)
        img[..., c] = 127 + 100 * np.sin(fx * x + fy * y + ph)
    for _ in range(3):  # a few sharp rectangles: edges make resampling differences visible
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        img[y0 : y0 + rng.integers(4, height // 2), x0 : x0 + rng.integers(4, width // 2)] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def perturb(module, seed, scale=0.05):
    """Random init leaves LayerNorms at 1/0 and some biases at 0: jitter every parameter so every mapped tensor
    matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------------
# HPSv2
# ----------------------------------------------------------------------------------------------------------------
def make_hps(images, vocab_size, tok_dir):
    import hpsv2.src.open_clip as oc
    import hpsv2.src.open_clip.tokenizer as octok
    from transformers import CLIPConfig

    d = OUT / "hps"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 2},
    }
    (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tiny-hps.json").write_text(json.dumps(cfg))
    oc.add_model_config(d / "tiny-hps.json")
    (d / "tiny-hps.json").unlink()
    torch.manual_seed(0)
    # hpsv2.img_score.initialize_model's arguments, with the tiny config and no pretrained tag, on CPU in fp32.
    model, _, preprocess_val = oc.create_model_and_transforms(
        "tiny-hps",
        None,
        precision="fp32",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )
    perturb(model, 1)
    torch.save({"state_dict": model.state_dict()}, d / "HPS_v2.1_compressed.pt")
    # hpsv2.score: checkpoint = torch.load(cp); model.load_state_dict(checkpoint['state_dict'])
    model.load_state_dict(torch.load(d / "HPS_v2.1_compressed.pt", map_location="cpu")["state_dict"])
    model.eval()
    octok._tokenizer = octok.SimpleTokenizer(str(OUT / "tokenizer" / "bpe.txt.gz"))
    tokenizer = oc.get_tokenizer("tiny-hps")
    scores = []
    with torch.no_grad():
        for img, prompt in zip(images, PROMPTS):
            image = preprocess_val(img).unsqueeze(0)
            text = tokenizer([prompt])
            outputs = model(image, text)
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            scores.append(float(torch.diagonal(logits_per_image)[0]))
    # Our side: the CLIPConfig of this architecture + the tokenizer, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K has.
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    config = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=t["width"],
            intermediate_size=4 * t["width"],
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=v["width"],
            intermediate_size=4 * v["width"],
            num_hidden_layers=v["layers"],
            num_attention_heads=v["width"] // v["head_width"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
    )
    config.save_pretrained(d / "processor")
    write_tokenizer(d / "processor", MERGES)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# PickScore
# ----------------------------------------------------------------------------------------------------------------
def tiny_clip_config(vocab_size, act):
    from transformers import CLIPConfig

    return CLIPConfig(
        projection_dim=32,
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIZE,
            patch_size=16,
            hidden_act=act,
        ),
    )


def write_image_processor(folder):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)


def write_processor(folder):
    """A CLIPProcessor folder (image processor + tokenizer), as laion/CLIP-ViT-H-14-laion2B-s32B-b79K has."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    write_tokenizer(folder, MERGES)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(folder)).save_pretrained(
        folder
    )


def make_pickscore(images, vocab_size):
    from transformers import AutoModel, AutoProcessor, CLIPModel

    d = OUT / "pickscore"
    torch.manual_seed(2)
    model = CLIPModel(tiny_clip_config(vocab_size, "gelu"))
    perturb(model, 3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore's learned scale is about 100
    model.save_pretrained(d / "model")
    write_processor(d / "processor")

    def card_recipe(backend):
        # PickScore model card, per (image, prompt) pair.
        processor = AutoProcessor.from_pretrained(d / "processor", backend=backend)
        model = AutoModel.from_pretrained(d / "model").eval()
        out = []
        for img, prompt in zip(images, PROMPTS):
            image_inputs = processor(images=[img], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            with torch.no_grad():
                image_embs = model.get_image_features(**image_inputs)
                image_embs = getattr(image_embs, "pooler_output", image_embs)
                image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
                text_embs = model.get_text_features(**text_inputs)
                text_embs = getattr(text_embs, "pooler_output", text_embs)
                text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
                scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
            out.append(float(scores[0]))
        return out

    return card_recipe("pil"), card_recipe("torchvision")


# ----------------------------------------------------------------------------------------------------------------
# Aesthetic
# ----------------------------------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    """The improved-aesthetic-predictor MLP layout (its pytorch_lightning base dropped: inference only)."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def make_aesthetic(images, vocab_size):
    from torchvision import transforms as T
    from transformers import CLIPModel

    d = OUT / "aesthetic"
    torch.manual_seed(4)
    clip = CLIPModel(tiny_clip_config(vocab_size, "quick_gelu"))  # OpenAI's CLIP uses QuickGELU
    perturb(clip, 5)
    clip.save_pretrained(d / "clip")
    write_image_processor(d / "clip")
    torch.manual_seed(6)
    mlp = MLP(clip.config.projection_dim)
    perturb(mlp, 7, scale=0.02)
    with torch.no_grad():  # default init maps unit vectors to nearly one value: spread the outputs
        for i in (0, 2, 4, 6, 7):
            mlp.layers[i].weight.mul_(4.0)
    torch.save(mlp.state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")

    model = MLP(clip.config.projection_dim)
    model.load_state_dict(torch.load(d / "sac+logos+ava1-l14-linearMSE.pth", map_location="cpu"))
    model.eval()
    clip = CLIPModel.from_pretrained(d / "clip").eval()
    n_px = clip.config.vision_config.image_size
    # clip.clip._transform(n_px)
    preprocess = T.Compose(
        [
            T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(n_px),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    out = []
    for img in images:
        image = preprocess(img).unsqueeze(0)
        with torch.no_grad():
            image_features = clip.get_image_features(pixel_values=image)
            image_features = getattr(image_features, "pooler_output", image_features)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        with torch.no_grad():
            prediction = model(torch.from_numpy(im_emb_arr).float())
        out.append(float(prediction[0, 0]))
    return out


def main():
    global MERGES
    import hpsv2  # noqa: F401  (fails early when the reference environment is not set up)
    import open_clip
    import torchvision
    import transformers

    (OUT / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i, (w, h, kind) in enumerate(IMAGES):
        path = OUT / "images" / f"{i}_{kind}.png"
        make_image(w, h, seed=100 + i).save(path, optimize=True)
        images.append(Image.open(path).convert("RGB"))
    (OUT / "prompts.json").write_text(json.dumps(PROMPTS, indent=1))

    MERGES = learn_merges(PROMPTS * 2)  # every pair counts twice: the prompts' words become single tokens
    vocab_size = write_tokenizer(OUT / "tokenizer", MERGES)
    write_open_clip_bpe(OUT / "tokenizer" / "bpe.txt.gz", MERGES)

    hps = make_hps(images, vocab_size, OUT / "tokenizer")
    pick_pil, pick_tv = make_pickscore(images, vocab_size)
    aes = make_aesthetic(images, vocab_size)
    golden = {
        "images": [f"images/{i}_{kind}.png" for i, (_, _, kind) in enumerate(IMAGES)],
        "prompts": PROMPTS,
        "hpsv2": hps,
        "pickscore": pick_pil,
        "pickscore_torchvision_backend": pick_tv,
        "aesthetic": aes,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__,
            "hpsv2": "1.2.0",
            "transformers": transformers.__version__,
        },
    }
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1))
    print(json.dumps(golden, indent=1))


if __name__ == "__main__":
    main()
