"""The simulated-delay harness, how chunks join, the seam metrics and PolicyRunner's committed
prefix, on the real PushT environment with a tiny (untrained) policy. No test reads the wall clock."""

import json

import numpy as np
import pytest

from conftest import tiny_policy
from paradiffpolicy import PolicyRunner, SamplerConfig, save_policy
from paradiffpolicy.control.agent import PolicyAgent
from paradiffpolicy.control.controller import ControllerConfig, DelaySchedule, Episode, run_fast, run_vector
from paradiffpolicy.control.join import JoinConfig
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.eval import EvalConfig, Evaluator

PUSHT = TaskConfig(name="pusht", suite="gym", env_name="gym_pusht/PushT-v0", obs_keys=[], control_hz=10,
                   max_steps=24, expert="pusht", hold="repeat", env_kwargs={"obs_type": "state"})


def pusht_policy(sampler=None):
    """Obs 5, action 2, T=16, Ta=8, To=2, 10 DDPM steps; actions in PushT's [0, 512]."""
    return tiny_policy(sampler or SamplerConfig(window=4, tol=0.05), steps=10, obs_range=(0.0, 512.0), action_range=(0.0, 512.0))


def schedule(policy, hz=10, **ctl):
    cfg = policy.config
    return DelaySchedule(ControllerConfig(mode="delay", **ctl), cfg.n_action_steps, cfg.horizon - cfg.executed_start, hz)


def delayed(policy, seeds, join="naive", n_envs=1, **ctl):
    join_cfg = JoinConfig(method=join)
    envs = [make_env(PUSHT) for _ in range(n_envs)]
    agents = [PolicyAgent(policy, join=join_cfg) for _ in range(n_envs)]
    return sorted(run_vector(envs, agents, seeds, schedule(policy, join=join_cfg, **ctl)), key=lambda r: r.seed)


def trace(result):
    return result.length, result.sum_reward, result.max_reward, result.success


def same_episodes(a, b):
    """Lengths and success equal, rewards equal up to float rounding."""
    assert [(r.length, r.success) for r in a] == [(r.length, r.success) for r in b]
    rewards = lambda rs: [v for r in rs for v in (r.sum_reward, r.max_reward)]  # noqa: E731
    assert rewards(a) == pytest.approx(rewards(b), rel=1e-5)


def test_zero_delay_naive_is_fast_mode_episode_for_episode():
    policy = pusht_policy()
    seeds = [3, 4]
    fast = [run_fast(make_env(PUSHT), PolicyAgent(policy), s) for s in seeds]
    got = delayed(policy, seeds, delay=0)
    assert [trace(r) for r in got] == [trace(r) for r in fast]
    assert [r.seam_jumps for r in got] == [r.seam_jumps for r in fast]
    # batched calls round differently (a batch of 2 is not two batches of 1), episodes stay the same
    batched = delayed(policy, seeds, delay=0, n_envs=2)
    same_episodes(batched, fast)
    four = delayed(policy, seeds, delay=4)
    assert [trace(r) for r in four] != [trace(r) for r in fast]  # a delay changes the episodes


def test_bad_delay_and_execution_horizon_are_refused_naming_the_keys():
    policy = pusht_policy()  # a chunk holds T - (To - 1) = 15 actions, Ta = 8
    with pytest.raises(ValueError, match=r"controller.delay=9 with controller.execute=8"):
        schedule(policy, delay=9)
    with pytest.raises(ValueError, match=r"controller.delay=6 with controller.execute=10: need d <= s and d \+ s <= 15"):
        schedule(policy, delay=6, execute=10)
    with pytest.raises(ValueError, match=r"controller.delay_ms \(up to 950.0 ms = 10 ticks at 10 Hz\)"):
        schedule(policy, delay_ms=[120.0, 950.0])
    with pytest.raises(ValueError, match="controller.execute=16 exceeds the 15 actions"):
        schedule(policy, execute=16)
    with pytest.raises(ValueError, match="need controller.mode=delay"):
        ControllerConfig(mode="fast", delay=2)
    with pytest.raises(ValueError, match="delay_ms"):
        ControllerConfig(mode="delay", delay_ms=[float("nan")])
    with pytest.raises(ValueError, match="controller.join.method"):
        JoinConfig(method="teleport")
    assert schedule(policy, delay=7).calls == [(7, 7)] and schedule(policy, delay=3, execute=12).execute == 12


