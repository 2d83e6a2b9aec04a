#!/usr/bin/env python
"""SPIN-Diffusion: self-play fine-tuning of a text-to-image diffusion model (Yuan et al., NeurIPS 2024): SD-1.x/2.x,
SDXL, SD3.x or Flux.1, full or LoRA.

Per iteration k = 0 .. K-1, with theta_k the model of the previous iteration (the start model for k = 0):
  1. generation: theta_k draws one latent per prompt the iteration trains on (the opponent's samples);
  2. training: the policy starts from theta_k and learns to make the real image more likely and theta_k's
     sample less likely, relative to the frozen reference theta_k (utils/losses.py: spin_loss);
  3. save theta_{k+1} to output_dir/iter_{k+1}/ and push it to the Hub as its own repo (or revision).
`--negative_source dataset` instead uses the Pick-a-Pic loser as the negative with the start model as the
reference, for one iteration: that is Diffusion-DPO, the paper's main baseline.

    accelerate launch train_spin_diffusion.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset_name sayakpaul/pickapic_v2_webdataset --max_train_samples 50000 --use_lora --output_dir sd15-spin

Rerunning the same command resumes: finished generation shards, checkpoints and iterations are kept, and
iterations whose push failed are pushed without training again.
"""

import functools
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from utils.args import (
    add_data_args,
    add_hub_args,
    add_model_args,
    add_training_args,
    make_parser,
    parse_with_config,
    rerun_command,
    save_args,
    tracker_config,
    validate_training_args,
)
from utils.checkpointing import (
    CheckpointError,
    RunState,
    load_checkpoint,
    register_checkpoint_hooks,
    resolve_resume_checkpoint,
    resume_position,
    save_checkpoint,
    step_of,
)
from utils.data import (
    DataError,
    EpochSampler,
    PairDataset,
    TrainDataset,
    caption_of,
    collate,
    load_training_dataset,
    set_epoch,
)
from utils.families import load_lora, model_family, refuse_flags, save_lora
from utils.generation import (
    SyntheticStore,
    generate_opponent_samples,
    iteration_grid,
    iteration_pipeline,
    log_images,
)
from utils.hub import (
    BackgroundPushes,
    HubError,
    push_unpushed,
    resolve_hub_repo,
    unpushed_iterations,
    write_iteration_card,
)
from utils.losses import spin_loss, step_generator
from utils.models import (
    ModelError,
    Reference,
    add_lora,
    batch_conditions,
    cast_conditions,
    check_model_source,
    make_optimizer,
    optimize_unet,
    store_frozen_in_fp8,
    trainable_parameters,
)
from utils.spin import (
    IterationTally,
    SpinStep,  # noqa: F401  (the step's settings; callers build it from the flags with spin_step)
    iteration_line,
    iteration_prompts,
    opponent_scheduler,
    pair_conditions,
    pair_errors,
    pair_inputs,
    print_summary,
    real_error_sentence,
    real_latents,
    reference_extras,
    saturation_warning,
    spin_step,
    store_settings,
    trajectory_errors,
    trajectory_inputs,
)
from utils.spin_args import add_spin_args, check_spin_args
from utils.training import (
    PREEMPTED_EXIT,
    DivergedError,
    Preempted,
    Preemption,
    assert_finite_weights,
    check_finite_step,
    init_run,
    load_frozen_components,
    model_for_saving,
    optimizer_step,
)

logger = get_logger(__name__)
LOGGED = ("loss", "spin_loss", "implicit_acc", "reward_margin")
LOGGED += ("model_err_real", "model_err_gen", "ref_err_real", "ref_err_gen")


def parse_args(input_args=None):
    parser = make_parser(__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser)
    add_hub_args(parser)
    add_spin_args(parser)
    args = parse_with_config(parser, input_args)
    check_spin_args(parser, args)
    args = validate_training_args(parser, args)
    args.command = rerun_command("train_spin_diffusion.py", sys.argv[1:] if input_args is None else input_args)
    return args


