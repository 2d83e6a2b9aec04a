"""The SDXL family (`StableDiffusionXLPipeline`): two CLIP text encoders, a VAE that overflows in fp16 (so it
runs in fp32 unless --pretrained_vae_model_name_or_path gives a fixed one), and a `UNet2DConditionModel` with
SDXL's extra conditioning, trained with the DDPM objective like SD.

What differs from SD (`family_sd.py`, which lists what every family module declares):
- prompts: the penultimate hidden states of both encoders, concatenated on the feature axis, plus the second
  encoder's pooled (projected) embedding;
- size conditioning: six numbers per image, (original height, width, crop top, left, target height, width),
  from each real image's own size and crop and from the generation size for the opponent's samples (the data
  layer's `image_size`, `negative_image_size`).
Needs its siblings `family_sd.py`, `models.py`, `losses.py` and `data.py`.
"""

import torch

from .data import tokenizer_ids
from .family_sd import (  # noqa: F401  (pipeline_latents: SD's)
    flow_flags_set,
    given_parts,
    pipeline_latents,
    set_prediction_type,
)
from .losses import DDPMObjective
from .models import loading

PIPELINE_CLASSES = ("StableDiffusionXLPipeline",)
DESCRIPTION = "SDXL, two CLIP text encoders and size/crop conditioning"
DENOISER, DENOISER_CLASSES = "unet", ()  # its UNet is SD's class: saved and loaded as family_sd does
LORA_PIPELINE, LORA_FORMAT = "StableDiffusionXLPipeline", "diffusers"
LORA_TARGETS = "to_k,to_q,to_v,to_out.0"
GUIDANCE_SCALE = 5.0  # the opponent's default --gen_guidance_scale (the pipeline's own)
# the latent side its pipeline renders at by default, times the VAE's scale (None: the denoiser's sample_size)
RESOLUTION_MULTIPLE = 8  # image sides it can tile: the VAE's 8x
DEFAULT_SAMPLE_SIZE = None
VAE_UPCAST = True  # SDXL's own VAE overflows in fp16 / bf16


class Tokenizers:
    """Captions to both encoders' CLIP token ids ({"input_ids", "input_ids_2"})."""

    def __init__(self, tokenizer, tokenizer_2):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    def ids(self, captions):
        return {
            "input_ids": tokenizer_ids(self.tokenizer, captions),
            "input_ids_2": tokenizer_ids(self.tokenizer_2, captions),
        }


class Prompts(torch.nn.Module):
    """Both frozen CLIP encoders: token ids to {"prompt_embeds": penultimate states of both, concatenated,
    "pooled_prompt_embeds": the second encoder's projected pooled output}, as the pipeline encodes prompts."""

    COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, tokenizers, text_encoder, text_encoder_2):
        super().__init__()
        self.tokenizers, self.text_encoder, self.text_encoder_2 = tokenizers, text_encoder, text_encoder_2

    def forward(self, batch):
        device = self.text_encoder.device
        one = self.text_encoder(batch["input_ids"].to(device), output_hidden_states=True)
        two = self.text_encoder_2(batch["input_ids_2"].to(device), output_hidden_states=True)
        return {
            "prompt_embeds": torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1),
            "pooled_prompt_embeds": two[0],
        }

    def pipeline_parts(self):
        return {
            "tokenizer": self.tokenizers.tokenizer,
            "tokenizer_2": self.tokenizers.tokenizer_2,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }


def forward(model, noisy, timesteps, cond):
    """The UNet's prediction with SDXL's added conditioning (pooled text and size/crop ids)."""
    pooled = cond["pooled_prompt_embeds"]
    if "image_size" not in cond:
        raise ValueError("SDXL needs each image's size conditioning (image_size); the batch has none")
    added = {"text_embeds": pooled, "time_ids": cond["image_size"].to(pooled.device, pooled.dtype)}
    return model(noisy, timesteps, cond["prompt_embeds"], added_cond_kwargs=added, return_dict=False)[0]


def objective(scheduler, args=None):
    return DDPMObjective(scheduler, forward)


def refused(args):
    """The flags set in `args` that SDXL cannot honour, as (flag, why) pairs."""
    out = flow_flags_set(args)
    if getattr(args, "cache_latents", False):
        out.append(
            ("--cache_latents", "SDXL conditions on each image's original size and crop, which the cache drops")
        )
    return out


def load_components(
    name,
    *,
    revision=None,
    variant=None,
    prediction_type=None,
    cache_dir=None,
    with_unet=True,
    max_sequence_length=None,
):
    """Prompts (both tokenizers and encoders), vae, unet (None unless `with_unet`) and the training noise scheduler
    (DDPM with the model's betas)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(revision=revision, cache_dir=cache_dir)
    with loading(name, "SDXL"):
        tokenizers = Tokenizers(
            CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw),
            CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw),
        )
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            name, subfolder="text_encoder_2", variant=variant, **kw
        )
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    unet = load_denoiser(name, variant=variant, **kw) if with_unet else None
    set_prediction_type(name, scheduler, prediction_type)
    return Prompts(tokenizers, text_encoder, text_encoder_2), vae, unet, scheduler


def load_denoiser(name, subfolder=DENOISER, **kwargs):
    """The UNet of a pipeline folder or Hub repo (`subfolder` None: at its root)."""
    from diffusers import UNet2DConditionModel

    with loading(name, "SDXL"):
        return UNet2DConditionModel.from_pretrained(name, subfolder=subfolder, **kwargs)


def load_pipeline(name, prediction_type=None, *, denoiser=None, text=None, vae=None, **kwargs):
    """`StableDiffusionXLPipeline.from_pretrained` with the given trained `denoiser`, frozen `text` (Prompts) and
    `vae` in place of the stored ones, its scheduler set to the UNet's prediction type."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(name, **given_parts(denoiser, text, vae), **kwargs)
    if prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    return pipeline
