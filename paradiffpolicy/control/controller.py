"""Closed-loop episodes.

* ``fast``: call the policy, execute ``Ta`` actions, repeat — as fast as the machine allows
  (Diffusion Policy's simulation eval); :func:`run_vector` does the same over several environments
  in lockstep with one batched policy call.
* ``realtime``: one environment step per tick of the task's control clock, through
  :class:`~paradiffpolicy.control.runner.PolicyRunner` (background inference, latency matching,
  deadline misses counted). Ticks that start late are counted as ``late_ticks``.

All three share :class:`Episode`: the bookkeeping of one episode (steps, rewards, success, the
failure reason of an environment or policy fault, wall time, achieved rate).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from paradiffpolicy.control.agent import InferenceLog, PolicyAgent
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

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key."""
        if self.mode not in MODES:
            raise ValueError(f"controller.mode={self.mode!r} is unknown; expected one of {MODES}")
        if self.hz < 0:
            raise ValueError(f"controller.hz={self.hz} must be >= 0 (0 = the task's rate)")
        if self.late_tolerance < 0:
            raise ValueError(f"controller.late_tolerance={self.late_tolerance} must be >= 0")
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

    def to_json(self) -> dict:
        return {
            "seed": self.seed, "success": self.success, "sum_reward": self.sum_reward, "max_reward": self.max_reward,
            **({} if self.max_coverage is None else {"max_coverage": self.max_coverage}),
            "length": self.length, "failure_reason": self.failure_reason, "deadline_misses": self.deadline_misses,
            "late_ticks": self.late_ticks, "wall_s": round(self.wall_s, 3), "achieved_hz": round(self.achieved_hz, 2),
            "inference": self.inference.summary(),
        }


@dataclass
class Clock:
    """Where the realtime loop reads the time and waits (the wall clock; tests pass a fake one)."""

    now: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep


class Episode:
    """One episode's bookkeeping, shared by every runner. ``start`` resets the environment; each
    ``step`` records the reward, success and (optionally) a video frame; a fault inside
    ``with episode.guard():`` ends the episode with its reason; ``finish`` returns the result."""

    def __init__(self, env: PolicyEnv, seed: int, record_video: bool = False, clock: Clock | None = None):
        self.env, self.record_video = env, record_video
        self.clock = clock or Clock()
        self.result = EpisodeResult(seed=seed)
        self.obs = None
        self.done = False
        self._t0 = self.clock.now()

    def start(self):
        self.obs = self.env.reset(self.result.seed)
        return self.obs

    def step(self, action: np.ndarray) -> bool:
        """Execute one action; returns whether the episode is over (success or time limit)."""
        step = self.env.step(action)
        res = self.result
        res.length += 1
        res.sum_reward += step.reward
        res.max_reward = max(res.max_reward, step.reward)
        res.success = res.success or step.success
        if "coverage" in step.info:
            res.max_coverage = max(res.max_coverage or 0.0, float(step.info["coverage"]))
        self.obs = step.obs
        if self.record_video:
            frame = self.env.render()
            if frame is not None:
                res.frames.append(frame)
        self.done = step.done
        return step.done

    @contextmanager
    def guard(self) -> Iterator["Episode"]:
        """An environment or policy fault inside the block ends this episode only, with its reason."""
        try:
            yield self
        except Exception as e:  # noqa: BLE001 - KeyboardInterrupt / SystemExit go on
            self.result.failure_reason = f"{type(e).__name__}: {e}"
            self.result.success = False
            self.done = True

    def finish(self, inference: InferenceLog | None = None, achieved_hz: float | None = None) -> EpisodeResult:
        """Close the books: wall time, rate (default: steps per second of the whole episode), the
        failure reason of an unsuccessful episode without a fault (``time limit``)."""
        res = self.result
        self.done = True
        res.wall_s = self.clock.now() - self._t0
        res.achieved_hz = achieved_hz if achieved_hz is not None else (res.length / res.wall_s if res.wall_s > 0 else 0.0)
        if inference is not None:
            res.inference = inference
        if res.failure_reason is None and not res.success:
            res.failure_reason = "time limit"
        return res


def run_fast(env: PolicyEnv, agent: PolicyAgent, seed: int, record_video: bool = False) -> EpisodeResult:
    """Infer a chunk, execute its ``Ta`` actions, repeat, until the episode ends."""
    ep = Episode(env, seed, record_video)
    ta = agent.policy.config.n_action_steps
    with ep.guard():
        agent.reset(ep.start(), seed)
        while not ep.done:
            chunk = agent.infer(ep.result.length)
            for j in range(ta):
                if ep.step(chunk.actions[j]):
                    break
                agent.observe(ep.obs)
    return ep.finish(agent.log)


def run_realtime(env: PolicyEnv, runner: PolicyRunner, seed: int, hz: float, late_tolerance: float = 0.5,
                 record_video: bool = False, clock: Clock | None = None) -> EpisodeResult:
    """One environment step per tick at ``hz`` on ``clock``, the action from ``runner.step``. The
    first chunk is computed before the clock starts. ``achieved_hz`` is the paced loop's rate."""
    ep = Episode(env, seed, record_video, clock)
    period = 1.0 / hz
    achieved = 0.0
    with ep.guard():
        runner.reset(ep.start(), seed)
        start = ep.clock.now()
        while not ep.done:
            due = start + runner.tick * period
            now = ep.clock.now()
            if now < due:
                ep.clock.sleep(due - now)
            elif now - due > late_tolerance * period:
                ep.result.late_ticks += 1
            ep.step(runner.step(ep.obs))
            elapsed = ep.clock.now() - start
            achieved = runner.tick / elapsed if elapsed > 0 else 0.0
    ep.result.deadline_misses = runner.deadline_misses
    log = runner.log
    runner.reset()  # waits for a call still running; ready for the next episode
    return ep.finish(log, achieved)


def run_vector(envs: list[PolicyEnv], agents: list[PolicyAgent], seeds: list[int]) -> Iterator[EpisodeResult]:
    """``fast`` mode over several environments in lockstep, one batched policy call per chunk
    (throughput for success-rate evaluation; the latencies recorded are the batched calls').
    Yields each EpisodeResult as its episode ends (in completion order)."""
    queue = list(seeds)
    slots: list[Episode | None] = [None] * len(envs)
    finished: list[EpisodeResult] = []
    ta = agents[0].policy.config.n_action_steps

    def start(i: int) -> None:
        while queue:
            ep = Episode(envs[i], queue.pop(0))
            with ep.guard():
                agents[i].reset(ep.start(), ep.result.seed)
            if not ep.done:
                slots[i] = ep
                return
            finished.append(ep.finish(agents[i].log))
        slots[i] = None

    for i in range(len(envs)):
        start(i)
    while any(slots) or finished:
        yield from finished
        finished.clear()
        active = [i for i, ep in enumerate(slots) if ep is not None]
        if not active:
            break
        chunks = PolicyAgent.infer_together([agents[i] for i in active], [slots[i].result.length for i in active])
        for i, chunk in zip(active, chunks):
            ep = slots[i]
            with ep.guard():
                for j in range(ta):
                    if ep.step(chunk.actions[j]):
                        break
                    agents[i].observe(ep.obs)
            if ep.done:
                finished.append(ep.finish(agents[i].log))
                start(i)
