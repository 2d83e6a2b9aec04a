"""SPIN-Diffusion's per-pair pieces, shared by the training step and the generation phase, for both objectives:
- approximate: the inputs of a (real, negative) pair (one t, shared noise by default) and a model's errors on it;
- trajectory (exact): the opponent sampler's step table, the recorder of its chain steps, the real side's
  forward-posterior pairs and a model's likelihood-weighted errors on both sides;
and the reference errors precomputed while the opponent theta_k is in memory (so training needs no reference);
and what an iteration's metrics say about it: a saturated margin, the likelihood drift on the real images, the
run's summary table; and which flags the trajectory objective refuses.
Needs its siblings `data.py`, `losses.py` and `models.py`."""

import contextlib
import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch

from .data import caption_of, generated_size, tokenize
from .losses import (
    forward_posterior_pair,
    per_sample_mse,
    sample_noise,
    sampler_prev_timestep,
    sampler_step_coefficients,
)
from .models import ModelError, encode_images, to_model_latents


class PairInputs(NamedTuple):
    """A batch of (real, negative) pairs as the approximate objective noises them: one t per pair, and noise
    shared by both latents unless --no_share_noise."""

    real: torch.Tensor
    negative: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    noise_negative: torch.Tensor


def seeded_noise(seeds, shape, device, dtype, share_noise=True):
    """Per-sample noise from per-sample seeds: (noise for the real latent, noise for the negative)."""
    real, neg = [], []
    for s in seeds.tolist():
        g = torch.Generator(device=device).manual_seed(int(s))
        real.append(torch.randn(shape, generator=g, device=device, dtype=dtype))
        neg.append(real[-1] if share_noise else torch.randn(shape, generator=g, device=device, dtype=dtype))
    return torch.stack(real), torch.stack(neg)


def real_latents(batch, *, vae, generator, dtype):
    """The batch's real latents: stored ones (`real_latents`, with precomputed reference errors), else sampled
    from cached VAE distributions or encoded by the VAE (`encode_images`)."""
    if "real_latents" in batch:
        return batch["real_latents"].to(generator.device, dtype)
    return encode_images(vae, batch, generator, dtype)


def pair_inputs(batch, real, *, vae, generator, objective, share_noise=True, noise_offset=0.0):
    """The approximate objective's `PairInputs`. The negative is the opponent's latent (`gen_latents`, SPIN) or
    the dataset's loser image encoded by the VAE (`loser_pixel_values`, Diffusion-DPO). t and noise come from the
    batch when it carries them (`timesteps`, `noise_seed`: drawn ahead with precomputed reference errors), else
    from `generator` (the noise, then t by the family's `objective.draw`)."""
    device = generator.device
    if "gen_latents" in batch:
        negative = batch["gen_latents"].to(device, real.dtype)
    else:
        negative = encode_images(vae, {"pixel_values": batch["loser_pixel_values"]}, generator, real.dtype)
    if "timesteps" in batch:
        noise, noise_neg = seeded_noise(batch["noise_seed"], real.shape[1:], device, real.dtype, share_noise)
        return PairInputs(real, negative, batch["timesteps"].to(device), noise, noise_neg)
    noise = sample_noise(real, generator, noise_offset)
    t = objective.draw(real.shape[0], generator, device)
    noise_neg = (
        noise if share_noise else torch.randn(noise.shape, generator=generator, device=device, dtype=noise.dtype)
    )
    return PairInputs(real, negative, t, noise, noise_neg)


def pair_conditions(cond, batch):
    """The conditioning of the concatenated (real, negative) rows: the prompt's twice, and, where the batch has
    them, each side's image size and crop (`image_size`, `negative_image_size`: SDXL's micro-conditioning)."""
    both = {name: torch.cat([t, t]) for name, t in cond.items()}
    if "image_size" in batch and "negative_image_size" in batch:
        device = next(iter(cond.values())).device
        both["image_size"] = torch.cat([batch["image_size"], batch["negative_image_size"]]).to(device)
    return both


