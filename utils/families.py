"""Which model family a pipeline belongs to, read from its model_index.json before any weights load.

Each family is one module next to this file, named `family_<name>.py`. It declares PIPELINE_CLASSES (the
`_class_name`s of model_index.json it handles) and DESCRIPTION, and implements what differs between families:
loading the frozen parts and the denoiser, and the pipeline class used to sample and to save. LoRA adapters are
saved and loaded here, in the format of the denoiser's family. The scripts ask
`model_family` for the module and call it; they never branch on the family. Adding a family is adding its file.
Needs its sibling `models.py` (the model_index.json reading), as do the family modules.
"""

import importlib.util
import sys
from pathlib import Path

from .models import ModelError, hub_model_index, pipeline_class_name

FAMILY_DIR = Path(__file__).resolve().parent
PREFIX = "family_"


def family_modules():
    """{module name: module} of every `family_*.py` in FAMILY_DIR (this file's folder), imported as modules of
    this package (once)."""
    package = __name__.rsplit(".", 1)[0]
    modules = {}
    for path in sorted(FAMILY_DIR.glob(f"{PREFIX}*.py")):
        full = f"{package}.{path.stem}"
        if path.parent == Path(__file__).resolve().parent:
            importlib.import_module(full)
        elif full not in sys.modules:  # a family folder elsewhere (a test's): imported from its file
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
        modules[path.stem] = sys.modules[full]
    return modules


def family_name(module):
    """The short name of a family module ("sd" for utils/family_sd.py); None for None."""
    return module.__name__.rsplit(".", 1)[-1].removeprefix(PREFIX) if module is not None else None


def supported():
    """{pipeline class: what it is} over all families."""
    return {cls: module.DESCRIPTION for module in family_modules().values() for cls in module.PIPELINE_CLASSES}


def family_for_class(class_name):
    """The family module handling `class_name`, or None."""
    for module in family_modules().values():
        if class_name in module.PIPELINE_CLASSES:
            return module
    return None


def family_of_index(name, index_file, flag="--pretrained_model_name_or_path"):
    """The family of the pipeline whose model_index.json is `index_file`; ModelError (one line naming the class
    found and the supported ones) when no family handles it."""
    try:
        found = pipeline_class_name(index_file)
    except ValueError as e:
        raise ModelError(f"{flag} {name}: {e}") from None
    module = family_for_class(found)
    if module is None:
        listed = "; ".join(f"{c} ({what})" for c, what in supported().items())
        raise ModelError(f"{flag} {name}: a {found}, which these scripts do not train; supported: {listed}")
    return module


def model_family(name, revision=None, token=None, flag="--pretrained_model_name_or_path", shown=None):
    """The family module of a local pipeline folder or Hub model repo, from its model_index.json (downloaded alone,
    or from the cache when the Hub cannot be reached). ModelError, naming it as `flag shown` (`shown` defaults to
    `name`), when it cannot be read now or no family handles its class. Call it after `check_model_source`, which
    names a missing folder or repo."""
    shown = shown or name
    path = Path(name).expanduser()
    index = path / "model_index.json" if path.is_dir() else hub_model_index(name, revision, token, flag)
    if index is None:
        raise ModelError(
            f"{flag} {shown}: its model_index.json is neither in the Hub cache nor downloadable now (offline?), so "
            "its model family cannot be told"
        )
    return family_of_index(shown, index, flag)


def refuse_flags(family, args, shown=None):
    """ModelError, one line, when `args` set flags the model's family cannot honour (the family's `refused`):
    before any weights load."""
    problems = family.refused(args)
    untileable = resolution_problem(family, getattr(args, "resolution", None))
    if untileable:
        problems.append((f"--resolution {args.resolution}", untileable))
    if problems:
        what = "; ".join(f"{flag}: {why}" for flag, why in problems)
        model = shown or args.pretrained_model_name_or_path
        raise ModelError(f"{model} ({family.PIPELINE_CLASSES[0]}: {family.DESCRIPTION}) cannot take {what}")


def resolution_problem(family, resolution):
    """Why `family` cannot render images `resolution` px wide (its RESOLUTION_MULTIPLE), or None."""
    multiple = family.RESOLUTION_MULTIPLE
    if not resolution or resolution % multiple == 0:
        return None
    return f"its images tile in {multiple} px steps; use e.g. {max(multiple, multiple * round(resolution / multiple))}"


def denoiser_family(model):
    """The family module (utils/family_*.py) whose denoiser class `model` is (peft wrappers and torch.compile
    keep the class)."""
    name = type(getattr(model, "_orig_mod", model)).__name__
    for module in family_modules().values():
        if name in module.DENOISER_CLASSES:
            return module
    raise ModelError(f"no model family trains a {name}")


def lora_state_dict(unet, adapter_name="default"):
    """The adapter's weights in the key format its family's pipeline saves and loads (diffusers' for UNets, peft's
    for transformers; what `save_lora_weights` writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if denoiser_family(unet).LORA_FORMAT == "diffusers":
        state_dict = convert_state_dict_to_diffusers(state_dict)
    return {
        k: v.contiguous() for k, v in state_dict.items()
    }  # conv adapters under --channels_last: safetensors packs nothing


def save_lora(unet, output_dir, adapter_name="default"):
    """Write `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(output_dir)` by the
    denoiser's own pipeline class."""
    import diffusers

    family = denoiser_family(unet)
    getattr(diffusers, family.LORA_PIPELINE).save_lora_weights(
        output_dir, **{f"{family.DENOISER}_lora_layers": lora_state_dict(unet, adapter_name)}, safe_serialization=True
    )


def load_lora(unet, path, adapter_name="default"):
    """Load saved LoRA weights (a folder or file in diffusers format) into an existing adapter of `unet`."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    family = denoiser_family(unet)
    state_dict = getattr(diffusers, family.LORA_PIPELINE).lora_state_dict(path)
    state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict  # SD's returns (weights, alphas)
    prefix = family.DENOISER + "."
    own = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    peft_state = convert_unet_state_dict_to_peft(own)
    ranks = {v.shape[0] for k, v in peft_state.items() if "lora_A" in k and v.ndim >= 2}
    built = getattr(unet, "peft_config", {}).get(adapter_name)
    if built is not None and ranks and ranks != {built.r}:
        raise ModelError(
            f"LoRA weights at {path} have rank {sorted(ranks)[0]}, the adapter this run builds has rank {built.r}: "
            "rerun with the --rank (and --lora_alpha, --lora_target_modules) that made them"
        )
    try:
        result = set_peft_model_state_dict(unet, peft_state, adapter_name=adapter_name)
    except RuntimeError as e:  # other shapes: other target modules or another model
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise ModelError(f"LoRA weights at {path} do not fit this model's adapter ({first})") from e
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(
            f"LoRA weights at {path} do not match the adapter this run builds: unexpected keys {unexpected[:5]} "
            "(made with other --lora_target_modules, or for another model)"
        )
