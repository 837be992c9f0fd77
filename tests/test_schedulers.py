"""Scheduler math against diffusers (the oracle), step by step and over whole trajectories."""

import itertools

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import ToyDenoiser  # noqa: E402
from paradiffpolicy.sampling import SequentialSampler, draw_noise  # noqa: E402
from paradiffpolicy.schedulers import SchedulerConfig, make_step_table  # noqa: E402

CASES = [
    # (name, inference steps, prediction, clip, beta schedule, spacing)
    *[("ddpm", n, pred, clip, beta, None) for n, pred, clip, beta in itertools.product(
        (100, 16, 8), ("epsilon", "sample"), (True, False), ("squaredcos_cap_v2", "linear"))],
    *[("ddim", n, pred, clip, beta, None) for n, pred, clip, beta in itertools.product(
        (100, 16, 8), ("epsilon", "sample"), (True, False), ("squaredcos_cap_v2", "linear"))],
    *[("dpmsolver++", n, pred, False, beta, None) for n, pred, beta in itertools.product(
        (16, 8), ("epsilon", "sample"), ("squaredcos_cap_v2", "linear"))],
    ("ddpm", 16, "epsilon", True, "squaredcos_cap_v2", "trailing"),
    ("ddim", 16, "epsilon", True, "squaredcos_cap_v2", "trailing"),
    ("ddim", 16, "epsilon", True, "squaredcos_cap_v2", "linspace"),
    ("ddim", 8, "epsilon", False, "squaredcos_cap_v2", "leading-noalpha1"),
]


def _pair(name, n, pred, clip, beta, spacing):
    set_alpha_to_one = spacing != "leading-noalpha1"
    spacing = None if spacing == "leading-noalpha1" else spacing
    cfg = SchedulerConfig(name=name, num_train_timesteps=100, num_inference_steps=n, beta_schedule=beta,
                          prediction_type=pred, clip_sample=clip, timestep_spacing=spacing,
                          set_alpha_to_one=set_alpha_to_one)
    common = dict(num_train_timesteps=100, beta_schedule=beta, prediction_type=pred)
    if spacing:
        common["timestep_spacing"] = spacing
    if name == "ddpm":
        ref = diffusers.DDPMScheduler(**common, clip_sample=clip, variance_type="fixed_small")
    elif name == "ddim":
        ref = diffusers.DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=set_alpha_to_one)
    else:
        ref = diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(n)
    return cfg, ref


def _ref_step(ref, name, out, t, x, z):
    """One diffusers step; DDPM's internal noise draw is replaced by ``z`` via a seeded generator."""
    if name == "ddpm":
        g = torch.Generator().manual_seed(1234)
        zz = torch.randn(x.shape, generator=g)
        y = ref.step(out, t, x, generator=torch.Generator().manual_seed(1234)).prev_sample
        # remove diffusers' noise, add ours: the noise scale is what we compare, via the difference
        return y, zz
    return ref.step(out, t, x).prev_sample, None


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_each_step_matches_diffusers(case):
    name = case[0]
    cfg, ref = _pair(*case)
    table = make_step_table(cfg)
    assert table.timesteps.tolist() == ref.timesteps.tolist()
    model = ToyDenoiser(horizon=8, action_dim=3, strength=1.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, generator=g)
    x0_prev = torch.zeros_like(x)
    for k, t in enumerate(ref.timesteps):
        kk = torch.full((2,), k)
        out = model(x, table.timesteps[kk])
        y_ref, z = _ref_step(ref, name, out, t, x, None)
        x0, eps = table.predict_x0_eps(out, x, kk)
        y = table.noise_free_step(x, x0, eps, x0_prev, kk)
        if z is not None:
            y = y + table.noise_std[k] * z
        np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-4, atol=2e-5, err_msg=f"step {k} (t={int(t)})")
        x, x0_prev = y_ref, x0


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == "epsilon" and c[4] == "squaredcos_cap_v2"],
                         ids=lambda c: "-".join(str(v) for v in c))
def test_sequential_trajectory_matches_diffusers(case):
    """Our SequentialSampler vs a plain diffusers loop with the same noise, end to end."""
    name = case[0]
    cfg, ref = _pair(*case)
    table = make_step_table(cfg)
    model = ToyDenoiser(horizon=8, action_dim=3)
    noise = draw_noise((3, 8, 3), table.num_steps, torch.Generator().manual_seed(7))
    out = SequentialSampler(table).sample(model, noise)
    ours, stats = out.sample, out.stats
    x = noise.initial.clone()
    for k, t in enumerate(ref.timesteps):
        out = model(x, torch.full((3,), int(t)))
        if name == "ddpm":
            # diffusers draws its own noise: subtract it and add ours
            y = ref.step(out, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
            if int(t) > 0:
                z_ref = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
                y = y + table.noise_std[k] * (noise.steps[k] - z_ref)
            x = y
        else:
            x = ref.step(out, t, x).prev_sample
    np.testing.assert_allclose(ours.numpy(), x.numpy(), rtol=1e-4, atol=1e-4)
    assert stats.rounds == table.num_steps


def test_ddpm_noise_scale_matches_diffusers_variance():
    cfg, ref = _pair("ddpm", 100, "epsilon", True, "squaredcos_cap_v2", None)
    table = make_step_table(cfg)
    expected = [float(ref._get_variance(int(t))) ** 0.5 if int(t) > 0 else 0.0 for t in ref.timesteps]
    np.testing.assert_allclose(table.noise_std.numpy(), expected, rtol=1e-5, atol=1e-8)


def test_dpmsolver_rejects_duplicate_timesteps():
    with pytest.raises(ValueError, match="duplicate DPM-Solver timesteps"):
        make_step_table(SchedulerConfig(name="dpmsolver++", num_inference_steps=100, clip_sample=False))


@pytest.mark.parametrize("key,value,match", [
    ("name", "euler", "scheduler.name"),
    ("beta_schedule", "cosine", "scheduler.beta_schedule"),
    ("prediction_type", "v", "scheduler.prediction_type"),
    ("num_inference_steps", 0, "scheduler.num_inference_steps"),
    ("num_inference_steps", 101, "scheduler.num_inference_steps"),
    ("timestep_spacing", "uniform", "scheduler.timestep_spacing"),
])
def test_bad_scheduler_config_names_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        make_step_table(SchedulerConfig(**{key: value}))