def pair_errors(model, objective, pair, cond):
    """Per-sample errors (2B,) of `model` on the concatenated (real, negative) batch: one forward. `cond` is the
    pair's conditioning (`pair_conditions`); returns (errors, timesteps (2B,))."""
    latents = torch.cat([pair.real, pair.negative])
    noise, timesteps = torch.cat([pair.noise, pair.noise_negative]), torch.cat([pair.timesteps, pair.timesteps])
    return objective.errors(model, latents, noise, timesteps, cond), timesteps


def stored_real_latents(vae, real_pixels, sample_seeds, dtype):
    """Real latents as --precompute_reference stores them: a VAE sample with a per-sample seed, rounded to fp16
    (what training will read back), on the VAE's device."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    device = vae.device
    dist = DiagonalGaussianDistribution(vae.encode(real_pixels.to(device, vae.dtype)).latent_dist.parameters)
    eps = torch.stack(
        [
            torch.randn(
                dist.mean.shape[1:],
                generator=torch.Generator(device=device).manual_seed(int(s)),
                device=device,
                dtype=dist.mean.dtype,
            )
            for s in sample_seeds
        ]
    )
    return to_model_latents(vae, dist.mean + dist.std * eps).half().float()


@torch.no_grad()
def precompute_reference(
    reference,
    real_pixels,
    gen_latents,
    batch,
    sample_seeds,
    *,
    vae,
    text,
    objective,
    dtype,
    share_noise=True,
    autocast=contextlib.nullcontext,
):
    """For a chunk of prompts, while theta_k is loaded: the real latents (VAE sample with a per-sample seed),
    one t and noise seed per pair, theta_k's errors on both latents and the text conditioning. `batch` holds the
    chunk's token ids (and image sizes). Training on these runs no reference forward, VAE or text encoder;
    `pair_inputs` rebuilds exactly the same t and noise from them."""
    device = gen_latents.device
    real = stored_real_latents(vae, real_pixels, sample_seeds, dtype)
    gen = gen_latents.half().float()  # stored in fp16 like the generated latents: errors on what training reads
    timesteps = torch.cat(
        [objective.draw(1, torch.Generator().manual_seed(int(s) + 1), "cpu") for s in sample_seeds]
    ).to(device)
    noise_seeds = torch.tensor([int(s) + 2 for s in sample_seeds], dtype=torch.int64)
    stored = {"gen_latents": gen, "timesteps": timesteps, "noise_seed": noise_seeds}
    pair = pair_inputs(
        stored, real, vae=vae, generator=torch.Generator(device=device), objective=objective, share_noise=share_noise
    )
    # The text conditioning is stored too (in the compute dtype, exactly what the step would compute): training
    # then needs no text encoder.
    cond = text(batch)
    with autocast():
        err, _ = pair_errors(reference, objective, pair, pair_conditions(cond, batch))
    r_real, r_gen = err.float().chunk(2)
    return {
        "real_latents": real.half().cpu(),
        "timesteps": timesteps.cpu(),
        "noise_seed": noise_seeds,
        "ref_err_real": r_real.cpu(),
        "ref_err_gen": r_gen.cpu(),
        **{name: t.cpu() for name, t in cond.items()},
    }


# ----------------------------------------------------------------------------- the exact (trajectory) objective


class TrajectoryTable:
    """The opponent sampler's stochastic steps: for each timestep t it samples from, the Gaussian step's (a, b,
    sigma) (`sampler_step_coefficients`) and its likelihood weight b^2 / sigma^2, normalised to mean 1 over the
    steps. With the normalised weight, beta keeps the approximate objective's scale: each side's error is
    `weight * mean((eps - eps_hat)^2)`, and -(2 / (D * mean weight)) times the exact log-likelihood ratio of the
    step (D = latent size) is the difference of the two models' errors."""

    def __init__(self, sampler, eta):
        rows = {}
        for t in (int(t) for t in sampler.timesteps):
            if sampler_prev_has_noise(sampler, t, eta):
                rows[t] = sampler_step_coefficients(sampler, t, eta)
        if not rows:
            raise ValueError(
                "the opponent's sampler adds no noise at any step: the trajectory objective needs a "
                "stochastic one (DDPM, or DDIM with --gen_eta > 0)"
            )
        self.sampler, self.eta = sampler, eta
        weights = {t: b * b / (s * s) for t, (a, b, s) in rows.items()}
        self.mean_weight = sum(weights.values()) / len(weights)
        self.timesteps = sorted(rows, reverse=True)
        self.rows = {t: (a, b, s, weights[t] / self.mean_weight) for t, (a, b, s) in rows.items()}

    def columns(self, timesteps, device):
        """(a, b, sigma, weight) as fp32 tensors shaped like `timesteps`."""
        values = torch.tensor([self.rows[int(t)] for t in timesteps.flatten().tolist()], dtype=torch.float64)
        return [values[:, i].reshape(timesteps.shape).to(device, torch.float32) for i in range(4)]