def main(args, preempt=None):
    """The run. `preempt` (utils/training.py Preemption): SIGTERM / SIGUSR1 stop it at the next safe point, after
    saving (None: signals keep their default action)."""
    preempt = preempt or Preemption(install=False)
    output_dir = Path(args.output_dir)
    # 1. Hub identity, model, data: bad input fails here, before any model is loaded.
    hub_repo = resolve_hub_repo(args) if args.push_to_hub else None
    check_model_source(args.pretrained_model_name_or_path, args.revision, args.hub_token)
    family = model_family(args.pretrained_model_name_or_path, args.revision, args.hub_token)  # SD, SDXL, ...
    refuse_flags(family, args)  # flags the family cannot honour (e.g. --weighting_scheme on SD)
    if args.gen_guidance_scale is None:
        args.gen_guidance_scale = family.GUIDANCE_SCALE
    accelerator = init_run(args)
    hf_dataset, spec = load_training_dataset(args)
    if args.negative_source == "dataset" and spec["kind"] != "pickapic":
        raise DataError(
            "--negative_source dataset needs a Pick-a-Pic-shaped dataset (it trains against the loser image)"
        )
    captions = [caption_of(c) for c in hf_dataset[spec["caption"]]]
    num_iterations = 1 if args.negative_source == "dataset" else args.num_iterations
    state = RunState(output_dir / "spin_state.json")
    todo = [k for k in range(num_iterations) if k + 1 not in state.get("done")]
    logger.info(
        f"{len(captions)} training prompts; {num_iterations} iteration(s), {len(todo)} to train; state: {state.data}"
    )

    if todo:  # a rerun that only has pushes left loads no model
        set_seed(args.seed)
        frozen = load_frozen_components(args, accelerator, family)  # no UNet: each iteration loads theta_k
        text, vae, _, dtype, _ = frozen
        step = spin_step(args)
    if accelerator.is_main_process:
        state.update(num_iterations=num_iterations)
    pushes = BackgroundPushes() if args.push_to_hub and accelerator.is_main_process else None
    if pushes is not None:  # a preempted run gives a push under way 30 s; an unfinished one is redone by the rerun
        preempt.before_stop = functools.partial(pushes.wait, min(30.0, args.hub_retry_max_time))

    for k in todo:
        if preempt.requested(accelerator):  # between iterations: everything before k is saved
            preempt.stop(f"iterations {sorted(state.get('done'))} are saved; iteration {k + 1} did not start")
        it_dir = output_dir / f"iter_{k + 1}"
        if accelerator.is_main_process:
            state.update(iteration=k + 1, phase="generate")
        # theta_k: the policy starts from it; it also generates the negatives and is the frozen reference.
        unet, reference = load_policy_and_reference(args, k, frozen, accelerator.device)
        optimize_unet(unet, reference, channels_last=args.channels_last, compile=args.torch_compile)

        started = time.monotonic()
        store, ds_k = None, hf_dataset
        if args.negative_source == "self":  # only the prompts this iteration's steps consume (or as asked)
            ds_k, captions_k = iteration_subset(args, hf_dataset, captions, k, accelerator.num_processes)
            store = SyntheticStore(
                it_dir / "synthetic",
                len(captions_k),
                args.gen_shard_size,
                settings=store_settings(args, captions_k) | {"prompts": f"{len(captions_k)} of {len(captions)}"},
            )
            try:  # every process checks; refuses shards made for other prompts or settings
                store.claim(write=accelerator.is_main_process)
            except ValueError as e:
                raise DataError(str(e)) from e
            accelerator.wait_for_everyone()
            if store.missing_shards(accelerator.process_index, accelerator.num_processes):
                pipeline = opponent_pipeline(args, unet, frozen, accelerator.device)
                extras = None
                if args.precompute_reference:
                    real_images = TrainDataset(
                        ds_k,
                        spec,
                        text.tokenizers,
                        resolution=args.resolution,
                        center_crop=True,
                        seed=args.seed + k,
                    )
                    extras = reference_extras(
                        args, real_images, unet, frozen=frozen, step=step, accelerator=accelerator
                    )
                generate_opponent_samples(
                    pipeline,
                    captions_k,
                    store,
                    seed=args.seed,
                    iteration=k,
                    batch_size=args.gen_batch_size,
                    num_inference_steps=args.gen_num_inference_steps,
                    guidance_scale=args.gen_guidance_scale,
                    resolution=args.resolution,
                    eta=args.gen_eta,  # None: not passed (flow samplers take none)
                    to_latents=frozen.family.pipeline_latents,
                    process_index=accelerator.process_index,
                    num_processes=accelerator.num_processes,
                    autocast_dtype=dtype if dtype != torch.float32 else None,
                    progress=accelerator.is_local_main_process,
                    extras=extras,
                    trajectory=(step.table, step.trajectory_steps) if step.objective == "trajectory" else None,
                    stop=lambda: preempt.signal_name is not None,  # after the shard under way
                )
                del pipeline, extras  # both hold theta_k's UNet
            accelerator.wait_for_everyone()
            if preempt.requested(accelerator):
                preempt.stop(f"iteration {k + 1}'s finished generation shards are kept in {store.dir}")
            if accelerator.is_main_process:
                store.write_manifest()

        if accelerator.is_main_process:
            state.update(phase="train")
        if args.precompute_reference:  # latents and text embeddings are stored: VAE and text encoder wait on the CPU
            vae.to("cpu")
            text.to("cpu")
        generated = time.monotonic()
        metrics = train_iteration(
            args,
            accelerator,
            k,
            it_dir=it_dir,
            unet=unet,
            reference=reference,
            store=store,
            data=(ds_k, spec),
            frozen=frozen,
            step=step,
            preempt=preempt,
        )

        result = model_for_saving(accelerator, unet)  # every process: under FSDP the shards are gathered here
        if accelerator.is_main_process:
            state.update(phase="save")
            prompts = args.validation_prompts or captions[: args.num_validation_images]
            save_iteration(
                args,
                result,
                it_dir=it_dir,
                k=k,
                hub_repo=hub_repo,
                metrics=metrics,
                family=family,
                prompts=prompts,
                accelerator=accelerator,
                dtype=dtype,
            )
            state.update(done=sorted(set(state.get("done")) | {k + 1}), phase="done")
            if args.push_to_hub:  # in the background: this iteration, and any earlier one whose push failed
                pushes.submit(functools.partial(push_unpushed, args, state, hub_repo, stop_at_failure=k != todo[-1]))
            times = (generated - started, time.monotonic() - generated)
            logger.info(
                iteration_line(k + 1, metrics, times, it_dir, pushing=args.push_to_hub), main_process_only=True
            )
        vae.to(accelerator.device)
        text.to(accelerator.device)
        # Iteration k's UNet, reference copy and optimizer go before k+1 loads its own. Dropping the names is not
        # enough: a prepared model is a reference cycle (accelerate's patched forward holds it), and free_memory()
        # collects garbage before it drops accelerate's own references. So: names, accelerate's lists, then collect.
        del unet, reference, store, result
        accelerator.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand theta_k's blocks back: iteration k+1 allocates afresh
        accelerator.wait_for_everyone()

    unpushed = []
    if accelerator.is_main_process:
        if args.push_to_hub and not todo:  # a rerun that only pushes
            push_unpushed(args, state, hub_repo, stop_at_failure=False)
        elif args.push_to_hub and not pushes.wait(args.hub_retry_max_time):  # what is left, within one budget
            logger.error(f"pushes still under way after --hub_retry_max_time {args.hub_retry_max_time:g} s: given up")
        unpushed = unpushed_iterations(state) if args.push_to_hub else []
        print_summary(output_dir, num_iterations, state)
    accelerator.end_training()
    if unpushed:
        errors = state.get("push_errors", {})
        lines = "\n".join(
            f"  iteration {it}: {output_dir / f'iter_{it}'} ({errors.get(str(it), 'not pushed')})" for it in unpushed
        )
        raise HubError(
            f"{len(unpushed)} iteration(s) trained and saved but not pushed:\n{lines}\n"
            f"Rerun the same command to push them (nothing is generated or trained again):\n  {args.command}"
        )


