"""SPIN-Diffusion's per-pair pieces, shared by the training step and the generation phase:
the inputs of a (real, negative) pair (one t, shared noise by default), a model's errors on a pair, and
the reference errors precomputed while the opponent theta_k is in memory (so training needs no reference)."""

import contextlib

import torch

from .losses import diffusion_target, per_sample_mse, sample_noise_and_timesteps
from .models import encode_images, encode_prompt


def seeded_noise(seeds, shape, device, dtype, share_noise=True):
    """Per-sample noise from per-sample seeds: (noise for the real latent, noise for the negative)."""
    real, neg = [], []
    for s in seeds.tolist():
        g = torch.Generator(device=device).manual_seed(int(s))
        real.append(torch.randn(shape, generator=g, device=device, dtype=dtype))
        neg.append(real[-1] if share_noise else torch.randn(shape, generator=g, device=device, dtype=dtype))
    return torch.stack(real), torch.stack(neg)


def pair_inputs(batch, vae, generator, dtype, num_train_timesteps, share_noise=True, noise_offset=0.0):
    """(real, negative, t, noise_real, noise_negative) for a batch of pairs. t and noise come from the batch
    when it carries them (`timesteps`, `noise_seed`: drawn ahead with precomputed reference errors), else
    from `generator`."""
    device = generator.device
    real = batch["real_latents"].to(device, dtype) if "real_latents" in batch else encode_images(vae, batch, generator, dtype)
    if "gen_latents" in batch:
        negative = batch["gen_latents"].to(device, real.dtype)
    else:  # Diffusion-DPO: the dataset's loser image
        negative = encode_images(vae, {"pixel_values": batch["loser_pixel_values"]}, generator, dtype)
    if "timesteps" in batch:
        t = batch["timesteps"].to(device)
        noise, noise_neg = seeded_noise(batch["noise_seed"], real.shape[1:], device, real.dtype, share_noise)
        return real, negative, t, noise, noise_neg
    noise, t = sample_noise_and_timesteps(real, num_train_timesteps, generator, noise_offset)
    noise_neg = noise if share_noise else torch.randn(noise.shape, generator=generator, device=device, dtype=noise.dtype)
    return real, negative, t, noise, noise_neg


def pair_errors(model, noise_scheduler, real, negative, t, noise, noise_neg, prompt_embeds):
    """Per-sample errors (2B,) of `model` on the concatenated (real, negative) batch: one forward.
    `prompt_embeds` is (B, L, D); returns (errors, timesteps (2B,))."""
    latents, noise, timesteps = torch.cat([real, negative]), torch.cat([noise, noise_neg]), torch.cat([t, t])
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    pred = model(noisy, timesteps, prompt_embeds.repeat(2, 1, 1), return_dict=False)[0]
    return per_sample_mse(pred, target), timesteps


@torch.no_grad()
def precompute_reference(reference, vae, text_encoder, noise_scheduler, real_pixels, gen_latents, input_ids,
                         sample_seeds, dtype, share_noise=True, autocast=contextlib.nullcontext):
    """For a chunk of prompts, while theta_k is loaded: the real latents (VAE sample with a per-sample seed),
    one t and noise seed per pair, theta_k's errors on both latents and the text embeddings. Training on
    these runs no reference forward, VAE or text encoder; `pair_inputs` rebuilds exactly the same t and noise from them."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    device = gen_latents.device
    dist = DiagonalGaussianDistribution(vae.encode(real_pixels.to(device, dtype)).latent_dist.parameters)
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator(device=device).manual_seed(int(s)),
                                   device=device, dtype=dist.mean.dtype) for s in sample_seeds])
    # Stored in fp16 like the generated latents: compute the errors from exactly what training will read.
    real = ((dist.mean + dist.std * eps) * vae.config.scaling_factor).half().float()
    gen = gen_latents.half().float()
    T = noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor([torch.randint(0, T, (1,), generator=torch.Generator().manual_seed(int(s) + 1)).item()
                              for s in sample_seeds], device=device)
    noise_seeds = torch.tensor([int(s) + 2 for s in sample_seeds], dtype=torch.int64)
    batch = {"real_latents": real, "gen_latents": gen, "timesteps": timesteps, "noise_seed": noise_seeds}
    inputs = pair_inputs(batch, vae, torch.Generator(device=device), dtype, T, share_noise)
    # The text embeddings are stored too (in the compute dtype, exactly what the step would compute): training
    # then needs no text encoder.
    prompt_embeds = encode_prompt(text_encoder, input_ids.to(device))
    with autocast():
        err, _ = pair_errors(reference, noise_scheduler, *inputs, prompt_embeds)
    r_real, r_gen = err.float().chunk(2)
    return {"real_latents": real.half().cpu(), "timesteps": timesteps.cpu(), "noise_seed": noise_seeds,
            "ref_err_real": r_real.cpu(), "ref_err_gen": r_gen.cpu(), "prompt_embeds": prompt_embeds.cpu()}
