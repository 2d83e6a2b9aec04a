"""Model pieces every family shares: the model source check, freezing, precision, LoRA adapters (saved in each
family's format by `families.py`), optimizer, the reference. Loading a family's components is in its
`family_*.py` (see `families.py`).

Only the denoiser (UNet or transformer) is trained; the VAE and text encoders are frozen in the compute dtype.
Needs no sibling module: it can be copied on its own.
"""

import contextlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision):
    """dtype for frozen weights (and the LoRA base weights) under accelerate's mixed precision."""
    return WEIGHT_DTYPES.get(mixed_precision, torch.float32)


class FrozenComponents(NamedTuple):
    """What training uses beside the denoiser: the family's text side (tokenizers and frozen text encoders as one
    module, `family.Prompts`), the frozen VAE, the family's training objective (noise, target, timestep draw and
    per-sample error, around the family's denoiser call), the compute dtype and the family module itself (it
    builds the pipelines)."""

    text: Any
    vae: torch.nn.Module
    objective: Any
    dtype: torch.dtype
    family: Any = None

    @property
    def scheduler(self):
        """The training noise scheduler (DDPM with the model's betas; the flow-matching table for flow models)."""
        return self.objective.scheduler


class ModelError(ValueError):
    """A model that cannot be used as given (missing folder or repo, unloadable files, LoRA targets that match
    nothing), reported with the flag that names it."""


@contextlib.contextmanager
def loading(name, what):
    """Turns a missing or unreadable file while loading model `name` into a ModelError that names it and says
    which components (`what`: "SDXL", ...) could not be read, with the first line of the cause."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise ModelError(
            f"--pretrained_model_name_or_path {name}: could not load its {what} components "
            f"({type(e).__name__}: {(str(e).strip().splitlines() or ['no message'])[0][:300]})"
        ) from e


def check_model_source(name, revision=None, token=None, flag="--pretrained_model_name_or_path"):
    """Before any download: `name` must be a local diffusers pipeline folder or a Hub model repo that exists
    (and has `revision`). When the Hub cannot be asked (offline mode, no network), loading decides later. Which
    family it is: `utils/families.py`."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{flag} {name}: not a diffusers pipeline folder (no model_index.json in it)")
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"{flag} {name}: neither a local folder nor a valid Hub repo id") from None
    try:
        model_info(name, revision=revision, token=token)
    except RepositoryNotFoundError:
        raise ModelError(
            f"{flag} {name}: no such model repo on the Hub (or it is private or gated and the token cannot read it)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{flag} {name}: the repo has no revision {revision!r} (--revision)") from None
    except Exception:  # offline or unreachable: the cache may still hold it
        pass


def hub_model_index(name, revision=None, token=None, flag="--pretrained_model_name_or_path"):
    """The local path of a Hub repo's model_index.json (downloaded, or from the cache when the Hub cannot be
    reached); None when neither has it now, so that loading decides later."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for local_only in (False, True):
        try:
            return hf_hub_download(
                name, "model_index.json", revision=revision, token=token, local_files_only=local_only
            )
        except Exception as e:
            if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):  # the Hub says so
                raise ModelError(
                    f"{flag} {name}: the repo has no model_index.json (not a diffusers pipeline)"
                ) from None
            continue  # unreachable now: try the cache, then give up
    return None


def pipeline_class_name(index_file):
    """`_class_name` of a model_index.json; ValueError when the file is not a diffusers pipeline index."""
    try:
        index = json.loads(Path(index_file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"its model_index.json cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ValueError("its model_index.json names no pipeline class (_class_name)")
    return index["_class_name"]


def freeze(*modules):
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def add_lora(unet, rank, alpha, target_modules=("to_k", "to_q", "to_v", "to_out.0"), adapter_name="default"):
    """Freeze the denoiser and add a trainable peft LoRA adapter on the given attention projections."""
    from peft import LoraConfig

    names = [n for n, _ in unet.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        examples = sorted(
            {n.rsplit(".", 1)[-1] for n in names if n.endswith(("to_q", "to_k", "to_v", "proj_in", "conv1"))}
        )
        raise ModelError(
            f"--lora_target_modules: {unmatched} match no module of the {type(unet).__name__} (module names end "
            f"in e.g. {examples})"
        )
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def store_frozen_in_fp8(model, storage, compute_dtype):
    """--layerwise_casting: keep `model`'s frozen weights in fp8 (`storage`, a FP8_DTYPES name) and upcast each layer
    to `compute_dtype` while it runs (diffusers' `enable_layerwise_casting`; its default skips leave norms,
    embeddings and peft's adapter layers as they are). Call it after the model is on its device and dtype: a
    later `.to(dtype)` would undo it. `storage` None: nothing changes."""
    if storage is not None:
        model.enable_layerwise_casting(storage_dtype=FP8_DTYPES[storage], compute_dtype=compute_dtype)
    return model


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, *, lr, betas, weight_decay, eps, use_8bit_adam=False):
    """AdamW (fused on CUDA), or bitsandbytes' 8-bit AdamW (works on CPU and GPU)."""
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        cls = bnb.optim.AdamW8bit
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    params = list(params)  # fused AdamW (one kernel for all parameters) when they all live on a GPU
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)


