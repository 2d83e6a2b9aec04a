"""The Flux.1 family (`FluxPipeline`): a CLIP text encoder (pooled) and a T5, a VAE with a shift factor, and a
`FluxTransformer2DModel` over 2x2-packed latents, trained by flow matching (`flow.py`).

What differs from SD3 (`family_sd3.py`; `family_sd.py` lists what every family module declares):
- prompts: T5's states (--max_sequence_length tokens, 512 for Flux.1-dev) and CLIP's pooled output;
- latents are stored, noised and compared in the VAE's (B, C, h, w) layout, as for every family; the forward
  packs them into the transformer's 2x2 patches with their position ids and unpacks its prediction (the
  velocity is elementwise, so the error is the same in either layout);
- Flux.1-dev's guidance embedding takes --guidance_scale in training (3.5, as diffusers' Flux scripts), the
  opponent's samples --gen_guidance_scale; the transformer sees t / 1000, as the pipeline passes it.
Needs its siblings `family_sd.py`, `family_sd3.py`, `flow.py`, `models.py` and `data.py`.
"""

import functools

import torch

from .data import tokenizer_ids
from .family_sd import given_parts
from .family_sd3 import ddpm_flags_set
from .flow import objective_from_args
from .models import loading

PIPELINE_CLASSES = ("FluxPipeline",)
DESCRIPTION = "Flux.1, flow matching with CLIP and T5 over packed latents"
DENOISER, DENOISER_CLASSES = "transformer", ("FluxTransformer2DModel",)
LORA_PIPELINE, LORA_FORMAT = "FluxPipeline", "peft"
LORA_TARGETS = "to_k,to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out"
VAE_UPCAST = False
MAX_SEQUENCE_LENGTH = 512  # Flux.1-dev's pipeline default
GUIDANCE_SCALE = 3.5  # the guidance embedding's value in training (as diffusers' Flux scripts) and sampling
# the latent side its pipeline renders at by default, times the VAE's scale (FluxPipeline's own 128)
RESOLUTION_MULTIPLE = 16  # image sides it can tile: the VAE's 8x, then 2x2 patches
DEFAULT_SAMPLE_SIZE = 128


def refused(args):
    return ddpm_flags_set(args)


class Tokenizers:
    """Captions to CLIP's and T5's token ids ({"input_ids", "input_ids_2"})."""

    def __init__(self, tokenizer, tokenizer_2, max_sequence_length=MAX_SEQUENCE_LENGTH):
        self.tokenizer, self.tokenizer_2, self.max_sequence_length = tokenizer, tokenizer_2, max_sequence_length

    def ids(self, captions):
        return {
            "input_ids": tokenizer_ids(self.tokenizer, captions),
            "input_ids_2": tokenizer_ids(self.tokenizer_2, captions, self.max_sequence_length),
        }


class Prompts(torch.nn.Module):
    """The frozen encoders: token ids to {"prompt_embeds": T5's states, "pooled_prompt_embeds": CLIP's pooled
    output}, as the pipeline encodes prompts."""

    COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, tokenizers, text_encoder, text_encoder_2):
        super().__init__()
        self.tokenizers, self.text_encoder, self.text_encoder_2 = tokenizers, text_encoder, text_encoder_2

    def forward(self, batch):
        device = self.text_encoder.device
        pooled = self.text_encoder(batch["input_ids"].to(device), output_hidden_states=False).pooler_output
        return {
            "prompt_embeds": self.text_encoder_2(batch["input_ids_2"].to(device))[0],
            "pooled_prompt_embeds": pooled,
        }

    def pipeline_parts(self):
        t = self.tokenizers
        return {
            "tokenizer": t.tokenizer,
            "tokenizer_2": t.tokenizer_2,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }


def pack(latents):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): the transformer's 2x2 patches, as the pipeline packs them."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed, h, w):
    """`pack`'s inverse: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = packed.shape
    return packed.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def position_ids(h, w, device, dtype):
    """The image tokens' ids (h/2 * w/2, 3): (0, row, column) of each patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def forward(model, noisy, timesteps, cond, guidance_scale=GUIDANCE_SCALE):
    """The transformer's velocity prediction in the (B, C, h, w) layout."""
    b, _, h, w = noisy.shape
    text = cond["prompt_embeds"]
    guided = (model.config if hasattr(model, "config") else model.module.config).guidance_embeds  # DDP: .module
    out = model(
        hidden_states=pack(noisy),
        timestep=timesteps.to(noisy.dtype) / 1000,
        guidance=torch.full((b,), guidance_scale, device=noisy.device, dtype=noisy.dtype) if guided else None,
        pooled_projections=cond["pooled_prompt_embeds"],
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=position_ids(h, w, noisy.device, noisy.dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def objective(scheduler, args=None):
    scale = getattr(args, "guidance_scale", None)
    return objective_from_args(
        scheduler, functools.partial(forward, guidance_scale=GUIDANCE_SCALE if scale is None else scale), args
    )


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
    """Prompts (CLIP and T5), vae, transformer (None unless `with_unet`) and the training scheduler (the model's
    FlowMatchEulerDiscreteScheduler: its unshifted table, as diffusers' Flux scripts draw from)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    kw = dict(revision=revision, cache_dir=cache_dir)
    with loading(name, "Flux"):
        tokenizers = Tokenizers(
            CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw),
            T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_2", **kw),
            max_sequence_length or MAX_SEQUENCE_LENGTH,
        )
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw)
        text_encoder_2 = T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    transformer = load_denoiser(name, variant=variant, **kw) if with_unet else None
    return Prompts(tokenizers, text_encoder, text_encoder_2), vae, transformer, scheduler


def load_denoiser(name, subfolder=DENOISER, **kwargs):
    """The FluxTransformer2DModel of a pipeline folder or Hub repo (`subfolder` None: at its root)."""
    from diffusers import FluxTransformer2DModel

    with loading(name, "Flux"):
        return FluxTransformer2DModel.from_pretrained(name, subfolder=subfolder, **kwargs)


def load_pipeline(name, prediction_type=None, *, denoiser=None, text=None, vae=None, **kwargs):
    """`FluxPipeline.from_pretrained` with the given trained `denoiser`, frozen `text` and `vae`."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(name, **given_parts(denoiser, text, vae, DENOISER), **kwargs)


def pipeline_latents(pipeline, latents, height, width):
    """The pipeline's packed `output_type="latent"` output, unpacked to the VAE's (B, C, h, w) layout."""
    scale = pipeline.vae_scale_factor
    return unpack(latents, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))
