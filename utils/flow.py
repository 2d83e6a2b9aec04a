"""Flow matching for the rectified-flow families (SD3.x, Flux.1), done the way diffusers' training scripts for
those models do it, so that a weighting scheme or a beta means here what it means there:

    x_t    = (1 - sigma) * x_0 + sigma * noise
    target = noise - x_0                           (the velocity the transformer predicts)
    error  = mean over the sample of  w(sigma) * (prediction - target)^2

sigma is drawn by `compute_density_for_timestep_sampling` (--weighting_scheme, --logit_mean, --logit_std,
--mode_scale) and mapped onto the training scheduler's own (shifted) sigma table; w comes from
`compute_loss_weighting_for_sd3`. The per-sample error is the family's own training loss per sample, so SFT
averages it and SPIN / Diffusion-DPO compare it between the policy and the reference as they do epsilon errors
(its scale differs: beta must be chosen for it). Plain functions of tensors; this file can be copied on its own.
"""

WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


def sample_sigmas(
    scheduler,
    batch_size,
    *,
    weighting_scheme="none",
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
    generator=None,
    device="cpu",
):
    """(timesteps, sigmas), each (B,): a draw u in [0, 1) by the weighting scheme, then the entry of the
    scheduler's table at index floor(u * num_train_timesteps). `scheduler` is the training copy of a
    FlowMatchEulerDiscreteScheduler: its table is the one built at load time, never reset by `set_timesteps`.
    Seeded by `generator` (on `device`), so a resumed run draws what an uninterrupted one would."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme {weighting_scheme!r}: expected one of {', '.join(WEIGHTING_SCHEMES)}")
    u = compute_density_for_timestep_sampling(
        weighting_scheme,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    n = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != n:
        raise ValueError(
            f"the training scheduler's table has {len(scheduler.timesteps)} entries, not num_train_timesteps={n}: "
            "set_timesteps was called on it (sample with a copy)"
        )
    index = (u * n).long().clamp(0, n - 1).cpu()
    return scheduler.timesteps[index].to(device), scheduler.sigmas[index].to(device)


def _per_sample(sigmas, ndim):
    return sigmas.reshape((-1,) + (1,) * (ndim - 1))


def noised(latents, noise, sigmas):
    """x_t = (1 - sigma) x_0 + sigma * noise, with one sigma per sample."""
    s = _per_sample(sigmas, latents.ndim).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents, noise):
    """What the flow model predicts: d x_t / d sigma = noise - x_0."""
    return noise - latents


def per_sample_error(prediction, target, sigmas, weighting_scheme="none"):
    """The weighted squared error averaged over all but the batch dimension, in fp32: shape (B,)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float())
    squared = (prediction.float() - target.float()) ** 2
    return (_per_sample(weights, squared.ndim) * squared).flatten(1).mean(dim=1)


class FlowMatchingObjective:
    """The training objective of the rectified-flow families (SD3.x, Flux.1), with the interface of
    `losses.DDPMObjective`: t drawn by the weighting scheme from the training scheduler's table (sigma = t /
    num_train_timesteps), x_t = (1 - sigma) x_0 + sigma noise, the velocity target, the weighted per-sample error.
    `forward(model, noisy, timesteps, cond)` is the family's denoiser call."""

    def __init__(self, scheduler, forward, weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
        self.scheduler, self.forward = scheduler, forward
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.scheme = dict(
            weighting_scheme=weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
        )

    def draw(self, n, generator, device):
        return sample_sigmas(self.scheduler, n, generator=generator, device=device, **self.scheme)[0]

    def errors(self, model, latents, noise, timesteps, cond):
        sigmas = timesteps.float() / self.num_train_timesteps
        prediction = self.forward(model, noised(latents, noise, sigmas), timesteps, cond)
        return per_sample_error(prediction, velocity_target(latents, noise), sigmas, self.scheme["weighting_scheme"])

    def weights(self, timesteps, snr_gamma):
        raise ValueError("--snr_gamma weights DDPM timesteps; flow matching weights by --weighting_scheme")


def objective_from_args(scheduler, forward, args):
    """`FlowMatchingObjective` under the flags --weighting_scheme, --logit_mean, --logit_std, --mode_scale (None:
    none, 0, 1, 1.29)."""
    given = {name: getattr(args, name, None) for name in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")}
    return FlowMatchingObjective(scheduler, forward, **{k: v for k, v in given.items() if v is not None})
