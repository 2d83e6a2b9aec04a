"""The SD-1.x / SD-2.x family (`StableDiffusionPipeline`): a CLIP text encoder, a VAE, a
`UNet2DConditionModel` predicting epsilon or v, and a DDPM noise schedule for training.

One of the family modules `utils/families.py` finds by name. Each declares what the scripts ask of a family:
- PIPELINE_CLASSES, DESCRIPTION: the model_index.json classes it handles, in words;
- DENOISER ("unet" / "transformer": the pipeline's component trained), DENOISER_CLASSES, LORA_PIPELINE and
  LORA_FORMAT (how an adapter is saved so that the pipeline's `load_lora_weights` reads it), LORA_TARGETS;
- Tokenizers (picklable: the datasets hold it) and Prompts (the frozen text encoders as one module): captions to
  token ids, token ids to the conditioning {name: tensor} that `forward` reads;
- forward(model, noisy, timesteps, cond): the denoiser's prediction;
- objective(scheduler, args): noise, target, timestep draw, per-sample error (losses.py or flow.py);
- load_components, load_denoiser, load_pipeline, pipeline_latents;
- GUIDANCE_SCALE (the opponent's default guidance), VAE_UPCAST (the VAE runs in fp32);
- refused(args): the flags this family cannot honour (a flow model: the trajectory objective, eta, DDPM
  settings; a DDPM model: the flow-matching flags).
Needs its siblings `models.py`, `losses.py` and `data.py`.
"""

import torch

from .data import tokenizer_ids
from .losses import DDPMObjective
from .models import ModelError, loading

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
DESCRIPTION = "SD-1.x and SD-2.x, epsilon or v-prediction"
DENOISER, DENOISER_CLASSES = "unet", ("UNet2DConditionModel",)
LORA_PIPELINE, LORA_FORMAT = "StableDiffusionPipeline", "diffusers"
LORA_TARGETS = "to_k,to_q,to_v,to_out.0"
GUIDANCE_SCALE = 7.5  # the opponent's default --gen_guidance_scale (the pipeline's own)
# the latent side its pipeline renders at by default, times the VAE's scale (None: the denoiser's sample_size)
RESOLUTION_MULTIPLE = 8  # image sides it can tile: the VAE's 8x
DEFAULT_SAMPLE_SIZE = None
VAE_UPCAST = False  # the VAE runs in the compute dtype
FLOW_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length", "guidance_scale")


class Tokenizers:
    """Captions to the CLIP token ids the text encoder reads ({"input_ids": (B, 77)})."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, captions):
        return {"input_ids": tokenizer_ids(self.tokenizer, captions)}


class Prompts(torch.nn.Module):
    """The frozen CLIP text encoder: token ids to {"prompt_embeds": its last hidden states}."""

    COND_KEYS = ("prompt_embeds",)

    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizers, self.text_encoder = Tokenizers(tokenizer), text_encoder

    def forward(self, batch):
        ids = batch["input_ids"].to(self.text_encoder.device)
        return {"prompt_embeds": self.text_encoder(ids, return_dict=False)[0]}

    def pipeline_parts(self):
        return {"tokenizer": self.tokenizers.tokenizer, "text_encoder": self.text_encoder}


def forward(model, noisy, timesteps, cond):
    """The UNet's epsilon or v prediction."""
    return model(noisy, timesteps, cond["prompt_embeds"], return_dict=False)[0]


def objective(scheduler, args=None):
    return DDPMObjective(scheduler, forward)


def refused(args):
    """The flags set in `args` that this family cannot honour, as (flag, why) pairs."""
    return flow_flags_set(args)


def flow_flags_set(args):
    """What a UNet (DDPM) family refuses: the flow-matching flags, and an fp8-stored base under gradient
    checkpointing (the UNet's checkpointed blocks recompute on the fp8 weights, and the backward fails)."""
    out = [(f"--{n}", "a flow-matching (SD3, Flux) setting") for n in FLOW_FLAGS if getattr(args, n, None) is not None]
    if getattr(args, "layerwise_casting", None) and getattr(args, "gradient_checkpointing", False):
        out.append(
            (
                "--layerwise_casting with --gradient_checkpointing",
                "the UNet's checkpointed blocks recompute on the fp8-stored weights and the backward fails; drop one",
            )
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
    """Prompts (tokenizer and text encoder), vae, unet (None unless `with_unet`) and the training noise scheduler
    (DDPM with the model's betas). `max_sequence_length` is a T5 setting (this family refuses it).
    Raises ModelError naming the model when its files cannot be found or read."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(revision=revision, cache_dir=cache_dir)
    with loading(name, "Stable Diffusion"):
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    unet = load_denoiser(name, variant=variant, **kw) if with_unet else None
    set_prediction_type(name, scheduler, prediction_type)
    return Prompts(tokenizer, text_encoder), vae, unet, scheduler


def set_prediction_type(name, scheduler, prediction_type=None):
    """--prediction_type onto the training scheduler; without it the model's own, which must be one the losses
    train (epsilon or v_prediction): ModelError naming it otherwise."""
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    own = scheduler.config.get("prediction_type", "epsilon")
    if own not in ("epsilon", "v_prediction"):
        raise ModelError(
            f"--pretrained_model_name_or_path {name}: its scheduler predicts {own!r}; these scripts train epsilon or "
            "v_prediction (--prediction_type)"
        )


def load_denoiser(name, subfolder=DENOISER, **kwargs):
    """The UNet of a pipeline folder or Hub repo (`subfolder` None: at its root); ModelError naming it when its
    files cannot be found or read. `kwargs` go to `from_pretrained` (torch_dtype, token)."""
    from diffusers import UNet2DConditionModel

    with loading(name, "Stable Diffusion"):
        return UNet2DConditionModel.from_pretrained(name, subfolder=subfolder, **kwargs)


def load_pipeline(name, prediction_type=None, *, denoiser=None, text=None, vae=None, **kwargs):
    """`StableDiffusionPipeline.from_pretrained` without the safety checker, with the given trained `denoiser`,
    frozen `text` (Prompts) and `vae` in place of the stored ones, its scheduler set to the prediction type the
    UNet was trained for (so samples, and a saved pipeline's scheduler config, match the weights)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        name, safety_checker=None, requires_safety_checker=False, **given_parts(denoiser, text, vae), **kwargs
    )
    if prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    return pipeline


def given_parts(denoiser, text, vae, denoiser_name=DENOISER):
    """The pipeline components passed in place of the stored ones (None: the stored one)."""
    parts = text.pipeline_parts() if text is not None else {}
    return parts | {name: part for name, part in ((denoiser_name, denoiser), ("vae", vae)) if part is not None}


def pipeline_latents(pipeline, latents, height, width):
    """The pipeline's `output_type="latent"` output in the layout training reads: (B, C, h, w) already."""
    return latents
