"""LAION improved aesthetic predictor (sac+logos+ava1-l14-linearMSE) on transformers CLIP ViT-L/14."""

import re

import numpy as np
import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The official predictor's nn.Sequential: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear,
# Linear (no activations); its state dict keys are layers.{0,2,4,6,7}.{weight,bias}.
LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def clip_preprocess(image, size):
    """OpenAI CLIP's `preprocess` (as `clip.load` returns it): Resize(size, bicubic) of the shorter side on the PIL
    image (longer side `int(size * long / short)`), CenterCrop(size) (offsets `int(round(excess / 2))`), RGB,
    ToTensor, Normalize(OpenAI mean/std). Returns a float32 CHW tensor."""
    from PIL import Image

    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(OPENAI_MEAN, dtype=np.float32)) / np.asarray(OPENAI_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def build_head(state_dict):
    """The LAION MLP with the official layer layout, sized from the state dict, weights loaded strictly."""
    keys = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k))}
    if tuple(sorted(keys)) != LINEAR_INDICES or len(state_dict) != 2 * len(LINEAR_INDICES):
        raise ValueError(
            f"not a LAION aesthetic predictor state dict (expected layers.{{0,2,4,6,7}}.weight/bias), "
            f"got keys {sorted(state_dict)[:8]}"
        )
    modules = []
    for i in range(LINEAR_INDICES[-1] + 1):
        if i in DROPOUTS:
            modules.append(torch.nn.Dropout(DROPOUTS[i]))
        else:
            out_f, in_f = state_dict[f"layers.{i}.weight"].shape
            modules.append(torch.nn.Linear(in_f, out_f))
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(*modules)
    head.load_state_dict(state_dict, strict=True)
    return head


def _looks_local(location):
    """A path rather than a Hub id ("owner/name" or "owner/name:filename"): absolute, relative with ./ ../ ~,
    more than one "/", or ending in a checkpoint suffix."""
    loc = str(location)
    return (
        loc.startswith(("/", "./", "../", "~"))
        or loc.count("/") > 1
        or (":" not in loc and loc.endswith((".pt", ".pth", ".bin", ".safetensors")))
    )


class Aesthetic:
    """LAION improved aesthetic predictor: MLP(L2-normalised CLIP ViT-L/14 image embedding); prompts are ignored.

    Reproduces christophschuhmann/improved-aesthetic-predictor `simple_inference.py`: `clip.load("ViT-L/14")` and its
    preprocess, `encode_image`, L2 normalisation, then the `MLP(768)` whose `layers` are Linear(768, 1024),
    Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1),
    loaded from sac+logos+ava1-l14-linearMSE.pth. The image tower is transformers' port of the OpenAI weights
    (openai/clip-vit-large-patch14, `get_image_features`); the preprocessing is OpenAI's (see `clip_preprocess`).
    Proven by tests/test_scorers_clip.py::test_aesthetic_matches_reference: a tiny CLIP folder + a LAION-format .pth
    head scored by the LAION recipe (tests/golden/make_clip_goldens.py) agree to 1e-4.

    `head`: a local .pth, a folder holding sac+logos+ava1-l14-linearMSE.pth, or "repo_id:filename". The default is
    the Hub mirror camenduru/improved-aesthetic-predictor of the file in the LAION GitHub repository (the official
    file is on GitHub only). Loaded with `torch.load(weights_only=True)`.
    `clip_model`: a CLIPModel (or CLIPVisionModelWithProjection) folder / Hub id.
    """

    FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
    HEAD = f"camenduru/improved-aesthetic-predictor:{FILENAME}"
    CLIP_MODEL = "openai/clip-vit-large-patch14"

    def __init__(self, head=HEAD, clip_model=CLIP_MODEL, device="cpu", dtype=torch.float32, batch_size=16):
        from pathlib import Path

        from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection
        from transformers.utils import logging

        from utils.hub import resolve_file

        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        if _looks_local(head) and not Path(str(head)).expanduser().exists():
            raise FileNotFoundError(f"aesthetic head {head}: no such file or folder")
        path = resolve_file(str(head), self.FILENAME)
        try:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from e
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        self.head = build_head({k: v.float() for k, v in state_dict.items()}).to(self.device, dtype).eval()
        config = AutoConfig.from_pretrained(clip_model)
        if isinstance(config, CLIPConfig):  # a full CLIPModel (as openai/clip-vit-large-patch14): its image tower
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the text tower's weights are unused on purpose: no load report
        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(clip_model, config=config, dtype=dtype)
        finally:
            logging.set_verbosity(verbosity)
        self.clip = self.clip.to(self.device).eval()
        self.image_size = self.clip.config.image_size
        embed = self.clip.config.projection_dim
        if self.head.layers[0].in_features != embed:
            raise ValueError(
                f"aesthetic head expects {self.head.layers[0].in_features}-d embeddings, {clip_model} gives {embed}"
            )

    @torch.no_grad()
    def score(self, images, prompts=None):
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([clip_preprocess(im, self.image_size) for im in images[i : i + self.batch_size]])
            emb = self.clip(pixel_values=pixels.to(self.device, self.dtype)).image_embeds.float()
            norm = emb.norm(dim=-1, keepdim=True)
            emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)
            scores += self.head.layers(emb.to(self.dtype)).float().squeeze(-1).tolist()
        return scores