def reference_extras(args, real_images, unet, *, frozen, step, accelerator):
    """For --precompute_reference: per generated chunk, the real latents, the noise seeds (and t), theta_k's
    errors and the text embeddings, for the objective in use."""

    def extras(indices, seeds, outputs):
        rows = [real_images.ds[i] for i in indices]
        decoded = [real_images.pixels(real_images.image_value(row), i) for row, i in zip(rows, indices)]
        valid = torch.tensor([d is not None for d in decoded])  # an undecodable real image: replaced at training time
        blank = (torch.zeros(3, args.resolution, args.resolution), generated_size(args.resolution))
        pixels, sizes = (torch.stack(column) for column in zip(*(d if d is not None else blank for d in decoded)))
        captions = [caption_of(row[real_images.spec["caption"]]) for row in rows]
        batch = tokenize(real_images.tokenizer, captions) | {
            "image_size": sizes,
            "negative_image_size": torch.stack([generated_size(args.resolution)] * len(rows)),
        }
        common = dict(
            vae=frozen.vae,
            text=frozen.text,
            objective=frozen.objective,
            dtype=frozen.dtype,
            autocast=accelerator.autocast,
        )
        if step.objective == "trajectory":
            trajectory = {name: t.to(accelerator.device) for name, t in outputs.items() if name.startswith("traj_")}
            out = precompute_trajectory_reference(unet, pixels, trajectory, batch, seeds, table=step.table, **common)
        else:
            out = precompute_reference(
                unet,
                pixels,
                outputs["latents"].to(accelerator.device),
                batch,
                seeds,
                share_noise=step.share_noise,
                **common,
            )
        return out | {"valid": valid, "image_size": sizes}

    return extras


def sampler_prev_has_noise(sampler, t, eta):
    """Whether `sampler`'s step from t is stochastic (has a likelihood)."""
    try:
        sampler_step_coefficients(sampler, t, eta)
    except ValueError as e:
        if "no likelihood" in str(e):
            return False
        raise
    return True


class TrajectoryRecorder:
    """Wraps a scheduler's `step` during one pipeline call and keeps, per sample, the steps whose index is drawn
    for it: (t, x_t, x_prev) exactly as the sampler made them (the guided prediction moved the chain)."""

    def __init__(self, scheduler, chosen):
        self.scheduler, self.chosen = scheduler, chosen  # chosen[b] = the timesteps kept for sample b
        self.kept = [dict() for _ in chosen]

    def __enter__(self):
        real = self.scheduler.step

        # wraps: pipelines pass `eta` and `generator` only to a step whose signature names them
        # (prepare_extra_step_kwargs inspects it); a bare (*args, **kwargs) signature made DDIM deterministic
        @functools.wraps(real)
        def step(model_output, timestep, sample, *args, **kwargs):
            out = real(model_output, timestep, sample, *args, **kwargs)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            for b, times in enumerate(self.chosen):
                if int(timestep) in times:
                    self.kept[b][int(timestep)] = (sample[b].float().cpu(), prev[b].float().cpu())
            return out

        self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        del self.scheduler.step  # the class's method again

    def tensors(self):
        """{"traj_t": (B, K), "traj_x_t": (B, K, C, h, w), "traj_x_prev": ...} in the order of `chosen`."""
        t = torch.tensor([list(times) for times in self.chosen], dtype=torch.int64)
        x_t = torch.stack(
            [torch.stack([self.kept[b][int(s)][0] for s in times]) for b, times in enumerate(self.chosen)]
        )
        x_prev = torch.stack(
            [torch.stack([self.kept[b][int(s)][1] for s in times]) for b, times in enumerate(self.chosen)]
        )
        return {"traj_t": t, "traj_x_t": x_t, "traj_x_prev": x_prev}


