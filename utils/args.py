"""Command-line flags shared by the training scripts, `--config FILE.yaml`, and `training_args.json`.

Flag names follow diffusers' `train_text_to_image.py`. Each script builds its parser from the groups
below, adds its own flags, and calls `parse_with_config`. Validation that needs no model or data runs
in `validate_training_args`, so a bad command line fails in a second, not after a model download.
Needs no sibling module: it can be copied on its own.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import yaml

SECRET_KEYS = ("hub_token",)
NOT_RECORDED = SECRET_KEYS + ("command",)  # `command`: the rerun command line the scripts print, set after parsing


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        required=False,
        help="Hub id or local folder of a diffusers pipeline of a supported family, one utils/family_*.py each "
        "(e.g. runwayml/stable-diffusion-v1-5); another class stops with an error naming the supported ones.",
    )
    g.add_argument(
        "--revision", type=str, default=None, help="Revision (branch, tag or commit) of the pretrained model."
    )
    g.add_argument("--variant", type=str, default=None, help="Weight variant of the pretrained model, e.g. fp16.")
    g.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Override the scheduler's prediction type. Default: the model's own.",
    )
    g.add_argument(
        "--use_lora",
        action="store_true",
        help="Train a LoRA adapter on the UNet attention projections instead of the full UNet.",
    )
    g.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha. Default: equal to --rank (scale 1).")
    g.add_argument(
        "--lora_target_modules",
        type=str,
        default=None,
        help="Comma-separated denoiser module names that get LoRA adapters. Default per family: the attention "
        "projections to_k,to_q,to_v,to_out.0 (SD, SDXL), plus the text stream's add_k_proj,add_q_proj,add_v_proj,"
        "to_add_out (SD3, Flux.1).",
    )
    g.add_argument(
        "--layerwise_casting",
        choices=["fp8_e4m3fn", "fp8_e5m2"],
        default=None,
        help="With --use_lora: store the frozen denoiser's weights in this fp8 dtype and upcast each layer to the "
        "compute dtype as it runs (diffusers' enable_layerwise_casting; norms, embeddings and the LoRA adapters "
        "stay as they are). Half the frozen base's memory against bf16, at some precision.",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE (folder or Hub repo of an AutoencoderKL) to use instead of the pipeline's, e.g. "
        "madebyollin/sdxl-vae-fp16-fix, whose fp16 / bf16 encodes do not overflow as SDXL's own VAE does (which "
        "therefore runs in fp32).",
    )
    f = parser.add_argument_group("flow matching (SD3.x, Flux.1; refused for the DDPM families)")
    f.add_argument(
        "--weighting_scheme",
        choices=["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"],
        default=None,
        help="How training draws sigma, and weights the loss, as diffusers' SD3 and Flux scripts do. Default: "
        "none (uniform, unweighted).",
    )
    f.add_argument("--logit_mean", type=float, default=None, help="logit_normal's mean. Default 0.")
    f.add_argument("--logit_std", type=float, default=None, help="logit_normal's standard deviation. Default 1.")
    f.add_argument("--mode_scale", type=float, default=None, help="mode's scale. Default 1.29.")
    f.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens per prompt. Default: 256 for SD3.x (its pipeline's), 512 for Flux.1-dev (256: schnell).",
    )
    f.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Flux.1-dev: the guidance embedding's value in training (diffusers' Flux scripts: 3.5). Default 3.5; "
        "refused for models without a guidance embedding.",
    )
    return g


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id (e.g. sayakpaul/pickapic_v2_webdataset, a copy of the removed "
        "yuvalkirstain/pickapic_v2), a local folder, a .parquet/.json/.csv file, or webdataset .tar shards "
        "(a file or a glob).",
    )
    g.add_argument("--dataset_config_name", type=str, default=None, help="Dataset configuration name on the Hub.")
    g.add_argument("--dataset_split", type=str, default="train", help="Split to train on.")
    g.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the dataset instead of downloading it (Pick-a-Pic train is hundreds of GB). "
        "Needs --max_train_steps.",
    )
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    g.add_argument("--caption_column", type=str, default="caption", help="Column with the prompt.")
    g.add_argument(
        "--image_0_column", type=str, default="jpg_0", help="Pick-a-Pic: column with the first image (JPEG bytes)."
    )
    g.add_argument("--image_1_column", type=str, default="jpg_1", help="Pick-a-Pic: column with the second image.")
    g.add_argument(
        "--label_0_column",
        type=str,
        default="label_0",
        help="Pick-a-Pic: preference label of image 0 (1 = preferred, 0 = not, 0.5 = tie; ties are dropped).",
    )
    g.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="Plain image-caption dataset: column with the image. Set it to train on a non-Pick-a-Pic dataset.",
    )
    g.add_argument(
        "--unique_prompts",
        action="store_true",
        help="Keep one example per unique prompt (the first). Whether SPIN did this is unconfirmed; default off.",
    )
    g.add_argument(
        "--max_train_samples", type=int, default=None, help="Truncate the (filtered) dataset to this many examples."
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Training resolution in pixels (images are resized and cropped to it).",
    )
    g.add_argument("--center_crop", action="store_true", help="Center-crop to --resolution (default: random crop).")
    g.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    g.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="train_sft.py: share of examples whose caption is replaced by the empty prompt (caption dropout), "
        "which trains the unconditional prediction that classifier-free guidance needs. Default 0.",
    )
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every training image with the VAE once before training and reuse the latents "
        "(not with --streaming).",
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes (0: load in the main process).",
    )
    return g


def add_training_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument(
        "--output_dir", type=str, default="output", help="Where the model, checkpoints and logs are written."
    )
    g.add_argument(
        "--seed", type=int, default=0, help="Seed for data order, noise and timesteps; a run is reproducible from it."
    )
    g.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    g.add_argument(
        "--channels_last",
        action="store_true",
        help="UNet weights and activations in channels-last (NHWC) layout. Can speed up convolutions on a GPU; "
        "no gain measured on CPU (README, Performance; bench/gpu_opts.sh measures it on a GPU).",
    )
    g.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the UNet (and the reference's copy). The first steps, and the first generation batch, "
        "compile first (minutes); on CPU no gain measured (README, Performance; bench/gpu_opts.sh measures it "
        "on a GPU).",
    )
    g.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: the accelerate config's. fp16 needs a GPU; bf16 also works on CPU.",
    )
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by batch size x accumulation x processes."
    )
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument(
        "--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (saves ~75%% of optimizer memory)."
    )
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting gamma (5.0 is the usual value). Default off.",
    )
    g.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0.1 is common). Default off.")
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an EMA of the UNet weights and save it as the result (full fine-tuning).",
    )
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument(
        "--ddp_timeout",
        type=int,
        default=7200,
        help="Seconds processes wait for each other (e.g. while the main one saves and pushes) before failing.",
    )
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="Prompts rendered every --validation_steps and at the end (the model card's sample grid).",
    )
    g.add_argument(
        "--validation_steps", type=int, default=None, help="Render validation images every N optimizer steps."
    )
    g.add_argument("--validation_num_inference_steps", type=int, default=30)
    g.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint-N every N optimizer steps."
    )
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoint-N folders."
    )
    g.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint-N folder, or "latest" for the newest one in --output_dir.',
    )
    return g


def add_hub_args(parser):
    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the result and its model card to the Hub.")
    g.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Repo to push to. Default: the name of --output_dir under your account.",
    )
    g.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Hub token. Default: the cached login (huggingface-cli login) or HF_TOKEN.",
    )
    g.add_argument("--hub_private_repo", action="store_true", help="Create the repo as private.")
    g.add_argument(
        "--hub_retry_max_time",
        type=float,
        default=600.0,
        help="Seconds a push keeps retrying on 429, 5xx or dropped connections (exponential backoff, honouring "
        "Retry-After). A push that still fails leaves the result saved; rerunning the same command pushes it.",
    )
    return g


def parse_with_config(parser, input_args=None):
    """Parse `input_args` (sys.argv when None); keys of `--config FILE.yaml` become defaults, so the
    command line wins over the file. Unknown keys in the file are an error naming them."""
    parser.add_argument(
        "--config", type=str, default=None, help="YAML file whose keys are flag names; command-line flags override it."
    )
    pre, _ = parser.parse_known_args(input_args)
    if pre.config:
        path = Path(pre.config)
        if not path.is_file():
            parser.error(f"--config {pre.config}: file not found")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            parser.error(f"--config {pre.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        config = {k.lstrip("-").replace("-", "_"): v for k, v in config.items()}
        unknown = sorted(set(config) - known - {"config"})
        if unknown:
            parser.error(f"--config {pre.config}: unknown keys {unknown}")
        by_dest = {a.dest: a for a in parser._actions}
        parser.set_defaults(**{k: config_value(parser, pre.config, by_dest[k], v) for k, v in config.items()})
    return parser.parse_args(input_args)


def config_value(parser, path, action, value):
    """A --config file's value for `action`, checked and converted as the same flag on the command line would be
    (type, choices, one value or a list, true/false); parser.error naming the key otherwise."""
    key = action.dest
    if action.nargs == 0:  # store_true
        value = False if value is None else value
        if not isinstance(value, bool):
            parser.error(f"--config {path}: {key} takes true or false, got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many and not isinstance(value, list):
        value = [value]  # `validation_prompts: a red fox` is one prompt, not one per character
    if not many and isinstance(value, (list, dict)):
        parser.error(f"--config {path}: {key} takes one value, got {value!r}")

    def convert(item):
        if item is False and action.choices is not None and "no" in action.choices:
            item = "no"  # YAML reads a bare `no` as false: `mixed_precision: no`
        try:
            item = action.type(item if isinstance(item, str) else str(item)) if action.type else item
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            parser.error(f"--config {path}: {key}: invalid value {item!r} ({e})")
        if action.choices is not None and item not in action.choices:
            parser.error(
                f"--config {path}: {key}: invalid choice {item!r} (choose from {', '.join(map(str, action.choices))})"
            )
        return item

    return [convert(item) for item in value] if many else convert(value)


def validate_training_args(parser, args):
    """Checks that need neither models nor data. Calls parser.error (exit code 2) with the problem."""
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required")
    if args.dataset_name is None:
        parser.error("--dataset_name is required (a Hub dataset id, a local folder or a .parquet file)")
    if args.use_ema and args.use_lora:
        parser.error("--use_ema and --use_lora conflict: EMA is for full fine-tuning; drop one of them")
    if args.layerwise_casting and not args.use_lora:
        parser.error(
            "--layerwise_casting needs --use_lora: it stores the frozen base weights in fp8, and full fine-tuning "
            "trains them"
        )
    if args.channels_last and args.use_8bit_adam:
        parser.error(
            "--channels_last and --use_8bit_adam conflict: bitsandbytes makes every parameter contiguous at each "
            "step (the layout is dropped after step 1) and pairs its 8-bit states with weights by memory address "
            "(a resume with the other layout would scramble them); drop one of them"
        )
    if args.streaming and args.cache_latents:
        parser.error("--streaming and --cache_latents conflict: a latent cache needs the whole dataset on disk")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a streamed dataset has no length to count epochs by)")
    if args.streaming and args.unique_prompts:
        parser.error("--streaming and --unique_prompts conflict: deduplication needs the whole caption column")
    if args.validation_steps is not None and not args.validation_prompts:
        parser.error("--validation_steps needs --validation_prompts")
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "resolution",
        "rank",
        "checkpointing_steps",
        "validation_num_inference_steps",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    tracker_packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}
    tracker_packages |= {"mlflow": ("mlflow",), "clearml": ("clearml",), "aim": ("aim",), "dvclive": ("dvclive",)}
    if args.report_to in tracker_packages and not any(map(importlib.util.find_spec, tracker_packages[args.report_to])):
        parser.error(
            f"--report_to {args.report_to}: the {tracker_packages[args.report_to][0]} package is not installed "
            f"(pip install {tracker_packages[args.report_to][0]}), or pass --report_to none"
        )
    if args.num_validation_images < 0:
        parser.error(f"--num_validation_images must be >= 0 (0: no sample grid), got {args.num_validation_images}")
    for name in ("max_train_steps", "max_train_samples", "validation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be >= 1")
    if not 0 <= args.proportion_empty_prompts < 1:
        parser.error(f"--proportion_empty_prompts must be in [0, 1), got {args.proportion_empty_prompts}")
    if args.resolution % 8 != 0:
        parser.error(f"--resolution must be a multiple of 8, got {args.resolution}")
    for name in ("learning_rate", "hub_retry_max_time"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed} (a run is reproducible from its seed)")
    if args.dataloader_num_workers < 0:
        parser.error(
            f"--dataloader_num_workers must be >= 0 (0: load in the main process), got {args.dataloader_num_workers}"
        )
    if args.output_dir.startswith("~"):  # from a config file or a quoted argument, where no shell expands it
        args.output_dir = os.path.expanduser(args.output_dir)
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir}: exists and is not a folder")
    if args.pretrained_model_name_or_path.startswith("~"):
        args.pretrained_model_name_or_path = os.path.expanduser(args.pretrained_model_name_or_path)
    model = args.pretrained_model_name_or_path
    if Path(model).is_file():
        parser.error(
            f"--pretrained_model_name_or_path {model}: a single file; the scripts load a diffusers pipeline folder "
            "(a single-file checkpoint converts with the pipeline class's from_single_file(...).save_pretrained(DIR))"
        )
    if not Path(model).expanduser().is_dir() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        parser.error(
            f"--pretrained_model_name_or_path {model}: no such folder (give a local diffusers pipeline "
            f"folder or a Hub repo id such as runwayml/stable-diffusion-v1-5)"
        )
    mixed = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed == "fp16" and not _has_fp16_device():
        parser.error(
            "--mixed_precision fp16 needs a GPU and none is visible; use --mixed_precision bf16 (works on CPU) or no"
        )
    if args.resume_from_checkpoint not in (None, "latest"):
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir() and not (Path(args.output_dir) / path).is_dir():
            parser.error(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder "
                f"(give a path, a checkpoint-N name inside --output_dir, or 'latest')"
            )
        if not re.fullmatch(r"checkpoint-\d+", path.name):
            parser.error(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a checkpoint-N folder written by "
                f"--checkpointing_steps"
            )
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    return args


def rerun_command(script, argv):
    """The command line that reruns `script` with `argv` (the token, if given on it, shown as $HF_TOKEN)."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--hub_token" and i + 1 < len(argv):
            argv[i + 1] = "$HF_TOKEN"
        elif a.startswith("--hub_token="):
            argv[i] = "--hub_token=$HF_TOKEN"
    return f"accelerate launch {script} " + " ".join(
        a if a == "$HF_TOKEN" or a.endswith("=$HF_TOKEN") else shlex.quote(a) for a in argv
    )


