"""utils/flow.py: the flow-matching noising, target, sigma draw and weighting agree with diffusers' own
FlowMatchEulerDiscreteScheduler, so that a model trained with them is sampled correctly by its pipeline."""

import copy

import pytest
import torch

from utils.flow import WEIGHTING_SCHEMES, noised, per_sample_error, sample_sigmas, velocity_target


def scheduler(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def test_noised_latents_are_the_schedulers_own():
    sched = scheduler()
    x0, noise = torch.randn(6, 4, 5, 7), torch.randn(6, 4, 5, 7)
    t, sigmas = sample_sigmas(sched, 6, weighting_scheme="logit_normal", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t, sigmas * sched.config.num_train_timesteps)  # the table's own pairs
    ours = noised(x0, noise, sigmas)
    theirs = copy.deepcopy(sched).scale_noise(x0, t, noise)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_an_euler_step_along_the_true_velocity_stays_on_the_path():
    """The pipeline's sampler moves x_t by (sigma_next - sigma) * prediction: with the target as prediction it lands
    exactly on the noised latents at the next sigma, so the target's sign and scale are the sampler's."""
    sched = scheduler()
    sched.set_timesteps(8)
    x0, noise = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for i in range(len(sched.timesteps) - 1):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        x_t = noised(x0, noise, sigma.repeat(2))
        step = copy.deepcopy(sched)
        step._step_index = i
        x_next = step.step(velocity_target(x0, noise), sched.timesteps[i], x_t).prev_sample
        assert torch.allclose(x_next, noised(x0, noise, sigma_next.repeat(2)), atol=1e-5)


def test_sigma_draws_are_seeded_and_follow_the_scheme():
    sched = scheduler(shift=1.0)  # unshifted: the table's sigmas are (almost) the uniform draw itself
    draw = lambda scheme, seed: sample_sigmas(  # noqa: E731
        sched, 4000, weighting_scheme=scheme, generator=torch.Generator().manual_seed(seed)
    )[1]
    assert torch.equal(draw("none", 1), draw("none", 1)) and not torch.equal(draw("none", 1), draw("none", 2))
    assert abs(draw("none", 0).mean().item() - 0.5) < 0.02
    logit = draw("logit_normal", 0)
    assert abs(logit.median().item() - 0.5) < 0.03 and logit.std() < draw("none", 0).std()  # mass near the middle
    assert (draw("mode", 0) > 0).all() and (draw("mode", 0) <= 1).all()
    shifted = sample_sigmas(scheduler(shift=3.0), 4000, generator=torch.Generator().manual_seed(0))[1]
    assert shifted.mean() > 0.6  # SD3's shift 3 moves the draws toward noise


def test_per_sample_error_is_the_weighted_mse():
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.allclose(per_sample_error(pred, target, sigmas, scheme), mse)
    assert torch.allclose(per_sample_error(pred, target, sigmas, "sigma_sqrt"), mse / sigmas**2)
    assert torch.allclose(per_sample_error(target, target, sigmas, "cosmap"), torch.zeros(3))
    assert per_sample_error(pred.half(), target.half(), sigmas).dtype == torch.float32


def test_bad_scheme_or_a_used_scheduler_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        sample_sigmas(scheduler(), 2, weighting_scheme="uniform")
    used = scheduler()
    used.set_timesteps(10)
    with pytest.raises(ValueError, match="set_timesteps was called on it"):
        sample_sigmas(used, 2)
    assert set(WEIGHTING_SCHEMES) == {"logit_normal", "mode", "sigma_sqrt", "cosmap", "none"}