def choose_trajectory_steps(table, seeds, k):
    """Per sample, `k` distinct timesteps of the table drawn from the sample's seed (so a rerun keeps the same)."""
    chosen = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) + 3)
        order = torch.randperm(len(table.timesteps), generator=g)[:k].tolist()
        chosen.append([table.timesteps[i] for i in order])
    return chosen


def predicted_eps(noise_scheduler, pred, x_t, timesteps):
    """The model's epsilon from its output (epsilon or v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        abar = (
            noise_scheduler.alphas_cumprod.to(x_t.device)[timesteps]
            .reshape(-1, *([1] * (x_t.ndim - 1)))
            .to(pred.dtype)
        )
        return abar.sqrt() * pred + (1 - abar).sqrt() * x_t
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


class TrajectoryInputs(NamedTuple):
    """One training batch of the trajectory objective, real rows then generated rows, each sample's K steps
    flattened (2 * B * K rows): the states x_t the models see, the noise eps_hat each pair implies, the
    timesteps and the per-step likelihood weights."""

    x_t: torch.Tensor
    eps_hat: torch.Tensor
    timesteps: torch.Tensor
    weight: torch.Tensor


def trajectory_inputs(batch, real, *, table, noise_scheduler, generator):
    """The real side draws (x_t, x_prev) from q(x_t | x_0) and the forward posterior q(x_prev | x_t, x_0) at each
    stored step's t (over the sampler's stride); the generated side is the opponent's stored chain steps."""
    device = real.device
    t = batch["traj_t"].to(device)  # (B, K)
    b, k = t.shape
    prev = torch.tensor([sampler_prev(table, int(s)) for s in t.flatten().tolist()], device=device)
    x0 = real.float().repeat_interleave(k, dim=0)
    if "noise_seed" in batch:  # drawn ahead with precomputed reference errors: the same draws again
        draws = [
            torch.randn(
                (2, k) + tuple(real.shape[1:]),
                generator=torch.Generator(device=device).manual_seed(int(s)),
                device=device,
            )
            for s in batch["noise_seed"].tolist()
        ]
        noise = torch.cat([d[0] for d in draws])
        posterior_noise = torch.cat([d[1] for d in draws])
    else:
        noise = torch.randn(x0.shape, generator=generator, device=device)
        posterior_noise = torch.randn(x0.shape, generator=generator, device=device)
    real_x_t, real_x_prev = forward_posterior_pair(noise_scheduler, x0, noise, posterior_noise, t.flatten(), prev)
    gen_x_t = batch["traj_x_t"].to(device).float().flatten(0, 1)
    gen_x_prev = batch["traj_x_prev"].to(device).float().flatten(0, 1)
    x_t, x_prev, ts = (
        torch.cat([real_x_t, gen_x_t]),
        torch.cat([real_x_prev, gen_x_prev]),
        torch.cat([t.flatten()] * 2),
    )
    a, bb, _, weight = table.columns(ts, device)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    eps_hat = (a.reshape(shape) * x_t - x_prev) / bb.reshape(shape)
    return TrajectoryInputs(x_t, eps_hat, ts, weight)


def sampler_prev(table, t):
    """The timestep the table's sampler steps to from t."""
    return sampler_prev_timestep(table.sampler, t)


