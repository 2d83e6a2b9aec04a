#!/usr/bin/env python
"""SFT baseline of SPIN-Diffusion: fine-tune a Stable Diffusion UNet with the plain denoising loss on the
preferred images of Pick-a-Pic (ties dropped), or on any image-caption dataset. Full or LoRA.

    accelerate launch train_sft.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset_name sayakpaul/pickapic_v2_webdataset --use_lora --output_dir sd15-sft-lora

The output folder loads with `StableDiffusionPipeline.from_pretrained(output_dir)` (full) or
`pipe.load_lora_weights(output_dir)` (LoRA). If the push fails, the result stays saved and rerunning the same
command pushes it without training again.
"""

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from utils.args import (
    HELP_GROUPS,
    add_data_args,
    add_hub_args,
    add_model_args,
    add_training_args,
    make_parser,
    parse_with_config,
    public_args,
    regroup,
    rerun_command,
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
    LatentCache,
    StreamingTrainDataset,
    TrainDataset,
    caption_of,
    collate,
    load_training_dataset,
    set_epoch,
)
from utils.families import model_family, refuse_flags, save_lora
from utils.generation import log_images, make_grid, render
from utils.hub import HubError, describe, hub_user, push_folder, validate_repo_name, write_model_card
from utils.losses import sample_noise, sft_loss, step_generator
from utils.models import (
    ModelError,
    add_lora,
    batch_conditions,
    check_model_source,
    encode_images,
    make_optimizer,
    optimize_unet,
    store_frozen_in_fp8,
    trainable_parameters,
    vae_latent_params,
)
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


def parse_args(input_args=None):
    parser = make_parser(__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser)
    add_hub_args(parser)
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Images in the final sample grid when no --validation_prompts are given (training captions are used; "
        "0: no grid).",
    )
    for title, dests in HELP_GROUPS.items():
        regroup(parser, title, dests)
    args = parse_with_config(parser, input_args)
    args = validate_training_args(parser, args)
    args.command = rerun_command("train_sft.py", sys.argv[1:] if input_args is None else input_args)
    return args


