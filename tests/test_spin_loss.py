"""spin_loss against SPIN.md's formula computed by hand, its sign, and one optimizer step's effect."""

import contextlib
import copy
import math

import pytest
import torch

from utils.losses import per_sample_mse, spin_loss


def by_hand(m_real, m_gen, r_real, r_gen, beta):
    """-log sigmoid(-beta/2 * delta) = log(1 + exp(beta/2 * delta)), averaged, with plain floats."""
    deltas = [(a - c) - (b - d) for a, b, c, d in zip(m_real, m_gen, r_real, r_gen)]
    losses = [math.log1p(math.exp(beta / 2 * x)) for x in deltas]
    return sum(losses) / len(losses), deltas


def test_matches_formula_by_hand_with_half_beta_convention():
    m_real, m_gen = [0.10, 0.30, 0.25], [0.20, 0.22, 0.40]
    r_real, r_gen = [0.12, 0.28, 0.25], [0.19, 0.25, 0.41]
    beta = 500.0
    loss, logs = spin_loss(*(torch.tensor(v, dtype=torch.float64) for v in (m_real, m_gen, r_real, r_gen)), beta)
    expected, deltas = by_hand(m_real, m_gen, r_real, r_gen, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert logs["implicit_acc"].item() == pytest.approx(sum(d < 0 for d in deltas) / 3)
    assert logs["reward_margin"].item() == pytest.approx(sum(-beta / 2 * d for d in deltas) / 3)
    assert logs["model_err_real"].item() == pytest.approx(sum(m_real) / 3)
    assert logs["ref_err_gen"].item() == pytest.approx(sum(r_gen) / 3)
    # beta/2 inside: with beta (not beta/2) the value would be different
    assert expected != pytest.approx(by_hand(m_real, m_gen, r_real, r_gen, 2 * beta)[0])


def test_sign_lower_error_on_real_than_reference_gives_lower_loss():
    ref = torch.tensor([0.2]), torch.tensor([0.2])
    better, _ = spin_loss(torch.tensor([0.15]), torch.tensor([0.2]), *ref, beta=100.0)  # real error down
    worse, _ = spin_loss(torch.tensor([0.25]), torch.tensor([0.2]), *ref, beta=100.0)  # real error up
    tie, logs = spin_loss(torch.tensor([0.2]), torch.tensor([0.2]), *ref, beta=100.0)
    assert better.item() < math.log(2) < worse.item()
    assert tie.item() == pytest.approx(math.log(2)) and logs["reward_margin"].item() == 0
    gen_up, _ = spin_loss(torch.tensor([0.2]), torch.tensor([0.3]), *ref, beta=100.0)  # generated error up: good
    assert gen_up.item() < math.log(2)


def test_one_step_lowers_real_error_relative_to_generated(assets):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(assets["pipeline"], subfolder="unet")
    reference = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(assets["pipeline"], subfolder="scheduler")
    real, generated = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16) * 0.5 + 1.0
    noise, t = torch.randn(1, 4, 16, 16), torch.tensor([400])
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    x = sched.add_noise(torch.cat([real, generated]), torch.cat([noise, noise]), torch.cat([t, t]))

    def errors(model):
        return per_sample_mse(model(x, torch.cat([t, t]), emb.repeat(2, 1, 1)).sample, torch.cat([noise, noise]))

    with torch.no_grad():
        r_real, r_gen = errors(reference).chunk(2)
        before = errors(unet)
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    m_real, m_gen = errors(unet).chunk(2)
    loss, _ = spin_loss(m_real, m_gen, r_real, r_gen, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = errors(unet)
    gap_before, gap_after = (before[0] - before[1]).item(), (after[0] - after[1]).item()
    assert gap_after < gap_before


def test_precomputed_reference_gives_the_in_loop_loss(assets):
    """--precompute_reference: the errors stored during generation give the same loss as running the frozen
    reference in the training step, for the same t and noise."""

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    import train_spin_diffusion
    from utils import family_sd
    from utils.models import FrozenComponents, Reference
    from utils.spin import precompute_reference

    torch.manual_seed(0)
    pipe = assets["pipeline"]
    theta_k = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    from diffusers import AutoencoderKL

    vae, text_encoder = (
        AutoencoderKL.from_pretrained(pipe, subfolder="vae"),
        CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder"),
    )
    sched = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
    pixels, gen_latents = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 4, 16, 16)
    input_ids = torch.randint(0, 600, (3, 77))
    text, objective = family_sd.Prompts(None, text_encoder), family_sd.objective(sched)
    stored = precompute_reference(
        theta_k,
        pixels,
        gen_latents,
        {"input_ids": input_ids},
        [11, 22, 33],
        vae=vae,
        text=text,
        objective=objective,
        dtype=torch.float32,
    )
    policy = copy.deepcopy(theta_k)  # a policy that has moved away from theta_k
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    frozen = FrozenComponents(text, vae, objective, torch.float32, family_sd)
    step_pre = train_spin_diffusion.SpinStep("approximate", True, 5000.0, True, 0.0, None, None, 1)
    step_loop = step_pre._replace(precomputed=False)
    batch = {"input_ids": input_ids, "gen_latents": gen_latents.half().float(), **stored}  # as the store gives them
    gen = torch.Generator().manual_seed(0)
    loss_pre, logs_pre = train_spin_diffusion.spin_forward(
        policy, None, batch, gen, frozen=frozen, step=step_pre, autocast=contextlib.nullcontext
    )
    assert stored["prompt_embeds"].shape == (3, 77, text_encoder.config.hidden_size)
    in_loop = {
        k: v for k, v in batch.items() if not k.startswith("ref_err") and k != "prompt_embeds"
    }  # TE and reference run
    reference = Reference.frozen_copy(theta_k, "cpu")
    loss_loop, logs_loop = train_spin_diffusion.spin_forward(
        policy, reference, in_loop, gen, frozen=frozen, step=step_loop, autocast=contextlib.nullcontext
    )
    assert abs(loss_pre.item() - math.log(2)) > 1e-3  # the policy differs from the reference: a real check
    assert loss_pre.item() == pytest.approx(loss_loop.item(), abs=1e-6)
    assert logs_pre["ref_err_real"].item() == pytest.approx(logs_loop["ref_err_real"].item(), rel=1e-6)


