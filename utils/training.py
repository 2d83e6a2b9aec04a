"""The start shared by the training scripts: the Accelerator (precision, accumulation, trackers, logging)
and the frozen Stable Diffusion components. The training loops themselves stay in the scripts.
Needs its siblings `args.py` and `models.py`."""

import logging
import math
from pathlib import Path

import torch

from .args import save_args
from .models import FrozenComponents, ModelError, freeze, trainable_parameters, weight_dtype


def init_run(args):
    """Accelerator + logging + TF32 + the compile settings; applies --scale_lr (so training_args.json records the lr
    really used)
    and writes training_args.json (never the token) on the main process."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        # the other processes wait while the main one saves and pushes (GBs): longer than torch's 30 min default
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    if getattr(args, "use_ema", False) and accelerator.distributed_type == DistributedType.FSDP:
        raise ModelError(
            "--use_ema does not work under FSDP (diffusers' EMAModel keeps whole tensors, FSDP shards the "
            "weights): drop --use_ema, or launch with DDP or DeepSpeed ZeRO-2"
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if (
        args.torch_compile
    ):  # each iteration's UNet, LoRA adapter switch and batch shape adds graphs: keep compiling them
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        if accelerator.is_local_main_process:
            logging.getLogger(__name__).info(
                "--torch_compile: the first UNet calls compile it (minutes) before they run"
            )
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_args(args, output_dir / "training_args.json")
    return accelerator


def load_frozen_components(args, accelerator, family):
    """`FrozenComponents`: the text encoders (with their tokenizers) and the VAE, frozen, on the device in the
    compute dtype; the family's training objective; that dtype; and `family` (the model's family module, which
    loads them). No denoiser: each script loads the one it trains (`family.load_denoiser`)."""
    text, vae, _, noise_scheduler = family.load_components(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        prediction_type=args.prediction_type,
        cache_dir=args.cache_dir,
        with_unet=False,
        max_sequence_length=args.max_sequence_length,
    )
    if args.pretrained_vae_model_name_or_path:
        vae = load_vae(args.pretrained_vae_model_name_or_path, args.cache_dir)
    dtype = weight_dtype(accelerator.mixed_precision)
    freeze(text, vae)
    text.to(accelerator.device, dtype)
    # a VAE that overflows in fp16 / bf16 (SDXL's own) runs in fp32; a replacement is assumed fixed
    upcast = family.VAE_UPCAST and not args.pretrained_vae_model_name_or_path
    vae.to(accelerator.device, torch.float32 if upcast else dtype)
    return FrozenComponents(text, vae, family.objective(noise_scheduler, args), dtype, family)


def load_vae(name, cache_dir=None):
    """--pretrained_vae_model_name_or_path: an AutoencoderKL at the root of a folder or Hub repo."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"--pretrained_vae_model_name_or_path {name}: not a loadable AutoencoderKL ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200]})"
        ) from e


def optimizer_step(accelerator, model, optimizer, lr_scheduler, max_grad_norm=None):
    """The tail of every micro-step inside `accelerator.accumulate`: clip the gradients on the steps that sync
    them, step the optimizer and the schedule, zero the gradients. Returns the gradient norm (or None)."""

    grad_norm = None
    if accelerator.sync_gradients and max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


PREEMPTED_EXIT = 75  # the exit status of a run stopped by SIGTERM / SIGUSR1 after saving (EX_TEMPFAIL: "try again")


class Preempted(RuntimeError):
    """The run stopped on SIGTERM or SIGUSR1 at a safe point, after saving; the message says what was saved."""