def trajectory_errors(model, objective, inputs, cond, k):
    """Per-sample errors (2B,) of `model` under the trajectory objective: the likelihood-weighted squared error
    of its epsilon against each pair's implied noise, averaged over the sample's K steps. One forward over all
    2 * B * K rows; `cond` is the pair's conditioning (2B rows, `pair_conditions`), `objective` a DDPM family's.

    Classifier-free guidance: the opponent's chain was drawn with the guided prediction (that is what moved it
    from x_t to x_prev), but the likelihood here uses the *conditional* prediction, for the policy and the
    reference alike. The model being trained is the conditional model p_theta(x | c), which guidance only
    reshapes at sampling time; the real side has no guided chain to match; and the approximate objective
    scores the conditional prediction too, so the two objectives train the same thing. At theta = theta_k both
    models' errors are equal, so the first step is still log 2 (the guided drift only makes eps_hat differ
    from either prediction on the generated side). Scoring the guided prediction would double every forward."""
    dtype = next(t.dtype for t in cond.values() if t.is_floating_point())
    x_t = inputs.x_t.to(dtype) if dtype != torch.float32 else inputs.x_t
    pred = objective.forward(model, x_t, inputs.timesteps, {n: t.repeat_interleave(k, dim=0) for n, t in cond.items()})
    eps = predicted_eps(objective.scheduler, pred.float(), inputs.x_t, inputs.timesteps)
    err = per_sample_mse(eps, inputs.eps_hat) * inputs.weight
    return err.reshape(-1, k).mean(dim=1)


@torch.no_grad()
def precompute_trajectory_reference(
    reference,
    real_pixels,
    trajectory,
    batch,
    sample_seeds,
    *,
    vae,
    text,
    objective,
    table,
    dtype,
    autocast=contextlib.nullcontext,
):
    """--precompute_reference for the trajectory objective: the real latents, a noise seed per sample (the real
    side's forward and posterior draws), theta_k's errors on both sides and the text conditioning (`batch`: the
    chunk's token ids and image sizes). Training rebuilds the same real pairs from the seed (`trajectory_inputs`)."""
    device = vae.device
    real = stored_real_latents(vae, real_pixels, sample_seeds, dtype)
    noise_seeds = torch.tensor([int(s) + 2 for s in sample_seeds], dtype=torch.int64)
    stored = {"noise_seed": noise_seeds, **{name: trajectory[name] for name in ("traj_t", "traj_x_t", "traj_x_prev")}}
    k = stored["traj_t"].shape[1]
    inputs = trajectory_inputs(
        stored, real, table=table, noise_scheduler=objective.scheduler, generator=torch.Generator(device=device)
    )
    cond = text(batch)
    with autocast():
        both = pair_conditions({n: t.to(dtype) if t.is_floating_point() else t for n, t in cond.items()}, batch)
        err = trajectory_errors(reference, objective, inputs, both, k)
    r_real, r_gen = err.float().chunk(2)
    return {
        "real_latents": real.half().cpu(),
        "noise_seed": noise_seeds,
        "ref_err_real": r_real.cpu(),
        "ref_err_gen": r_gen.cpu(),
        **{name: t.cpu() for name, t in cond.items()},
    }


# ----------------------------------------------------------------------------- the step's settings, from the flags