def test_latency_distribution_gives_per_call_delays_seeded_by_episode():
    policy = pusht_policy()
    ms = [40.0, 100.0, 180.0, 250.0]  # at 10 Hz: 1, 1, 2, 3 ticks
    assert schedule(policy, delay_ms=ms).calls == [(1, 1), (1, 1), (2, 2), (3, 3)]
    a = delayed(policy, [7, 8], join="soft", delay_ms=ms)
    b = delayed(policy, [7, 8], join="soft", delay_ms=ms, n_envs=2)
    same_episodes(a, b)
    assert [r.inference.delays for r in a] == [r.inference.delays for r in b]
    drawn = [d for r in a for d in r.inference.delays]
    assert set(drawn) <= {1, 2, 3} and len(set(drawn)) > 1
    assert all(len(r.inference.delays) == r.inference.summary()["calls"] - 1 for r in a)  # all but the first call


def test_hard_join_commits_the_actions_executed_during_inference():
    """With DDPM and x0 inpainting at weight 1, the new chunk's actions for the d ticks that ran
    from the old chunk are the old chunk's actions: the seam is as smooth as a step within a
    chunk. Naive joining leaves a jump there."""
    policy = pusht_policy(SamplerConfig(window=4, tol=0.0))
    start, d, s = policy.config.executed_start, 3, 8
    chunks = {}
    for method in ("hard", "naive"):
        agent = PolicyAgent(policy, join=JoinConfig(method=method))
        agent.reset(np.full(5, 200.0), seed=1)
        old = agent.infer(0)
        for t in range(1, s + 1):
            agent.observe(np.full(5, 200.0 + 5 * t))
        new = agent.infer(s, delay=d)
        chunks[method] = (old, new)
        assert new.delay == d and agent.log.delays == [d]
    old, new = chunks["hard"]
    np.testing.assert_allclose(new.actions[:d], old.actions[s : s + d], atol=1e-3)
    np.testing.assert_allclose(new.normalized[: start + d], old.normalized[s : s + start + d], atol=1e-5)
    old, new = chunks["naive"]
    assert np.abs(new.actions[:d] - old.actions[s : s + d]).max() > 1.0


def test_seam_and_within_chunk_jumps_are_told_apart():
    class Line:
        """A stand-in environment whose steps cost nothing; the bookkeeping is what is tested."""

        def reset(self, seed):
            return np.zeros(2)

        def step(self, action):
            from paradiffpolicy.envs.base import StepResult

            return StepResult(np.zeros(2), 0.0, False, False, {})

    ep = Episode(Line(), seed=0)
    ep.start()
    for action, seam in [([0, 0], False), ([1, 0], False), ([1, 2], True), ([4, 6], False), ([4, 6], True)]:
        ep.step(np.array(action, dtype=float), seam=seam)
    assert ep.result.inner_jumps == [1.0, 5.0]
    assert ep.result.seam_jumps == [2.0, 0.0]
    summary = ep.result.to_json()["jumps"]
    assert summary["seam"] == {"n": 2, "mean": 1.0, "p95": pytest.approx(1.9)}
    assert summary["inner"]["mean"] == 3.0


def test_a_seam_is_wherever_the_executing_chunk_changes():
    """s = d: each chunk runs only during the next call (its actions d .. 2d-1), so every cycle
    starts on a new chunk; s = Ta: the seam is at index d."""
    policy = pusht_policy()  # 24-step episodes
    # s = d = 3: ticks 0-2 from chunk 0, 3-5 chunk 0 again, then a new chunk at 6, 9, ..., 21;
    # s = 8, d = 3: chunk 0 until tick 10, chunk 1 from 11 (its index 3), chunk 2 from 19
    for execute, delay, seams in ((3, 3, 6), (8, 3, 2)):
        (res,) = delayed(policy, [2], delay=delay, execute=execute)
        assert res.length == 24 and len(res.seam_jumps) == seams and len(res.inner_jumps) == 23 - seams


def test_fast_mode_marks_a_seam_at_every_chunk_start():
    res = run_fast(make_env(PUSHT), PolicyAgent(pusht_policy()), seed=2)
    ta = 8
    assert len(res.seam_jumps) == (res.length - 1) // ta  # every chunk after the first
    assert len(res.seam_jumps) + len(res.inner_jumps) == res.length - 1