class Preemption:
    """SIGTERM (a spot instance, `scancel`, Kubernetes) and SIGUSR1 (SLURM's `--signal=USR1@120`) only set a flag;
    the loops look at it at safe points: after an optimizer step (so the accumulation window ends), after a
    generation shard is written, between iterations. With several processes they agree (any process signalled
    stops them all), so every process saves the same checkpoint and stops together."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, install=True):
        import signal
        import threading

        self.signal_name, self._previous = None, {}
        self.before_stop = None  # e.g. give a push under way a little time
        if install and threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        import signal

        self.signal_name = signal.Signals(number).name

    def requested(self, accelerator=None):
        """Whether a stop was asked for here, or (with `accelerator` over several processes: a collective, so every
        process must call it at the same point) in any process."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signal_name is not None
        return self.agreed(accelerator.reduce(self.flag(torch.zeros(1, device=accelerator.device)), "max").item())

    def flag(self, like):
        """This process's stop flag (1: signalled) as a 1-element tensor of `like`'s dtype and device, to ride
        along an all-reduce (mean or max) the loop does anyway; `agreed` reads the reduced value."""
        return torch.tensor([float(self.signal_name is not None)], dtype=like.dtype, device=like.device)

    def agreed(self, reduced):
        """Whether any process was signalled, from the reduced flag (above 0 when one was)."""
        if reduced > 0 and self.signal_name is None:
            self.signal_name = "another process's signal"
        return reduced > 0

    def stop(self, saved, rerun="rerun the same command"):
        """Raise Preempted with the one line the user reads (after `before_stop`, if set)."""
        if self.before_stop is not None:
            self.before_stop()
        raise Preempted(f"stopped on {self.signal_name}: {saved}; {rerun} to continue")

    def restore(self):
        """Put the previous handlers back (a test, or a script run in-process, gets them again)."""
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: the run stops before saving or pushing it."""


MAX_OVERFLOW_STREAK = 25  # fp16: the scaler halves its scale per skipped step; 25 in a row means the model overflows


def check_finite_step(logs, *, where, last_checkpoint, skipped=False, skipped_in_a_row=0):
    """Stop the run (DivergedError) when an optimizer step's loss or gradient norm is inf/NaN. `where` names the
    step ("iteration 2, step 37"), `last_checkpoint` what is left to resume from. A step the fp16 grad scaler
    `skipped` on overflow is normal (the scaler lowers its scale and the weights did not change): not divergence,
    unless `skipped_in_a_row` reaches MAX_OVERFLOW_STREAK (the forward itself overflows at any scale)."""
    if skipped and skipped_in_a_row >= MAX_OVERFLOW_STREAK:
        raise DivergedError(
            f"training diverged at {where}: the fp16 grad scaler skipped {skipped_in_a_row} steps in a row on "
            f"overflow (loss={logs.get('loss')}); the last finite checkpoint is {last_checkpoint}. Use bf16 "
            f"(--mixed_precision bf16) or a lower --learning_rate"
        )
    if skipped:
        return
    bad = [f"{name}={logs[name]}" for name in ("loss", "grad_norm") if name in logs and not math.isfinite(logs[name])]
    if bad:
        raise DivergedError(
            f"training diverged at {where}: non-finite {', '.join(bad)}. Nothing from this step was saved or pushed; "
            f"the last finite checkpoint is {last_checkpoint}. Lower --learning_rate or clip harder (a smaller "
            f"--max_grad_norm) and resume from it (a resumed run takes the new rate); if it diverges again, its "
            f"weights are already damaged: remove the newest checkpoint-N folders and rerun"
        )


def model_for_saving(accelerator, model):
    """The trained `model` as a plain module holding all of its weights, ready for `save_pretrained`. Call it on
    every process. With whole weights on each process (one device, DDP, DeepSpeed ZeRO-2) this is
    `accelerator.unwrap_model(model)`. Under FSDP each process holds a shard: the full weights are gathered (a
    collective) and loaded into a fresh copy of the model (a diffusers model, built from its config) on the main
    process; the other processes get None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # full weights, on the main process only (in host memory)
    if not accelerator.is_main_process:
        return None
    sharded = accelerator.unwrap_model(model)
    plain = type(sharded).from_config(sharded.config)
    for name, config in getattr(sharded, "peft_config", {}).items():  # LoRA: the same adapters, then all the weights
        plain.add_adapter(config, adapter_name=name)
    plain.load_state_dict(state_dict)
    return plain


def _local(tensor):
    """The part of a parameter this process holds (an FSDP2 DTensor's local shard; a plain tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _checkable(tensor):
    """fp8 weights (--layerwise_casting) have no isfinite kernel: checked upcast (NaN stays NaN)."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def assert_finite_weights(model, what, accelerator=None):
    """Raise DivergedError if any parameter of `model` holds inf/NaN: checked before anything is saved. With
    `accelerator` (a call every process makes), the verdict is agreed across processes, so a NaN in one rank's
    FSDP/ZeRO shard stops every rank instead of leaving the others waiting in the save."""
    params = list(model.named_parameters())
    finite = (
        torch.stack([torch.isfinite(_checkable(_local(p.detach()))).all() for _, p in params]).all()
        if params
        else torch.tensor(True)
    )
    if accelerator is not None and accelerator.num_processes > 1:  # any process with a non-finite shard
        finite = accelerator.reduce((~finite).float().to(accelerator.device), "max") == 0
    if finite:
        return
    bad = [name for name, p in params if not torch.isfinite(_local(p.detach())).all()] or ["(on another process)"]
    raise DivergedError(f"{what}: {len(bad)} parameter tensor(s) hold non-finite values (e.g. {bad[0]}); not saved")