def main(args, preempt=None):
    """The run. `preempt` (utils/training.py Preemption): SIGTERM / SIGUSR1 stop it after the optimizer step under
    way, with a checkpoint (None: signals keep their default action)."""
    preempt = preempt or Preemption(install=False)
    output_dir = Path(args.output_dir)
    # 0. Hub identity and the model first: a bad token, repo id or model name fails in seconds.
    if args.push_to_hub:
        validate_repo_name(args.hub_model_id or output_dir.resolve().name)
        hub_user(args.hub_token, args.hub_retry_max_time, repo_id=args.hub_model_id)
    check_model_source(args.pretrained_model_name_or_path, args.revision, args.hub_token)
    family = model_family(args.pretrained_model_name_or_path, args.revision, args.hub_token)  # SD, SDXL, ...
    refuse_flags(family, args)  # flags the family cannot honour (e.g. --weighting_scheme on SD)
    state = RunState(output_dir / "sft_state.json")
    if args.push_to_hub and state.get("trained") == settings_key(args) and not state.get("pushed"):
        if os.environ.get("RANK", "0") == "0":  # before the Accelerator exists: the launcher's rank
            print(f"{output_dir} already holds this run's result (sft_state.json): pushing it without training")
            push_result(args, state)
        return
    accelerator = init_run(args)
    if accelerator.is_main_process:
        state.update(trained=None)  # until this run's result is saved, output_dir holds no pushable result

    # 1. Data first: a bad path, column or empty split fails here, before any model is loaded.
    hf_dataset, spec = load_training_dataset(args, accelerator.num_processes, accelerator.process_index)
    logger.info(
        f"dataset {args.dataset_name} ({spec['kind']}): "
        f"{'streaming' if args.streaming else f'{len(hf_dataset)} examples'} after filtering"
    )

    # 2. Models: only the UNet trains; VAE and text encoder are frozen in the compute dtype.
    set_seed(args.seed)
    frozen = load_frozen_components(args, accelerator, family)
    text, vae, _, dtype, _ = frozen
    unet = family.load_denoiser(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir
    )
    ema_unet = None
    if args.use_lora:
        add_lora(unet, args.rank, args.lora_alpha, (args.lora_target_modules or family.LORA_TARGETS).split(","))
        unet.to(accelerator.device, dtype)
        store_frozen_in_fp8(unet, args.layerwise_casting, dtype)  # --layerwise_casting (None: off)
        for p in trainable_parameters(unet):  # adapter weights train in fp32
            p.data = p.data.float()
    optimize_unet(unet, channels_last=args.channels_last, compile=args.torch_compile)  # before EMA copies the layout
    if args.use_ema:  # full fine-tuning only (--use_lora refuses it)
        from diffusers.training_utils import EMAModel

        ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema_unet.to(accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    register_checkpoint_hooks(accelerator, use_lora=args.use_lora, ema_model=ema_unet)

    # 3. Training examples, optionally from a latent cache built once.
    if args.streaming:
        train_set = StreamingTrainDataset(
            hf_dataset,
            spec,
            text.tokenizers,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            seed=args.seed,
            empty_prompt_prob=args.proportion_empty_prompts,
        )
        sampler = None
    else:
        train_set = TrainDataset(
            hf_dataset,
            spec,
            text.tokenizers,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            seed=args.seed,
            empty_prompt_prob=args.proportion_empty_prompts,
        )
        if args.cache_latents:
            key = LatentCache.make_key(
                model=args.pretrained_model_name_or_path,
                revision=args.revision,
                variant=args.variant,
                data=getattr(hf_dataset, "_fingerprint", args.dataset_name),
                spec=spec,
                n=len(train_set),
                res=args.resolution,
                crop=args.center_crop,
                flip=args.random_flip,
                seed=args.seed,
            )
            cache = LatentCache(output_dir / "latent_cache", len(train_set), key)
            cache.build(
                train_set,
                lambda px: vae_latent_params(vae, px),
                batch_size=args.train_batch_size,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                progress=accelerator.is_local_main_process,
            )
            accelerator.wait_for_everyone()
            train_set.latent_cache = cache
            vae.to("cpu")  # the steps read cached latents: the VAE waits on the CPU (validation renders bring it back)
        sampler = EpochSampler(len(train_set), seed=args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )

    unet.to(accelerator.device)  # before the optimizer: fused AdamW needs the parameters on the GPU
    optimizer = make_optimizer(
        trainable_parameters(unet),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam,
    )
    if args.streaming:  # already split by node; accelerate must not shard it again
        unet, optimizer = accelerator.prepare(unet, optimizer)
        steps_per_epoch = None
        max_train_steps = args.max_train_steps
        num_epochs = sys.maxsize
    else:
        unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_sft", config=tracker_config(args))

    # 4. Resume: restore weights, optimizer, scheduler, EMA; skip the batches already seen this epoch.
    global_step, first_epoch, skip_batches, micro_step = 0, 0, 0, 0
    checkpoint = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    last_good = checkpoint or "none (the run starts from the start model)"
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info("no checkpoint to resume from in %s: starting a new run", output_dir)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, optimizer, lr_scheduler, args.learning_rate)
        global_step = step_of(checkpoint)
        first_epoch, skip_batches, micro_step = resume_position(
            global_step, args.gradient_accumulation_steps, None if args.streaming else len(train_dataloader)
        )
        logger.info(
            f"resumed from {checkpoint} at step {global_step} (epoch {first_epoch}, skipping {skip_batches} batches)"
        )

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"training: {max_train_steps} optimizer steps, {total_batch} images per step, "
        f"{'LoRA rank ' + str(args.rank) if args.use_lora else 'full UNet'}"
    )
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="sft", disable=not accelerator.is_local_main_process
    )
    skipped_images, logs, window_loss, window_batches, overflows = 0, {}, 0.0, 0, 0
    # 5. The loop: plain denoising loss on the real images.
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        set_epoch(loader, train_set, sampler, epoch)
        unet.train()
        for batch in loader:
            micro_step += 1
            skipped_images += batch["num_skipped"]
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            gen = step_generator(args.seed, micro_step, accelerator.process_index, accelerator.device)
            with accelerator.accumulate(unet):
                loss = sft_forward(
                    unet, batch, gen, frozen=frozen, noise_offset=args.noise_offset, snr_gamma=args.snr_gamma
                )
                accelerator.backward(loss)
                window_loss, window_batches = window_loss + loss.detach(), window_batches + 1
                grad_norm = optimizer_step(accelerator, unet, optimizer, lr_scheduler, args.max_grad_norm)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            # the loss averaged over the accumulation window and the processes, with the stop flag along (above 0:
            # some process was signalled), so one sync per optimizer step
            mean_loss = window_loss.reshape(1) / window_batches
            loss_value, flag = accelerator.reduce(torch.cat([mean_loss, preempt.flag(mean_loss)]), "mean").tolist()
            stop = preempt.agreed(flag) and global_step < max_train_steps
            logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
            window_loss, window_batches = 0.0, 0
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            overflows = overflows + 1 if accelerator.optimizer_step_was_skipped else 0  # fp16 scaler skips
            check_finite_step(
                logs,
                where=f"step {global_step}",
                last_checkpoint=last_good,
                skipped=accelerator.optimizer_step_was_skipped,
                skipped_in_a_row=overflows,
            )
            if skipped_images:
                logs["skipped_images"] = skipped_images
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or stop:
                assert_finite_weights(unet, f"checkpoint-{global_step}", accelerator)
                last_good = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                logger.info(f"saved {last_good}")
            if stop:
                rerun = "rerun the same command" + (
                    "" if args.resume_from_checkpoint == "latest" else " with --resume_from_checkpoint latest"
                )
                preempt.stop(f"saved at step {global_step} in {last_good}", rerun)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                run_validation(args, accelerator, unet, frozen=frozen, ema_unet=ema_unet, step=global_step)
            if global_step >= max_train_steps:
                break
    progress.close()
    skipped_images = int(accelerator.reduce(torch.tensor(skipped_images, device=accelerator.device), "sum"))
    if skipped_images:
        logger.warning(
            f"replaced {skipped_images} undecodable images by the next good ones "
            "(counted each time they came up, summed over processes)"
        )

    # 6. Save the result (diffusers pipeline or LoRA weights), a sample grid, the model card; push.
    accelerator.wait_for_everyone()
    unet = model_for_saving(accelerator, unet)  # every process: under FSDP the shards are gathered here
    if accelerator.is_main_process:
        pipeline = save_result(args, unet, ema_unet=ema_unet, family=family)
        prompts = args.validation_prompts
        if not prompts and not args.streaming:  # no prompts given: show what it learned on training captions
            head = hf_dataset.select(range(min(args.num_validation_images, len(hf_dataset))))
            prompts = [caption_of(c) for c in head[spec["caption"]]]
        if prompts:
            images = render(
                pipeline.to(accelerator.device),
                [str(p) for p in prompts],
                seed=args.seed,
                num_inference_steps=args.validation_num_inference_steps,
                resolution=args.resolution,
                autocast_dtype=dtype if dtype != torch.float32 else None,
            )
            make_grid(images).save(output_dir / "validation_grid.png")
            log_images(accelerator, images, prompts, global_step)
        write_model_card(
            output_dir,
            base_model=args.pretrained_model_name_or_path,
            dataset=args.dataset_name,
            title=f"SFT {'LoRA ' if args.use_lora else ''}fine-tune of {args.pretrained_model_name_or_path}",
            description="Supervised fine-tuning (plain denoising loss) on the preferred images of the dataset: "
            "the SFT "
            "baseline of SPIN-Diffusion (Yuan et al., NeurIPS 2024), trained with `train_sft.py`.",
            tags=["sft", "lora"] if args.use_lora else ["sft"],
            hyperparameters={
                k: getattr(args, k)
                for k in (
                    "learning_rate",
                    "lr_scheduler",
                    "lr_warmup_steps",
                    "train_batch_size",
                    "gradient_accumulation_steps",
                    "resolution",
                    "mixed_precision",
                    "use_8bit_adam",
                    "use_lora",
                    "rank",
                    "snr_gamma",
                    "use_ema",
                    "seed",
                )
            }
            | {"prediction_type": frozen.scheduler.config.get("prediction_type")}
            | {"max_train_steps": max_train_steps, "images_per_step": total_batch},
            metrics={"final_loss": logs["loss"]} if "loss" in logs else None,
        )
        state.update(trained=settings_key(args), step=global_step, pushed=None)
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        push_result(args, state)


