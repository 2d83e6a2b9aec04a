"""ImageReward (Xu et al., 2023) on transformers alone, loading the official `THUDM/ImageReward` files."""

import json
import re

import numpy as np
import torch
from PIL import Image

# Constants of the reference code (ImageReward/ImageReward.py, class ImageReward).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
IMAGE_SIZE = 224  # `_transform(224)` and `BLIP_Pretrain(image_size=224)`
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the reference `Normalize` (OpenAI CLIP statistics)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35  # tokenizer(padding="max_length", truncation=True, max_length=35)
VISION_HEAD_DIM = 64  # BLIP's create_vit: 'large' = 1024 wide / 16 heads, 'base' = 768 / 12 heads
VISION_LAYER_NORM_EPS = 1e-6  # the BLIP VisionTransformer's partial(nn.LayerNorm, eps=1e-6)

_V = "blip.visual_encoder."
_T = "blip.text_encoder."
# Parts of the official state dict the reward does not use (BLIP pretraining projections; a buffer).
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")


def preprocess(image, size=IMAGE_SIZE):
    """The reference transform: Resize(size, BICUBIC) on the shorter side, CenterCrop(size), convert("RGB"),
    ToTensor, Normalize(CLIP mean/std), in that order (the RGB conversion comes after the resize and crop, as
    in the reference, which matters for RGBA / palette / greyscale inputs). Returns a float32 (3, size, size)."""
    w, h = image.size
    # torchvision Resize(int) on PIL: the shorter side becomes `size`, the longer int(size * long / short).
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    # torchvision CenterCrop: offsets int(round((dim - size) / 2)); the image is never smaller than `size` here.
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)


