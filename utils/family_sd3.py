"""The SD3.x family (`StableDiffusion3Pipeline`): two CLIP text encoders and a T5, a VAE with a shift factor, and
an `SD3Transformer2DModel` trained by flow matching (`flow.py`: the velocity target, sigma drawn by
--weighting_scheme).

What differs from SD (`family_sd.py` lists what every family module declares):
- prompts as the pipeline encodes them: both CLIP encoders' penultimate states concatenated, zero-padded to
  T5's width and followed by T5's states (--max_sequence_length tokens); the pooled embedding is both CLIP
  encoders' projected outputs, concatenated;
- latents: (x - shift_factor) * scaling_factor (`models.to_model_latents`, shared by every family);
- the objective is flow matching, whose sampler is an ODE: no eta, no --gen_scheduler ddim / ddpm, and no
  trajectory objective (a deterministic step has no likelihood).
Needs its siblings `family_sd.py`, `flow.py`, `models.py` and `data.py`.
"""

import torch

from .data import tokenizer_ids
from .family_sd import given_parts
from .flow import objective_from_args
from .models import loading

PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
DESCRIPTION = "SD3.x, flow matching with CLIP-L, CLIP-G and T5"
DENOISER, DENOISER_CLASSES = "transformer", ("SD3Transformer2DModel",)
LORA_PIPELINE, LORA_FORMAT = "StableDiffusion3Pipeline", "peft"
LORA_TARGETS = "to_k,to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out"
GUIDANCE_SCALE = 7.0  # the opponent's default --gen_guidance_scale (the pipeline's own)
# the latent side its pipeline renders at by default, times the VAE's scale (None: the denoiser's sample_size)
RESOLUTION_MULTIPLE = 16  # image sides it can tile: the VAE's 8x, then 2x2 patches
DEFAULT_SAMPLE_SIZE = None
VAE_UPCAST = False
MAX_SEQUENCE_LENGTH = 256  # the pipeline's default
DDPM_FLAGS = (  # (flag, what it is, the value that means "not set")
    ("prediction_type", "a DDPM prediction type (flow models predict the velocity)", None),
    ("snr_gamma", "min-SNR weights DDPM timesteps (use --weighting_scheme)", None),
    ("noise_offset", "a DDPM noise setting", 0.0),
    ("spin_objective", "the trajectory objective needs a stochastic sampler; a flow model's is an ODE", "approximate"),
    ("gen_scheduler", "the opponent samples with the model's own flow-matching sampler", "model"),
    ("gen_eta", "a DDIM setting", None),
)


def ddpm_flags_set(args):
    """The DDPM-only flags set in `args`, as (flag, why) pairs: what a flow-matching family refuses."""
    out = []
    for name, why, unset in DDPM_FLAGS:
        value = getattr(args, name, unset)
        if value is not None and value != unset:
            out.append((f"--{name} {value}" if not isinstance(value, bool) else f"--{name}", why))
    return out


def refused(args):
    out = ddpm_flags_set(args)
    if getattr(args, "guidance_scale", None) is not None:
        out.append(("--guidance_scale", "SD3 has no guidance embedding (the opponent's CFG is --gen_guidance_scale)"))
    return out


class Tokenizers:
    """Captions to the token ids of both CLIP encoders and T5 ({"input_ids", "input_ids_2", "input_ids_3"})."""

    def __init__(self, tokenizer, tokenizer_2, tokenizer_3, max_sequence_length=MAX_SEQUENCE_LENGTH):
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.max_sequence_length = max_sequence_length

    def ids(self, captions):
        return {
            "input_ids": tokenizer_ids(self.tokenizer, captions),
            "input_ids_2": tokenizer_ids(self.tokenizer_2, captions),
            "input_ids_3": tokenizer_ids(self.tokenizer_3, captions, self.max_sequence_length),
        }


class Prompts(torch.nn.Module):
    """The three frozen encoders: token ids to {"prompt_embeds": CLIP states (padded) then T5 states,
    "pooled_prompt_embeds": both CLIP pooled outputs}."""

    COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, tokenizers, text_encoder, text_encoder_2, text_encoder_3):
        super().__init__()
        self.tokenizers = tokenizers
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3

    def forward(self, batch):
        device = self.text_encoder.device
        one = self.text_encoder(batch["input_ids"].to(device), output_hidden_states=True)
        two = self.text_encoder_2(batch["input_ids_2"].to(device), output_hidden_states=True)
        t5 = self.text_encoder_3(batch["input_ids_3"].to(device))[0]
        clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip, t5], dim=-2),
            "pooled_prompt_embeds": torch.cat([one[0], two[0]], dim=-1),
        }

    def pipeline_parts(self):
        t = self.tokenizers
        return {
            "tokenizer": t.tokenizer,
            "tokenizer_2": t.tokenizer_2,
            "tokenizer_3": t.tokenizer_3,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "text_encoder_3": self.text_encoder_3,
        }


def forward(model, noisy, timesteps, cond):
    """The transformer's velocity prediction (timesteps on the scheduler's 0-1000 scale, as the pipeline passes)."""
    return model(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_prompt_embeds"],
        return_dict=False,
    )[0]


def objective(scheduler, args=None):
    return objective_from_args(scheduler, forward, args)


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
    """Prompts (three tokenizers and encoders), vae, transformer (None unless `with_unet`) and the training
    scheduler (the model's FlowMatchEulerDiscreteScheduler, whose table training draws from)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    kw = dict(revision=revision, cache_dir=cache_dir)
    with loading(name, "SD3"):
        tokenizers = Tokenizers(
            CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw),
            CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw),
            T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_3", **kw),
            max_sequence_length or MAX_SEQUENCE_LENGTH,
        )
        encoders = [
            CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw),
            CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", variant=variant, **kw),
            T5EncoderModel.from_pretrained(name, subfolder="text_encoder_3", variant=variant, **kw),
        ]
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    transformer = load_denoiser(name, variant=variant, **kw) if with_unet else None
    return Prompts(tokenizers, *encoders), vae, transformer, scheduler


def load_denoiser(name, subfolder=DENOISER, **kwargs):
    """The SD3Transformer2DModel of a pipeline folder or Hub repo (`subfolder` None: at its root)."""
    from diffusers import SD3Transformer2DModel

    with loading(name, "SD3"):
        return SD3Transformer2DModel.from_pretrained(name, subfolder=subfolder, **kwargs)


def load_pipeline(name, prediction_type=None, *, denoiser=None, text=None, vae=None, **kwargs):
    """`StableDiffusion3Pipeline.from_pretrained` with the given trained `denoiser`, frozen `text` and `vae`."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(name, **given_parts(denoiser, text, vae, DENOISER), **kwargs)


def pipeline_latents(pipeline, latents, height, width):
    """The pipeline's `output_type="latent"` output: (B, C, h, w) in the transformer's space already."""
    return latents
