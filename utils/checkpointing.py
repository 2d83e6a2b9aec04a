"""Resumable `checkpoint-N` folders through `accelerator.save_state`, with hooks that store the UNet as
diffusers weights (full) or LoRA weights, plus the EMA weights, and restore them on load.
Needs its sibling `families.py` (LoRA weights in the family's format)."""

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from .families import load_lora, save_lora

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint named on the command line that cannot be resumed from."""


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir):
    """Finished checkpoint folders in `output_dir`, oldest first, as (step, path)."""
    out = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_problem(path):
    """None when every file of a checkpoint folder reads back whole (safetensors headers cover their files,
    torch.save zips pass their CRC check, JSON parses), else what is wrong with the first bad file."""
    files = sorted(f for f in Path(path).rglob("*") if f.is_file())
    if not files:
        return "the folder is empty"
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt"):
                    pass
            elif f.suffix in (".bin", ".pkl", ".pt", ".pth"):
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                if bad is not None:
                    return f"{f.relative_to(path)}: member {bad} is corrupt"
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception as e:
            return (
                f"{f.relative_to(path)} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            )
    return None


def latest_complete_checkpoint(output_dir):
    """The newest checkpoint that reads back whole, or None; each newer corrupt one is named in a warning and
    left where it is (the run overwrites it when it gets there again)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(f"checkpoint {path} is unusable ({problem}): falling back to the previous complete one")
    return None


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """Path of the checkpoint to resume from, or None to start fresh ("latest" with none saved yet). "latest"
    skips corrupt checkpoints with a warning. Raises FileNotFoundError for an explicit checkpoint that does not
    exist, CheckpointError for one that is corrupt."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_complete_checkpoint(output_dir)
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / resume_from_checkpoint):
        if candidate.is_dir():
            problem = checkpoint_problem(candidate)
            if problem is not None:
                raise CheckpointError(
                    f"--resume_from_checkpoint {resume_from_checkpoint}: {problem}; "
                    f"pass an earlier checkpoint-N or 'latest' (the newest complete one)"
                )
            return candidate
    raise FileNotFoundError(
        f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder (looked in . and {output_dir})"
    )


def step_of(checkpoint_path):
    return int(CHECKPOINT_RE.match(Path(checkpoint_path).name).group(1))


def prune_checkpoints(output_dir, total_limit, keep_room_for=1):
    """Delete the oldest checkpoints so that at most `total_limit - keep_room_for` remain."""
    if total_limit is None:
        return []
    ckpts = list_checkpoints(output_dir)
    excess = len(ckpts) - (total_limit - keep_room_for)
    removed = [p for _, p in ckpts[: max(0, excess)]]
    for p in removed:
        shutil.rmtree(p)
    return removed


def save_checkpoint(accelerator, output_dir, step, total_limit=None, extra_files=None):
    """Save `checkpoint-{step}` atomically (written under a temporary name, then renamed), then prune the
    oldest beyond `total_limit`: a kill at any moment leaves at least the previous complete checkpoint."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in (extra_files or {}).items():  # e.g. running metrics: part of the same atomic checkpoint
            (tmp / name).write_text(text)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit, keep_room_for=0)  # only once the new one is complete
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint, optimizer, lr_scheduler=None, learning_rate=None):
    """`accelerator.load_state`, then the optimizer states put in their parameters' memory layout: a checkpoint
    saved with the other --channels_last setting restores them in the layout they were saved in, which fused
    AdamW refuses and 8-bit Adam (flat memory) would pair with the wrong elements. With `learning_rate`, a
    resumed run uses that peak rate (e.g. lowered after a divergence) on the checkpoint's schedule position."""
    import torch

    accelerator.load_state(str(checkpoint))
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if (
        learning_rate is not None
        and hasattr(schedule, "lr_lambdas")
        and schedule.base_lrs != [learning_rate] * len(schedule.base_lrs)
    ):
        logger.warning(
            f"resuming with --learning_rate {learning_rate} (the checkpoint was trained with {schedule.base_lrs[0]})"
        )
        schedule.base_lrs = [learning_rate] * len(schedule.base_lrs)
        for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
            group["initial_lr"] = learning_rate
            group["lr"] = learning_rate * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def register_checkpoint_hooks(accelerator, use_lora=False, ema_model=None):
    """Make `save_state`/`load_state` store the denoiser (a UNet or a transformer; the folder is `unet/` whatever
    the family) (full) or `pytorch_lora_weights.safetensors` (LoRA) and the EMA weights as `unet_ema/`, and
    restore them into the live models on load, as the denoiser's own class. Under FSDP accelerate itself writes
    the model (`pytorch_model_fsdp_0/`, sharded or whole as the config's state dict type says) and reads it
    back."""
    from accelerate.utils import DistributedType
    from diffusers.training_utils import EMAModel

    sharded = accelerator.distributed_type == DistributedType.FSDP  # accelerate saves and loads FSDP models itself

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in [] if sharded else models:
                model = accelerator.unwrap_model(model)
                if use_lora:
                    save_lora(model, output_dir)
                else:
                    model.save_pretrained(os.path.join(output_dir, "unet"))
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
        while weights:  # saved above; stop accelerate from saving them a second time
            weights.pop()

    def load_hook(models, input_dir):
        if ema_model is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), ema_model.model_cls)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)
        while models:
            model = accelerator.unwrap_model(models.pop())
            if use_lora:
                load_lora(model, input_dir)
            else:
                loaded = type(model).from_pretrained(input_dir, subfolder="unet")  # the family's denoiser class
                model.load_state_dict(loaded.state_dict())

    # Handles: call .remove() on both before registering hooks for another model (e.g. the next SPIN iteration).
    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)


def resume_position(global_step, gradient_accumulation_steps, batches_per_epoch=None):
    """Where a run restored at `global_step` picks up: (first_epoch, batches to skip in that epoch, micro-steps
    already done). `batches_per_epoch` is None for a streamed dataset (one endless epoch)."""
    if batches_per_epoch is None:
        done = global_step * gradient_accumulation_steps
        return 0, done, done
    steps_per_epoch = -(-batches_per_epoch // gradient_accumulation_steps)
    epoch, rest = divmod(global_step, steps_per_epoch)
    skip = rest * gradient_accumulation_steps
    return epoch, skip, epoch * batches_per_epoch + skip


class RunState:
    """A small JSON file recording a multi-phase run's progress (e.g. SPIN's iteration and phase, which
    iterations are saved and which are pushed). Written atomically, one update at a time (the main thread and the
    background pushes both write); only the main process should write."""

    def __init__(self, path):
        import threading

        self.path, self._lock = Path(path), threading.Lock()  # the background pushes update it too
        self.data = {"done": [], "pushed": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError as e:
                raise CheckpointError(
                    f"{self.path} is corrupt ({e}): restore it, or delete it to let the run start "
                    f"over (finished iterations are then trained again)"
                ) from e

    def get(self, key, default=None):
        return self.data.get(key, default)

    def update(self, **fields):
        with self._lock:
            self.data = self.data | fields
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)


def record_settings(path, settings, write=True):
    """What a folder of resumable outputs was made with. If `path` exists, return the keys whose values differ
    from `settings` (empty: the outputs can be reused); else write `settings` there (when `write`) and return []."""
    path = Path(path)
    wanted = json.loads(json.dumps(settings))
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is corrupt ({e}): delete its folder to make those outputs again") from e
        return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return []
