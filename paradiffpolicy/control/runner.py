"""PolicyRunner: a diffusion policy inside your own control loop.

    runner = PolicyRunner(policy, hz=20, hold="zero_motion")
    runner.reset(obs, seed=0)
    while running:                       # your loop, one iteration per control tick
        action = runner.step(obs)         # never blocks on inference after the first call
        obs = robot.apply(action)
    runner.close()

Inference of the next chunk runs in a background thread, started ``lead`` ticks before the current
chunk's ``Ta`` actions run out (``lead`` from the measured p95 latency). A chunk predicted from the
observation at tick ``s`` holds the action for tick ``s + j``; actions whose tick has passed are
dropped (latency matching). While the next chunk is late, the current chunk's remaining actions
(up to its horizon) are used; after that the hold action is sent and a deadline miss counted.
``budget_s`` caps each Picard call: past it the sampler returns its current estimate (counted in
``budget_hits``). Everything is reported by :meth:`stats`.

``inference_process=True`` runs the policy in a separate worker process
(:class:`~paradiffpolicy.control.worker.ProcessAgent`, ``threads`` torch threads) instead of a
thread of yours: on a small CPU the inference then does not queue for the GIL behind your loop's
Python code. The background thread stays; it only waits on the worker.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from paradiffpolicy.control.agent import Chunk, PolicyAgent
from paradiffpolicy.control.worker import ProcessAgent
from paradiffpolicy.policy import DiffusionPolicy

HOLDS = ("zero_motion", "repeat")


def hold_action(last: np.ndarray, kind: str) -> np.ndarray:
    """What to send when no valid action exists: the last action again (absolute targets), or
    zeros with the gripper command kept (delta actions)."""
    if kind == "repeat":
        return last
    held = np.zeros_like(last)
    held[-1] = last[-1]
    return held


class PolicyRunner:
    def __init__(self, policy: DiffusionPolicy | PolicyAgent, hz: float, hold: str = "zero_motion",
                 budget_s: float | None = None, warm_start: bool = False, inference_process: bool = False,
                 threads: int = 1):
        if hz <= 0:
            raise ValueError(f"hz={hz} must be > 0")
        if hold not in HOLDS:
            raise ValueError(f"hold={hold!r} must be one of {HOLDS}")
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s={budget_s} must be > 0 or None")
        self._owns_agent = not isinstance(policy, PolicyAgent)
        if isinstance(policy, PolicyAgent):
            self.agent = policy
            if budget_s is not None:
                if isinstance(policy, ProcessAgent) and policy.budget_s != budget_s:
                    raise ValueError(f"budget_s={budget_s}: a ProcessAgent's budget is fixed when it starts ({policy.budget_s})")
                self.agent.budget_s = budget_s
        elif inference_process:
            self.agent = ProcessAgent(policy, warm_start=warm_start, budget_s=budget_s, threads=threads)
        else:
            self.agent = PolicyAgent(policy, warm_start=warm_start, budget_s=budget_s)
        self.period = 1.0 / hz
        self.hold = hold
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-inference")
        self._pending: Future | None = None
        self._chunk: Chunk | None = None
        self.tick = 0
        self.deadline_misses = 0
        self._last: np.ndarray | None = None

    def reset(self, obs: np.ndarray, seed: int = 0) -> None:
        """Start an episode: compute the first chunk synchronously from ``obs``."""
        obs = self._check_obs(obs)
        self._drain()  # no inference is running past this point
        self.agent.reset(obs, seed)
        self.tick = 0
        self.deadline_misses = 0
        self._chunk = self.agent.infer(0)
        self._last = self._chunk.actions[0]

    def step(self, obs: np.ndarray) -> np.ndarray:
        """The action for this tick, given this tick's observation (after the first call, which
        is ``reset``'s observation and needs no ``step`` observation, use the newest one)."""
        if self._chunk is None:
            raise RuntimeError("call reset(obs) before step(obs)")
        obs = self._check_obs(obs)
        if self.tick > 0:  # tick 0's observation is reset()'s
            self.agent.observe(obs)
        if self._pending is not None and self._pending.done():
            self._chunk, self._pending = self._pending.result(), None  # re-raises inference errors
        ta = self.agent.policy.config.n_action_steps
        lat = self.agent.log.latency_ms
        lead = math.ceil(np.percentile(lat, 95) / 1e3 / self.period) + 1 if lat else ta // 2
        if self._pending is None and self.tick >= self._chunk.obs_tick + max(0, ta - lead):
            self._pending = self._pool.submit(self.agent.infer, self.tick, self.agent.snapshot())
        off = self.tick - self._chunk.obs_tick
        if off < len(self._chunk.actions):
            action = self._chunk.actions[off]
        else:
            action = hold_action(self._last, self.hold)
            self.deadline_misses += 1
        self._last = action
        self.tick += 1
        return action

    def _check_obs(self, obs):
        """Reject a bad observation here, in the caller's thread, before it enters the history
        (the runner stays usable for the next valid call)."""
        return self.agent.policy.check_step(obs)

    def stats(self) -> dict:
        return {"ticks": self.tick, "deadline_misses": self.deadline_misses, **self.agent.log.summary()}

    def _drain(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result()
            finally:
                self._pending = None

    def close(self) -> None:
        """Wait for a running inference and stop the thread (and the worker process, if this
        runner started one)."""
        try:
            self._drain()
        finally:
            self._pool.shutdown(wait=True)
            if self._owns_agent and isinstance(self.agent, ProcessAgent):
                self.agent.close()

    def __enter__(self) -> "PolicyRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