def test_runner_commits_what_executes_while_it_infers():
    """PolicyRunner passes the expected delay d (ticks of its p95 latency so far) with every
    background call; with ``hard`` joining, the new chunk's first d actions are the current
    chunk's for those ticks, and ``switched`` marks the tick the new chunk takes over."""
    policy = pusht_policy(SamplerConfig(window=4, tol=0.0))
    with PolicyRunner(policy, hz=1, hold="repeat", join=JoinConfig(method="hard")) as runner:
        runner.reset(np.full(5, 100.0), seed=0)
        current = runner.agent.previous
        switches, used = [], []
        for tick in range(30):
            runner.step(np.full(5, 100.0 + tick))
            switches.append(runner.switched)
            runner.wait()  # inference always in time: the chunk is used from the next tick
            new = runner.agent.previous
            if new is not current:
                d = new.delay
                assert d >= 1 and runner.agent.log.delays[-1] == d
                np.testing.assert_allclose(new.actions[:d], current.actions[new.obs_tick - current.obs_tick:][:d], atol=1e-3)
                current = new
                used.append(new)
        assert runner.stats()["deadline_misses"] == 0
        # each chunk arrived in time and served from the tick after its observation: measured arrival 1
        assert runner.agent.log.arrivals == [(c.delay, 1) for c in used] and len(used) == 3
    assert sum(switches) == runner.stats()["calls"] - 1  # one switch per background chunk


@pytest.mark.parametrize("execute,ticks", [(None, [0, 8, 16, 24]), (3, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27])])
def test_runner_calls_every_s_ticks(execute, ticks):
    """A background call every s ticks (default Ta = 8), each from that tick's observation, as in
    controller=delay: with every call in time, the chunks' observation ticks are 0, s, 2s, ..."""
    policy = pusht_policy()
    seen = []
    with PolicyRunner(policy, hz=1, hold="repeat", execute=execute) as runner:
        runner.reset(np.full(5, 100.0), seed=0)
        for tick in range(30):
            runner.step(np.full(5, 100.0 + tick))
            runner.wait()
            if runner.agent.previous.obs_tick not in seen:
                seen.append(runner.agent.previous.obs_tick)
    assert seen == ticks
    with pytest.raises(ValueError, match=r"execute=16 must lie in \[1, 15\]"):
        PolicyRunner(policy, hz=1, execute=16)


def test_delays_measured_by_a_realtime_run_are_replayed(tmp_path):
    """controller.delay_from draws each call from a wall-clock run's measurements, at its rate: the d
    the runner gave it (its estimate) conditions the call, the measured arrival says from which tick
    its chunk executes. Anything but a realtime run's record with arrivals, or another rate, is
    refused naming the key."""
    policy = pusht_policy()
    arrivals = {"by_delay": {"3": {"2": 2, "3": 1}, "2": {"2": 1}}}
    record = {"control": {"mode": "realtime", "target_hz": 10.0}, "inference": {"arrival_ticks": arrivals}}
    path = tmp_path / "eval_info.json"
    path.write_text(json.dumps(record))
    assert schedule(policy, delay_from=str(path)).calls == [(2, 2), (3, 2), (3, 2), (3, 3)]
    got = delayed(policy, [7, 8], join="soft", delay_from=str(path))
    drawn = [call for r in got for call in r.inference.arrivals]
    assert set(drawn) == {(2, 2), (3, 2), (3, 3)} and [d for d, _ in drawn] == [d for r in got for d in r.inference.delays]
    def replay(name, by_delay):
        one = tmp_path / name
        one.write_text(json.dumps({**record, "inference": {"arrival_ticks": {"by_delay": by_delay}}}))
        return delayed(policy, [7], delay_from=str(one))[0]
    on_time, early = replay("on_time.json", {"3": {"3": 1}}), replay("early.json", {"3": {"2": 1}})
    assert on_time.inference.delays == early.inference.delays  # both calls given d = 3...
    assert on_time.seam_jumps != early.seam_jumps  # ...but the early chunks execute from index 2, a tick sooner
    old = tmp_path / "estimates.json"  # a record from before arrivals were measured
    old.write_text(json.dumps({**record, "inference": {"delay_ticks": {"counts": {"3": 2}}}}))
    with pytest.raises(ValueError, match=r"estimates.json' records no measured arrivals"):
        ControllerConfig(mode="delay", delay_from=str(old))
    with pytest.raises(ValueError, match=r"measured at 10 Hz; this run ticks at 20 Hz"):
        schedule(policy, hz=20, delay_from=str(path))
    bad = tmp_path / "fast.json"
    bad.write_text(json.dumps({**record, "control": {"mode": "fast", "target_hz": 10.0}}))
    with pytest.raises(ValueError, match=r"controller.delay_from=.*fast.json' is a controller.mode=fast record"):
        ControllerConfig(mode="delay", delay_from=str(bad))
    with pytest.raises(ValueError, match=r"controller.delay_from=.*cannot read"):
        ControllerConfig(mode="delay", delay_from=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="give one of"):
        ControllerConfig(mode="delay", delay=2, delay_from=str(path))
    # an episode the record played replays its own calls in order; the others draw from all of them
    played = {**record, "per_episode": [{"seed": 7, "inference": {"arrivals": [[2, 3], [3, 1]]}}]}
    (tmp_path / "played.json").write_text(json.dumps(played))
    own, other = delayed(policy, [7, 8], delay_from=str(tmp_path / "played.json"))
    assert own.inference.arrivals == [(2, 3), (3, 1)]
    assert other.inference.arrivals == [call for r in got if r.seed == 8 for call in r.inference.arrivals]
    played["per_episode"][0]["inference"]["arrivals"] = [[2]]
    (tmp_path / "played.json").write_text(json.dumps(played))
    with pytest.raises(ValueError, match=r"per_episode\[0\] has no seed or its inference.arrivals \[\[2\]\]"):
        ControllerConfig(mode="delay", delay_from=str(tmp_path / "played.json"))
    # a measured arrival later than s (= Ta = 8) is replayed as the clock ran it, not refused: every
    # call here arrives 9 ticks after its observation, and a chunk holds 15 actions from it
    late = tmp_path / "late.json"
    late.write_text(json.dumps({**record, "inference": {"arrival_ticks": {"by_delay": {"3": {"9": 1}}}}}))
    held = delayed(policy, [7], delay_from=str(late))[0]
    # ticks 0-7: the first chunk; a call at 8 arrives at 17: ticks 8-14 finish the first chunk, 15-16
    # hold (2 misses); the next call starts at 17: 17-22 from the second chunk (index 9-14), 23 holds
    assert (held.length, held.deadline_misses) == (24, 3)
    assert held.inference.arrivals == [(3, 9), (3, 9)]