SAMPLERS = {  # --gen_scheduler: the diffusers class, its defaults under the model's config, what it always takes
    "ddim": ("DDIMScheduler", {"clip_sample": False}, {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}, {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {}, {"algorithm_type": "dpmsolver++", "solver_order": 2}),  # 2M
    "unipc": ("UniPCMultistepScheduler", {}, {}),
}


def sampler_from_config(name, config, prediction_type=None):
    """The --gen_scheduler `name` sampler built from a model's scheduler `config` (its betas, timestep spacing and
    prediction type; `prediction_type` overrides the last). clip_sample stays off unless the config turns it on:
    SD's latents are not clipped."""
    import diffusers

    cls_name, defaults, always = SAMPLERS[name]
    config = {**defaults, **config, **always}
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return getattr(diffusers, cls_name).from_config(config)


def opponent_scheduler(args):
    """The opponent's sampler for --gen_scheduler ddim / ddpm / dpmsolver / unipc, from the start model's scheduler
    config (None: the model's own)."""
    from diffusers import DDIMScheduler

    if args.gen_scheduler == "model":
        return None
    config = DDIMScheduler.load_config(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )
    return sampler_from_config(args.gen_scheduler, config, args.prediction_type)


def iteration_prompts(n_prompts, consumed, requested, seed, iteration):
    """The sorted indices of the prompts iteration `iteration` generates for and trains on: `requested` of them
    ("all", a count, or None: `consumed`, the pairs its optimizer steps take), drawn from (seed, iteration), each
    at most once; all of them when that is as many as there are."""
    n = n_prompts if requested == "all" else min(n_prompts, consumed if requested is None else int(requested))
    if n >= n_prompts:
        return list(range(n_prompts))
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return sorted(torch.randperm(n_prompts, generator=g)[:n].tolist())


def trajectory_flag_error(args):
    """Why the flags cannot run --spin_objective trajectory (None: they can): it needs the opponent's own stochastic
    sampling chain, and the approximate form's noising flags mean nothing to it."""
    if args.negative_source != "self":
        return "--spin_objective trajectory scores the opponent's own sampling chain: it needs --negative_source self"
    if args.gen_scheduler == "model":
        return (
            "--spin_objective trajectory needs a stochastic sampler whose steps have a likelihood: "
            "--gen_scheduler ddpm, or --gen_scheduler ddim with --gen_eta > 0"
        )
    if args.gen_scheduler == "ddim" and not args.gen_eta:
        return (
            "--spin_objective trajectory with --gen_scheduler ddim needs --gen_eta > 0: at eta 0 a DDIM step is "
            "deterministic and has no per-step likelihood"
        )
    if args.trajectory_steps > args.gen_num_inference_steps - 1:
        return (
            f"--trajectory_steps {args.trajectory_steps} must be below --gen_num_inference_steps "
            f"{args.gen_num_inference_steps} (the chain's last step may add no noise)"
        )
    for flag, value in (
        ("--snr_gamma", args.snr_gamma),
        ("--noise_offset", args.noise_offset),
        ("--no_share_noise", args.no_share_noise),
    ):
        if value:
            return (
                f"{flag} is for the approximate objective; the trajectory objective weights and noises each step "
                "by the sampler's own likelihood"
            )
    return None


# Flags of the flow families that shape the stored samples or the precomputed reference; recorded only when set,
# so stores written before they existed stay valid.
FAMILY_STORE_FLAGS = (
    "max_sequence_length",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "guidance_scale",
)


def store_settings(args, captions):
    """What an iteration's synthetic samples (and precomputed reference entries) depend on: a rerun whose settings
    differ is refused rather than silently reusing them (`SyntheticStore.claim`)."""
    import hashlib

    settings = {
        "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
        "seed": args.seed,
        "resolution": args.resolution,
        "precompute_reference": args.precompute_reference,
        "share_noise": not args.no_share_noise,
    }
    if args.precompute_reference:
        settings["stores_prompt_embeds"] = True  # older stores lack them
    if args.gen_eta:
        settings["gen_eta"] = args.gen_eta
    if args.spin_objective == "trajectory":
        settings |= {"spin_objective": "trajectory", "trajectory_steps": args.trajectory_steps}
    for name in ("gen_num_inference_steps", "gen_guidance_scale", "gen_scheduler", "pretrained_model_name_or_path"):
        settings[name] = getattr(args, name)
    return settings | {n: getattr(args, n) for n in FAMILY_STORE_FLAGS if getattr(args, n, None) is not None}


class SpinStep(NamedTuple):
    """The flags that choose and shape the SPIN step (`train_spin_diffusion.spin_forward`)."""

    objective: str  # "approximate" or "trajectory" (--spin_objective)
    precomputed: bool  # the reference errors were stored during generation (--precompute_reference)
    beta: float
    share_noise: bool
    noise_offset: float
    snr_gamma: float | None
    table: TrajectoryTable | None  # trajectory: the opponent sampler's stochastic steps
    trajectory_steps: int  # trajectory: K stored chain steps per sample
    sft_weight: float = 0.0  # lambda of the SFT term on the real images (--sft_weight; 0: the paper's loss)


def spin_step(args):
    """`SpinStep` from train_spin_diffusion.py's flags; for the trajectory objective, the opponent sampler's table
    (ModelError when the sampler cannot give one)."""
    table = None
    if args.spin_objective == "trajectory":
        sampler = opponent_scheduler(args)
        sampler.set_timesteps(args.gen_num_inference_steps)
        try:
            table = TrajectoryTable(sampler, args.gen_eta or 0.0)
        except ValueError as e:
            raise ModelError(f"--spin_objective trajectory with --gen_scheduler {args.gen_scheduler}: {e}") from e
        if args.trajectory_steps > len(table.timesteps):
            raise ModelError(
                f"--trajectory_steps {args.trajectory_steps}: the sampler has only {len(table.timesteps)} "
                "stochastic steps"
            )
    return SpinStep(
        args.spin_objective,
        args.precompute_reference,
        args.beta,
        not args.no_share_noise,
        args.noise_offset,
        args.snr_gamma,
        table,
        args.trajectory_steps,
        args.sft_weight,
    )


# ----------------------------------------------------------------------------- what an iteration's metrics say

SATURATED_ACC, SATURATED_LOSS = 0.99, 0.01


def is_saturated(logs):
    """Whether one optimizer step's logged values show a saturated margin: implicit accuracy > 0.99 and loss
    < 0.01. The loss is the preference term (`spin_loss`; the total without --sft_weight): the SFT term keeps the
    total above 0.01 whatever the margin does."""
    return logs["implicit_acc"] > SATURATED_ACC and logs.get("spin_loss", logs["loss"]) < SATURATED_LOSS


class IterationTally:
    """An iteration's running metrics: the first counted optimizer step's logs, the sums behind the means, the
    last step's logs, the steps counted (an fp16 step the scaler skipped left the weights unchanged: not counted)
    and those with a saturated margin. Saved with each checkpoint (`FILE`), so a resumed iteration reports all of
    its steps."""

    FILE = "spin_metrics.json"

    def __init__(self, checkpoint=None):
        data = {"sums": {}, "first": None, "logs": {}, "counted": 0, "saturated": 0}
        if checkpoint is not None and (Path(checkpoint) / self.FILE).exists():
            data |= json.loads((Path(checkpoint) / self.FILE).read_text())
        self.sums, self.first, self.logs = data["sums"], data["first"], data["logs"]
        self.counted, self.saturated = data["counted"], data["saturated"]

    def add(self, logs, step, counted=True):
        self.logs = logs
        if counted:
            self.first = self.first or dict(logs, step=step)
            self.counted, self.saturated = self.counted + 1, self.saturated + is_saturated(logs)
            for name, v in logs.items():
                if name != "skipped_images":
                    self.sums[name] = self.sums.get(name, 0.0) + v

    def files(self):
        """The checkpoint's extra file."""
        data = {"sums": self.sums, "first": self.first, "logs": self.logs, "counted": self.counted}
        return {self.FILE: json.dumps(data | {"saturated": self.saturated})}

    def metrics(self, k, objective, steps):
        """Iteration k+1's metrics.json: first, last and mean step, saturation counts and the real-image drift."""
        mean = {name: v / max(self.counted, 1) for name, v in self.sums.items()}
        metrics = {"iteration": k + 1, "spin_objective": objective, "steps": steps, "first_step": self.first}
        metrics |= {"last_step": self.logs, "mean": mean, "saturated_steps": self.saturated}
        metrics["counted_steps"] = self.counted
        # real_err_rise(_mean): the policy's real-image error against theta_k's
        return metrics | real_error_drift(self.logs, mean)


def saturation_warning(metrics, beta, learning_rate):
    """The warning for an iteration (`metrics`: "iteration", "saturated_steps", "counted_steps") in which more than
    half of the counted steps were saturated (`is_saturated`), else None. A saturated margin means the policy
    already tells its real images from theta_k's samples almost perfectly: the loss gives almost no gradient, and
    what it still gives is free to push the error on the real images up along with the generated ones."""
    n, m = metrics.get("saturated_steps", 0), metrics.get("counted_steps", 0)
    if not m or 2 * n <= m:
        return None
    return (
        f"the SPIN margin saturated in iteration {metrics['iteration']} ({n} of {m} steps with implicit accuracy "
        f"> {SATURATED_ACC} and loss < {SATURATED_LOSS}) at --beta {beta:g} and --learning_rate {learning_rate:g}: "
        "the rest of the iteration learns little from the loss; try a smaller --beta or --learning_rate, fewer "
        "--max_train_steps per iteration, or --sft_weight against likelihood drift"
    )


def real_error_drift(last_step, mean):
    """The likelihood drift on the real images: {"real_err_rise": the last step's model_err_real - ref_err_real,
    "real_err_rise_mean": the same from the iteration's means}. Positive: the policy's error on the real images
    rose against theta_k's (it made them less likely). None where the iteration logged no step."""

    def rise(logs):
        return logs["model_err_real"] - logs["ref_err_real"] if logs and "model_err_real" in logs else None

    return {"real_err_rise": rise(last_step), "real_err_rise_mean": rise(mean)}


def rose_or_fell(value):
    """'+1.2e-04 rose', '-3.0e-05 fell', '0 same' (or 'n/a') for a real_err_rise."""
    if value is None:
        return "n/a"
    return f"{value:+.1e} rose" if value > 0 else f"{value:+.1e} fell" if value < 0 else "0 same"


def real_error_sentence(metrics):
    """A line for the iteration's model card: the policy's error on the real images against theta_k's, and
    whether it rose (the likelihood drift that --sft_weight counters)."""
    last, rise = metrics.get("last_step") or {}, metrics.get("real_err_rise")
    if rise is None:
        return ""
    verdict = "rose: the policy made the real images less likely" if rise > 0 else "did not rise"
    mean = metrics.get("real_err_rise_mean")
    mean_text = f"; {mean:+.3g} on average over the iteration" if mean is not None else ""
    return (
        f"Real-image error at the last step: the policy {last['model_err_real']:.4g} against theta_k's (the "
        f"reference) {last['ref_err_real']:.4g}, a change of {rise:+.3g}{mean_text}: the error {verdict}."
    )


def print_summary(output_dir, num_iterations, state):
    """One row per saved iteration; real_err_rise: the policy's real-image error minus theta_k's at the last
    step (rose: likelihood drift)."""
    print("\niteration  steps  loss(mean)  implicit_acc(mean)  margin(mean)  margin(last)  real_err_rise  weights")
    for k in range(num_iterations):
        path = output_dir / f"iter_{k + 1}" / "metrics.json"
        if path.exists():
            m, nan = json.loads(path.read_text()), float("nan")
            where = state.get("pushed").get(str(k + 1), str(path.parent))
            print(
                f"{k + 1:>9}  {m['steps']:>5}  {m['mean'].get('loss', nan):>10.4f}  "
                f"{m['mean'].get('implicit_acc', nan):>18.3f}  {m['mean'].get('reward_margin', nan):>12.4g}  "
                f"{(m['last_step'] or {}).get('reward_margin', nan):>12.4g}  "
                f"{rose_or_fell(m.get('real_err_rise')):>13}  {where}"
            )


def iteration_line(k, metrics, seconds, where, pushing):
    """The one line a person reads at the end of iteration k: time for generation and training, the loss,
    implicit accuracy and margin from the first step to the last, whether the real-image error rose, where the
    iteration is saved and whether it is being pushed."""
    first, last = metrics.get("first_step") or {}, metrics.get("last_step") or {}
    nan = float("nan")

    def change(name, spec):
        return f"{format(first.get(name, nan), spec)} -> {format(last.get(name, nan), spec)}"

    push = "pushing in the background" if pushing else "not pushed (no --push_to_hub)"
    return (
        f"iteration {k}: generation {seconds[0]:.0f} s, training {seconds[1]:.0f} s; loss {change('loss', '.4f')}, "
        f"implicit accuracy {change('implicit_acc', '.2f')}, margin {change('reward_margin', '.3g')}; real-image "
        f"error {rose_or_fell(metrics.get('real_err_rise'))}; saved in {where}; {push}"
    )
