"""Evaluation and control loops against a policy server on localhost: the same episodes as the
local policy (equal actions, fast mode), every controller runs remotely, and faults of the
machinery (a server killed and restarted, an inference worker killed) are held through, counted,
and never scored as policy failures."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_policy
from paradiffpolicy import SamplerConfig, load_policy, save_policy
from paradiffpolicy.control.agent import PolicyAgent
from paradiffpolicy.control.controller import ControllerConfig, run_fast
from paradiffpolicy.control.remote import RemoteAgent
from paradiffpolicy.control.runner import PolicyRunner
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.eval import EvalConfig, Evaluator
from paradiffpolicy.remote.client import RemotePolicy
from paradiffpolicy.remote.server import PolicyServer
from paradiffpolicy.serve import free_port

PUSHT = TaskConfig(name="pusht", suite="gym", env_name="gym_pusht/PushT-v0", obs_keys=[], control_hz=10,
                   max_steps=24, expert="pusht", hold="repeat", env_kwargs={"obs_type": "state"})


def recorded_episode(task, agent, seed):
    """run_fast of one episode, with every chunk the agent returned."""
    chunks = []
    infer = agent.infer

    def keep(*args, **kw):
        chunk = infer(*args, **kw)
        chunks.append(chunk.actions.copy())
        return chunk

    agent.infer = keep
    env = make_env(task)
    try:
        result = run_fast(env, agent, seed)
    finally:
        env.close()
    return result, chunks


def _served(policy):
    server = PolicyServer(policy, {"default": policy.sampler_config})
    return server, server.start()


@pytest.mark.parametrize("case", ["lowdim", pytest.param("camera", marks=pytest.mark.slow)])
def test_a_served_policy_plays_the_local_episodes(case):
    if case == "lowdim":
        task, policy = PUSHT, tiny_policy(steps=10, obs_range=(0, 512), action_range=(0, 512))
    else:
        task = TaskConfig(name="pusht_image", suite="gym", env_name="gym_pusht/PushT-v0", obs_keys=[], control_hz=10, max_steps=16,
                          expert="pusht", hold="repeat", env_kwargs={"obs_type": "pixels_agent_pos"},
                          features={"observation.image": "pixels", "observation.state": "agent_pos"})
        policy = load_policy(ROOT / "checkpoints" / "pusht_image", sampler=SamplerConfig(window=8, tol=0.1))
    server, port = _served(policy)
    try:
        with RemotePolicy(f"127.0.0.1:{port}") as client:
            for seed in (3, 4):
                local, local_chunks = recorded_episode(task, PolicyAgent(policy), seed)
                remote, remote_chunks = recorded_episode(task, RemoteAgent(client), seed)
                assert len(local_chunks) == len(remote_chunks) >= 2
                for a, b in zip(local_chunks, remote_chunks):
                    np.testing.assert_array_equal(a, b)  # equal actions
                assert (local.sum_reward, local.length) == (remote.sum_reward, remote.length)
                assert remote.inference.network_ms and not remote.faulted
    finally:
        server.stop(1)


def test_eval_runs_every_controller_against_a_server(tmp_path):
    """``eval server=host:port``: fast, delay and realtime episodes through the server, the call
    time split into network, queue and compute in eval_info.json."""
    policy = tiny_policy(steps=10, obs_range=(0, 512), action_range=(0, 512))
    server, port = _served(policy)
    try:
        for mode, extra in (("fast", {}), ("delay", {"delay": 2}), ("realtime", {})):
            cfg = EvalConfig(task=PUSHT, n_episodes=2, output_dir=str(tmp_path / mode), progress=False, server=f"127.0.0.1:{port}",
                             controller=ControllerConfig(mode=mode, **extra), threads=1)
            info = Evaluator(cfg, tmp_path / mode).run_all()
            assert info["overall"]["n_episodes"] == 2 and info["server"] == f"127.0.0.1:{port}"
            assert info["inference"]["network_ms"]["p50"] >= 0 and "queue_ms" in info["inference"]
            assert info["backend"] == "remote (eager)" and "n_faulted" not in info["overall"]
            if mode == "delay":
                assert info["inference"]["delay_ticks"]["max"] == 2
    finally:
        server.stop(1)
    with pytest.raises(ValueError, match="server= runs every call on the server"):
        EvalConfig(task=PUSHT, server="127.0.0.1:1", compare=True)


def _start_server(checkpoint, port) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "paradiffpolicy.serve", f"checkpoint={checkpoint}", f"port={port}", "threads=1",
                             "sampler.window=4", "hydra.run.dir=" + str(Path(checkpoint).parent / "hydra")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until it serves
        if line.startswith("serving"):
            return proc
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def _drive(runner, ticks, hz, on_tick=None):
    obs = np.full(5, 100.0)
    runner.reset(obs, seed=0)
    start = time.perf_counter()
    for tick in range(ticks):
        if on_tick:
            on_tick(tick)
        runner.step(obs)
        time.sleep(max(0.0, start + (tick + 1) / hz - time.perf_counter()))


@pytest.mark.slow
def test_a_server_killed_and_restarted_mid_episode_is_held_through(tmp_path):
    save_policy(tiny_policy(steps=10, obs_range=(0, 512), action_range=(0, 512)), tmp_path / "ck")
    port = free_port()
    procs = [_start_server(tmp_path / "ck", port)]

    def chaos(tick):
        if tick == 10:
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
        if tick == 40:  # in the background, as a supervisor would restart it
            threading.Thread(target=lambda: procs.append(_start_server(tmp_path / "ck", port)), daemon=True).start()

    try:
        with RemotePolicy(f"127.0.0.1:{port}") as client:
            agent = RemoteAgent(client, timeout_s=1.0)
            with PolicyRunner(None, hz=20, hold="repeat", agent=agent, max_backoff_s=0.5) as runner:
                _drive(runner, 300, 20, chaos)
                stats = runner.stats()
                last = runner.chunk.obs_tick
        assert stats["ticks"] == 300 and stats["faults"]["calls"] >= 1 and stats["deadline_misses"] > 0
        assert last > 40  # chunks came again after the restart
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_an_inference_worker_killed_mid_run_is_restarted_and_its_episodes_marked(tmp_path):
    policy = tiny_policy(steps=10, obs_range=(0, 512), action_range=(0, 512))
    with PolicyRunner(policy, hz=20, hold="repeat", inference_process=True, max_backoff_s=0.2) as runner:
        first = runner.agent.pid
        _drive(runner, 120, 20, lambda tick: os.kill(first, signal.SIGKILL) if tick == 20 else None)
        stats = runner.stats()
        assert runner.agent.restarts == 1 and runner.agent.pid != first and runner.agent.alive
        assert stats["faults"]["calls"] >= 1 and runner.chunk.obs_tick > 20
    # through eval: the episode hit by the kill is marked and counted apart, the others scored
    save_policy(policy, tmp_path / "ck")
    cfg = EvalConfig(task=PUSHT, checkpoint=str(tmp_path / "ck"), n_episodes=3, output_dir=str(tmp_path / "ev"), progress=False,
                     controller=ControllerConfig(mode="realtime", inference_process=True), threads=1)
    ev = Evaluator(cfg, tmp_path / "ev")
    import paradiffpolicy.control.worker as worker
    original = worker.ProcessAgent.call
    calls = []

    def kill_on_fifth(self, *args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.2)
        return original(self, *args)

    worker.ProcessAgent.call = kill_on_fifth
    try:
        info = ev.run_all()
    finally:
        worker.ProcessAgent.call = original
    per = info["per_episode"]
    assert len(per) == 3 and sum(e["faulted"] for e in per) == 1
    assert all(e["length"] == PUSHT.max_steps or e["success"] for e in per)  # no episode cut short
    assert info["overall"]["n_episodes"] == 2 and info["overall"]["n_faulted"] == 1
    assert info["inference"]["faults"]["calls"] >= 1


@pytest.mark.slow
def test_a_client_killed_mid_call_costs_the_server_nothing():
    policy = tiny_policy(steps=100)
    server = PolicyServer(policy, {"default": SamplerConfig(name="sequential")})
    port = server.start()
    script = (f"from paradiffpolicy.remote.client import RemotePolicy; import numpy as np, sys\n"
              f"c = RemotePolicy('127.0.0.1:{port}')\nprint('ready', flush=True)\nsys.stdin.readline()\n"
              f"c.predict({{'observation.state': np.zeros((1, 2, 5), np.float32)}}, seed=1)\n")
    try:
        with RemotePolicy(f"127.0.0.1:{port}") as client:
            proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            busy = [client._stub.Predict.future(client.request({"observation.state": np.zeros((16, 2, 5), np.float32)}, seed=i),
                                                timeout=120) for i in range(4)]  # four full batches of 100 sequential steps
            time.sleep(0.1)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            time.sleep(0.3)  # its call is queued behind the busy ones
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert not busy[-1].done()  # it was killed while the server was still busy
            assert all(b.result().action_pred.shape[0] == 16 for b in busy)
            assert client.predict({"observation.state": np.zeros((1, 2, 5), np.float32)}, seed=2).action_pred.shape == (1, 16, 2)
            stats = client.stats()
            assert stats.answered == 5 and stats.rows == 65 and stats.expired == 1  # counted, and its row never computed
    finally:
        server.stop(1)


@pytest.mark.slow
def test_serve_benchmark_runs_end_to_end(tmp_path):
    """python -m paradiffpolicy.bench.serve with tiny settings: every call answered (none lost),
    batched and unbatched servers, plaintext and TLS, the local reference, JSON + Markdown + plot."""
    from paradiffpolicy.bench import serve as bench_serve
    from paradiffpolicy.data.obs_sample import save_observation_sample

    save_policy(tiny_policy(steps=10), tmp_path / "ck")
    save_observation_sample(tmp_path / "ck", {"observation.state": torch.rand(4, 2, 5)}, {"task": "test"})
    result = bench_serve.main([f"checkpoint={tmp_path / 'ck'}", "task=tiny", "samplers=[ddim8]", "clients=[1,3]", "calls=4",
                               "max_batches=[4,1]", "tls=[false,true]", "backend=eager", "local_calls=2", "rounds=2", f"out={tmp_path}"])
    points = result["points"]
    assert len(points) == 2 * 2 * 2 * 2 and all(p["answered"] == p["calls"] and p["lost"] == 0 for p in points)
    assert all(p["batch_rows_mean"] == 1.0 for p in points if p["max_batch"] == 1)
    # round 1 runs the settings in another order than round 0; each round's batched point has its unbatched twin
    order = [(p["tls"], p["max_batch"]) for p in points if p["clients"] == 1]
    assert order[:4] != order[4:] and sorted(order[:4]) == sorted(order[4:])
    ratios = {(b["tls"], b["clients"]): b for b in result["batching"]}
    assert set(ratios) == {(t, n) for t in (False, True) for n in (1, 3)} and all(b["rounds"] == 2 for b in ratios.values())
    b = ratios[False, 3]
    twins = [(p["throughput"], q["throughput"]) for p in points for q in points
             if p["round"] == q["round"] and not p["tls"] and not q["tls"] and p["clients"] == q["clients"] == 3
             and p["max_batch"] == 4 and q["max_batch"] == 1]
    assert sorted(b["ratios"]) == sorted(x / y for x, y in twins) and b["ratio_min"] <= b["ratio_median"] <= b["ratio_max"]
    local = result["local"]["ddim8"]
    assert local["n"] == 2 and local["rows"] == 3 and local["batching_ceiling"] == 3 * local["p50"] / local["rows_p50"]
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"serve-tiny.{suffix}").is_file()


@pytest.mark.slow
def test_the_ray_serve_engine_with_two_replicas_plays_the_local_episodes(tmp_path, monkeypatch):
    """``serve engine=ray ray.replicas=2`` on a local Ray cluster started in its own temporary
    directory: the front end is the same, the chunks come from Ray Serve replicas, and closed-loop
    episodes equal the local ones action for action."""
    pytest.importorskip("ray.serve")
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token file left in ~/.ray
    from paradiffpolicy.remote.ray_engine import RayEngine, RayOptions

    policy = tiny_policy(steps=10, obs_range=(0, 512), action_range=(0, 512))
    save_policy(policy, tmp_path / "ck")
    policy = load_policy(tmp_path / "ck")  # what the replicas load
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    engine = RayEngine.factory(str(tmp_path / "ck"), "eager", RayOptions(replicas=2, temp_dir=ray_dir))
    server = PolicyServer(policy, {"default": policy.sampler_config}, engine=engine)
    port = server.start()
    try:
        with RemotePolicy(f"127.0.0.1:{port}", timeout_s=120) as client:
            for seed in (3, 4):
                _, local_chunks = recorded_episode(PUSHT, PolicyAgent(policy), seed)
                _, remote_chunks = recorded_episode(PUSHT, RemoteAgent(client, timeout_s=120), seed)
                assert len(local_chunks) == len(remote_chunks) >= 2
                for a, b in zip(local_chunks, remote_chunks):
                    np.testing.assert_array_equal(a, b)
            stats = client.stats()
            assert stats.answered >= 4 and stats.batches >= 1 and stats.failed == 0 and stats.refused == 0
    finally:
        server.stop(5)
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
