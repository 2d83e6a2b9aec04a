"""The exact (trajectory) objective's pieces, against independent references: the step coefficients against
diffusers' own DDPM and DDIM(eta) steps over SD-1.5's strided schedule, the per-step log-ratio through epsilon
errors against torch.distributions' Gaussian log-densities, and the real side's pairs against the forward
process's moments."""

import contextlib

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from utils.losses import forward_posterior_pair, sampler_step_coefficients, spin_trajectory_log_ratio

SD15 = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)


def sampler(kind, steps):
    if kind == "ddpm":
        s = DDPMScheduler(**SD15)
    else:
        s = DDIMScheduler(**SD15, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    return s


CASES = [("ddpm", 50, 1.0), ("ddpm", 1000, 1.0), ("ddim", 50, 1.0), ("ddim", 25, 0.3)]


def picks(s):
    ts = [int(t) for t in s.timesteps]
    return [ts[0], ts[len(ts) // 3], ts[len(ts) // 2], ts[-2]] + ([ts[-1]] if ts[-1] > 0 else [])


@pytest.mark.parametrize("kind,steps,eta", CASES)
def test_step_coefficients_reproduce_the_samplers_own_step(kind, steps, eta):
    s = sampler(kind, steps)
    g = torch.Generator().manual_seed(0)
    for t in picks(s):
        x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        a, b, sigma = sampler_step_coefficients(s, t, eta)
        if kind == "ddpm":
            out = s.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
            z = randn_tensor(eps.shape, generator=torch.Generator().manual_seed(7), dtype=eps.dtype)
        else:
            z = torch.randn(eps.shape, generator=g)
            out = s.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        assert torch.allclose(out, a * x_t - b * eps + sigma * z, atol=1e-5, rtol=1e-5), (kind, t)


def test_deterministic_steps_have_no_likelihood():
    with pytest.raises(ValueError, match="no likelihood"):
        sampler_step_coefficients(sampler("ddim", 50), 981, eta=0.0)
    with pytest.raises(ValueError, match="no likelihood"):
        sampler_step_coefficients(sampler("ddpm", 1000), 0)
    with pytest.raises(ValueError, match="clip_sample"):
        sampler_step_coefficients(DDPMScheduler(num_train_timesteps=1000, clip_sample=True), 500)


@pytest.mark.parametrize("kind,steps,eta", CASES)
def test_log_ratio_through_eps_errors_equals_gaussian_log_densities(kind, steps, eta):
    s = sampler(kind, steps)
    g = torch.Generator().manual_seed(1)
    for t in picks(s):
        a, b, sigma = sampler_step_coefficients(s, t, eta)
        x_t = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        eps_model = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        eps_ref = eps_model + 0.1 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        # x_prev from the reference's own step, as on the generated side (the opponent is the reference)
        x_prev = a * x_t - b * eps_ref + sigma * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        ours = spin_trajectory_log_ratio(eps_model, eps_ref, x_t, x_prev, a=a, b=b, sigma=sigma)

        def log_density(eps):
            return torch.distributions.Normal(a * x_t - b * eps, sigma).log_prob(x_prev).flatten(1).sum(1)

        expected = log_density(eps_model) - log_density(eps_ref)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (kind, t, ours, expected)
        # per-sample coefficients as tensors give the same
        per_sample = spin_trajectory_log_ratio(
            eps_model,
            eps_ref,
            x_t,
            x_prev,
            a=torch.full((3,), a),
            b=torch.full((3,), b),
            sigma=torch.full((3,), sigma),
        )
        assert torch.allclose(per_sample, ours)


@pytest.mark.parametrize("t,s", [(981, 961), (501, 481), (41, 21), (21, 1), (1, -1), (999, 0)])
def test_real_pairs_have_the_forward_processs_moments(t, s):
    """Over many draws with x0 fixed: x_s is N(sqrt(abar_s) x0, 1 - abar_s), and x_t given x_s is the forward
    step N(sqrt(abar_t / abar_s) x_s, 1 - abar_t / abar_s): the joint Gaussian of (x_t, x_s) that the
    posterior must reproduce. The conditional of x_s on x_t (slope, residual variance) is checked too."""
    sched = DDPMScheduler(**SD15)
    n = 400_000
    g = torch.Generator().manual_seed(2)
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    tt, ss = torch.full((n,), t), torch.full((n,), s)
    x_t, x_s = forward_posterior_pair(
        sched,
        x0,
        torch.randn(n, 1, generator=g, dtype=torch.float64),
        torch.randn(n, 1, generator=g, dtype=torch.float64),
        tt,
        ss,
    )
    x_t, x_s = x_t.flatten(), x_s.flatten()
    abar = sched.alphas_cumprod.double()
    abar_t, abar_s = float(abar[t]), (float(abar[s]) if s >= 0 else 1.0)
    tol = 5 / n**0.5  # about 5 standard errors for unit-scale moments
    assert float(x_s.mean()) == pytest.approx(abar_s**0.5 * 0.7, abs=tol)
    assert float(x_s.var()) == pytest.approx(1 - abar_s, abs=tol)
    cov = float(((x_t - x_t.mean()) * (x_s - x_s.mean())).mean())
    assert cov == pytest.approx((abar_t / abar_s) ** 0.5 * (1 - abar_s), abs=tol)
    # the conditional of x_s on x_t (x0 fixed): slope and residual variance of DDPM's posterior over the stride
    slope = cov / float(x_t.var())
    residual = x_s - x_s.mean() - slope * (x_t - x_t.mean())
    beta = 1 - abar_t / abar_s
    assert slope == pytest.approx((1 - beta) ** 0.5 * (1 - abar_s) / (1 - abar_t), abs=tol)
    assert float(residual.var()) == pytest.approx((1 - abar_s) / (1 - abar_t) * beta, abs=tol)


def test_trajectory_errors_are_the_scaled_exact_log_ratio():
    """The training step's per-sample errors: model minus reference equals -(2 / (D * mean weight)) times the exact
    log-likelihood ratio of the step, on both sides; equal models give equal errors (loss log 2)."""
    from utils import family_sd
    from utils.spin import TrajectoryInputs, TrajectoryTable, trajectory_errors

    s = sampler("ddpm", 50)
    table = TrajectoryTable(s, eta=1.0)
    g = torch.Generator().manual_seed(3)
    b, k, shape = 2, 3, (4, 8, 8)
    t = torch.tensor([table.timesteps[i] for i in (0, 5, 20, 30, 40, 48)] * 2)  # 2 * B * K rows
    x_t, x_prev = torch.randn(len(t), *shape, generator=g), torch.randn(len(t), *shape, generator=g)
    a, bb, sigma, weight = table.columns(t, "cpu")
    view = (-1, 1, 1, 1)
    inputs = TrajectoryInputs(x_t, (a.view(view) * x_t - x_prev) / bb.view(view), t, weight)
    w1, w2 = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)

    def model_with(w):
        return lambda x, ts, emb, return_dict=False: (x * w,)

    cond, objective = {"prompt_embeds": torch.zeros(2 * b, 1, 1)}, family_sd.objective(s)
    m, r = (trajectory_errors(model_with(w), objective, inputs, cond, k) for w in (w1, w2))
    exact = spin_trajectory_log_ratio(x_t * w1, x_t * w2, x_t, x_prev, a=a, b=bb, sigma=sigma).reshape(-1, k).mean(1)
    d = x_t[0].numel()
    assert torch.allclose(m - r, -2 / (d * table.mean_weight) * exact, rtol=1e-4, atol=1e-6)
    assert torch.equal(trajectory_errors(model_with(w1), objective, inputs, cond, k), m)


def test_recorded_chain_steps_are_the_samplers_own(assets):
    """The opponent's stored steps are consecutive states of its chain: with every step kept, each x_prev is
    the next step's x_t, and the last x_prev is the returned latent (DDIM, eta 1)."""
    from diffusers import StableDiffusionPipeline

    from utils.spin import TrajectoryRecorder, TrajectoryTable

    pipe = StableDiffusionPipeline.from_pretrained(str(assets["pipeline"]), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # PNDM's config has none
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    table = TrajectoryTable(pipe.scheduler, eta=1.0)
    chosen = [list(table.timesteps), list(table.timesteps)]
    with TrajectoryRecorder(pipe.scheduler, chosen) as rec:
        out = pipe(
            ["a red square", "a blue circle"],
            num_inference_steps=4,
            guidance_scale=3.0,
            eta=1.0,
            height=32,
            width=32,
            output_type="latent",
            generator=[torch.Generator().manual_seed(i) for i in (1, 2)],
        )
    traj = rec.tensors()
    assert traj["traj_x_t"].shape == (2, len(chosen[0]), 4, 16, 16) and traj["traj_t"].tolist() == chosen
    assert torch.equal(traj["traj_x_prev"][:, :-1], traj["traj_x_t"][:, 1:])
    assert torch.allclose(traj["traj_x_prev"][:, -1], out.images.float())
    assert "step" not in vars(pipe.scheduler)  # the wrapper is gone


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_recording_keeps_the_samplers_noise_seeded_and_stochastic(assets, kind):
    """Pipelines pass `eta` and `generator` to a step only if its signature names them: the recorder must not hide
    them. Recorded or not, the same seeds give the same stochastic chain (DDIM at eta 1, DDPM), and DDIM at eta 1
    differs from DDIM at eta 0 (before the fix, the recorded opponent sampled at eta 0 whatever --gen_eta said)."""
    from diffusers import StableDiffusionPipeline

    from utils.spin import TrajectoryRecorder

    pipe = StableDiffusionPipeline.from_pretrained(str(assets["pipeline"]), safety_checker=None)
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)

    def sample(eta, record):
        kwargs = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="latent", eta=eta)
        gens = [torch.Generator().manual_seed(i) for i in (1, 2)]
        with TrajectoryRecorder(pipe.scheduler, [[], []]) if record else contextlib.nullcontext():
            torch.manual_seed(123 if record else 456)  # the global RNG must not be what draws the noise
            return pipe(["a red square", "a blue circle"], generator=gens, **kwargs).images

    recorded = sample(1.0, record=True)
    assert torch.equal(recorded, sample(1.0, record=False))
    if kind == "ddim":
        assert not torch.allclose(recorded, sample(0.0, record=True), atol=1e-3)


# ----------------------------------------------------------------------------- end to end (tiny assets)

TRAJ = [
    "--spin_objective",
    "trajectory",
    "--gen_scheduler",
    "ddpm",
    "--gen_num_inference_steps",
    "4",
    "--trajectory_steps",
    "2",
]


def iteration_metrics(out, k):
    import json

    return json.loads((out / f"iter_{k}" / "metrics.json").read_text())


def card_meta(server, repo):
    import yaml

    return yaml.safe_load(server.read_file(repo, "README.md").decode().split("---")[1])


@pytest.mark.parametrize("mode", ["lora", "full_ddim", "lora_precompute"])
def test_trajectory_runs_push_loadable_iterations_starting_at_log_2(assets, tmp_path, hub_server, mode):
    import math

    from diffusers import StableDiffusionPipeline

    from helpers import run_spin, spin_args
    from hub_server import TEST_TOKEN, hub_online

    extra = {
        "lora": ["--use_lora"],
        "full_ddim": ["--gen_scheduler", "ddim", "--gen_eta", "1.0", "--learning_rate", "1e-4"],
        "lora_precompute": ["--use_lora", "--precompute_reference"],
    }[mode]
    out, name = tmp_path / mode, f"test-user/traj-{mode.replace('_', '-')}"
    with hub_online():
        run_spin(
            *spin_args(
                assets,
                out,
                *TRAJ,
                "--max_train_steps",
                "2",
                *extra,
                "--push_to_hub",
                "--hub_model_id",
                name,
                "--hub_token",
                TEST_TOKEN,
            )
        )
        base = StableDiffusionPipeline.from_pretrained(
            assets["pipeline"], safety_checker=None, requires_safety_checker=False
        )
        for k in (1, 2):
            m = iteration_metrics(out, k)
            assert m["spin_objective"] == "trajectory"
            assert m["first_step"]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
            assert m["first_step"]["ref_err_gen"] > 0 and math.isfinite(m["mean"]["loss"])
            assert "spin-trajectory-objective" in card_meta(hub_server, f"{name}-iter{k}")["tags"]
            card = hub_server.read_file(f"{name}-iter{k}", "README.md").decode()
            assert "spin_objective" in card and "| trajectory |" in card.replace("`", "")
            if "lora" in mode:
                base.load_lora_weights(f"{name}-iter{k}", adapter_name=f"it{k}")
            else:
                pulled = StableDiffusionPipeline.from_pretrained(f"{name}-iter{k}")
                assert all(torch.isfinite(p).all() for p in pulled.unet.parameters())
    shard = out / "iter_1" / "synthetic" / "shard-00000.safetensors"
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        assert f.get_slice("traj_x_t").get_shape()[1:3] == [2, 4]  # K = 2 stored steps of 4-channel latents
        assert ("ref_err_real" in f.keys()) == ("precompute" in mode)


def test_killed_trajectory_iteration_reruns_to_the_same_weights(assets, tmp_path, monkeypatch):
    import train_spin_diffusion
    from helpers import max_abs_diff, run_spin, spin_args, tensors

    argv = [*TRAJ, "--use_lora", "--max_train_steps", "4", "--checkpointing_steps", "2", "--num_iterations", "1"]
    run_spin(*spin_args(assets, tmp_path / "straight", *argv))
    out = tmp_path / "killed"
    real = train_spin_diffusion.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(accelerator, directory, step, *a, **kw):
        result = real(accelerator, directory, step, *a, **kw)
        if step == 2:
            raise Killed()
        return result

    with monkeypatch.context() as m:
        m.setattr(train_spin_diffusion, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_spin(*spin_args(assets, out, *argv))
    run_spin(*spin_args(assets, out, *argv))
    a = tensors(tmp_path / "straight" / "iter_1" / "pytorch_lora_weights.safetensors")
    b = tensors(out / "iter_1" / "pytorch_lora_weights.safetensors")
    assert max_abs_diff(a, b) < 1e-6


def test_trajectory_on_two_processes(assets, tmp_path):
    """Two CPU processes (DDP): each generates its shards with their chain steps, training starts at log 2."""
    import json
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import spin_args

    out = tmp_path / "ddp"
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(root / "train_spin_diffusion.py"),
           *spin_args(assets, out, *TRAJ, "--use_lora", "--num_iterations", "1", "--train_batch_size", "2",
                      "--gen_shard_size", "4", "--max_train_steps", "2")]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "iter_1" / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert {r["process"] for r in rows} == {0, 1} and sorted(r["index"] for r in rows) == list(range(20))
    m = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert m["spin_objective"] == "trajectory" and m["first_step"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