def settings_key(args):
    """What the result depends on (every flag but the Hub, logging and resume ones): a rerun with the same key
    and an unpushed result only pushes."""
    ignored = {
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "hub_retry_max_time",
        "report_to",
        "logging_dir",
        "resume_from_checkpoint",
        "dataloader_num_workers",
        "config",
    }
    settings = {k: v for k, v in public_args(args).items() if k not in ignored}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def push_result(args, state):
    """Push output_dir (retried on transient failures). If it still fails, the result stays saved, sft_state.json
    records the error, and HubError tells the user to rerun the same command (which then only pushes)."""
    output_dir = Path(args.output_dir)
    try:
        repo_id = push_folder(
            output_dir,
            args.hub_model_id or output_dir.resolve().name,
            token=args.hub_token,
            private=args.hub_private_repo,
            commit_message=f"train_sft.py: step {state.get('step')}",
            max_time=args.hub_retry_max_time,
        )
    except Exception as e:
        state.update(push_error=describe(e))
        raise HubError(
            f"the result is saved in {output_dir} but the push failed ({describe(e)}). Rerun the same "
            f"command to push it (nothing is trained again):\n  {args.command}"
        ) from e
    state.update(pushed=repo_id, push_error=None)
    print(f"pushed to {repo_id}")


def sft_forward(unet, batch, generator, *, frozen, noise_offset=0.0, snr_gamma=None):
    """One micro-batch of the plain denoising loss on the real images (`frozen`: the VAE, text encoders, the
    family's training objective and the compute dtype): the family's own per-sample training error, averaged."""
    latents = encode_images(frozen.vae, batch, generator, frozen.dtype)
    noise = sample_noise(latents, generator, noise_offset)
    timesteps = frozen.objective.draw(latents.shape[0], generator, latents.device)
    cond = batch_conditions(frozen.text, batch)
    if "image_size" in batch:  # SDXL's size conditioning of each real image
        cond["image_size"] = batch["image_size"].to(latents.device)
    weights = frozen.objective.weights(timesteps, snr_gamma) if snr_gamma else None
    return sft_loss(frozen.objective.errors(unet, latents, noise, timesteps, cond), weights)


