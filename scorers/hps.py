"""HPSv2 (Human Preference Score v2.0 / v2.1) on transformers alone."""

from pathlib import Path

import numpy as np
import torch

# hpsv2 normalises with open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (ViT-H-14 sets no others).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _looks_local(location):
    """A path rather than a Hub id ("owner/name" or "owner/name:filename"): absolute, relative with ./ ../ ~,
    more than one "/", or ending in a checkpoint suffix."""
    loc = str(location)
    return (
        loc.startswith(("/", "./", "../", "~"))
        or loc.count("/") > 1
        or (":" not in loc and loc.endswith((".pt", ".pth", ".bin", ".safetensors")))
    )


def _load_state_dict(path):
    """The open_clip state dict inside an HPS checkpoint (`{"state_dict": ...}` as hpsv2 loads it, or a bare
    state dict), loaded with `weights_only=True`; a DataParallel `module.` prefix is dropped."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything but tensors and plain containers
        raise ValueError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not an open_clip state dict (expected tensors, optionally under 'state_dict')")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def _split_blocks(sd, src, dst, n_layers, out):
    """open_clip residual blocks `src.N.*` -> transformers CLIPEncoderLayer `dst.N.*` (in_proj split into q/k/v)."""
    for i in range(n_layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{s}.attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{d}.self_attn.q_proj.{kind}"] = q
            out[f"{d}.self_attn.k_proj.{kind}"] = k
            out[f"{d}.self_attn.v_proj.{kind}"] = v
            out[f"{d}.self_attn.out_proj.{kind}"] = sd[f"{s}.attn.out_proj.{kind}"]
            out[f"{d}.layer_norm1.{kind}"] = sd[f"{s}.ln_1.{kind}"]
            out[f"{d}.layer_norm2.{kind}"] = sd[f"{s}.ln_2.{kind}"]
            out[f"{d}.mlp.fc1.{kind}"] = sd[f"{s}.mlp.c_fc.{kind}"]
            out[f"{d}.mlp.fc2.{kind}"] = sd[f"{s}.mlp.c_proj.{kind}"]


def open_clip_to_transformers(sd, config):
    """Map an open_clip CLIP state dict (`visual.*`, `token_embedding`, `positional_embedding`, `transformer.*`,
    `ln_final`, `text_projection`, `logit_scale`) to the keys of a transformers `CLIPModel` built from `config`.
    Projections are stored `x @ P` in open_clip and as `nn.Linear` weights (P.T) in transformers."""
    out = {
        "logit_scale": sd["logit_scale"].reshape(()),
        # text tower
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        # vision tower
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    _split_blocks(sd, "transformer.resblocks", "text_model.encoder.layers", config.text_config.num_hidden_layers, out)
    _split_blocks(
        sd, "visual.transformer.resblocks", "vision_model.encoder.layers", config.vision_config.num_hidden_layers, out
    )
    used = {
        "logit_scale",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "text_projection",
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
        "visual.proj",
    }
    extra = [
        k
        for k in sd
        if k not in used and not k.startswith(("transformer.resblocks.", "visual.transformer.resblocks."))
    ]
    extra += [
        k
        for k in sd
        if k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= config.text_config.num_hidden_layers
    ]
    extra += [
        k
        for k in sd
        if k.startswith("visual.transformer.resblocks.")
        and int(k.split(".")[3]) >= config.vision_config.num_hidden_layers
    ]
    if extra:
        raise ValueError(
            f"open_clip checkpoint has weights this CLIPConfig has no place for, e.g. {sorted(extra)[:5]}"
        )
    return out


def hps_preprocess(image, size):
    """hpsv2's validation transform (hpsv2 1.2.0, its open_clip fork: `image_transform(..., resize_longest_max=True)`):
    convert to RGB, ToTensor, then ResizeMaxSize on the float tensor (longest side -> `size`, each side
    `round(dim * scale)`, torchvision's tensor resize = `interpolate(bicubic, antialias=True)`, no clamping), zero
    padding (left/top get the floor half), Normalize(OpenAI mean/std). hpsv2 skips resize and padding when the
    longest side is already `size`, leaving a non-square image the model cannot take; such an image is padded to a
    square here (identical for square inputs). Returns a float32 CHW tensor."""
    x = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(x.copy()).permute(2, 0, 1).to(torch.float32).div(255)
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        height, width = round(height * scale), round(width * scale)
        x = torch.nn.functional.interpolate(
            x[None], size=[height, width], mode="bicubic", align_corners=False, antialias=True
        )[0]
    pad_h, pad_w = size - height, size - width
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(OPENAI_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(OPENAI_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


class HPSv2:
    """Human Preference Score v2: cosine between the HPS-finetuned open_clip ViT-H-14 image and text embeddings.

    Reproduces `hpsv2.score` (hpsv2's img_score.py: `create_model_and_transforms('ViT-H-14', ...)`,
    `model.load_state_dict(torch.load(ckpt)['state_dict'])`, the `preprocess_val` transform, the open_clip
    tokenizer, normalised image/text features, score = the raw cosine, not scaled by logit_scale), with the
    open_clip weights key-mapped into a transformers `CLIPModel` (see `open_clip_to_transformers`).
    Proven by tests/test_scorers_clip.py::test_hps_matches_reference: a tiny open_clip CLIP saved in the HPS file
    layout, scored by open_clip + the hpsv2 recipe (tests/golden/make_clip_goldens.py), agrees to 1e-4.

    `checkpoint`: None -> the official `xswu/HPSv2` file for `version` (v2.0: HPS_v2_compressed.pt, v2.1:
    HPS_v2.1_compressed.pt); else a local .pt file, a folder holding that file, or "repo_id:filename".
    `processor`: a folder / Hub id with the CLIPConfig (architecture) and the CLIP tokenizer of ViT-H-14.
    v2.0 and v2.1 scores are not comparable.
    """

    PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    REPO = "xswu/HPSv2"
    FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

    def __init__(
        self, checkpoint=None, version="v2.1", processor=PROCESSOR, device="cpu", dtype=torch.float32, batch_size=16
    ):
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        from utils.hub import resolve_file

        version = {"2.0": "v2.0", "2.1": "v2.1", "v2": "v2.0"}.get(str(version), str(version))
        if version not in self.FILES:
            raise ValueError(f"unknown HPS version {version!r}; choose from {', '.join(self.FILES)}")
        self.version, self.device, self.dtype, self.batch_size = version, torch.device(device), dtype, batch_size
        location = checkpoint if checkpoint is not None else f"{self.REPO}:{self.FILES[version]}"
        if _looks_local(location) and not Path(str(location)).expanduser().exists():
            raise FileNotFoundError(f"HPS checkpoint {location}: no such file or folder")
        path = resolve_file(str(location), self.FILES[version])

        config = CLIPConfig.from_pretrained(processor)
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        # Pool the text at the first end-of-text token (open_clip: argmax of the ids, the eot id being the largest).
        config.text_config.eos_token_id = self.tokenizer.eos_token_id
        self.image_size = config.vision_config.image_size
        self.context_length = config.text_config.max_position_embeddings

        weights = open_clip_to_transformers(_load_state_dict(path), config)
        with torch.device("meta"):
            model = CLIPModel(config)
        expected = set(model.state_dict())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(
                f"{path}: does not fit the CLIPConfig of {processor}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False, assign=True)
        for mod in model.modules():  # non-persistent buffers are not in the checkpoint
            if getattr(mod, "position_ids", None) is not None and mod.position_ids.is_meta:
                mod.position_ids = torch.arange(mod.position_ids.shape[-1]).expand((1, -1))
        self.model = model.to(device=self.device, dtype=dtype).eval()

    @torch.no_grad()
    def score(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([hps_preprocess(im, self.image_size) for im in images[i : i + self.batch_size]])
            text = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            )
            img = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            txt = self.model.get_text_features(input_ids=text["input_ids"].to(self.device))
            img = getattr(img, "pooler_output", img).float()
            txt = getattr(txt, "pooler_output", txt).float()
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            scores += (img * txt).sum(-1).tolist()
        return scores
