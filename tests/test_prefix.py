"""Committed actions as a condition of every denoising step: the fixed point is the conditioned
sequential sample for every scheduler and mode, an all-zero weight is no condition at all, and a
weight of 1 pins the sample where the mode promises it."""

import math

import pytest
import torch

from paradiffpolicy.sampling import PicardSampler, SequentialSampler, draw_noise
from paradiffpolicy.sampling.prefix import ActionPrefix, prefix_weights
from paradiffpolicy.schedulers import SchedulerConfig, make_step_table

B, T, DA = 3, 8, 3
SCHEDULERS = {
    "ddpm": SchedulerConfig(),
    "ddim": SchedulerConfig(name="ddim", num_inference_steps=16),
    "dpmsolver++": SchedulerConfig(name="dpmsolver++", num_inference_steps=12),
}


def setup(scheduler: str, seed: int = 0):
    table = make_step_table(SCHEDULERS[scheduler])
    g = torch.Generator().manual_seed(seed)
    noise = draw_noise((B, T, DA), table.num_steps, g)
    cond = torch.randn(B, 4, generator=g)
    target = 0.6 * torch.tanh(torch.randn(B, T, DA, generator=g))
    return table, noise, cond, target


def weights(schedule="exp", committed=3, overlap_end=6):
    return prefix_weights(committed, overlap_end, T, schedule).expand(B, T).clone()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("mode,schedule", [("x0", "exp"), ("x0", "hard"), ("noised", "hard"), ("clean", "hard"),
                                           ("noised", "exp"), ("guided", "exp")])
def test_conditioned_picard_fixed_point_is_the_conditioned_sequential_sample(toy, scheduler, mode, schedule):
    table, noise, cond, target = setup(scheduler)
    prefix = ActionPrefix(target, weights(schedule), mode)
    ref = SequentialSampler(table).sample(toy, noise, cond, prefix=prefix).sample
    free = SequentialSampler(table).sample(toy, noise, cond).sample
    assert (ref - free).abs().max() > 1e-2  # the condition changes the sample
    for window in (1, 4):
        out = PicardSampler(table, window=window, tol=0.0).sample(toy, noise, cond, prefix=prefix)
        assert out.stats.converged.all()
        torch.testing.assert_close(out.sample, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_zero_weights_are_no_condition_bit_for_bit(toy, scheduler):
    table, noise, cond, target = setup(scheduler)
    for mode in ("x0", "noised", "clean"):
        prefix = ActionPrefix(target, torch.zeros(B, T), mode)
        for sampler in (SequentialSampler(table), PicardSampler(table, window=4, tol=0.05)):
            assert torch.equal(sampler.sample(toy, noise, cond, prefix=prefix).sample, sampler.sample(toy, noise, cond).sample)


@pytest.mark.parametrize("mode", ["x0", "noised", "clean"])
def test_weight_one_pins_the_committed_actions(toy, mode):
    """DDPM's last step returns x̂0 (x0 mode) or the state is replaced at the clean level
    (noised, clean): the committed positions come out as the target."""
    table, noise, cond, target = setup("ddpm")
    w = weights("hard", committed=3)
    out = SequentialSampler(table).sample(toy, noise, cond, prefix=ActionPrefix(target, w, mode)).sample
    torch.testing.assert_close(out[:, :3], target[:, :3], atol=1e-5, rtol=0)
    assert (out[:, 3:] - target[:, 3:]).abs().max() > 1e-2  # the free positions are not


def test_guidance_moves_towards_the_target(toy):
    table, noise, cond, target = setup("ddpm")
    w = weights("hard", committed=4)
    free = SequentialSampler(table).sample(toy, noise, cond).sample
    guided = SequentialSampler(table).sample(toy, noise, cond, prefix=ActionPrefix(target, w, "guided")).sample
    err = lambda x: (x[:, :4] - target[:, :4]).abs().mean()  # noqa: E731
    assert err(guided) < 0.5 * err(free)


def test_picard_with_a_state_prefix_converges_in_few_iterations_when_hard(toy):
    """Pinned states are pinned in the guesses too, so Picard's iteration count stays near the
    unconditioned one (a guess that missed them would propagate its error down the window)."""
    table, noise, cond, target = setup("ddpm")
    sampler = PicardSampler(table, window=16, tol=0.1)
    free = sampler.sample(toy, noise, cond).stats.rounds
    pinned = sampler.sample(toy, noise, cond, prefix=ActionPrefix(target, weights("hard"), "noised")).stats.rounds
    assert pinned <= free + 3 < table.num_steps // 2


def test_prefix_weights_follow_real_time_chunking():
    """RTC's eq. 5 (``get_prefix_weights``): start=2, end=6, total=10."""
    lin = prefix_weights(2, 6, 10, "linear")
    torch.testing.assert_close(lin, torch.tensor([1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0]))
    ex = prefix_weights(2, 6, 10, "exp")
    expected = [w * math.expm1(w) / (math.e - 1) if 0 < w < 1 else w for w in lin.tolist()]
    torch.testing.assert_close(ex, torch.tensor(expected))
    assert prefix_weights(2, 6, 10, "hard").tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert prefix_weights(8, 5, 10, "exp").tolist() == [1] * 5 + [0] * 5  # nothing beyond the overlap


def test_bad_prefix_is_refused_naming_what():
    target = torch.zeros(B, T, DA)
    with pytest.raises(ValueError, match="mode"):
        ActionPrefix(target, torch.zeros(B, T), "paint")
    with pytest.raises(ValueError, match=r"weights \(B, T\)"):
        ActionPrefix(target, torch.zeros(B, T + 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ActionPrefix(target, torch.full((B, T), 1.5))
    with pytest.raises(ValueError, match="NaN"):
        ActionPrefix(target.clone().fill_(float("nan")), torch.zeros(B, T))
    with pytest.raises(ValueError, match="schedule"):
        prefix_weights(1, 4, 8, "cosine")
    table, noise, cond, _ = setup("ddpm")
    with pytest.raises(ValueError, match="prefix target has shape"):
        SequentialSampler(table).sample(torch.nn.Identity(), noise, cond, prefix=ActionPrefix(torch.zeros(1, T, DA), torch.zeros(1, T)))
