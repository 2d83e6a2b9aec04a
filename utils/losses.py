"""Diffusion losses: the denoising target, per-sample errors, min-SNR weights, the SFT loss and the
SPIN / Diffusion-DPO loss. Plain functions of tensors; this file can be copied on its own."""

import torch
import torch.nn.functional as F


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def per_sample_mse(pred, target):
    """Mean squared error over all but the batch dimension, in fp32: shape (B,)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))


def min_snr_weights(scheduler, timesteps, gamma):
    """Min-SNR-gamma loss weights (Hang et al. 2023) per sample, for epsilon or v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1)
    return weights


def sft_loss(model_err, weights=None):
    """Plain denoising loss: the batch mean of the per-sample errors, optionally weighted."""
    return (model_err * weights).mean() if weights is not None else model_err.mean()


def spin_loss(model_err_real, model_err_gen, ref_err_real, ref_err_gen, beta):
    """SPIN-Diffusion's approximate objective (= Diffusion-DPO with winner = real, loser = generated).

    delta = (model_err_real - ref_err_real) - (model_err_gen - ref_err_gen)
    loss  = -logsigmoid(-beta / 2 * delta), averaged over the batch.

    beta follows the Diffusion-DPO code convention (the 1/2 is inside). Inputs are per-sample errors
    of shape (B,); returns (loss, logs) where logs holds detached batch means for logging.
    """
    delta = (model_err_real - ref_err_real) - (model_err_gen - ref_err_gen)
    margin = -0.5 * beta * delta
    loss = -F.logsigmoid(margin).mean()
    logs = {
        "loss": loss.detach(),
        "implicit_acc": (delta < 0).float().mean().detach(),
        "reward_margin": margin.mean().detach(),
        "model_err_real": model_err_real.mean().detach(),
        "model_err_gen": model_err_gen.mean().detach(),
        "ref_err_real": ref_err_real.mean().detach(),
        "ref_err_gen": ref_err_gen.mean().detach(),
    }
    return loss, logs


def step_generator(seed, micro_step, process_index, device):
    """RNG for one micro-batch's noise and timesteps, a function of (seed, micro-step, process) only:
    a resumed run draws exactly what an uninterrupted run would have drawn."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + micro_step) * 64 + process_index)


def sample_noise_and_timesteps(latents, num_train_timesteps, generator, noise_offset=0.0):
    """Gaussian noise like `latents` (plus an optional per-channel offset) and one timestep per sample."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (b,), generator=generator, device=latents.device).long()
    return noise, timesteps