def load_state_dict(path):
    """The official ImageReward.pt: a pickled state dict, loaded with weights_only=True (arbitrary objects refused)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: not a plain tensor dict
        raise ValueError(
            f"{path}: not loadable as a weights-only ImageReward state dict ({type(e).__name__}: {e})"
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(k.startswith(_V) for k in sd) or not any(k.startswith(_T) for k in sd):
        raise ValueError(
            f"{path}: not an ImageReward checkpoint (expected keys blip.visual_encoder.*, "
            "blip.text_encoder.*, mlp.layers.*)"
        )
    return sd


def _vision_from_state_dict(sd):
    """A transformers BlipVisionModel holding the BLIP ViT (`blip.visual_encoder.*`, timm-style names)."""
    from transformers import BlipVisionConfig, BlipVisionModel

    v = {k[len(_V) :]: t for k, t in sd.items() if k.startswith(_V)}
    hidden = v["cls_token"].shape[-1]
    patch = v["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in v if k.startswith("blocks."))
    num_positions = v["pos_embed"].shape[1]
    grid = IMAGE_SIZE // patch
    if num_positions != grid * grid + 1:
        raise ValueError(
            f"visual encoder pos_embed has {num_positions} positions; {IMAGE_SIZE}px images with "
            f"patch {patch} need {grid * grid + 1}"
        )
    if hidden % VISION_HEAD_DIM:
        raise ValueError(f"visual encoder width {hidden} is not a multiple of BLIP's head size {VISION_HEAD_DIM}")
    config = BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=v["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=hidden // VISION_HEAD_DIM,
        image_size=IMAGE_SIZE,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )
    mapped = {
        "embeddings.class_embedding": v.pop("cls_token"),
        "embeddings.position_embedding": v.pop("pos_embed"),
        "embeddings.patch_embedding.weight": v.pop("patch_embed.proj.weight"),
        "embeddings.patch_embedding.bias": v.pop("patch_embed.proj.bias"),
        "post_layernorm.weight": v.pop("norm.weight"),
        "post_layernorm.bias": v.pop("norm.bias"),
    }
    rename = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for k in list(v):
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in rename:
            mapped[f"encoder.layers.{m.group(1)}.{rename[m.group(2)]}.{m.group(3)}"] = v.pop(k)
    if v:
        raise ValueError(f"unexpected visual encoder keys: {sorted(v)[:5]}")
    model = BlipVisionModel(config)
    model.load_state_dict(mapped, strict=True)
    return model


def _text_from_state_dict(sd, med_config, encoder_width):
    """A transformers BlipTextModel (BLIP's med.py BERT, cross-attention in every layer) for `blip.text_encoder.*`."""
    from transformers import BlipTextConfig, BlipTextModel

    cfg = json.loads(med_config.read_text()) if hasattr(med_config, "read_text") else dict(med_config)
    if not cfg.get("add_cross_attention", False):
        raise ValueError("med_config.json: ImageReward's text encoder needs add_cross_attention=true")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("med_config.json: only absolute position embeddings are supported")
    config = BlipTextConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        hidden_act=cfg.get("hidden_act", "gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=cfg.get("pad_token_id", 0),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,  # generation-only ids; not used for scoring
        is_decoder=True,
    )  # is_decoder builds the cross-attention layers; forward(is_decoder=False) keeps it bidirectional
    t = {k[len(_T) :]: v for k, v in sd.items() if k.startswith(_T) and not _UNUSED.match(k)}
    model = BlipTextModel(config, add_pooling_layer=False)
    model.load_state_dict(t, strict=True)
    return model


class _MLP(torch.nn.Module):
    """The reference head: Linear layers at indices 0, 2, 4, 6, 7 of an nn.Sequential, with no activation between
    them (the ReLUs are commented out in the reference) and dropout at 1, 3, 5 (identity at inference)."""

    def __init__(self, sd):
        super().__init__()
        idx = sorted({int(k.split(".")[2]) for k in sd if k.startswith("mlp.layers.")})
        if not idx:
            raise ValueError("ImageReward checkpoint has no mlp.layers.* head")
        self.layers = torch.nn.ModuleDict()
        for i in idx:
            w = sd[f"mlp.layers.{i}.weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            lin.load_state_dict({"weight": w, "bias": sd[f"mlp.layers.{i}.bias"]})
            self.layers[str(i)] = lin

    def forward(self, x):
        for lin in self.layers.values():
            x = lin(x)
        return x


class ImageReward:
    """ImageReward score of (image, prompt) pairs, higher is better.

    Reproduces the reference implementation `ImageReward.ImageReward.score` of the PyPI package `image-reward`
    (THUDM/ImageReward, v1.5): the BLIP ViT image embeddings feed the cross-attention of the BLIP/BERT text
    encoder, the [CLS] hidden state goes through the (purely linear) MLP head, and the reward is
    (mlp - 0.16717362830052426) / 1.0333394966054072. Proven by tests/test_scorer_imagereward.py, which compares
    against golden scores that the reference code computed on a tiny checkpoint in the official file format
    (tests/golden/make_imagereward_golden.py).

    Mapping: `blip.visual_encoder.*` (timm ViT names) -> transformers `BlipVisionModel` (heads = width / 64, LayerNorm
    eps 1e-6, 224 px, patch from the checkpoint); `blip.text_encoder.*` -> `BlipTextModel` configured from
    med_config.json (cross-attention to the image tokens, all image tokens attended); `mlp.layers.*` -> the head.
    Text: `bert-base-uncased` extended like the reference's `init_tokenizer` ([DEC] as bos token, [ENC] as an
    additional special token, so the vocabulary is 30524), padded and truncated to 35 tokens; the reference's
    `score` keeps the [CLS] token in front (it does not swap in [ENC]), and so does this class.
    """

    CHECKPOINT = "THUDM/ImageReward"
    TOKENIZER = "bert-base-uncased"

    def __init__(self, checkpoint=CHECKPOINT, tokenizer=TOKENIZER, device="cpu", dtype=torch.float32, batch_size=16):
        from utils.hub import resolve_file

        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        weights, med_config = self._resolve(str(checkpoint), resolve_file)
        sd = load_state_dict(weights)
        unused = {k for k in sd if not k.startswith((_V, _T, "mlp.layers.")) and not _UNUSED.match(k)}
        if unused:
            raise ValueError(f"{weights}: unexpected keys {sorted(unused)[:5]}")

        self.vision = _vision_from_state_dict(sd).to(self.device, dtype).eval()
        self.text = _text_from_state_dict(sd, med_config, self.vision.config.hidden_size).to(self.device, dtype).eval()
        # The reference casts the text features to float32 before the head; the head stays float32 here.
        self.mlp = _MLP(sd).to(self.device, torch.float32).eval()
        if self.mlp.layers[next(iter(self.mlp.layers))].in_features != self.text.config.hidden_size:
            raise ValueError("ImageReward head input size does not match the text encoder width")
        self.tokenizer = self._load_tokenizer(tokenizer)
        if len(self.tokenizer) > self.text.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens, the text encoder {self.text.config.vocab_size}"
            )

    @staticmethod
    def _resolve(location, resolve_file):
        """(ImageReward.pt, med_config.json) from a local .pt file (med_config.json beside it), a local folder,
        or a Hub repo id (optionally `repo:weights.pt`)."""
        from pathlib import Path

        local = Path(location).expanduser()
        try:
            if local.is_file():
                med = local.parent / "med_config.json"
                if not med.is_file():
                    raise FileNotFoundError(f"{location}: no med_config.json beside it")
                return local, med
            weights = resolve_file(location, "ImageReward.pt")
            med = resolve_file(location if local.is_dir() else location.partition(":")[0], "med_config.json")
            return Path(weights), Path(med)
        except FileNotFoundError:
            raise
        except Exception as e:  # Hub errors: invalid repo id, offline, missing repo/file
            raise FileNotFoundError(
                f"ImageReward checkpoint {location!r}: not a local file or folder, and the Hub could not provide "
                f"ImageReward.pt + med_config.json ({type(e).__name__}: {e})"
            ) from e

    @staticmethod
    def _load_tokenizer(location):
        """BertTokenizer + the reference's init_tokenizer additions ([DEC] bos, [ENC] additional special token)."""
        from transformers import BertTokenizer

        tok = BertTokenizer.from_pretrained(str(location))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tok

    def tokenize(self, prompts):
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )

    @torch.no_grad()
    def score(self, images, prompts):
        """One reward per (image, prompt) pair."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            imgs, texts = images[i : i + self.batch_size], prompts[i : i + self.batch_size]
            pixels = torch.stack([preprocess(im) for im in imgs]).to(self.device, self.dtype)
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            tok = self.tokenize(texts).to(self.device)
            hidden = self.text(
                input_ids=tok.input_ids,
                attention_mask=tok.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                is_decoder=False,
            ).last_hidden_state
            rewards = self.mlp(hidden[:, 0, :].float())
            rewards = (rewards - REWARD_MEAN) / REWARD_STD
            out.extend(rewards[:, 0].cpu().tolist())
        return out
