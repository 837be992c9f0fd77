"""Picard sampling returns the sequential sample for the same pre-drawn noise."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ToyDenoiser
from paradiffpolicy.sampling import PicardSampler, SequentialSampler, draw_noise
from paradiffpolicy.schedulers import SchedulerConfig, make_step_table

SCHEDULERS = [("ddpm", 100), ("ddpm", 16), ("ddim", 16), ("ddim", 8), ("dpmsolver++", 16), ("dpmsolver++", 8)]


def _setup(name, steps, batch=3, seed=0, strength=1.0):
    table = make_step_table(SchedulerConfig(name=name, num_inference_steps=steps, clip_sample=name != "dpmsolver++"))
    model = ToyDenoiser(strength=strength)
    noise = draw_noise((batch, 8, 3), steps, torch.Generator().manual_seed(seed))
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed + 1))
    ref = SequentialSampler(table).sample(model, noise, cond).sample
    return table, model, noise, cond, ref


@pytest.mark.parametrize("name,steps", SCHEDULERS)
@pytest.mark.parametrize("init", ["rollout", "copy"])
def test_window_one_is_sequential(name, steps, init):
    table, model, noise, cond, ref = _setup(name, steps)
    out = PicardSampler(table, window=1, tol=0.5, init=init).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert (x - ref).abs().max() < 1e-5
    assert stats.rounds == steps and bool(stats.converged.all())


@pytest.mark.parametrize("name,steps", SCHEDULERS)
@pytest.mark.parametrize("window", [2, 5, 16, 200])
def test_zero_tolerance_is_sequential_for_any_window(name, steps, window):
    table, model, noise, cond, ref = _setup(name, steps)
    out = PicardSampler(table, window=window, tol=0.0).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert (x - ref).abs().max() < 1e-4
    assert stats.rounds <= steps and bool(stats.converged.all())


@pytest.mark.parametrize("name,steps,tol", [("ddpm", 100, 0.1), ("ddim", 16, 1e-3), ("dpmsolver++", 16, 1e-3)])
@pytest.mark.parametrize("init", ["rollout", "copy"])
def test_tolerance_gives_fewer_rounds_and_small_deviation(name, steps, tol, init):
    table, model, noise, cond, ref = _setup(name, steps)
    out = PicardSampler(table, window=16, tol=tol, init=init).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert stats.rounds < steps
    assert (x - ref).abs().max() < 2e-2
    assert bool(stats.converged.all())
    assert (stats.residual <= tol).all()


@pytest.mark.parametrize("name,steps", SCHEDULERS)
@pytest.mark.parametrize("memory", [1, 3])
def test_anderson_keeps_the_sequential_fixed_point(name, steps, memory):
    """Anderson-accelerated Picard: exact at tol=0 (any window), never more than N iterations,
    and within tolerance of the sequential sample at the default τ."""
    table, model, noise, cond, ref = _setup(name, steps, strength=2.0)
    out = PicardSampler(table, window=8, tol=0.0, anderson=memory).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert (x - ref).abs().max() < 1e-4 and stats.rounds <= steps and bool(stats.converged.all())
    tol = 0.1 if name == "ddpm" else 1e-3
    out = PicardSampler(table, window=16, tol=tol, anderson=memory).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert (x - ref).abs().max() < 2e-2 and bool(stats.converged.all())


@pytest.mark.parametrize("name,steps", SCHEDULERS)
@pytest.mark.parametrize("update", ["frozen_x0", "frozen_eps"])
def test_newton_type_updates_keep_the_sequential_fixed_point(name, steps, update):
    """A window update that carries corrections with the step's linear part (instead of the running
    sum) changes the path, not the fixed point: exact at window=1 and at tol=0 for any window, never
    more than N iterations; with Anderson on top too."""
    table, model, noise, cond, ref = _setup(name, steps, strength=2.0)
    for settings_ in (dict(window=1, tol=0.5), dict(window=5, tol=0.0), dict(window=16, tol=0.0),
                      dict(window=8, tol=0.0, anderson=2)):
        out = PicardSampler(table, update=update, **settings_).sample(model, noise, cond)
        assert (out.sample - ref).abs().max() < 1e-4, settings_
        assert out.stats.rounds <= steps and bool(out.stats.converged.all())


def test_newton_type_update_is_not_the_running_sum():
    """The update option takes effect: at a loose tolerance the path (and so the count or the
    sample) differs from ParaDiGMS' running sum."""
    table, model, noise, cond, _ = _setup("ddpm", 100, strength=2.0)
    plain = PicardSampler(table, window=16, tol=0.1).sample(model, noise, cond)
    newton = PicardSampler(table, window=16, tol=0.1, update="frozen_x0").sample(model, noise, cond)
    assert plain.stats.rounds != newton.stats.rounds or not torch.equal(plain.sample, newton.sample)