def batch_conditions(text, batch):
    """The batch's text conditioning {name: tensor}: the cached one when the batch carries it (the text side's
    `COND_KEYS`, stored by --precompute_reference), else the text encoders' (`text(batch)`, under no_grad)."""
    if all(key in batch for key in text.COND_KEYS):
        return {key: batch[key] for key in text.COND_KEYS}
    with torch.no_grad():
        return text(batch)


def cast_conditions(cond, device, dtype):
    """`cond` with its floating tensors on `device` in `dtype` (ids and integer tensors keep theirs)."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}


def encode_images(vae, batch, generator, dtype):
    """Scaled latents for a batch: sampled from cached VAE distributions if the batch carries them
    (`latent_params`), else by running the VAE on `pixel_values`."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:  # the VAE itself may wait on the CPU: only its scaling factor is used
        dist = DiagonalGaussianDistribution(batch["latent_params"].to(generator.device, dtype))
    else:
        with torch.no_grad():  # in the VAE's own dtype (fp32 for SDXL's), the latents in the compute dtype
            dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
    return to_model_latents(vae, dist.sample(generator)).to(dtype)


def to_model_latents(vae, latents):
    """VAE latents into the denoiser's space: minus the VAE's shift factor (SD3, Flux), times its scaling factor."""
    shift = getattr(vae.config, "shift_factor", None)
    return (latents - shift if shift else latents) * vae.config.scaling_factor


@torch.no_grad()
def vae_latent_params(vae, pixel_values):
    """The VAE's latent distribution parameters (mean and log-variance stacked on channels), for caching."""
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters


def optimize_unet(unet, reference=None, channels_last=False, compile=False):
    """--channels_last and --torch_compile for the policy UNet and the reference's frozen copy (if any). Compiling
    works in place (`nn.Module.compile`): the module, its parameters and state-dict keys stay, and the graphs are
    built at the first calls (one per input shape and grad mode: training step, generation batch).
    Saving needs nothing more: `save_pretrained` packs each tensor contiguously, `lora_state_dict` too."""
    models = [unet] + ([reference.copy] if reference is not None and reference.copy is not None else [])
    for model in models:
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if compile:
            model.compile()


class Reference:
    """The frozen reference model of the SPIN / Diffusion-DPO loss, called like a UNet (under no_grad).

    - LoRA: the *same* UNet with the frozen `adapter` active (theta_k's adapter), or with adapters disabled
      when theta_k is the base model (adapter=None). No second UNet in memory.
    - Full: a frozen copy of the UNet in the policy's dtype. With `offload=True` its weights live in host
      memory (pinned when `device` is a GPU): each call copies them up (`non_blocking`: the host queues the
      copies and the forward without waiting), runs on those copies, and drops them. The weights never
      change, so nothing is ever copied back.
    Call it before the policy forward of the same step: switching adapters changes requires_grad flags.
    """

    def __init__(self, unet, copy=None, *, adapter=None, trainable_adapter="default", offload=False, device=None):
        self.unet, self.copy, self.adapter, self.trainable_adapter = unet, copy, adapter, trainable_adapter
        self.offload, self.device = offload, torch.device(device) if device is not None else None
        self._pinned = False

    @classmethod
    def frozen_copy(cls, unet, device, offload=False):
        """Full fine-tuning's reference: a frozen copy of `unet` in the policy's own dtype (fp32: under mixed
        precision both then compute the same thing at the first step, loss log 2, as SPIN's reference = theta_k
        requires). The script and the bench build it through this one call."""
        import copy as _copy

        ref = _copy.deepcopy(unet).to("cpu" if offload else device)
        freeze(ref)
        return cls(unet, copy=ref, offload=offload, device=device)

    @property
    def config(self):
        """The denoiser's config (a family's forward may read it)."""
        return (self.copy if self.copy is not None else self.unet).config

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """Like calling the denoiser with the same arguments (the family's forward passes them), under no_grad."""
        return self._forward(args, kwargs)

    def _host_state(self):
        """The offloaded copy's weights and buffers by name, as they sit in host memory: pinned once (after any
        --channels_last re-layout, which makes new host tensors) when the device is a GPU."""
        state = dict(self.copy.named_parameters()) | dict(self.copy.named_buffers())
        if not self._pinned and self.device.type == "cuda":
            for t in state.values():
                t.data = t.data.pin_memory()
            self._pinned = True
        return state

    def _forward(self, args, kwargs):
        if self.copy is not None and self.offload:
            # The module keeps its host tensors; the call runs on device copies that die with it.
            on_device = {name: t.to(self.device, non_blocking=True) for name, t in self._host_state().items()}
            return torch.func.functional_call(self.copy, on_device, args, kwargs)
        if self.copy is not None:
            return self.copy(*args, **kwargs)
        if self.adapter is None:
            self.unet.disable_adapters()
            try:
                return self.unet(*args, **kwargs)
            finally:
                self.unet.enable_adapters()
        self.unet.set_adapter(self.adapter)
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.set_adapter(self.trainable_adapter)
