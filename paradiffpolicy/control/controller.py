"""Closed-loop episode runners.

* ``fast``: call the policy, execute ``Ta`` actions, repeat — as fast as the machine allows
  (Diffusion Policy's simulation eval).
* ``realtime``: one environment step per tick of the task's control clock, on the wall clock,
  through :class:`~paradiffpolicy.control.runner.PolicyRunner` (background inference, latency
  matching, deadline misses counted). Ticks that start late are counted as ``late_ticks``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from paradiffpolicy.control.agent import InferenceLog, PolicyAgent, infer_batch
from paradiffpolicy.control.runner import PolicyRunner
from paradiffpolicy.envs.base import PolicyEnv

MODES = ("fast", "realtime")


@dataclass
class ControllerConfig:
    mode: str = "fast"
    hz: float = 0.0  # 0: the task's control rate
    late_tolerance: float = 0.5  # a tick that starts later than this fraction of a period is late
    # realtime only: run the policy in a worker process (see control/worker.py), not a thread
    inference_process: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"controller.mode={self.mode!r} is unknown; expected one of {MODES}")
        if self.hz < 0:
            raise ValueError(f"controller.hz={self.hz} must be >= 0 (0 = the task's rate)")
        if self.inference_process and self.mode != "realtime":
            raise ValueError("controller.inference_process=true needs controller.mode=realtime")


@dataclass
class EpisodeResult:
    seed: int
    success: bool = False
    sum_reward: float = 0.0
    max_reward: float = 0.0
    max_coverage: float | None = None  # PushT: the env's coverage of the goal region
    length: int = 0
    failure_reason: str | None = None
    deadline_misses: int = 0
    late_ticks: int = 0
    wall_s: float = 0.0
    achieved_hz: float = 0.0
    inference: InferenceLog = field(default_factory=InferenceLog)
    frames: list = field(default_factory=list)

    def record(self, step) -> None:
        """Account one environment step (a StepResult)."""
        self.length += 1
        self.sum_reward += step.reward
        self.max_reward = max(self.max_reward, step.reward)
        self.success = self.success or step.success
        if "coverage" in step.info:
            self.max_coverage = max(self.max_coverage or 0.0, float(step.info["coverage"]))

    def to_json(self) -> dict:
        return {
            "seed": self.seed, "success": self.success, "sum_reward": self.sum_reward, "max_reward": self.max_reward,
            **({} if self.max_coverage is None else {"max_coverage": self.max_coverage}),
            "length": self.length, "failure_reason": self.failure_reason, "deadline_misses": self.deadline_misses,
            "late_ticks": self.late_ticks, "wall_s": round(self.wall_s, 3), "achieved_hz": round(self.achieved_hz, 2),
            "inference": self.inference.summary(),
        }


class EpisodeRunner:
    def __init__(self, env: PolicyEnv, agent: PolicyAgent, cfg: ControllerConfig, hold: str, record_video: bool = False):
        cfg.validate()
        self.env, self.agent, self.cfg, self.hold = env, agent, cfg, hold
        self.record_video = record_video
        self.hz = cfg.hz or env.control_hz

    def run(self, seed: int) -> EpisodeResult:
        res = EpisodeResult(seed=seed)
        self.agent.log = res.inference
        t0 = time.perf_counter()
        try:
            self._obs = self.env.reset(seed)
            if self.cfg.mode == "fast":
                self.agent.reset(self._obs, seed)
                self._fast(res)
            else:
                self._realtime(res)
            if res.failure_reason is None and not res.success:
                res.failure_reason = "time limit"
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - an env or policy fault ends this episode only
            res.failure_reason = f"{type(e).__name__}: {e}"
            res.success = False
        res.wall_s = time.perf_counter() - t0
        if not res.achieved_hz:  # fast mode: steps per second of the whole episode
            res.achieved_hz = res.length / res.wall_s if res.wall_s > 0 else 0.0
        return res

    def _step(self, res: EpisodeResult, action: np.ndarray) -> bool:
        step = self.env.step(action)
        res.record(step)
        self._obs = step.obs
        if self.cfg.mode == "fast":
            self.agent.observe(step.obs)
        if self.record_video:
            frame = self.env.render()
            if frame is not None:
                res.frames.append(frame)
        return step.done

    def _fast(self, res: EpisodeResult) -> None:
        ta = self.agent.policy.config.n_action_steps
        while True:
            chunk = self.agent.infer(res.length)
            for j in range(ta):
                if self._step(res, chunk.actions[j]):
                    return

    def _realtime(self, res: EpisodeResult) -> None:
        period = 1.0 / self.hz
        runner = PolicyRunner(self.agent, self.hz, self.hold)
        try:
            runner.reset(self._obs, res.seed)  # the first chunk is computed before the clock starts
            start = time.perf_counter()
            obs = self._obs
            while True:
                due = start + runner.tick * period
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                elif now - due > self.cfg.late_tolerance * period:
                    res.late_ticks += 1
                action = runner.step(obs)
                done = self._step(res, action)
                obs = self._obs
                res.achieved_hz = runner.tick / (time.perf_counter() - start)  # the paced loop only
                if done:
                    break
        finally:
            runner.close()
            res.deadline_misses = runner.deadline_misses


class VectorRunner:
    """``fast`` mode over several environments in lockstep with one batched policy call per chunk
    (throughput for success-rate evaluation; the latencies it records are batched calls)."""

    def __init__(self, envs: list[PolicyEnv], agents: list[PolicyAgent]):
        self.envs, self.agents = envs, agents

    def run(self, seeds: list[int]):
        """Yield each EpisodeResult as its episode ends (in completion order)."""
        queue = list(seeds)
        slots: list[tuple[EpisodeResult, float] | None] = [None] * len(self.envs)

        def start(i: int) -> None:
            while queue:
                res = EpisodeResult(seed=queue.pop(0))
                self.agents[i].log = res.inference
                try:
                    self.agents[i].reset(self.envs[i].reset(res.seed), res.seed)
                    slots[i] = (res, time.perf_counter())
                    return
                except Exception as e:  # noqa: BLE001
                    res.failure_reason = f"{type(e).__name__}: {e}"
                    finished.append(res)
            slots[i] = None

        finished: list[EpisodeResult] = []
        for i in range(len(self.envs)):
            start(i)
        ta = self.agents[0].policy.config.n_action_steps
        while any(slots) or finished:
            yield from finished
            finished.clear()
            active = [i for i, s in enumerate(slots) if s is not None]
            if not active:
                break
            chunks = infer_batch([self.agents[i] for i in active], [slots[i][0].length for i in active])
            for i, chunk in zip(active, chunks):
                res, t0 = slots[i]
                done = False
                try:
                    for j in range(ta):
                        step = self.envs[i].step(chunk.actions[j])
                        res.record(step)
                        self.agents[i].observe(step.obs)
                        if step.done:
                            done = True
                            break
                except Exception as e:  # noqa: BLE001 - an env fault ends this episode only
                    res.failure_reason = f"{type(e).__name__}: {e}"
                    done = True
                if done:
                    if res.failure_reason is None and not res.success:
                        res.failure_reason = "time limit"
                    res.wall_s = time.perf_counter() - t0
                    res.achieved_hz = res.length / res.wall_s
                    finished.append(res)
                    start(i)