def test_smaller_tolerance_tracks_sequential_more_closely():
    table, model, noise, cond, ref = _setup("ddpm", 100, strength=2.0)
    devs, rounds = [], []
    for tol in (0.3, 0.03, 0.003):
        out = PicardSampler(table, window=16, tol=tol).sample(model, noise, cond)
        x, stats = out.sample, out.stats
        devs.append(float((x - ref).abs().max()))
        rounds.append(stats.rounds)
    assert devs[0] > devs[1] > devs[2]
    assert rounds[0] <= rounds[1] <= rounds[2]


def test_rows_converge_independently():
    """An easy and a hard row in one batch: each takes its own number of iterations, each equals
    its single-row run, and once the easy row is done the calls carry only the hard row."""
    table = make_step_table(SchedulerConfig(num_inference_steps=100))
    easy, hard = ToyDenoiser(strength=0.0), ToyDenoiser(strength=4.0)
    calls = []

    def routed(sample, timestep, global_cond):  # cond > 0 marks the hard row
        calls.append(sample.shape[0])
        out = torch.empty_like(sample)
        is_hard = global_cond[:, 0] > 0
        if (~is_hard).any():
            out[~is_hard] = easy(sample[~is_hard], timestep[~is_hard])
        if is_hard.any():
            out[is_hard] = hard(sample[is_hard], timestep[is_hard])
        return out

    noise = draw_noise((1, 8, 3), 100, torch.Generator().manual_seed(3))
    sampler = PicardSampler(table, window=16, tol=0.05)
    out = sampler.sample(easy, noise)
    x_easy, s_easy = out.sample, out.stats
    out = sampler.sample(hard, noise)
    x_hard, s_hard = out.sample, out.stats
    assert s_easy.rounds < s_hard.rounds

    both = type(noise)(noise.initial.repeat(2, 1, 1), noise.steps.repeat(1, 2, 1, 1))
    out = sampler.sample(routed, both, torch.tensor([[-1.0], [1.0]]))
    x, stats = out.sample, out.stats
    assert stats.iterations.tolist() == [s_easy.rounds, s_hard.rounds]
    assert stats.rounds == s_hard.rounds
    assert torch.allclose(x[0], x_easy[0], atol=1e-5) and torch.allclose(x[1], x_hard[0], atol=1e-5)
    assert max(calls[s_easy.rounds:]) <= 16


@pytest.mark.parametrize("anderson,update", [(0, "picard"), (2, "picard"), (0, "frozen_x0")])
def test_fixed_shape_windows_give_the_same_result(anderson, update):
    """``fixed_shape`` (compiled graphs) feeds every call (batch x window) rows, finished rows and
    steps past N included; the results, iteration counts and residuals are those of the
    shrinking windows, also with a warm start and rows that finish at different times."""
    from paradiffpolicy.sampling import WarmStart

    table = make_step_table(SchedulerConfig(num_inference_steps=100))
    easy, hard = ToyDenoiser(strength=0.0), ToyDenoiser(strength=4.0)
    shapes = []

    def routed(sample, timestep, global_cond):  # cond > 0 marks the hard row
        shapes.append(tuple(sample.shape))
        hard_row = (global_cond[:, :1] > 0).view(-1, 1, 1)
        return torch.where(hard_row, hard(sample, timestep), easy(sample, timestep))

    noise = draw_noise((2, 8, 3), 100, torch.Generator().manual_seed(3))
    cond = torch.tensor([[-1.0], [1.0]])
    ref = SequentialSampler(table).sample(routed, noise, cond).sample
    first = PicardSampler(table, window=16, tol=0.0).sample(routed, noise, cond + 0.1, return_trajectory=True)
    for warm in (None, WarmStart.from_previous(first.trajectory, 3)):
        runs = {}
        for fixed in (False, True):
            shapes.clear()
            sampler = PicardSampler(table, window=16, tol=0.05, anderson=anderson, update=update, fixed_shape=fixed)
            out = sampler.sample(routed, noise, cond, warm_start=warm)
            runs[fixed] = (out.sample, out.stats, set(shapes))
        (x, st, seen), (xf, stf, seen_f) = runs[False], runs[True]
        assert seen_f == {(32, 8, 3)} and len(seen) > 1  # one shape only with fixed_shape
        assert torch.allclose(xf, x, atol=1e-6) and (xf - ref).abs().max() < 0.05
        assert stf.iterations.tolist() == st.iterations.tolist()
        assert warm is not None or stf.iterations[0] < stf.iterations[1]  # the easy row finishes first
        assert torch.allclose(stf.residual, st.residual) and bool(stf.converged.all())


