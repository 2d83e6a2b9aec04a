"""train_spin_diffusion.py's own flags (the SPIN, generation and iteration-grid ones) and the checks between them
that run before anything loads. Needs its siblings `args.py` (the flags both scripts share, the help groups) and
`spin.py` (which flags the trajectory objective refuses)."""

from .args import HELP_GROUPS, hide_flags, prompt_count, regroup
from .spin import trajectory_flag_error


def add_spin_args(parser):
    """The SPIN group and the generation group, the shared groups regrouped for --help, the train_sft.py flags
    hidden (refused here), and the SPIN recipe's defaults."""
    g = parser.add_argument_group("SPIN")
    g.add_argument("--num_iterations", type=int, default=3, help="Self-play iterations K (the paper releases 3).")
    g.add_argument(
        "--beta",
        type=float,
        default=5000.0,
        help="Loss strength, Diffusion-DPO convention (beta/2 inside the sigmoid), on the family's own per-sample "
        "error. Default 5000 is unconfirmed for SPIN; 2000-5000 are plausible for SD and SDXL. Flow models (SD3, "
        "Flux) have velocity errors of another scale: start lower (their example configs say 1000; peers use "
        "100-5000 on SD3).",
    )
    g.add_argument(
        "--sft_weight",
        type=float,
        default=0.0,
        help="lambda: add lambda x the policy's denoising error on the real images (the SFT loss) to the SPIN loss, "
        "against likelihood drift (the margin growing while the real images get less likely too). 0: the paper.",
    )
    g.add_argument(
        "--no_share_noise", action="store_true", help="Draw separate noise for the generated latent (default: shared)."
    )
    g.add_argument(
        "--negative_source",
        choices=["self", "dataset"],
        default="self",
        help="self: SPIN (the previous iterate's samples). dataset: the Pick-a-Pic loser with the start model as "
        "reference, one iteration (Diffusion-DPO).",
    )
    g.add_argument(
        "--precompute_reference",
        action="store_true",
        help="Draw each pair's t and noise during generation and compute the reference errors there, with theta_k "
        "already loaded; the real latents and text embeddings are stored too. Training then runs no reference, "
        "VAE or text encoder (both wait on the CPU). Fixes each pair's t, noise and real latent (center crop, "
        "no flip) for the iteration. Disk: ~180 KB per prompt per iteration for SD-1.5 in bf16.",
    )
    g.add_argument(
        "--offload_reference",
        action="store_true",
        help="Full fine-tuning: keep the frozen reference UNet on the CPU between uses.",
    )
    g.add_argument("--gen_num_inference_steps", type=int, default=50)
    g.add_argument(
        "--gen_guidance_scale",
        type=float,
        default=None,
        help="The opponent's guidance. Default: its pipeline's (SD 7.5, SDXL 5, SD3 7; Flux.1 3.5, its embedding).",
    )
    g.add_argument(
        "--gen_scheduler",
        choices=["model", "ddim", "ddpm", "dpmsolver", "unipc"],
        default="model",
        help="Sampler for the opponent, built from the model's scheduler config: its own, DDIM, DDPM, "
        "DPM-Solver++ 2M or UniPC (the last two match 50 DDIM steps in about 20: docs/performance.md).",
    )
    g.add_argument(
        "--gen_eta",
        type=float,
        default=None,
        help="DDIM's eta for the opponent: 0 (the default) is deterministic, 1 is DDPM-like noise. DDPM ignores it; "
        "flow models refuse it.",
    )
    g.add_argument(
        "--spin_objective",
        choices=["approximate", "trajectory"],
        default="approximate",
        help="approximate: forward-noise the opponent's final sample at a random t (SPIN.md's loss). trajectory: "
        "the exact objective, the per-step likelihood ratio on K stored steps of the opponent's own "
        "stochastic sampling chain against forward-posterior steps of the real image; needs --gen_scheduler "
        "ddpm, or ddim with --gen_eta > 0. Which one produced the paper's numbers is unconfirmed.",
    )
    g.add_argument(
        "--trajectory_steps",
        type=int,
        default=1,
        help="--spin_objective trajectory: chain steps stored and trained per sample (K). Storage: 2K fp32 "
        "latents per sample, K x 128 KiB for SD-1.5 at 512 px.",
    )
    g.add_argument("--gen_batch_size", type=int, default=8)
    g.add_argument(
        "--gen_shard_size", type=int, default=256, help="Samples per synthetic shard (the unit of resumption)."
    )
    g.add_argument(
        "--gen_prompts_per_iteration",
        type=prompt_count,
        default=None,
        help="Prompts an iteration generates for and trains on, drawn anew each iteration (N, or all). Default: "
        "as many as its steps consume (max_train_steps x total batch), so no sample is generated unused.",
    )
    g.add_argument(
        "--push_synthetic_dataset", action="store_true", help="Also upload each iteration's samples as a dataset repo."
    )
    g.add_argument(
        "--hub_versioning",
        choices=["repos", "revisions"],
        default="repos",
        help="repos: iteration N goes to {hub_model_id}-iterN. revisions: one repo, iteration N tagged iterN.",
    )
    g.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Without --validation_prompts: this many training captions make each iteration's sample grid (0: no "
        "grid).",
    )
    gen = [a.dest for a in parser._actions if a.dest.startswith("gen_") and a.dest != "gen_prompts_per_iteration"]
    regroup(parser, "generation (the opponent's samples)", gen + ["gen_prompts_per_iteration", "trajectory_steps"])
    for title, dests in HELP_GROUPS.items():
        regroup(parser, title, [d for d in dests if d != "validation_steps"])
    hide_flags(parser, "streaming", "cache_latents", "validation_steps", "proportion_empty_prompts")  # refused here
    next(a for a in parser._actions if a.dest == "validation_prompts").help = (
        "Prompts rendered after each iteration, beside every iteration before it (theta_0 first): the grid in the "
        "iteration's folder, model card and tracker. Default: --num_validation_images training captions."
    )
    # SPIN.md's per-iteration recipe (from the released models' cards): lr 2e-5, linear, 200 warmup, 500 steps.
    parser.set_defaults(learning_rate=2e-5, lr_scheduler="linear", lr_warmup_steps=200, max_train_steps=500)