def iteration_subset(args, hf_dataset, captions, k, num_processes):
    """Iteration k's rows and captions: the prompts its training consumes (max_train_steps x the total batch),
    drawn from (seed, k) without repeats, or --gen_prompts_per_iteration of them; all when that is as many."""
    consumed = args.max_train_steps * args.train_batch_size * args.gradient_accumulation_steps * num_processes
    indices = iteration_prompts(len(captions), consumed, args.gen_prompts_per_iteration, args.seed, k)
    logger.info(
        f"iteration {k + 1}: {len(indices)} of {len(captions)} prompts get a sample (training consumes {consumed} "
        "pairs; --gen_prompts_per_iteration N|all changes it)"
    )
    if len(indices) == len(captions):
        return hf_dataset, captions
    return hf_dataset.select(indices), [captions[i] for i in indices]


def load_policy_and_reference(args, k, frozen, device):
    """theta_k as the trainable policy, plus the frozen reference (theta_k; the start model for DPO).
    LoRA iterations are adapters relative to the base model: iteration k's adapter initialises the
    trainable one and is kept frozen as the reference on the same UNet."""
    previous = Path(args.output_dir) / f"iter_{k}"
    is_lora = (previous / "pytorch_lora_weights.safetensors").exists()
    if k > 0 and is_lora != args.use_lora:  # a rerun that extends a run must build what it saved
        held, flag = ("a LoRA adapter", "with --use_lora") if is_lora else ("a full model", "without --use_lora")
        raise ModelError(f"{previous} holds {held}: this --output_dir was trained {flag}; rerun {flag}")
    if not args.use_lora:
        source = (str(previous), None) if k > 0 else (args.pretrained_model_name_or_path, args.revision)
        unet = frozen.family.load_denoiser(
            source[0], revision=source[1], variant=args.variant if k == 0 else None, cache_dir=args.cache_dir
        )
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if args.precompute_reference:  # the reference errors come from the generation phase: no frozen copy
            return unet.to(device), None
        reference = Reference.frozen_copy(unet, device, offload=args.offload_reference)  # fp32, as the policy
        return unet.to(device), reference
    unet = frozen.family.load_denoiser(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir
    )
    targets = (args.lora_target_modules or frozen.family.LORA_TARGETS).split(",")
    add_lora(unet, args.rank, args.lora_alpha, targets)
    ref_adapter = None
    if k > 0:
        load_lora(unet, previous)
    if k > 0 and not args.precompute_reference:
        add_lora(unet, args.rank, args.lora_alpha, targets, adapter_name="reference")
        load_lora(unet, previous, adapter_name="reference")
        unet.set_adapter("default")  # trains "default"; "reference" stays frozen
        ref_adapter = "reference"
    unet.to(device, frozen.dtype)
    store_frozen_in_fp8(unet, args.layerwise_casting, frozen.dtype)  # --layerwise_casting (None: off)
    for p in trainable_parameters(unet):  # adapter weights train in fp32
        p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, None if args.precompute_reference else Reference(unet, adapter=ref_adapter)


