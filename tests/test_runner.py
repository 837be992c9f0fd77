"""PolicyRunner: the public API for a user's own control loop."""

import time

import numpy as np
import pytest
import torch

from paradiffpolicy import DiffusionPolicy, PolicyConfig, SamplerConfig
from paradiffpolicy.control.runner import PolicyRunner


def policy(sampler=None, steps=20):
    cfg = PolicyConfig(obs_dim=3, action_dim=2, down_dims=[16, 32], diffusion_step_embed_dim=16)
    cfg.scheduler.num_inference_steps = cfg.scheduler.num_train_timesteps = steps
    torch.manual_seed(0)
    return DiffusionPolicy(cfg, sampler or SamplerConfig(window=8, tol=0.05)).eval()


def test_loop_at_fixed_rate_returns_actions_and_reports(tmp_path):
    with PolicyRunner(policy(), hz=50, hold="repeat") as runner:
        runner.reset(np.zeros(3), seed=0)
        start = time.perf_counter()
        actions = []
        for tick in range(40):
            time.sleep(max(0.0, start + tick / 50 - time.perf_counter()))
            actions.append(runner.step(np.full(3, 0.01 * tick)))
        stats = runner.stats()
    assert np.isfinite(np.stack(actions)).all() and len(actions) == 40
    assert stats["ticks"] == 40 and stats["calls"] >= 2  # the first chunk plus at least one in the background
    assert {"p50", "p95", "p99"} <= set(stats["latency_ms"]) and "deadline_misses" in stats


def test_misses_are_counted_and_hold_is_sent_when_inference_is_too_slow():
    runner = PolicyRunner(policy(), hz=200, hold="zero_motion")
    real = runner.agent.infer
    runner.agent.infer = lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1]
    runner.reset(np.zeros(3))
    start = time.perf_counter()
    out = []
    for tick in range(60):
        time.sleep(max(0.0, start + tick / 200 - time.perf_counter()))
        out.append(runner.step(np.zeros(3)))
    runner.close()
    assert runner.deadline_misses > 0
    assert any(np.all(a[:-1] == 0) and a[-1] != 0 for a in out), "zero_motion hold keeps only the gripper dimension"


def test_budget_caps_each_call_and_is_reported():
    runner = PolicyRunner(policy(SamplerConfig(window=4, tol=0.0), steps=100), hz=20, budget_s=0.002)
    runner.reset(np.zeros(3))
    stats = runner.stats()
    runner.close()
    assert stats["budget_hits"] == 1 and stats["unconverged_calls"] == 1
    assert np.isfinite(runner._chunk.actions).all()


@pytest.mark.parametrize("obs,err,match", [
    (np.zeros(4), ValueError, r"shape \(4,\).*\(3,\)"),
    (np.array([0.0, np.nan, 0.0]), ValueError, "NaN or inf at \\[1\\]"),
    (np.zeros(3, dtype=np.int64), TypeError, "not floating point"),
])
def test_bad_observation_is_rejected_and_runner_stays_usable(obs, err, match):
    with PolicyRunner(policy(), hz=20) as runner:
        runner.reset(np.zeros(3))
        with pytest.raises(err, match=match):
            runner.step(obs)
        assert np.isfinite(runner.step(np.zeros(3))).all()


def test_step_before_reset_and_bad_settings():
    with pytest.raises(RuntimeError, match="reset"):
        PolicyRunner(policy(), hz=20).step(np.zeros(3))
    for kw, match in ((dict(hz=0), "hz"), (dict(hz=10, hold="freeze"), "hold"), (dict(hz=10, budget_s=-1), "budget_s")):
        with pytest.raises(ValueError, match=match):
            PolicyRunner(policy(), **kw)


def test_inference_process_gives_the_thread_runners_chunks_and_survives_bad_input():
    """The worker process holds its own copy of the policy: same seed, same chunks and the same
    statistics as in-process inference; an error inside the worker comes back as the same error
    type, and the worker answers the next valid call."""
    from paradiffpolicy.control.worker import ProcessAgent

    pol = policy()
    chunks = []
    for proc in (False, True):
        with PolicyRunner(pol, hz=1000, hold="repeat", inference_process=proc) as runner:
            runner.reset(np.full(3, 0.1), seed=7)
            first = runner._chunk.actions.copy()
            for tick in range(12):  # long enough for a background call
                runner.step(np.full(3, 0.1))
            runner.close()
            chunks.append((first, runner.stats()))
    assert np.abs(chunks[0][0] - chunks[1][0]).max() < 1e-5
    assert chunks[1][1]["calls"] >= 1 and chunks[1][1]["iterations_mean"] > 0
    with ProcessAgent(pol) as agent:
        agent.reset(np.zeros(3, dtype=np.float32), seed=0)
        with pytest.raises(ValueError, match="inference process: .*shape"):
            agent.infer(0, np.zeros((2, 5), dtype=np.float32))
        assert np.isfinite(agent.infer(0).actions).all() and len(agent.log.latency_ms) == 1
    assert not agent._proc.is_alive()