def test_sft_weight_zero_is_the_papers_loss_and_lambda_adds_lambda_times_the_real_error():
    m_real, m_gen = torch.tensor([0.10, 0.30, 0.25]), torch.tensor([0.20, 0.22, 0.40])
    r_real, r_gen = torch.tensor([0.12, 0.28, 0.25]), torch.tensor([0.19, 0.25, 0.41])
    beta = 500.0
    today, _ = spin_loss(m_real, m_gen, r_real, r_gen, beta)
    zero, logs0 = spin_loss(m_real, m_gen, r_real, r_gen, beta, sft_weight=0.0)
    assert zero.item() == today.item() == pytest.approx(by_hand(m_real, m_gen, r_real, r_gen, beta)[0], rel=1e-6)
    assert logs0["spin_loss"].item() == logs0["loss"].item()

    def loss_and_grad(lam):
        x = m_real.clone().double().requires_grad_(True)
        loss, logs = spin_loss(x, m_gen.double(), r_real.double(), r_gen.double(), beta, sft_weight=lam)
        loss.backward()
        return loss.item(), x.grad.clone(), logs

    base, grad0, _ = loss_and_grad(0.0)
    lam = 2.5
    with_sft, grad, logs = loss_and_grad(lam)
    assert with_sft - base == pytest.approx(lam * m_real.double().mean().item(), rel=1e-12)
    assert logs["loss"].item() == pytest.approx(with_sft) and logs["spin_loss"].item() == pytest.approx(base)
    # the SFT term's gradient on each real error is lambda / B, on top of the preference term's
    assert torch.allclose(grad - grad0, torch.full_like(grad, lam / 3), rtol=0, atol=1e-12)


def test_implicit_acc_counts_a_zero_delta_as_half_a_hit():
    err = torch.tensor([0.2, 0.3, 0.4, 0.5])
    _, logs = spin_loss(err, err + 0.1, err, err + 0.1, beta=5000.0)  # policy = reference: delta is exactly 0
    assert logs["implicit_acc"].item() == 0.5
    gen = torch.tensor([0.3, 0.3])
    _, logs = spin_loss(torch.tensor([0.1, 0.2]), gen, torch.tensor([0.2, 0.2]), gen, beta=1.0)
    assert logs["implicit_acc"].item() == 0.75  # one hit (delta < 0), one tie (delta == 0)
