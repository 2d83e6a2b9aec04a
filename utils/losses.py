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


def spin_loss(model_err_real, model_err_gen, ref_err_real, ref_err_gen, beta, *, sft_weight=0.0):
    """SPIN-Diffusion's approximate objective (= Diffusion-DPO with winner = real, loser = generated).

    delta = (model_err_real - ref_err_real) - (model_err_gen - ref_err_gen)
    loss  = -logsigmoid(-beta / 2 * delta), averaged over the batch
            + sft_weight * model_err_real, averaged over the batch.

    beta follows the Diffusion-DPO code convention (the 1/2 is inside). Inputs are per-sample errors
    of shape (B,); returns (loss, logs) where logs holds detached batch means for logging.

    `sft_weight` (lambda >= 0; 0 is the paper's loss) adds the policy's plain denoising error on the real images.
    The preference term only sees the difference of the two sides, so it can also grow its margin by making every
    image less likely, the real one included, as long as the generated one loses more (likelihood drift: the
    policy's error on the real images rises above the reference's). Iterative preference training for language
    models adopted this remedy against the same drift: an SFT (negative log-likelihood) term on the chosen
    samples next to the preference loss (Pang et al. 2024, iterative RPO; the DPOP penalty is a close relative).

    implicit_acc counts a pair whose delta is exactly 0 (policy = reference, as at an iteration's first step) as
    half a hit, so that step logs 0.5, not 0. logs["spin_loss"] is the preference term alone; logs["loss"] is
    the total.
    """
    delta = (model_err_real - ref_err_real) - (model_err_gen - ref_err_gen)
    margin = -0.5 * beta * delta
    preference = -F.logsigmoid(margin).mean()
    loss = preference + sft_weight * model_err_real.mean() if sft_weight else preference
    logs = {
        "loss": loss.detach(),
        "spin_loss": preference.detach(),
        "implicit_acc": ((delta < 0).float() + 0.5 * (delta == 0).float()).mean().detach(),
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


def sample_noise(latents, generator, noise_offset=0.0):
    """Gaussian noise like `latents`, plus an optional per-channel offset (--noise_offset)."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (b, c) + (1,) * (latents.ndim - 2), generator=generator, device=latents.device, dtype=latents.dtype
        )
    return noise


class DDPMObjective:
    """The training objective of the DDPM-family models (SD-1.x / 2.x, SDXL), around a family's denoiser call
    `forward(model, noisy, timesteps, cond) -> prediction`: one integer t per sample drawn uniformly, x_t from the
    scheduler's `add_noise`, the target epsilon or v (`diffusion_target`), the per-sample MSE. Flow-matching
    families have the same interface in `flow.py` (FlowMatchingObjective)."""

    def __init__(self, scheduler, forward):
        self.scheduler, self.forward = scheduler, forward
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw(self, n, generator, device):
        """n timesteps, uniform over the training schedule."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device).long()

    def errors(self, model, latents, noise, timesteps, cond):
        """Per-sample errors (B,) of `model` on `latents` noised with `noise` at `timesteps`."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.scheduler, latents, noise, timesteps)
        return per_sample_mse(self.forward(model, noisy, timesteps, cond), target)

    def weights(self, timesteps, snr_gamma):
        """--snr_gamma: the min-SNR weight of each sample."""
        return min_snr_weights(self.scheduler, timesteps, snr_gamma)


# The exact (trajectory) objective. A stochastic sampler's step from timestep t to the previous timestep s it
# samples is Gaussian and affine in the model's epsilon prediction:
#     p(x_s | x_t) = N(a * x_t - b * eps(x_t, t), sigma^2 I),
# so the log-likelihood ratio of one step under two models reduces to their epsilon errors against the noise
# that the pair (x_t, x_s) implies, eps_hat = (a * x_t - x_s) / b.


def sampler_prev_timestep(scheduler, t):
    """The timestep `scheduler` (a diffusers DDPMScheduler or DDIMScheduler after `set_timesteps`) steps to from t,
    computed as its own `step` does (-1: the end of the chain)."""
    if hasattr(scheduler, "previous_timestep"):  # DDPM: the next entry of its (possibly strided) timesteps
        return int(scheduler.previous_timestep(int(t)))
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # DDIM


def sampler_step_coefficients(scheduler, t, eta=1.0):
    """(a, b, sigma) of `scheduler`'s step from t, as Python floats computed in fp64, such that the step draws
    x_s ~ N(a * x_t - b * eps(x_t, t), sigma^2 I) with s = `sampler_prev_timestep(scheduler, t)`.
    DDPMScheduler (variance fixed_small or fixed_large) or DDIMScheduler with `eta` > 0; sigma = 0 (DDPM's last
    step, DDIM with eta = 0) has no likelihood and raises. Clipped or thresholded x0 predictions are not affine
    in eps and raise too."""
    cfg = scheduler.config
    if cfg.get("clip_sample") or cfg.get("thresholding"):
        raise ValueError(
            "the trajectory objective needs a sampler whose step is affine in eps: turn off "
            "clip_sample / thresholding in the scheduler config"
        )
    alphas = scheduler.alphas_cumprod.double()
    t, s = int(t), sampler_prev_timestep(scheduler, t)
    abar_t = float(alphas[t])
    is_ddpm = hasattr(scheduler, "previous_timestep")
    if s >= 0:
        abar_s = float(alphas[s])
    else:
        abar_s = 1.0 if is_ddpm else float(scheduler.final_alpha_cumprod)
    if is_ddpm:
        beta = 1 - abar_t / abar_s  # the step's own beta over a strided schedule
        c0 = abar_s**0.5 * beta / (1 - abar_t)  # on the x0 prediction
        ct = (1 - beta) ** 0.5 * (1 - abar_s) / (1 - abar_t)  # on x_t
        a, b = c0 / abar_t**0.5 + ct, c0 * (1 - abar_t) ** 0.5 / abar_t**0.5
        variance_type = cfg.get("variance_type", "fixed_small")
        if variance_type == "fixed_small":
            var = (1 - abar_s) / (1 - abar_t) * beta if t > 0 else 0.0
        elif variance_type == "fixed_large":
            var = beta if t > 0 else 0.0
        else:
            raise ValueError(
                f"variance_type {variance_type!r}: the trajectory objective supports fixed_small and fixed_large"
            )
    else:
        var = eta**2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
        a = (abar_s / abar_t) ** 0.5
        b = (abar_s * (1 - abar_t) / abar_t) ** 0.5 - max(1 - abar_s - var, 0.0) ** 0.5
    if not var > 0:
        raise ValueError(f"the sampler's step from t={t} adds no noise (deterministic): it has no likelihood")
    return a, b, var**0.5


def spin_trajectory_log_ratio(eps_model, eps_ref, x_t, x_prev, *, a, b, sigma):
    """log p_model(x_prev | x_t) - log p_ref(x_prev | x_t) per sample, shape (B,), for the Gaussian step
    N(a * x_t - b * eps, sigma^2 I) (`sampler_step_coefficients`), summed over the other dimensions:

        -(b^2 / (2 sigma^2)) * (||eps_model - eps_hat||^2 - ||eps_ref - eps_hat||^2),  eps_hat = (a x_t - x_prev) / b.

    `a`, `b`, `sigma` are floats or (B,) tensors. The normalising constants cancel (same sigma for both models).
    Computed in fp32 (fp64 if the inputs are)."""
    dtype = torch.promote_types(eps_model.dtype, torch.float32)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a, b, sigma = (torch.as_tensor(v, dtype=dtype, device=x_t.device).reshape(shape) for v in (a, b, sigma))
    eps_hat = (a * x_t.to(dtype) - x_prev.to(dtype)) / b
    err_model = (eps_model.to(dtype) - eps_hat).pow(2)
    err_ref = (eps_ref.to(dtype) - eps_hat).pow(2)
    coef = (b * b / (2 * sigma * sigma)).flatten()
    return -coef * (err_model - err_ref).flatten(1).sum(1)


def forward_posterior_pair(scheduler, x0, noise, posterior_noise, t, s):
    """The real side's (x_t, x_s): x_t ~ q(x_t | x_0) with `noise`, then x_s ~ q(x_s | x_t, x_0), the forward
    posterior over the sampler's own stride (s < t; s = -1 gives x_0 itself), with `posterior_noise`.
    Per-sample t and s are (B,) integer tensors. Computed in fp32 (fp64 if x0 is)."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alphas = scheduler.alphas_cumprod.to(device=x0.device, dtype=dtype)
    abar_t = alphas[t].reshape(shape)
    abar_s = torch.where(s >= 0, alphas[s.clamp(min=0)], torch.ones((), dtype=dtype, device=x0.device)).reshape(shape)
    x0, noise, posterior_noise = x0.to(dtype), noise.to(dtype), posterior_noise.to(dtype)
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise
    beta = 1 - abar_t / abar_s
    mean = abar_s.sqrt() * beta / (1 - abar_t) * x0 + (1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t) * x_t
    var = (1 - abar_s) / (1 - abar_t) * beta
    return x_t, mean + var.sqrt() * posterior_noise