def opponent_pipeline(args, unet, frozen, device):
    pipeline = frozen.family.load_pipeline(
        args.pretrained_model_name_or_path,
        args.prediction_type,
        denoiser=unet,
        vae=frozen.vae,
        text=frozen.text,
        revision=args.revision,
        cache_dir=args.cache_dir,
    )
    sampler = opponent_scheduler(args)
    if sampler is not None:
        pipeline.scheduler = sampler
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def spin_forward(unet, reference, batch, generator, *, frozen, step, autocast):
    """One micro-batch of the SPIN / Diffusion-DPO loss: (loss, logged values).

    Each of the policy (`unet`) and the frozen reference theta_k has an error on the real image and one on the
    negative; `spin_loss` compares the policy's improvement over the reference on each side. What the errors are:
    - approximate (default): both latents noised at one random t per pair (shared noise by default); the error
      is the denoising MSE (min-SNR weighted with --snr_gamma). One policy forward over the 2B latents.
    - trajectory (exact): at K stored steps of the opponent's own sampling chain and at forward-posterior steps
      of the real image at the same t, the error is the likelihood-weighted squared distance between the
      model's conditional epsilon and the noise each pair implies. Difference of the two models' errors =
      the scaled per-step log-likelihood ratio (`utils/spin.py`, TrajectoryTable).
    The reference's errors come from one forward of `reference` before the policy's (switching LoRA adapters
    touches requires_grad), or, with --precompute_reference, from the batch."""
    real = real_latents(batch, vae=frozen.vae, generator=generator, dtype=frozen.dtype)
    objective = frozen.objective
    cond = pair_conditions(cast_conditions(batch_conditions(frozen.text, batch), real.device, real.dtype), batch)

    if step.objective == "trajectory":
        inputs = trajectory_inputs(
            batch, real, table=step.table, noise_scheduler=objective.scheduler, generator=generator
        )
        if step.precomputed:
            ref_err = torch.cat([batch["ref_err_real"], batch["ref_err_gen"]]).to(real.device)
        else:
            with torch.no_grad(), autocast():
                ref_err = trajectory_errors(reference, objective, inputs, cond, step.trajectory_steps)
        model_err = trajectory_errors(unet, objective, inputs, cond, step.trajectory_steps)
    else:
        pair = pair_inputs(
            batch,
            real,
            vae=frozen.vae,
            generator=generator,
            objective=objective,
            share_noise=step.share_noise,
            noise_offset=step.noise_offset,
        )
        if step.precomputed:
            ref_err = torch.cat([batch["ref_err_real"], batch["ref_err_gen"]]).to(real.device)
        else:
            with torch.no_grad(), autocast():
                ref_err, _ = pair_errors(reference, objective, pair, cond)
        model_err, timesteps = pair_errors(unet, objective, pair, cond)
        if step.snr_gamma:
            w = objective.weights(timesteps, step.snr_gamma)
            model_err, ref_err = model_err * w, ref_err * w

    m_real, m_gen = model_err.chunk(2)
    r_real, r_gen = ref_err.float().chunk(2)
    return spin_loss(m_real, m_gen, r_real, r_gen, step.beta, sft_weight=step.sft_weight)