def test_eval_delay_mode_writes_delays_and_jumps(tmp_path):
    ckpt = tmp_path / "ck"
    save_policy(pusht_policy(), ckpt)
    cfg = EvalConfig(task=PUSHT, checkpoint=str(ckpt), n_episodes=3, n_envs=2, output_dir=str(tmp_path), progress=False,
                     controller=ControllerConfig(mode="delay", delay=2, join=JoinConfig(method="soft")))
    info = Evaluator(cfg, tmp_path / "out").run_all()
    assert info["inference"]["delay_ticks"]["counts"] == {"2": info["inference"]["calls"] - 3}  # all but each first call
    jumps = info["control"]["jumps"]
    assert jumps["seam"]["n"] + jumps["inner"]["n"] == info["control"]["steps"] - 3
    bad = EvalConfig(task=PUSHT, checkpoint=str(ckpt), controller=ControllerConfig(mode="delay", delay=8, execute=8))
    with pytest.raises(ValueError, match="controller.delay=8 with controller.execute=8"):
        Evaluator(bad, tmp_path / "bad")


@pytest.mark.slow
def test_replaying_a_realtime_run_reproduces_it_episode_for_episode(tmp_path):
    """Whatever the clock did, ``controller.delay_from`` on the same seeds replays each episode's
    calls in order, so the simulated episodes are the wall-clock ones: the runner and the simulated
    delay execute the same actions. (Nothing here depends on how long the calls took.)"""
    import dataclasses

    ckpt = tmp_path / "ck"
    save_policy(pusht_policy(), ckpt)
    common = dict(task=dataclasses.replace(PUSHT, max_steps=40), checkpoint=str(ckpt), n_episodes=2, threads=1, progress=False)
    clock = Evaluator(EvalConfig(**common, output_dir=str(tmp_path), controller=ControllerConfig(mode="realtime", hz=50)),
                      tmp_path / "realtime").run_all()
    assert all(e["inference"]["arrivals"] for e in clock["per_episode"])  # chunks arrived during the episodes
    replay = Evaluator(EvalConfig(**common, output_dir=str(tmp_path), controller=ControllerConfig(
        mode="delay", hz=50, delay_from=str(tmp_path / "realtime" / "eval_info.json"))), tmp_path / "replay").run_all()
    for wall, sim in zip(clock["per_episode"], replay["per_episode"]):
        assert (sim["seed"], sim["length"], sim["success"]) == (wall["seed"], wall["length"], wall["success"])
        assert sim["sum_reward"] == pytest.approx(wall["sum_reward"], rel=1e-6)
        # the simulation draws a call the clock never finished when the episode ends while it runs
        assert sim["inference"]["arrivals"][:len(wall["inference"]["arrivals"])] == wall["inference"]["arrivals"]
