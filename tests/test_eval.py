"""Closed-loop evaluation on real environments with tiny (untrained) checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from paradiffpolicy import DiffusionPolicy, PolicyConfig, SamplerConfig, save_policy
from paradiffpolicy.control.agent import PolicyAgent
from paradiffpolicy.control.controller import ControllerConfig, EpisodeRunner
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.eval import EvalConfig, Evaluator

ROOT = Path(__file__).resolve().parents[1]
PUSHT = TaskConfig(name="pusht", suite="gym", env_name="gym_pusht/PushT-v0", obs_keys=[], control_hz=10,
                   max_steps=20, expert="pusht", hold="repeat", env_kwargs={"obs_type": "state"})


def tiny_checkpoint(path, obs_dim, action_dim, obs_range, action_range, steps=10):
    cfg = PolicyConfig(obs_dim=obs_dim, action_dim=action_dim, down_dims=[16, 32], diffusion_step_embed_dim=16)
    cfg.scheduler.num_inference_steps = cfg.scheduler.num_train_timesteps = steps
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg)
    policy.obs_normalizer.fit(torch.tensor([[obs_range[0]] * obs_dim, [obs_range[1]] * obs_dim]))
    policy.action_normalizer.fit(torch.tensor([[action_range[0]] * action_dim, [action_range[1]] * action_dim]))
    save_policy(policy, path)
    return str(path)


@pytest.fixture(scope="module")
def pusht_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "pusht", 5, 2, (0, 512), (0, 512))


@pytest.fixture(scope="module")
def lift_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "lift", 19, 7, (-2, 2), (-1, 1))


REQUIRED = {
    "overall": ["pc_success", "avg_sum_reward", "avg_max_reward", "n_episodes", "eval_s"],
    "inference": ["latency_ms", "iterations_mean", "nfe_mean", "calls"],
    "control": ["mode", "target_hz", "achieved_hz", "deadline_misses"],
}


def check_info(info, n):
    for section, keys in REQUIRED.items():
        for k in keys:
            assert k in info[section], f"{section}.{k} missing"
    assert set(info["inference"]["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert info["overall"]["n_episodes"] == n == len(info["per_episode"])
    for ep in info["per_episode"]:
        assert {"seed", "success", "sum_reward", "max_reward", "length", "failure_reason"} <= set(ep)
    assert info["versions"]["torch"] and info["versions"]["mujoco"] and info["versions"]["robosuite"]
    assert info["cpu"]  # the processor: speed ratios differ between machines
    assert info["sampler"]["name"] in ("picard", "sequential") and info["seeds"]


@pytest.mark.slow
def test_eval_robosuite_lift(tmp_path, lift_ckpt):
    cfg = EvalConfig(task=TaskConfig(max_steps=16), checkpoint=lift_ckpt, n_episodes=2, output_dir=str(tmp_path), progress=False)
    info = Evaluator(cfg, tmp_path).run_all()
    check_info(info, 2)
    assert json.loads((tmp_path / "eval_info.json").read_text())["overall"] == info["overall"]
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [10_000_000, 10_000_001]
    assert all(json.loads(x)["length"] == 16 for x in lines)


@pytest.mark.slow
def test_eval_pusht_compare_realtime(tmp_path, pusht_ckpt):
    cfg = EvalConfig(task=PUSHT, checkpoint=pusht_ckpt, n_episodes=2, compare=True, output_dir=str(tmp_path),
                     controller=ControllerConfig(mode="realtime"), sampler=SamplerConfig(window=4, tol=0.0), progress=False)
    info = Evaluator(cfg, tmp_path).run_all()
    check_info(info, 2)
    cmp = info["compare"]
    assert cmp["max_abs_dev"] < 1e-4  # tol=0: the Picard chunks are the sequential chunks
    assert cmp["calls_over_1e-2"] == 0 and 0 <= cmp["abs_dev_p50_p95"][0] <= cmp["abs_dev_p50_p95"][1] <= cmp["max_abs_dev"]
    assert cmp["speedup"] > 0 and "pc_success_sequential" in cmp
    assert info["control"]["mode"] == "realtime" and info["control"]["target_hz"] == 10
    assert 5 < info["control"]["achieved_hz"] < 12  # paced near 10 Hz on the wall clock


def test_realtime_with_inference_process(tmp_path, pusht_ckpt):
    """controller.inference_process: the policy runs in a worker process; episodes, statistics
    and pacing are reported as with a thread, and the worker is shut down afterwards."""
    import multiprocessing

    cfg = EvalConfig(task=PUSHT, checkpoint=pusht_ckpt, n_episodes=2, output_dir=str(tmp_path), progress=False,
                     controller=ControllerConfig(mode="realtime", inference_process=True), sampler=SamplerConfig(window=4, tol=0.1))
    info = Evaluator(cfg, tmp_path).run_all()
    check_info(info, 2)
    assert info["inference"]["calls"] >= 4 and info["control"]["mode"] == "realtime"
    assert not [p for p in multiprocessing.active_children() if p.name == "policy-inference"]


def test_realtime_counts_deadline_misses_when_the_budget_is_impossible(pusht_ckpt):
    from paradiffpolicy import load_policy

    policy = load_policy(pusht_ckpt, sampler=SamplerConfig(name="sequential"))
    env = make_env(PUSHT)
    agent = PolicyAgent(policy)
    slow_infer = agent.infer

    def slow(*a, **k):
        time.sleep(0.5)  # 5 ticks at 50 Hz per call; a chunk holds 15 ticks: misses are unavoidable
        return slow_infer(*a, **k)

    agent.infer = slow
    res = EpisodeRunner(env, agent, ControllerConfig(mode="realtime", hz=50), hold="repeat").run(seed=1)
    assert res.length == 20 and res.deadline_misses > 0
    assert res.failure_reason == "time limit"


def test_pusht_keypoints_flattens_the_dict_observation_and_keeps_the_expert_state():
    keypoints = TaskConfig(**{**PUSHT.__dict__, "obs_keys": ["agent_pos", "environment_state"],
                              "env_kwargs": {"obs_type": "environment_state_agent_pos"}})
    env, state_env = make_env(keypoints), make_env(PUSHT)
    try:
        obs, state = env.reset(seed=3), state_env.reset(seed=3)
        assert env.obs_dim == obs.shape[0] == 18 and obs.dtype == np.float32
        assert np.allclose(obs[:2], state[:2])  # agent xy first, then the T's 8 keypoints
        assert np.allclose(env.expert_state(), state_env.expert_state())  # the expert sees the same state
        a = np.array([300.0, 200.0])
        assert np.allclose(env.step(a).obs[:2], state_env.step(a).obs[:2])
    finally:
        env.close()
        state_env.close()
    with pytest.raises(ValueError, match="obs_keys"):
        make_env(TaskConfig(**{**keypoints.__dict__, "obs_keys": ["agent_pos", "pixels"]}))


def test_env_fault_ends_episode_with_reason(pusht_ckpt):
    from paradiffpolicy import load_policy

    env = make_env(PUSHT)
    real_step = env.step
    calls = {"n": 0}

    def flaky(action):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated MuJoCo instability")
        return real_step(action)

    env.step = flaky
    res = EpisodeRunner(env, PolicyAgent(load_policy(pusht_ckpt)), ControllerConfig(), hold="repeat").run(seed=0)
    assert res.failure_reason == "RuntimeError: simulated MuJoCo instability" and res.length == 4
    res2 = EpisodeRunner(env, PolicyAgent(load_policy(pusht_ckpt)), ControllerConfig(), hold="repeat").run(seed=0)
    assert res2.length == 20  # the next episode runs normally


def test_warm_started_ticks_stay_exact(pusht_ckpt):
    """Warm start changes only the iteration count: with tol=0 every chunk equals the sequential
    chunk for the same observation and noise (the shadow comparison checks each call)."""
    from paradiffpolicy import load_policy
    from paradiffpolicy.sampling import make_sampler

    policy = load_policy(pusht_ckpt, sampler=SamplerConfig(window=4, tol=0.0, warm_start=True))
    shadow = make_sampler(policy.config.scheduler, SamplerConfig(name="sequential"))
    agent = PolicyAgent(policy, shadow, warm_start=True)
    res = EpisodeRunner(make_env(PUSHT), agent, ControllerConfig(), hold="repeat").run(seed=2)
    assert res.inference.summary()["calls"] >= 3
    assert res.inference.max_abs_dev < 1e-4


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def test_hydra_composes_groups():
    cfg = _compose("task=pusht", "sampler=sequential", "controller=realtime")
    assert cfg.task.env_name == "gym_pusht/PushT-v0" and cfg.sampler.name == "sequential"
    assert cfg.controller.mode == "realtime" and cfg.checkpoint == "checkpoints/pusht"
    cfg = _compose("sampler.window=4", "sampler.tol=0.03")
    assert (cfg.sampler.window, cfg.sampler.tol) == (4, 0.03)


@pytest.mark.parametrize("overrides,match", [
    (["sampler.window=0", "checkpoint=x"], "sampler.window"),
    (["sampler.tol=-1"], "sampler.tol"),
    (["controller.mode=turbo"], "controller.mode"),
    (["checkpoint=/nonexistent"], "checkpoint"),
    (["n_episodes=0"], "n_episodes"),
    (["controller=realtime", "controller.inference_process=true", "compare=true"], "inference_process"),
    (["controller.inference_process=true"], "controller.inference_process"),
])
def test_config_errors_name_the_key(overrides, match, lift_ckpt):
    overrides = [o if o != "checkpoint=x" else f"checkpoint={lift_ckpt}" for o in overrides]
    if not any(o.startswith("checkpoint=") for o in overrides):
        overrides.append(f"checkpoint={lift_ckpt}")
    cfg = _compose(*overrides)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_unknown_task_and_key_fail_at_composition():
    from hydra.errors import ConfigCompositionException, HydraException

    with pytest.raises((ConfigCompositionException, HydraException), match="task"):
        _compose("task=nonexistent")
    with pytest.raises(Exception, match="windw"):
        _compose("sampler.windw=3")


@pytest.mark.slow
def test_interrupted_eval_keeps_finished_episodes(tmp_path, pusht_ckpt):
    # far more episodes than can finish before the signal, even if this test is slow to poll
    cmd = [sys.executable, "-m", "paradiffpolicy.eval", "task=pusht", f"checkpoint={pusht_ckpt}", "n_episodes=100000",
           "task.max_steps=40", f"output_dir={tmp_path}", "progress=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    episodes = tmp_path / "episodes.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not episodes.exists() or len(episodes.read_text().splitlines()) < 2):
        time.sleep(0.2)
    # SIGTERM (what a scheduler or `kill` sends; Ctrl-C takes the same path): a process started in
    # the background may inherit an ignored SIGINT, so the test does not rely on it
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    finished = [json.loads(x) for x in episodes.read_text().splitlines()]
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert len(finished) >= 2, out.decode()[-2000:]
    assert info["interrupted"] is True and info["overall"]["n_episodes"] == len(finished) < 100000


def test_vector_envs_give_the_single_env_episodes(tmp_path, pusht_ckpt):
    """Batching environments changes throughput, not episodes: same seeds, same noise streams,
    rows that converge independently → the same rewards and lengths as one env at a time."""
    def run(n_envs, sub):
        cfg = EvalConfig(task=PUSHT, checkpoint=pusht_ckpt, n_episodes=3, n_envs=n_envs, output_dir=str(tmp_path / sub),
                         sampler=SamplerConfig(window=4, tol=0.0), progress=False)
        return Evaluator(cfg, tmp_path / sub).run_all()["per_episode"]

    single, batched = run(1, "a"), run(2, "b")
    assert [e["seed"] for e in batched] == [e["seed"] for e in single]
    for a, b in zip(single, batched):
        assert a["length"] == b["length"]
        assert abs(a["sum_reward"] - b["sum_reward"]) < 1e-3


@pytest.mark.slow
def test_two_by_two_sweep_produces_table_and_plot(tmp_path, pusht_ckpt):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "paradiffpolicy.eval", "-m", "task=pusht", f"checkpoint={pusht_ckpt}", "n_episodes=1",
           "task.max_steps=8", "compare=true", "progress=false", "sampler.window=2,4", "sampler.tol=0.1,0.0",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env, timeout=600)
    subprocess.run([sys.executable, "scripts/plot_sweep.py", str(sweep)], cwd=ROOT, check=True, capture_output=True, env=env)
    import csv

    table = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert sorted((r["window"], r["tol"]) for r in table) == [("2", "0.0"), ("2", "0.1"), ("4", "0.0"), ("4", "0.1")]
    assert all(float(r["speedup"]) > 0 for r in table)
    assert (sweep / "sweep.png").stat().st_size > 1000 and "| picard |" in (sweep / "sweep.md").read_text()


def test_realtime_loop_script_writes_soak_rows_as_it_goes(tmp_path, pusht_ckpt):
    """The example control loop (PolicyRunner around a real PushT env at 10 Hz) with interval
    reporting: rows land in the JSONL while running; the report has memory and latency drift."""
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "scripts/run_realtime_loop.py", f"checkpoint={pusht_ckpt}", "task=pusht",
           "ticks=25", "interval_s=0.5", f"out={out}",
           "sampler.scheduler=null", "sampler.num_inference_steps=null", "window=4"]  # the tiny checkpoint has 10 steps
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env, timeout=300)
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in Path(str(out) + ".intervals.jsonl").read_text().splitlines()]
    assert report["ticks"] == 25 and report["hz"] == 10 and len(rows) >= 2
    assert all(r["rss_mb"] > 0 and r["ticks"] <= 25 for r in rows)
    assert report["soak"]["intervals"] == len(rows) and "rss_growth_mb" in report["soak"]
