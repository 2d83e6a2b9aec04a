#!/usr/bin/env python
"""Per-step time and peak memory of the project's own training steps (`train_sft.sft_forward`,
`train_spin_diffusion.spin_forward`), side by side with a naive SPIN step written here (separate
forwards for real and generated, a second full UNet as the reference).

    python bench/bench_step.py --preset cpu-medium --cases sft:full:fp32:adamw:gc0,spin:full:fp32:adamw:gc0
    python bench/bench_step.py --preset sd15 --device cuda --batch 1            # the whole matrix on a GPU

A case is MODE:PARAMS:PRECISION:OPTIMIZER:GC[:OPTS] with MODE in sft, spin (in-loop reference), spin-pre
(reference errors precomputed during generation), dpo (loser encoded by the VAE each step) and naive;
PARAMS full or lora; PRECISION fp32 or bf16; OPTIMIZER adamw or adamw8bit; GC gc0 or gc1; OPTS, joined
with "+", any of emb (cached text embeddings: the batch carries them and the text encoder is gone; always so
for spin-pre, as --precompute_reference stores them), cl (--channels_last) and compile (--torch_compile).
`--batch B` is B samples for sft and B pairs (2B UNet samples) for the others. Real images come as cached
VAE latents (as with --cache_latents), prompts as token ids. Each case runs in a fresh process (peak RSS on
CPU is per process; on GPU torch.cuda.max_memory_allocated). Timings: median over --steps after --warmup.
"""

import argparse
import contextlib
import copy
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("sft", "spin", "spin-pre", "dpo", "naive")
OPTS = ("emb", "cl", "compile")
STDERR_TAIL = 30  # lines of a failed case's stderr shown
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


class Setup(NamedTuple):
    """A preset's models: the denoiser, its family module, the frozen text side (None: the preset has no text
    encoders and the batch carries random conditioning of `cond_shapes`, as --precompute_reference stores it), the
    VAE, the training noise scheduler and the resolution."""

    denoiser: Any
    family: Any
    text: Any
    vae: Any
    scheduler: Any
    resolution: int
    cond_shapes: dict


