"""Turns a DiffusionPolicy into a per-step actor: observation history, chunk queue, noise stream,
and per-call statistics. Used by both controllers and by PolicyRunner."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from paradiffpolicy.features import batch_histories, stack_history
from paradiffpolicy.policy import DiffusionPolicy
from paradiffpolicy.sampling import SamplerNoise, WarmStart


@dataclass
class Chunk:
    """Actions predicted from the observation at tick ``obs_tick``: ``actions[j]`` is for tick
    ``obs_tick + j`` (the trajectory from index To-1 on, up to the end of the horizon)."""

    obs_tick: int
    actions: np.ndarray  # (T - To + 1, Da)


@dataclass
class InferenceLog:
    latency_ms: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    nfe: list = field(default_factory=list)
    converged: list = field(default_factory=list)
    shadow_dev: list = field(default_factory=list)  # per call: max |chunk - sequential chunk| (normalised)
    shadow_ratio: list = field(default_factory=list)
    budget_hits: int = 0

    @property
    def max_abs_dev(self) -> float:
        return max(self.shadow_dev, default=0.0)

    def summary(self) -> dict:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        out = {
            "calls": len(self.latency_ms),
            "latency_ms": {q: float(np.percentile(lat, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
            "iterations_mean": float(np.mean(self.rounds)) if self.rounds else 0.0,
            "nfe_mean": float(np.mean(self.nfe)) if self.nfe else 0.0,
            "unconverged_calls": int(len(self.converged) - sum(self.converged)),
            "budget_hits": self.budget_hits,
        }
        out["latency_ms"]["max"] = float(lat.max())
        out["latency_ms"]["mean"] = float(lat.mean())
        return out

    def extend(self, other: "InferenceLog") -> None:
        for name in ("latency_ms", "rounds", "nfe", "converged", "shadow_dev", "shadow_ratio"):
            getattr(self, name).extend(getattr(other, name))
        self.budget_hits += other.budget_hits


class PolicyAgent:
    """Keeps the last ``To`` observations and produces chunks; one noise stream per episode.

    ``shadow`` (optional): a second policy sampler (the sequential reference) run on the same
    observation and noise after every call, to measure the deviation and per-call speed ratio.
    """

    def __init__(self, policy: DiffusionPolicy, shadow_sampler=None, warm_start: bool = False,
                 budget_s: float | None = None):
        self.policy = policy
        self.budget_s = budget_s
        self.shadow_sampler = shadow_sampler
        self.warm_start = warm_start
        self._previous: tuple[int, SamplerNoise, torch.Tensor, torch.Tensor] | None = None
        self.history: deque = deque(maxlen=policy.config.n_obs_steps)  # per step: an array, or a dict of arrays
        self.log = InferenceLog()
        self.generator = torch.Generator()

    def reset(self, obs, seed: int) -> None:
        self.history.clear()
        for _ in range(self.policy.config.n_obs_steps):  # pad the history with the first frame
            self.history.append(_copy_step(obs))
        self.generator.manual_seed(seed)
        self._previous = None

    def observe(self, obs) -> None:
        self.history.append(_copy_step(obs))

    def snapshot(self):
        """The current history (To, ...) — an array, or a dict of arrays for named features —
        copied (safe to hand to another thread)."""
        return stack_history(list(self.history))

    def infer(self, obs_tick: int, history: np.ndarray | None = None) -> Chunk:
        """One policy call (blocking) on ``history`` (To, Do), default the current one."""
        return infer_batch([self], [obs_tick], None if history is None else [history])[0]


def _copy_step(obs):
    """One step of observation as the history keeps it: float32 for flat arrays, dict entries as given
    (images stay uint8)."""
    if isinstance(obs, dict):
        return {k: np.array(v) for k, v in obs.items()}
    return np.asarray(obs, dtype=np.float32)


def infer_batch(agents: list[PolicyAgent], obs_ticks: list[int], histories: list[np.ndarray] | None = None) -> list[Chunk]:
    """One batched policy call for several agents of the same policy (vectorised evaluation).

    Each agent keeps its own noise stream and warm start; Picard rows converge independently, so
    each chunk is the one the agent would get alone. Latency is the batched call's.
    """
    policy = agents[0].policy
    if histories is None:
        histories = [a.snapshot() for a in agents]
    obs = batch_histories(histories)
    noises = [policy.draw_noise(1, a.generator) for a in agents]
    warm_start = agents[0].warm_start
    warm = None
    prev = [a._previous for a in agents]
    shifts = {t - p[0] for t, p in zip(obs_ticks, prev) if p is not None}
    if warm_start and all(p is not None for p in prev) and len(shifts) == 1:
        # closed-loop warm start: the previous tick's noise and converged trajectory, both moved
        # by the ticks elapsed. The sample is still exactly the sequential sample for this
        # observation and this noise; only the iteration count changes.
        shift = shifts.pop()
        noises = [p[1].shifted(shift, n) for p, n in zip(prev, noises)]
        warm = WarmStart.from_previous(torch.cat([p[2] for p in prev]), shift, None if prev[0][3] is None else torch.cat([p[3] for p in prev]))
    noise = SamplerNoise(torch.cat([n.initial for n in noises]), torch.cat([n.steps for n in noises], dim=1))
    t0 = time.perf_counter()
    budget = agents[0].budget_s
    _, info = policy.predict_action(obs, noise=noise, warm_start=warm, return_states=warm_start,
                                    deadline=None if budget is None else t0 + budget)
    latency = time.perf_counter() - t0
    stats = info["stats"]
    hit = bool(stats.extra.get("deadline_hit", False))
    states = stats.extra.pop("states", None)
    x0s = stats.extra.pop("x0", None)
    start = policy.config.executed_start
    devs, ratio = None, None
    shadow = agents[0].shadow_sampler
    if shadow is not None:
        main = policy.sampler
        policy.sampler = shadow
        t1 = time.perf_counter()
        _, ref = policy.predict_action(obs, noise=noise)
        ratio = (time.perf_counter() - t1) / latency
        policy.sampler = main
        sl = slice(start, start + policy.config.n_action_steps)
        devs = (info["action_pred_normalized"][:, sl] - ref["action_pred_normalized"][:, sl]).abs().flatten(1).max(1).values
    actions = info["action_pred"][:, start:].cpu().numpy().astype(np.float64)
    chunks = []
    for i, agent in enumerate(agents):
        if warm_start:
            agent._previous = (obs_ticks[i], noises[i], states[i : i + 1], None if x0s is None else x0s[i : i + 1])
        agent.log.latency_ms.append(latency * 1e3)
        agent.log.rounds.append(int(stats.iterations[i]))
        agent.log.nfe.append(float(stats.nfe[i]))
        agent.log.converged.append(bool(stats.converged[i]))
        agent.log.budget_hits += hit
        if devs is not None:
            agent.log.shadow_ratio.append(ratio)
            agent.log.shadow_dev.append(float(devs[i]))
        chunks.append(Chunk(obs_ticks[i], actions[i]))
    return chunks
