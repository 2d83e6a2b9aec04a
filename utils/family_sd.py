"""The SD-1.x / SD-2.x family (`StableDiffusionPipeline`): a CLIP text encoder, a VAE, a
`UNet2DConditionModel` predicting epsilon or v, and a DDPM noise schedule for training.

One of the family modules `utils/families.py` finds by name: what loading and sampling mean for this family.
Needs its sibling `models.py` (ModelError).
"""

from .models import ModelError

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
DESCRIPTION = "SD-1.x and SD-2.x, epsilon or v-prediction"


def load_error(name, e):
    return ModelError(
        f"--pretrained_model_name_or_path {name}: could not load its Stable Diffusion components "
        f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
    )


def load_components(name, *, revision=None, variant=None, prediction_type=None, cache_dir=None, with_unet=True):
    """tokenizer, text_encoder, vae, unet (None unless `with_unet`) and the training noise scheduler (DDPM with the
    model's betas). Raises ModelError naming the model when its files cannot be found or read."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(revision=revision, cache_dir=cache_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise load_error(name, e) from e
    unet = load_denoiser(name, variant=variant, **kw) if with_unet else None
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    return tokenizer, text_encoder, vae, unet, scheduler


def load_denoiser(name, subfolder="unet", revision=None, variant=None, cache_dir=None, **kwargs):
    """The UNet of a pipeline folder or Hub repo (`subfolder` None: at its root); ModelError naming it when its
    files cannot be found or read. `kwargs` go to `from_pretrained` (torch_dtype, token)."""
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(
            name, subfolder=subfolder, revision=revision, variant=variant, cache_dir=cache_dir, **kwargs
        )
    except (OSError, ValueError) as e:
        raise load_error(name, e) from e


def load_pipeline(name, prediction_type=None, **kwargs):
    """`StableDiffusionPipeline.from_pretrained` without the safety checker, its scheduler set to the prediction
    type the UNet was trained for (so samples, and a saved pipeline's scheduler config, match the weights)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        name, safety_checker=None, requires_safety_checker=False, **kwargs
    )
    if prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    return pipeline