def build_models(preset, device):
    """The preset's `Setup` with random weights, nothing downloaded."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils import family_sd

    torch.manual_seed(0)
    if preset in FAMILY_PRESETS:
        with torch.device(device):
            return build_family(preset)
    if preset == "sd15":
        cfg = ROOT / "bench" / "configs" / "sd15"
        unet = UNet2DConditionModel.from_config(json.loads((cfg / "unet.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((cfg / "vae.json").read_text()))
        te_cfg = {
            k: v
            for k, v in json.loads((cfg / "text_encoder.json").read_text()).items()
            if k not in ("architectures", "model_type")
        }
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        scheduler = DDPMScheduler.from_config(json.loads((cfg / "scheduler.json").read_text()))
        return Setup(unet, family_sd, family_sd.Prompts(None, text_encoder), vae, scheduler, 512, {})
    if preset == "tiny":
        sys.path.insert(0, str(ROOT / "examples"))
        from make_tiny_assets import build_tiny_pipeline

        path = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd")
        text, vae, unet, scheduler = family_sd.load_components(str(path))
        text.tokenizers.tokenizer = None  # the batch brings random ids, as for the other SD presets
        return Setup(unet, family_sd, text, vae, scheduler, 32, {})
    if preset == "cpu-medium":  # big enough that UNet compute dominates on a CPU
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            cross_attention_dim=256,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=1000,
                max_position_embeddings=77,
            )
        )
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        return Setup(unet, family_sd, family_sd.Prompts(None, text_encoder), vae, scheduler, 512, {})
    raise SystemExit(f"unknown preset {preset}")


# The families beyond SD-1.5, each with its real denoiser config (random weights) at 1024 px, or as a tiny
# pipeline of examples/make_tiny_families.py: tiny-* at 32 px (the CPU rehearsal), cpu-* at 128 px (the CPU
# step table). The real presets hold no text encoders: their
# batches carry random conditioning of the real shapes, as --precompute_reference stores it (training then runs
# no text encoder; the encoders' memory is in the README's arithmetic).
FAMILY_PRESETS = ("sdxl", "sd35m", "flux-dev", "tiny-sdxl", "tiny-sd3", "tiny-flux", "cpu-sdxl", "cpu-sd3", "cpu-flux")


def build_family(preset):
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from utils import family_flux, family_sd3, family_sdxl

    if preset.startswith(("tiny-", "cpu-")):  # the test pipelines: at 32 px, or at 128 px for CPU step tables
        sys.path.insert(0, str(ROOT / "examples"))
        import make_tiny_families

        kind, name = preset.split("-")
        resolution = 32 if kind == "tiny" else 128
        path = make_tiny_families.BUILDERS[name](Path(tempfile.mkdtemp()) / name, resolution=resolution)
        family = {"sdxl": family_sdxl, "sd3": family_sd3, "flux": family_flux}[name]
        text, vae, denoiser, scheduler = family.load_components(str(path), max_sequence_length=32)
        return Setup(denoiser, family, text, vae, scheduler, resolution, {})
    vae_kw = dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    if preset == "sdxl":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(latent_channels=4, scaling_factor=0.13025, **vae_kw)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        cond = {"prompt_embeds": (77, 2048), "pooled_prompt_embeds": (1280,)}
        return Setup(unet, family_sdxl, None, vae, scheduler, 1024, cond)
    if preset == "sd35m":
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )
        vae = AutoencoderKL(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, **vae_kw)
        cond = {"prompt_embeds": (77 + 256, 4096), "pooled_prompt_embeds": (2048,)}
        return Setup(transformer, family_sd3, None, vae, FlowMatchEulerDiscreteScheduler(shift=3.0), 1024, cond)
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    vae = AutoencoderKL(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, **vae_kw)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    cond = {"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)}
    return Setup(transformer, family_flux, None, vae, scheduler, 1024, cond)


def parse_case(case):
    fields = case.split(":")
    opts = set(fields.pop().split("+")) if len(fields) == 6 else set()
    if len(fields) != 5:
        raise SystemExit(
            f"bad case {case!r}: MODE:full|lora:fp32|bf16:adamw|adamw8bit:gc0|gc1[:OPTS], MODE in {MODES}"
        )
    mode, params, precision, optim, gc = fields
    if (
        mode not in MODES
        or params not in ("full", "lora")
        or precision not in ("fp32", "bf16")
        or optim not in ("adamw", "adamw8bit")
        or gc not in ("gc0", "gc1")
        or not opts <= set(OPTS)
        or (opts and mode == "naive")
        or ("cl" in opts and optim == "adamw8bit")
    ):
        raise SystemExit(
            f"bad case {case!r}: MODE:full|lora:fp32|bf16:adamw|adamw8bit:gc0|gc1[:OPTS], MODE in {MODES}, "
            f"OPTS a '+'-joined subset of {OPTS} (none for naive; no cl with adamw8bit, which the scripts refuse)"
        )
    return mode, params == "lora", precision == "bf16", optim == "adamw8bit", gc == "gc1", opts


class CachedText:
    """The text side of a preset without text encoders: the batch always carries the conditioning."""

    def __init__(self, keys):
        self.COND_KEYS = tuple(keys)

    def __call__(self, batch):
        raise RuntimeError("this preset has no text encoders: the batch must carry its conditioning")


def latent_shape(setup):
    """(channels, h, w) of the VAE's latents at the preset's resolution."""
    h = setup.resolution // 2 ** (len(setup.vae.config.block_out_channels) - 1)
    return setup.vae.config.latent_channels, h, h


def make_batch(mode, B, setup, objective, device):
    """A batch as the data layer gives it: cached VAE distributions of the real images, token ids (random for
    the SD presets, real ones for the tiny families) or, for presets without text encoders, the conditioning
    itself; the size conditioning; the opponent's latents; the precomputed reference's entries."""
    from utils.data import generated_size

    c, h, w = latent_shape(setup)
    g = torch.Generator().manual_seed(0)
    batch = {"latent_params": torch.randn(B, 2 * c, h, w, generator=g)}
    if setup.text is None:
        batch |= {name: torch.randn(B, *shape, generator=g) for name, shape in setup.cond_shapes.items()}
    elif setup.text.tokenizers.tokenizer is None:
        vocab = setup.text.text_encoder.config.vocab_size
        batch["input_ids"] = torch.randint(0, vocab, (B, 77), generator=g)
    else:
        batch |= setup.text.tokenizers.ids([f"a photo of thing number {i}, oil painting" for i in range(B)])
    batch["image_size"] = batch["negative_image_size"] = torch.stack([generated_size(setup.resolution)] * B)
    if mode in ("spin", "spin-pre", "naive"):
        batch["gen_latents"] = torch.randn(B, c, h, w, generator=g)
    if mode == "spin-pre":
        batch.pop("latent_params")
        batch |= {
            "real_latents": torch.randn(B, c, h, w, generator=g),
            "timesteps": objective.draw(B, g, "cpu"),
            "noise_seed": torch.arange(B),
            "ref_err_real": torch.rand(B, generator=g),
            "ref_err_gen": torch.rand(B, generator=g),
        }
    if mode == "dpo":
        batch["loser_pixel_values"] = torch.rand(B, 3, setup.resolution, setup.resolution, generator=g) * 2 - 1
    return {k: v.to(device) if k != "noise_seed" else v for k, v in batch.items()}


def conditions(frozen, batch):
    """The batch's conditioning for one side, with its size conditioning."""
    from utils.models import batch_conditions

    cond = batch_conditions(frozen.text, batch)
    return cond | {"image_size": batch["image_size"]}