def _has_fp16_device():
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def public_args(args):
    """The args as a JSON-safe dict without secrets (what goes into training_args.json, trackers and cards)."""
    out = {}
    for k, v in vars(args).items():
        if k in NOT_RECORDED:
            continue
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)
    return out


def save_args(args, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(public_args(args), indent=2, sort_keys=True) + "\n")


def tracker_config(args):
    """Trackers (tensorboard hparams) accept scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in public_args(args).items()}


def make_parser(description):
    # no abbreviated flags: `--hub_tok hf_...` would slip past the masking of the token in printed commands
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )


def prompt_count(value):
    """--gen_prompts_per_iteration: a positive count, or all."""
    if value == "all" or (value.isdigit() and int(value) > 0):
        return value if value == "all" else int(value)
    raise argparse.ArgumentTypeError(f"expected a positive number of prompts or 'all', got {value!r}")


def hide_flags(parser, *dests):
    """Keep flags a script refuses parseable (so the refusal can say which script takes them) but out of its
    --help, which lists only what the script accepts."""
    for action in parser._actions:
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def regroup(parser, title, dests):
    """Move the flags `dests` into the --help group `title` (created at the end), in the order given."""
    group = parser.add_argument_group(title)
    by_dest = {a.dest: a for a in parser._actions}
    for dest in dests:
        action = by_dest[dest]
        for other in parser._action_groups:
            if action in other._group_actions:
                other._group_actions.remove(action)
        group._group_actions.append(action)
    return group


HELP_GROUPS = {  # the --help groups both scripts share beyond model, data, training and the script's own
    "checkpoints": ("checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint"),
    "logging and validation": (
        "logging_dir",
        "report_to",
        "validation_prompts",
        "validation_steps",
        "num_validation_images",
        "validation_num_inference_steps",
    ),
}