def test_max_iters_returns_estimate_flagged_unconverged():
    table, model, noise, cond, ref = _setup("ddpm", 100, strength=3.0)
    out = PicardSampler(table, window=8, tol=1e-4, max_iters=5).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert stats.rounds == 5
    assert not bool(stats.converged.any())
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "sampler.window"),
    (dict(window=2.5), "sampler.window"),
    (dict(tol=-0.1), "sampler.tol"),
    (dict(tol=float("nan")), "sampler.tol"),
    (dict(max_iters=0), "sampler.max_iters"),
    (dict(init="zeros"), "sampler.init"),
    (dict(anderson=-1), "sampler.anderson"),
    (dict(update="newton"), "sampler.update"),
])
def test_bad_settings_are_rejected_by_name(kwargs, match):
    table = make_step_table(SchedulerConfig(num_inference_steps=10))
    with pytest.raises(ValueError, match=match):
        PicardSampler(table, **kwargs)


def test_noise_with_wrong_step_count_is_rejected():
    table = make_step_table(SchedulerConfig(num_inference_steps=10))
    noise = draw_noise((1, 8, 3), 12)
    for sampler in (SequentialSampler(table), PicardSampler(table)):
        with pytest.raises(ValueError, match="noise has 12 steps"):
            sampler.sample(ToyDenoiser(), noise)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["ddpm", "ddim", "dpmsolver++"]),
    steps=st.integers(2, 30),
    window=st.integers(1, 40),
    tol=st.sampled_from([0.0, 1e-6]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 1000),
    init=st.sampled_from(["rollout", "copy"]),
)
def test_property_tiny_tolerance_matches_sequential(name, steps, window, tol, batch, seed, init):
    table, model, noise, cond, ref = _setup(name, steps, batch=batch, seed=seed)
    out = PicardSampler(table, window=window, tol=tol, init=init).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert (x - ref).abs().max() < 1e-4
    assert stats.rounds <= steps
    assert bool(stats.converged.all())


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(5, 60), window=st.integers(2, 32), tol=st.floats(0.01, 0.5), seed=st.integers(0, 100))
def test_property_rounds_bounded_and_result_finite(steps, window, tol, seed):
    table, model, noise, cond, ref = _setup("ddpm", steps, seed=seed)
    out = PicardSampler(table, window=window, tol=tol).sample(model, noise, cond)
    x, stats = out.sample, out.stats
    assert stats.rounds <= steps
    assert (stats.nfe <= stats.iterations * min(window, steps)).all()
    assert torch.isfinite(x).all() and (x - ref).abs().max() < 0.5


@pytest.mark.parametrize("name,steps", [("ddpm", 100), ("ddim", 16), ("dpmsolver++", 16)])
def test_warm_start_changes_iterations_not_the_sample(name, steps):
    """Any warm start (here: the converged trajectory for another observation, time-shifted, and
    pure garbage) leaves the fixed point — the sequential sample — unchanged."""
    from paradiffpolicy.sampling import Trajectory, WarmStart

    table, model, noise, cond, ref = _setup(name, steps, batch=2)
    first = PicardSampler(table, window=8, tol=0.0).sample(model, noise, cond + 0.3, return_trajectory=True)
    states = first.trajectory.states
    assert states.shape == (2, steps + 1, 8, 3) and first.trajectory.x0.shape == states.shape
    garbage = torch.randn_like(states) * 5
    for warm in (WarmStart(states, torch.ones(8, dtype=torch.bool)), WarmStart.from_previous(Trajectory(states), 3),
                 WarmStart.from_previous(first.trajectory, 3),
                 WarmStart(garbage, torch.ones(8, dtype=torch.bool))):
        out = PicardSampler(table, window=8, tol=0.0).sample(model, noise, cond, warm_start=warm)
        x, stats = out.sample, out.stats
        assert (x - ref).abs().max() < 1e-4 and bool(stats.converged.all())
    # the same observation's own trajectory is a perfect guess: one pass over the windows suffices
    own = PicardSampler(table, window=8, tol=0.0).sample(model, noise, cond, return_trajectory=True).trajectory.states
    out = PicardSampler(table, window=8, tol=1e-3).sample(model, noise, cond, warm_start=WarmStart(own, torch.ones(8, dtype=torch.bool)))
    x, stats = out.sample, out.stats
    assert stats.rounds <= -(-steps // 8) + 1 and (x - ref).abs().max() < 1e-4


def test_noise_shift_moves_the_horizon_and_keeps_the_overlap():
    a, b = draw_noise((1, 8, 3), 5, torch.Generator().manual_seed(0)), draw_noise((1, 8, 3), 5, torch.Generator().manual_seed(1))
    s = a.shifted(3, b)
    assert torch.equal(s.initial[:, :5], a.initial[:, 3:]) and torch.equal(s.initial[:, 5:], b.initial[:, 5:])
    assert torch.equal(s.steps[:, :, :5], a.steps[:, :, 3:]) and torch.equal(s.steps[:, :, 5:], b.steps[:, :, 5:])
    assert a.shifted(8, b) is b and a.shifted(0, b) is a
