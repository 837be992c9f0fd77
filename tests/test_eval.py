"""Closed-loop evaluation on real environments with tiny (untrained) checkpoints."""

import contextlib
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import tiny_policy
from paradiffpolicy import SamplerConfig, save_policy
from paradiffpolicy.control.agent import PolicyAgent
from paradiffpolicy.control.controller import Clock, ControllerConfig, measured_delays, run_fast, run_realtime
from paradiffpolicy.control.runner import PolicyRunner
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.eval import EvalConfig, Evaluator

ROOT = Path(__file__).resolve().parents[1]
PUSHT = TaskConfig(name="pusht", suite="gym", env_name="gym_pusht/PushT-v0", obs_keys=[], control_hz=10,
                   max_steps=20, expert="pusht", hold="repeat", env_kwargs={"obs_type": "state"})


def tiny_checkpoint(path, obs_dim, action_dim, obs_range, action_range):
    save_policy(tiny_policy(steps=10, obs_range=obs_range, action_range=action_range, obs_dim=obs_dim, action_dim=action_dim), path)
    return str(path)


@pytest.fixture(scope="module")
def pusht_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "pusht", 5, 2, (0, 512), (0, 512))


@pytest.fixture(scope="module")
def lift_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "lift", 19, 7, (-2, 2), (-1, 1))


