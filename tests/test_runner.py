"""PolicyRunner: the public API for a user's own control loop. No test here reads the wall clock:
background inference is made to finish (or not) by waiting on it or by a policy that blocks."""

import threading

import numpy as np
import pytest

from conftest import tiny_policy
from paradiffpolicy import PolicyRunner, SamplerConfig


def policy(sampler=None, steps=20):
    return tiny_policy(sampler or SamplerConfig(window=8, tol=0.05), steps=steps, obs_dim=3)


def test_step_uses_background_chunks_and_reports():
    with PolicyRunner(policy(), hz=50, hold="repeat") as runner:
        runner.reset(np.zeros(3), seed=0)
        actions = []
        for tick in range(40):
            actions.append(runner.step(np.full(3, 0.01 * tick)))
            runner.wait()  # inference always in time: no misses
        stats = runner.stats()
    ta = runner.agent.policy.config.n_action_steps
    assert np.isfinite(np.stack(actions)).all() and len(actions) == 40
    assert stats["ticks"] == 40 and stats["deadline_misses"] == 0
    assert stats["calls"] >= 40 // ta  # the first chunk plus one per Ta ticks, started early
    assert {"p50", "p95", "p99"} <= set(stats["latency_ms"])


def test_act_is_synchronous_and_matches_step_chunks():
    """act() infers in the caller's thread every Ta ticks from that tick's observation: the same
    chunks as step() when step's background calls start at the same ticks."""
    pol = policy()
    ta = pol.config.n_action_steps
    obs = [np.full(3, 0.02 * t, dtype=np.float32) for t in range(3 * ta)]
    with PolicyRunner(pol) as runner:  # no hz: act() only
        runner.reset(seed=3)  # the episode starts at the first act()
        acted = [runner.act(o) for o in obs]
        assert not any(t.name.startswith("policy-inference") for t in threading.enumerate())  # no thread started
        assert runner.stats()["calls"] == 3 and runner.deadline_misses == 0
    with PolicyRunner(pol, hz=10) as stepped:
        stepped.reset(obs[0], seed=3)
        first = stepped.chunk.actions[:ta]
    assert np.array_equal(np.stack(acted[:ta]), first)  # the same first chunk for the same seed
    with pytest.raises(RuntimeError, match="hz"):
        PolicyRunner(pol).step(obs[0])


def test_misses_are_counted_and_hold_is_sent_when_inference_is_late():
    pol = policy()
    gate = threading.Event()
    real = pol.sample_from_condition

    def blocked(*a, **k):  # the background call waits until the test lets it go
        if threading.current_thread().name.startswith("policy-inference"):
            gate.wait(timeout=30)
        return real(*a, **k)

    pol.sample_from_condition = blocked
    runner = PolicyRunner(pol, hz=200, hold="zero_motion")
    runner.reset(np.zeros(3))
    horizon_left = len(runner.chunk.actions)
    out = [runner.step(np.zeros(3)) for _ in range(horizon_left + 5)]
    gate.set()
    runner.close()
    assert runner.deadline_misses == 5  # the chunk's remaining actions are used first, then the hold
    assert all(np.all(a[:-1] == 0) and a[-1] == out[horizon_left - 1][-1] for a in out[horizon_left:])


def test_budget_caps_each_call_and_is_reported():
    runner = PolicyRunner(policy(SamplerConfig(window=4, tol=0.0), steps=100), hz=20, budget_s=1e-9)
    runner.reset(np.zeros(3))
    stats = runner.stats()
    runner.close()
    assert stats["budget_hits"] == 1 and stats["unconverged_calls"] == 1
    assert np.isfinite(runner.chunk.actions).all()


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
        with pytest.raises(err, match=match):
            runner.act(obs)
        assert np.isfinite(runner.step(np.zeros(3))).all()
        assert len(runner.agent.history) == runner.agent.policy.config.n_obs_steps


def test_misuse_says_what_to_do():
    with pytest.raises(RuntimeError, match="reset"):
        PolicyRunner(policy(), hz=20).step(np.zeros(3))
    for kw, match in ((dict(hz=0), "hz"), (dict(hz=10, hold="freeze"), "hold"), (dict(hz=10, budget_s=-1), "budget_s")):
        with pytest.raises(ValueError, match=match):
            PolicyRunner(policy(), **kw)
    runner = PolicyRunner(policy(), hz=20)
    runner.reset(np.zeros(3))
    runner.close()
    runner.close()  # twice is harmless
    for call in (lambda: runner.step(np.zeros(3)), lambda: runner.act(np.zeros(3)), lambda: runner.reset(np.zeros(3))):
        with pytest.raises(RuntimeError, match="PolicyRunner is closed"):
            call()


@pytest.mark.slow
def test_inference_process_gives_the_thread_runners_chunks_and_survives_bad_input():
    """The worker process holds its own copy of the policy: same seed, same chunks and the same
    statistics as in-process inference; an error inside the worker comes back as the same error
    type, and the worker answers the next valid call."""
    from paradiffpolicy.control.worker import ProcessAgent

    pol = policy()
    runs = []
    for proc in (False, True):
        with PolicyRunner(pol, hz=1000, hold="repeat", inference_process=proc) as runner:
            runner.reset(np.full(3, 0.1), seed=7)
            first = runner.chunk.actions.copy()
            for tick in range(12):  # long enough for a background call
                runner.step(np.full(3, 0.1))
                runner.wait()
            runs.append((first, runner.stats()))
    assert np.abs(runs[0][0] - runs[1][0]).max() < 1e-5
    assert runs[1][1]["calls"] == runs[0][1]["calls"] >= 2 and runs[1][1]["iterations_mean"] > 0
    with ProcessAgent(pol) as agent:
        agent.reset(np.zeros(3, dtype=np.float32), seed=0)
        with pytest.raises(ValueError, match="inference process: .*shape"):
            agent.infer(0, np.zeros((2, 5), dtype=np.float32))
        assert np.isfinite(agent.infer(0).actions).all() and len(agent.log.latency_ms) == 1
    assert not agent.alive