def train_iteration(args, accelerator, k, *, it_dir, unet, reference, store, data, frozen, step, preempt):
    """One iteration's training phase on `data` = (dataset, column spec). Returns the iteration's metrics (first
    step, last step, means)."""
    hf_dataset, spec = data
    ema_unet = None
    if args.use_ema and not args.use_lora:
        from diffusers.training_utils import EMAModel

        ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema_unet.to(accelerator.device)
    hooks = register_checkpoint_hooks(accelerator, use_lora=args.use_lora, ema_model=ema_unet)
    base = TrainDataset(
        hf_dataset,
        spec,
        frozen.text.tokenizers,
        resolution=args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        seed=args.seed + k,
    )
    train_set = PairDataset(base, store)
    sampler = EpochSampler(len(train_set), seed=args.seed + k)
    train_dataloader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )
    optimizer = make_optimizer(
        trainable_parameters(unet),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam,
    )
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    max_train_steps = args.max_train_steps
    num_epochs = math.ceil(max_train_steps / math.ceil(len(train_dataloader) / args.gradient_accumulation_steps))
    lr_scheduler = accelerator.prepare(
        get_scheduler(
            args.lr_scheduler,
            optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
    )
    if accelerator.is_main_process and not accelerator.trackers:
        accelerator.init_trackers("train_spin_diffusion", config=tracker_config(args))

    global_step, first_epoch, skip_batches, micro_step = 0, 0, 0, 0
    checkpoint = resolve_resume_checkpoint(it_dir, "latest")  # the newest complete one
    last_good = checkpoint or (
        f"none in this iteration (it starts from {Path(args.output_dir) / f'iter_{k}'})"
        if k > 0
        else "none (the run starts from the start model)"
    )
    if checkpoint is not None:  # rerunning the same command resumes mid-iteration
        load_checkpoint(accelerator, checkpoint, optimizer, lr_scheduler, args.learning_rate)
        global_step = step_of(checkpoint)
        first_epoch, skip_batches, micro_step = resume_position(
            global_step, args.gradient_accumulation_steps, len(train_dataloader)
        )
        logger.info(f"iteration {k + 1}: resumed from {checkpoint} at step {global_step}")

    tally, skipped_images = IterationTally(checkpoint), 0  # running metrics: saved with checkpoints, resumed
    window, window_batches, overflows = 0.0, 0, 0
    progress = tqdm(
        range(max_train_steps),
        initial=global_step,
        desc=f"train (iteration {k + 1})",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        loader = (
            accelerator.skip_first_batches(train_dataloader, skip_batches)
            if epoch == first_epoch and skip_batches
            else train_dataloader
        )
        set_epoch(loader, train_set, sampler, epoch)
        unet.train()
        for batch in loader:
            micro_step += 1
            skipped_images += batch["num_skipped"]
            gen = step_generator(args.seed + k, micro_step, accelerator.process_index, accelerator.device)
            with accelerator.accumulate(unet):
                loss, step_logs = spin_forward(
                    unet, reference, batch, gen, frozen=frozen, step=step, autocast=accelerator.autocast
                )
                accelerator.backward(loss)
                window, window_batches = window + torch.stack([step_logs[name] for name in LOGGED]), window_batches + 1
                grad_norm = optimizer_step(accelerator, unet, optimizer, lr_scheduler, args.max_grad_norm)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            # averaged over the accumulation window and the processes, with the stop flag along (above 0: some
            # process was signalled), so one sync per optimizer step
            values = accelerator.reduce(torch.cat([window / window_batches, preempt.flag(window)]), "mean").tolist()
            stop = preempt.agreed(values.pop()) and global_step < max_train_steps
            window, window_batches = 0.0, 0
            logs = dict(zip(LOGGED, values)) | {"lr": lr_scheduler.get_last_lr()[0], "skipped_images": skipped_images}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            overflow = accelerator.optimizer_step_was_skipped  # fp16: the scaler skipped this step (weights unchanged)
            overflows = overflows + 1 if overflow else 0
            check_finite_step(
                logs,
                where=f"iteration {k + 1}, step {global_step}",
                last_checkpoint=last_good,
                skipped=overflow,
                skipped_in_a_row=overflows,
            )
            tally.add(logs, global_step, counted=not overflow)  # means count the steps that updated the weights
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(
                {f"{name}": v for name, v in logs.items()} | {"iteration": k + 1},
                step=k * max_train_steps + global_step,
            )
            if global_step % args.checkpointing_steps == 0 or stop:
                assert_finite_weights(unet, f"iteration {k + 1}, checkpoint-{global_step}", accelerator)
                last_good = save_checkpoint(
                    accelerator,
                    it_dir,
                    global_step,
                    args.checkpoints_total_limit,
                    extra_files=tally.files(),
                )
            if stop:
                preempt.stop(f"iteration {k + 1} is saved at step {global_step} in {last_good}")
            if global_step >= max_train_steps:
                break
    progress.close()
    if ema_unet is not None:
        ema_unet.copy_to(accelerator.unwrap_model(unet).parameters())
    for h in hooks:
        h.remove()
    metrics = tally.metrics(k, args.spin_objective, global_step)
    warning = saturation_warning(metrics, args.beta, args.learning_rate)
    if warning:
        logger.warning(warning)
    return metrics


def save_iteration(args, unet, *, it_dir, k, hub_repo, metrics, family, prompts, accelerator, dtype):
    """theta_{k+1} into iter_{k+1}/: LoRA weights (on the base model) or a full pipeline, the sample grid of every
    iteration so far on `prompts`, card, args, metrics."""
    assert_finite_weights(unet, f"iteration {k + 1}")  # a diverged model is never saved as a result
    it_dir.mkdir(parents=True, exist_ok=True)
    if args.use_lora:
        save_lora(unet, it_dir)
    else:
        family.load_pipeline(
            args.pretrained_model_name_or_path,
            args.prediction_type,
            denoiser=unet,
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        ).save_pretrained(it_dir, safe_serialization=True)
    save_args(args, it_dir / "training_args.json")
    (it_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if prompts:  # none with --num_validation_images 0 and no --validation_prompts: no grid
        grid, images = iteration_grid(
            args.output_dir,
            k + 1,
            prompts,
            functools.partial(iteration_pipeline, args, family),
            seed=args.seed,
            num_inference_steps=args.validation_num_inference_steps,
            guidance_scale=args.gen_guidance_scale,
            resolution=args.resolution,
            device=accelerator.device,
            autocast_dtype=dtype if dtype != torch.float32 else None,
        )
        log_images(accelerator, [grid], [f"iterations 0-{k + 1}"], k + 1, tag="iterations")
    note = real_error_sentence(metrics)  # whether the real images got less likely
    write_iteration_card(args, it_dir, k, hub_repo, metrics, family.PIPELINE_CLASSES[0], note)


def cli(argv=None):
    """The command line: bad input, a diverged run or an unpushed iteration end with one `error:` line."""
    preempt = Preemption()
    try:
        main(parse_args(argv), preempt)
    except Preempted as e:  # saved: the status tells a requeue loop to run the command again
        print(f"\npreempted: {e}", file=sys.stderr)  # on a line of its own, after any progress bar
        sys.exit(PREEMPTED_EXIT)
    except (DataError, ModelError, HubError, DivergedError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    finally:
        preempt.restore()


if __name__ == "__main__":
    cli()