REQUIRED = {
    "overall": ["pc_success", "avg_sum_reward", "avg_max_reward", "n_episodes", "eval_s"],
    "inference": ["latency_ms", "encoder_ms", "sampling_ms", "iterations_mean", "nfe_mean", "calls"],
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
    assert cmp["speedup_p5_p95"][0] <= cmp["speedup"] <= cmp["speedup_p5_p95"][1]
    assert "pc_success_sequential" in cmp and "same backend" in cmp["reference"]
    assert info["control"]["mode"] == "realtime" and info["control"]["target_hz"] == 10
    assert info["inference"]["calls"] >= 2 * (1 + 20 // 8)  # a chunk per Ta ticks (or sooner), per episode


@pytest.mark.slow
def test_realtime_with_inference_process(tmp_path, pusht_ckpt):
    """controller.inference_process: the policy runs in a worker process; episodes, statistics
    and pacing are reported as with a thread, and the worker is shut down afterwards."""
    import multiprocessing

    import dataclasses

    # 40 ticks: long enough for chunks to arrive during each episode even on a loaded machine
    cfg = EvalConfig(task=dataclasses.replace(PUSHT, max_steps=40), checkpoint=pusht_ckpt, n_episodes=2, output_dir=str(tmp_path),
                     progress=False, controller=ControllerConfig(mode="realtime", inference_process=True),
                     sampler=SamplerConfig(window=4, tol=0.1))
    info = Evaluator(cfg, tmp_path).run_all()
    check_info(info, 2)
    assert info["inference"]["calls"] >= 4 and info["control"]["mode"] == "realtime"
    assert not [p for p in multiprocessing.active_children() if p.name == "policy-inference"]
    # each episode keeps its calls' (d given, ticks until used) in order: what controller.delay_from replays
    per_episode = sorted(tuple(c) for e in info["per_episode"] for c in e["inference"]["arrivals"])
    measured = measured_delays(str(tmp_path / "eval_info.json"))
    assert per_episode and per_episode == measured.calls and set(measured.by_seed) == {e["seed"] for e in info["per_episode"]}


class FakeClock(Clock):
    """Time that passes only when the loop sleeps or the environment steps (``step_s`` per step)."""

    def __init__(self):
        self.t = 100.0
        super().__init__(now=lambda: self.t, sleep=self.advance)

    def advance(self, seconds):
        self.t += seconds


def paced_env(clock, step_s):
    env = make_env(PUSHT)
    real, starts = env.step, []

    def step(action):
        starts.append(clock.t)
        clock.advance(step_s)
        return real(action)

    env.step = step
    return env, starts


@pytest.mark.parametrize("step_s", [0.02, 0.16])
def test_realtime_loop_paces_ticks_and_counts_late_ones(pusht_ckpt, step_s):
    """On a fake clock: with a step shorter than the period every tick starts exactly on time; with
    a longer one every tick after the first starts late and is counted."""
    from paradiffpolicy import load_policy

    clock = FakeClock()
    env, starts = paced_env(clock, step_s)
    with PolicyRunner(load_policy(pusht_ckpt), hz=10, hold="repeat") as runner:
        res = run_realtime(env, runner, seed=1, hz=10, late_tolerance=0.5, clock=clock)
    assert res.length == 20 and res.failure_reason == "time limit"
    if step_s < 0.1:
        assert np.allclose(np.diff(starts), 0.1) and res.late_ticks == 0
        assert res.achieved_hz == pytest.approx(20 / (19 * 0.1 + step_s))
    else:
        assert np.allclose(np.diff(starts), step_s) and res.late_ticks == 19  # lateness 0.06 k > 0.05
        assert res.achieved_hz == pytest.approx(1 / step_s)


def test_realtime_counts_deadline_misses_when_inference_is_late(pusht_ckpt):
    """A background call that does not return within the episode: the chunk's remaining actions
    run out after 15 ticks, the last 5 of 20 are deadline misses."""
    import threading

    from paradiffpolicy import load_policy

    policy = load_policy(pusht_ckpt, sampler=SamplerConfig(name="sequential"))
    real, released = policy.sample_from_condition, threading.Event()

    def late(*a, **k):
        if threading.current_thread().name.startswith("policy-inference"):
            released.wait(timeout=60)
        return real(*a, **k)

    policy.sample_from_condition = late
    clock = FakeClock()
    env, _ = paced_env(clock, 0.001)
    with PolicyRunner(policy, hz=50, hold="repeat") as runner:
        original_reset = runner.reset

        def reset(obs=None, seed=0):  # after the episode: let the blocked call finish
            if obs is None:
                released.set()
            original_reset(obs, seed)

        runner.reset = reset
        res = run_realtime(env, runner, seed=1, hz=50, clock=clock)
    assert res.length == 20 and res.deadline_misses == 20 - 15
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


def test_asking_a_camera_env_for_its_shapes_leaves_the_episode_alone():
    image = TaskConfig(**{**PUSHT.__dict__, "env_kwargs": {"obs_type": "pixels_agent_pos"},
                          "features": {"observation.image": "pixels", "observation.state": "agent_pos"}})
    env, twin = make_env(image), make_env(image)
    try:
        assert env.observation_shapes() == {"observation.image": (96, 96, 3), "observation.state": (2,)}
        env.reset(seed=4), twin.reset(seed=4)
        a = np.array([250.0, 300.0])
        env.step(a), twin.step(a)
        assert env.observation_shapes() == twin.observation_shapes()  # asked mid-episode: no reset
        mine, theirs = env.step(a).obs, twin.step(a).obs
        assert all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    finally:
        env.close()
        twin.close()


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
    agent = PolicyAgent(load_policy(pusht_ckpt))
    res = run_fast(env, agent, seed=0)
    assert res.failure_reason == "RuntimeError: simulated MuJoCo instability" and res.length == 4
    res2 = run_fast(env, agent, seed=0)
    assert res2.length == 20 and res2.failure_reason == "time limit"  # the next episode runs normally


def test_warm_started_ticks_stay_exact(pusht_ckpt):
    """Warm start changes only the iteration count: with tol=0 every chunk equals the sequential
    chunk for the same observation and noise (the reference comparison checks each call)."""
    from paradiffpolicy import load_policy

    policy = load_policy(pusht_ckpt, sampler=SamplerConfig(window=4, tol=0.0, warm_start=True))
    agent = PolicyAgent(policy, reference=policy.make_sampler(SamplerConfig(name="sequential")), warm_start=True)
    res = run_fast(make_env(PUSHT), agent, seed=2)
    assert res.inference.summary()["calls"] == len(res.inference.reference_dev) == 3  # 20 steps, Ta=8
    assert res.inference.max_abs_dev < 1e-4


def test_failing_reference_call_does_not_change_later_episodes(tmp_path, pusht_ckpt, monkeypatch):
    """compare=true: the sequential reference raises once (first episode fails, with the reason);
    the next episode still samples with Picard (1 round at this tolerance, the sequential sampler
    takes 10) and is compared again."""
    from paradiffpolicy.sampling.sequential import SequentialSampler

    real, calls = SequentialSampler.sample, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("reference failed")
        return real(self, *a, **k)

    monkeypatch.setattr(SequentialSampler, "sample", flaky)
    cfg = EvalConfig(task=PUSHT, checkpoint=pusht_ckpt, n_episodes=2, compare=True, output_dir=str(tmp_path),
                     sampler=SamplerConfig(window=10, tol=1e9), progress=False)
    info = Evaluator(cfg, tmp_path).run_all()
    first, second = info["per_episode"]
    assert first["failure_reason"] == "RuntimeError: reference failed"
    assert second["failure_reason"] == "time limit" and second["length"] == 20
    assert second["inference"]["iterations_mean"] == 1.0 and second["inference"]["calls"] == 3
    assert info["compare"]["sequential"]["inference"]["iterations_mean"] == 10.0


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


def test_controller_realtime_alone_is_the_recommended_setting():
    """``controller=realtime`` with no other flag: a worker process, the fastest installed float32
    backend, one thread, frozen_x0, the policy's own join; each overridable, and the worker stays
    off where it cannot apply (a server, compare=true)."""
    from paradiffpolicy.backends import fastest_float32
    from paradiffpolicy.eval import choose_backend, choose_inference_process

    cfg = _compose("task=pusht_image", "controller=realtime")
    assert (cfg.backend, cfg.threads, cfg.sampler.update, cfg.controller.join.method) == ("auto", 1, "frozen_x0", "auto")
    assert choose_backend(cfg) == fastest_float32("cpu") and choose_backend(cfg)[0] in ("openvino", "jit")
    assert choose_inference_process(cfg)[0] is True
    assert choose_inference_process(_compose("controller=realtime", "server=127.0.0.1:1"))[0] is False
    assert choose_inference_process(_compose("controller=realtime", "compare=true"))[0] is False
    assert choose_inference_process(_compose("controller=delay"))[0] is False
    mine = _compose("controller=realtime", "backend=jit", "threads=2", "sampler.update=picard", "controller.inference_process=false")
    assert (choose_backend(mine)[0], mine.threads, mine.sampler.update, choose_inference_process(mine)[0]) == ("jit", 2, "picard", False)
    assert choose_backend(_compose("controller=realtime", "sampler=tuned"))[0] is None  # the tuned preset's own backend
    fast = _compose()
    assert (fast.backend, fast.threads, fast.sampler.update) == (None, 2, "picard")  # other modes unchanged


def test_robosuite_starts_quietly_and_keeps_its_other_warnings():
    """robosuite's start-up lines about its private macro file and optional robots are dropped by
    message; any other robosuite warning still shows."""
    code = ("from paradiffpolicy.envs.robosuite_env import import_robosuite; import_robosuite(); "
            "from robosuite.utils.log_utils import ROBOSUITE_DEFAULT_LOGGER as log; log.warning('a warning that matters')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout + run.stderr
    assert "a warning that matters" in out
    assert not any(w in out for w in ("macro", "robosuite_models", "mink")), out


@pytest.mark.parametrize("overrides,match", [
    (["sampler.window=0"], "sampler.window"),
    (["sampler.tol=-1"], "sampler.tol"),
    (["sampler.scheduler=euler"], "sampler.scheduler"),
    (["controller.mode=turbo"], "controller.mode"),
    (["n_episodes=0"], "n_episodes"),
    (["task.max_steps=0"], "task.max_steps"),
    (["controller=realtime", "controller.inference_process=true", "compare=true"], "inference_process"),
    (["controller.inference_process=true"], "controller.inference_process"),
    (["device=tpu"], "device='tpu'"),
] + ([] if torch.cuda.is_available() else [(["device=cuda"], "device='cuda' but this machine has no usable CUDA")]))
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        _compose(*overrides)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint /nonexistent does not exist"):
        Evaluator(_compose("checkpoint=/nonexistent"), tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_without_cuda_says_so_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paradiffpolicy.eval", "device=cuda", f"output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 1
    assert "error: device='cuda' but this machine has no usable CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


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
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    episodes = tmp_path / "episodes.jsonl"
    logged = []
    for line in proc.stdout:  # eval logs a line per finished episode: interrupt it after the second
        logged += [line] if "eval pusht: episode" in line else []
        if len(logged) == 2:
            break
    # SIGTERM (what a scheduler or `kill` sends; Ctrl-C takes the same path): a process started in
    # the background may inherit an ignored SIGINT, so the test does not rely on it
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    finished = [json.loads(x) for x in episodes.read_text().splitlines()]
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert len(logged) == 2 and len(finished) >= 2, out[-2000:]
    assert info["interrupted"] is True and info["overall"]["n_episodes"] == len(finished) < 100000


@pytest.mark.slow
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


@contextlib.contextmanager
def launcher_for(name, tmp_path):
    """Hydra launcher overrides; for Ray, a local cluster of our own: started here in its own
    session and temp dir, and only that process group is stopped afterwards (``ray stop`` would
    stop every Ray process of the user on this machine)."""
    if name != "ray":
        yield [] if name == "basic" else [f"hydra/launcher={name}"]
        return
    ray = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # a throwaway local cluster: no token authentication (with a token file in ~/.ray, left by any
    # earlier local Ray, the head would ask for one that `ray status` does not send)
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(300):  # until the head answers (each probe is a subprocess: ~1 s)
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited with status {head.returncode}")
            if subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True).returncode == 0:
                break
        else:
            raise RuntimeError(f"the test's Ray head on port {port} never answered")
        yield ["hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address=127.0.0.1:{port}"]
    finally:
        head.terminate()  # --block: on SIGTERM the head stops the processes it started
        head.wait(timeout=120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of ours left in its session
        shutil.rmtree(temp, ignore_errors=True)
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local", "ray"])
def test_two_by_two_sweep_runs_on_each_launcher_and_is_collected(tmp_path, pusht_ckpt, launcher):
    """A 2x2 window x tolerance sweep through Hydra's launchers (in-process, submitit's local
    executor, a Ray cluster): every job writes its eval_info.json; plot_sweep collects all four."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with launcher_for(launcher, tmp_path) as launch:
        cmd = [sys.executable, "-m", "paradiffpolicy.eval", "-m", "task=pusht", f"checkpoint={pusht_ckpt}", "n_episodes=1",
               "task.max_steps=8", "compare=true", "progress=false", "threads=1", "sampler.window=2,4", "sampler.tol=0.1,0.0",
               f"hydra.sweep.dir={sweep}", *launch]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.rglob("eval_info.json"))) == 4
    subprocess.run([sys.executable, "scripts/plot_sweep.py", str(sweep)], cwd=ROOT, check=True, capture_output=True, env=env)
    import csv

    table = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert sorted((r["window"], r["tol"]) for r in table) == [("2", "0.0"), ("2", "0.1"), ("4", "0.0"), ("4", "0.1")]
    # each row carries its own job's measured speed-up (the median of that job's per-call ratios)
    jobs = [json.loads(p.read_text()) for p in sweep.rglob("eval_info.json")]
    measured = {(str(j["sampler"]["window"]), str(j["sampler"]["tol"])): round(j["compare"]["speedup"], 2) for j in jobs}
    assert {(r["window"], r["tol"]): float(r["speedup"]) for r in table} == measured
    import matplotlib.image

    image = matplotlib.image.imread(sweep / "sweep.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0  # a drawn figure, not blank
    assert (sweep / "sweep.md").read_text().count("| picard |") == 4


@pytest.mark.slow
def test_realtime_loop_script_writes_soak_rows_as_it_goes(tmp_path, pusht_ckpt):
    """The example control loop (PolicyRunner around a real PushT env at 10 Hz) with interval
    reporting: rows land in the JSONL while running; the report has memory and latency drift."""
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "examples" / "realtime_loop.py"), f"checkpoint={pusht_ckpt}", "task=pusht",
           "ticks=25", "interval_s=0.5", f"out={out}",
           "sampler.scheduler=null", "sampler.num_inference_steps=null", "window=4"]  # the tiny checkpoint has 10 steps
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in Path(str(out) + ".intervals.jsonl").read_text().splitlines()]
    assert report["ticks"] == 25 and report["hz"] == 10 and len(rows) >= 2
    assert all(r["rss_mb"] > 0 and r["ticks"] <= 25 for r in rows)
    assert report["soak"]["intervals"] == len(rows) and "rss_growth_mb" in report["soak"]