def save_result(args, unet, *, ema_unet, family):
    """Write the LoRA weights or the full pipeline into output_dir; return a pipeline for the sample grid."""
    kw = dict(
        prediction_type=args.prediction_type, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir
    )
    if args.use_lora:
        assert_finite_weights(unet, "the result")
        save_lora(unet, args.output_dir)
        pipeline = family.load_pipeline(args.pretrained_model_name_or_path, **kw)
        pipeline.load_lora_weights(args.output_dir)
        return pipeline
    if ema_unet is not None:
        ema_unet.copy_to(unet.parameters())
    assert_finite_weights(unet, "the result")  # a diverged model is never saved as a result
    pipeline = family.load_pipeline(args.pretrained_model_name_or_path, denoiser=unet, **kw)
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    return pipeline


def run_validation(args, accelerator, unet, *, frozen, ema_unet, step):
    """Render the validation prompts with the current weights (the EMA weights when kept) and log them."""
    text, vae, _, dtype, family = frozen
    model = accelerator.unwrap_model(unet)
    if ema_unet is not None:
        ema_unet.store(model.parameters())
        ema_unet.copy_to(model.parameters())
    pipeline = family.load_pipeline(
        args.pretrained_model_name_or_path,
        args.prediction_type,
        denoiser=model,
        vae=vae,
        text=text,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        torch_dtype=dtype,
    ).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    images = render(
        pipeline,
        args.validation_prompts,
        seed=args.seed,
        num_inference_steps=args.validation_num_inference_steps,
        resolution=args.resolution,
        autocast_dtype=dtype if dtype != torch.float32 else None,
    )
    log_images(accelerator, images, args.validation_prompts, step)
    make_grid(images).save(Path(args.output_dir) / f"validation_step_{step}.png")
    if ema_unet is not None:
        ema_unet.restore(model.parameters())
    if args.cache_latents:
        vae.to("cpu")
    model.train()


def cli(argv=None):
    """The command line: bad input, a diverged run or a failed push end with one `error:` line."""
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