def naive_step(unet, ref_unet, frozen, batch, generator, beta=5000.0):
    """The obvious SPIN step: policy and reference each run twice (real, then generated), the reference is a
    second full denoiser. Same maths as spin_forward, none of its batching."""
    from utils.losses import spin_loss
    from utils.models import encode_images

    real = encode_images(frozen.vae, batch, generator, frozen.dtype)
    gen = batch["gen_latents"].to(real.dtype)
    noise = torch.randn(real.shape, generator=generator, device=real.device, dtype=real.dtype)
    t = frozen.objective.draw(real.shape[0], generator, real.device)
    cond = conditions(frozen, batch)
    errs = {}
    for name, x0 in (("real", real), ("gen", gen)):
        with torch.no_grad():
            errs["r_" + name] = frozen.objective.errors(ref_unet, x0, noise, t, cond)
        errs["m_" + name] = frozen.objective.errors(unet, x0, noise, t, cond)
    return spin_loss(errs["m_real"], errs["m_gen"], errs["r_real"], errs["r_gen"], beta)


def run_case(case, preset, B, steps, warmup, device):
    import train_sft
    import train_spin_diffusion
    from utils.models import (
        FrozenComponents,
        Reference,
        add_lora,
        freeze,
        make_optimizer,
        optimize_unet,
        trainable_parameters,
    )

    mode, lora, bf16, use_8bit, gc, opts = parse_case(case)
    device = torch.device(device)
    # the real family presets are built on the device (a 12B transformer initialised on a CPU takes minutes)
    setup = build_models(preset, device if preset in FAMILY_PRESETS[:3] else "cpu")
    unet, family, vae = setup.denoiser, setup.family, setup.vae
    dtype = torch.bfloat16 if bf16 else torch.float32
    text = setup.text if setup.text is not None else CachedText(setup.cond_shapes)
    freeze(vae, *([text] if setup.text is not None else []))
    vae.to(device, torch.float32 if family.VAE_UPCAST else dtype)
    if setup.text is not None:
        text.to(device, dtype)
    reference = ref_unet = None
    if lora:
        add_lora(unet, rank=4, alpha=4, target_modules=family.LORA_TARGETS.split(","))
        unet.to(device, dtype)
        for p in trainable_parameters(unet):
            p.data = p.data.float()
        if mode in ("spin", "dpo", "naive"):
            reference = Reference(unet, adapter=None)  # theta_0 = the base: adapters off, same denoiser
            ref_unet = copy.deepcopy(unet).requires_grad_(False) if mode == "naive" else None
    else:
        unet.to(device)
        if mode in ("spin", "dpo"):
            reference = Reference.frozen_copy(unet, device)  # as the script: fp32, the policy's dtype
        if mode == "naive":
            ref_unet = copy.deepcopy(unet).requires_grad_(False)  # the naive reference: a full fp32 copy
    if gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimize_unet(unet, reference, channels_last="cl" in opts, compile="compile" in opts)
    optimizer = make_optimizer(
        trainable_parameters(unet), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, use_8bit_adam=use_8bit
    )
    frozen = FrozenComponents(text, vae, family.objective(setup.scheduler, None), dtype, family)
    batch = make_batch(mode, B, setup, frozen.objective, device)
    has_ids = setup.text is not None
    if has_ids and ("emb" in opts or mode == "spin-pre"):
        # cached text embeddings (stored with --precompute_reference): no text encoder
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            cond = text(batch)
        batch = {k: v for k, v in batch.items() if not k.startswith("input_ids")}
        batch |= {k: v.to(dtype) for k, v in cond.items()}
        text.to("cpu")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    spin_step = train_spin_diffusion.SpinStep(
        objective="approximate",
        precomputed=mode == "spin-pre",
        beta=5000.0,
        share_noise=True,
        noise_offset=0.0,
        snr_gamma=None,
        table=None,
        trajectory_steps=1,
    )

    def step(i):
        gen = torch.Generator(device=device).manual_seed(i)
        with autocast():
            if mode == "sft":
                loss = train_sft.sft_forward(unet, batch, gen, frozen=frozen)
            elif mode == "naive":
                loss, _ = naive_step(unet, ref_unet or reference.copy, frozen, batch, gen)
            else:
                loss, _ = train_spin_diffusion.spin_forward(
                    unet, reference, batch, gen, frozen=frozen, step=spin_step, autocast=autocast
                )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    text_encoder_s = None
    if any(k.startswith("input_ids") for k in batch):  # what cached text embeddings would save per step
        te_times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad(), autocast():
                text(batch)
            sync()
            te_times.append(time.perf_counter() - t0)
        text_encoder_s = statistics.median(te_times)
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        step(warmup + i)
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        "case": case,
        "preset": preset,
        "family": family.PIPELINE_CLASSES[0],
        "batch": B,
        "unet_samples": B if mode == "sft" else 2 * B,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "steps": steps,
        "device": str(device),
        "text_encoder_s": text_encoder_s,
        "text_encoder_gib": (
            sum(p.numel() * p.element_size() for p in text.parameters()) / 2**30 if setup.text is not None else None
        ),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
        if bf16:
            result["unet_mfu"] = unet_mfu(unet, frozen, batch, mode, B, result["step_s"], device)
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def unet_mfu(unet, frozen, batch, mode, B, step_s, device):
    """Denoiser model FLOPs utilisation: the FLOPs a step needs (forward+backward on the policy samples,
    forward only on the reference samples), per second, over the GPU's bf16 dense peak."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1].to(device) for k, v in conditions(frozen, batch).items()}
    latents = batch["gen_latents"] if "gen_latents" in batch else batch["latent_params"]
    x = torch.randn(1, frozen.vae.config.latent_channels, *latents.shape[2:], device=device)
    t = frozen.objective.draw(1, torch.Generator(device=device), device)
    with FlopCounterMode(display=False) as fwd, torch.autocast("cuda", dtype=torch.bfloat16):
        frozen.objective.forward(unet, x, t, one).sum()
    f = fwd.get_total_flops()
    policy, ref = (B, 0) if mode == "sft" else (2 * B, 0 if mode == "spin-pre" else 2 * B)
    # forward + backward: 3x the forward for full fine-tuning (input and weight gradients), ~2x for LoRA
    # (the frozen base weights need no weight gradients)
    backward_factor = 2 if any("lora" in n for n, _ in unet.named_parameters()) else 3
    flops = backward_factor * f * policy + f * ref
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
    return None if peak is None else flops / step_s / (peak * 1e12)


def all_cases(modes):
    return [
        ":".join(c)
        for c in itertools.product(modes, ("full", "lora"), ("fp32", "bf16"), ("adamw", "adamw8bit"), ("gc0", "gc1"))
    ]


def table(results):
    def rest(r, opts=True):  # the case without its mode (and without its OPTS for the naive lookup)
        fields = r["case"].split(":")[1:]
        return (":".join(fields if opts else fields[:4]), r["batch"])

    sft = {rest(r): r["step_s"] for r in results if r["case"].startswith("sft:")}
    naive = {rest(r, opts=False): r["step_s"] for r in results if r["case"].startswith("naive:")}
    mem_key = "peak_mem_gib" if any("peak_mem_gib" in r for r in results) else "peak_rss_gib"
    lines = [
        f"| case | batch | UNet samples | step (ms) | {mem_key.replace('_', ' ')} | / SFT step same batch | / naive "
        "| MFU "
        "| text encoder fwd (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        vs_sft = f"{r['step_s'] / sft[rest(r)]:.2f}x" if rest(r) in sft and not r["case"].startswith("sft:") else ""
        vs_naive = (
            f"{r['step_s'] / naive[rest(r, False)]:.2f}x"
            if rest(r, False) in naive and not r["case"].startswith("naive:")
            else ""
        )
        mfu = f"{100 * r['unet_mfu']:.0f}%" if r.get("unet_mfu") else ""
        te = f"{1000 * r['text_encoder_s']:.0f}" if r.get("text_encoder_s") is not None else ""
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['unet_samples']} | {1000 * r['step_s']:.0f} | {r[mem_key]:.2f} | "
            f"{vs_sft} | {vs_naive} | {mfu} | {te} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "cpu-medium", "sd15", *FAMILY_PRESETS], default="tiny")
    p.add_argument("--cases", default="all", help="Comma-separated cases, or 'all' (the whole matrix incl. naive).")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="One or more batch sizes (B samples / B pairs).")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="Write the results here (JSON list, updated after every case).")
    p.add_argument("--in_process", action="store_true", help="Run cases in this process (no per-case peak memory).")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:  # child process: one case, one batch size, JSON on stdout's last line
        case, B = a._one.rsplit("@", 1)
        print(json.dumps(run_case(case, a.preset, int(B), a.steps, a.warmup, a.device)))
        return
    cases = all_cases(MODES) if a.cases == "all" else [c.strip() for c in a.cases.split(",") if c.strip()]
    for c in cases:
        parse_case(c)
    results, failed = [], []
    for B in a.batch:
        for case in cases:
            if a.in_process:
                try:
                    r = run_case(case, a.preset, B, a.steps, a.warmup, a.device)
                except Exception:
                    failed.append(f"{case} batch {B}")
                    print(f"{case} batch {B}: FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                    continue
            else:
                cmd = [
                    sys.executable,
                    __file__,
                    "--preset",
                    a.preset,
                    "--steps",
                    str(a.steps),
                    "--warmup",
                    str(a.warmup),
                    "--device",
                    a.device,
                    "--_one",
                    f"{case}@{B}",
                ]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false")
                )
                if (
                    proc.returncode != 0
                ):  # the other cases still run; the child's own error is shown, and the exit fails
                    failed.append(f"{case} batch {B}")
                    tail = "\n".join(proc.stderr.strip().splitlines()[-STDERR_TAIL:]) or "(no stderr)"
                    print(
                        f"{case} batch {B}: FAILED (exit {proc.returncode}), its stderr ends:\n{tail}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{case} batch {B}: {1000 * r['step_s']:.1f} ms", file=sys.stderr, flush=True)
            if a.json:  # after every case: a long run that is stopped keeps what it measured
                Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if failed:
        sys.exit(f"error: {len(failed)} of {len(a.batch) * len(cases)} cases failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