def check_spin_args(parser, args):
    """parser.error (one `error:` line, exit 2) on a SPIN flag out of range or a combination SPIN refuses."""
    if args.streaming:
        parser.error(
            "--streaming is not supported by SPIN: every training prompt gets a generated sample; "
            "use --max_train_samples to train on a subset"
        )
    for name in (
        "num_iterations",
        "beta",
        "gen_batch_size",
        "gen_shard_size",
        "gen_num_inference_steps",
        "trajectory_steps",
    ):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.sft_weight < 0:
        parser.error(f"--sft_weight must be >= 0, got {args.sft_weight}")
    if args.gen_guidance_scale is not None and args.gen_guidance_scale < 0:
        parser.error(f"--gen_guidance_scale must be >= 0, got {args.gen_guidance_scale}")
    if args.gen_eta is not None and args.gen_eta < 0:
        parser.error(f"--gen_eta must be >= 0, got {args.gen_eta}")
    if args.spin_objective == "trajectory" and trajectory_flag_error(args):
        parser.error(trajectory_flag_error(args))
    if args.precompute_reference and args.negative_source == "dataset":
        parser.error("--precompute_reference works with --negative_source self (it runs during the generation phase)")
    if args.precompute_reference and (args.noise_offset or args.random_flip):
        parser.error(
            "--precompute_reference fixes each pair's noise and real latent: drop --noise_offset / --random_flip"
        )
    if args.offload_reference and (args.use_lora or args.precompute_reference):
        why = (
            "with --use_lora the reference is the policy UNet with theta_k's adapter switched in"
            if args.use_lora
            else "with --precompute_reference training holds no reference"
        )
        parser.error(f"--offload_reference offloads a full fine-tune's frozen reference copy; {why}: drop it")
    if args.resume_from_checkpoint not in (None, "latest"):
        parser.error(
            "train_spin_diffusion.py resumes by itself from output_dir (iteration, phase, newest checkpoint): "
            "rerun the same command, optionally with --resume_from_checkpoint latest"
        )
    if args.cache_latents or args.validation_steps or args.proportion_empty_prompts:
        parser.error(
            "--cache_latents / --validation_steps / --proportion_empty_prompts are train_sft.py flags; SPIN stores "
            "its own latents and renders --validation_prompts after each iteration"
        )
    if args.push_synthetic_dataset and not args.push_to_hub:
        parser.error("--push_synthetic_dataset needs --push_to_hub")
    if args.push_to_hub and args.hub_retry_max_time >= args.ddp_timeout / 2:
        parser.error(
            f"--hub_retry_max_time {args.hub_retry_max_time:g} must stay well under --ddp_timeout "
            f"{args.ddp_timeout} (the other processes wait while the main one pushes): at most half of it"
        )
