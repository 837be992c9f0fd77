"""Turns a DiffusionPolicy into a per-step actor: observation history, noise stream, warm start, the
previous chunk (what a new one must join) and per-call statistics. Used by the episode runners and
by PolicyRunner."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from paradiffpolicy.control.join import JoinConfig, committed_prefix
from paradiffpolicy.errors import InferenceUnavailable
from paradiffpolicy.features import batch_histories, stack_history
from paradiffpolicy.measure import max_abs_deviation
from paradiffpolicy.policy import DiffusionPolicy, Sampler
from paradiffpolicy.sampling import SamplerNoise, Trajectory, WarmStart


@dataclass
class CallStats:
    """What one policy call cost (for one agent of a batched call: the batch's latency)."""

    latency_ms: float  # observation to action: encoder + sampling
    encoder_ms: float
    rounds: int
    nfe: float
    converged: bool
    budget_hit: bool = False
    delay: int | None = None  # the ticks the call was expected to take (None: it joined no chunk)
    reference_dev: float | None = None  # max |chunk - reference chunk| (normalised units)
    reference_ratio: float | None = None  # reference sampling time / this call's
    network_ms: float | None = None  # a remote call: its round trip less the server's queue and compute
    queue_ms: float | None = None  # a remote call: waiting in the server's queue


@dataclass
class Chunk:
    """Actions predicted from the observation at tick ``obs_tick``: ``actions[j]`` is for tick
    ``obs_tick + j`` (the trajectory from the executed start on, up to the end of the horizon).
    ``normalized`` is the whole predicted trajectory (T, Da) in the network's units (what the next
    chunk is conditioned on); ``stats`` what the call cost."""

    obs_tick: int
    actions: np.ndarray  # (T - start, Da)
    normalized: np.ndarray | None = None  # (T, Da)
    stats: CallStats | None = None

    @property
    def delay(self) -> int | None:
        return None if self.stats is None else self.stats.delay


@dataclass
class WarmState:
    """What a closed-loop call leaves for the next one: its tick, its noise and its trajectory.
    The next call shifts both by the ticks elapsed (see :meth:`PolicyAgent.infer_together`)."""

    obs_tick: int
    noise: SamplerNoise  # (1, T, Da) rows
    trajectory: Trajectory  # (1, N+1, T, Da)


def value_counts(values: list[int]) -> dict[str, int]:
    """How often each value occurs, in ascending order, keys as strings (JSON)."""
    return {str(v): int(n) for v, n in zip(*np.unique(np.asarray(values, dtype=int), return_counts=True))}


def tick_counts(ticks: list[int]) -> dict:
    """Mean, max and counts of per-call tick counts."""
    return {"mean": float(np.mean(ticks)) if ticks else 0.0, "max": int(max(ticks, default=0)), "counts": value_counts(ticks)}


@dataclass
class InferenceLog:
    """Per-call statistics of an agent over one episode."""

    latency_ms: list = field(default_factory=list)  # per call, observation to action: encoder + sampling
    encoder_ms: list = field(default_factory=list)  # per call, the observation encoder's part
    rounds: list = field(default_factory=list)
    nfe: list = field(default_factory=list)
    converged: list = field(default_factory=list)
    reference_dev: list = field(default_factory=list)  # per call: max |chunk - reference chunk| (normalised)
    reference_ratio: list = field(default_factory=list)  # per call: reference / this call's sampling time
    delays: list = field(default_factory=list)  # per call that joined a previous chunk: its delay d in ticks
    # per chunk put to use after a delay: (the d its call was given, the ticks from its observation
    # to its first executed action); on the wall clock the second is measured, in simulation the same d
    arrivals: list = field(default_factory=list)
    network_ms: list = field(default_factory=list)  # per remote call: round trip less the server's queue and compute
    queue_ms: list = field(default_factory=list)  # per remote call: waiting in the server's queue
    faults: list = field(default_factory=list)  # per call that failed for the machinery (worker, server): why
    budget_hits: int = 0

    @property
    def max_abs_dev(self) -> float:
        return max(self.reference_dev, default=0.0)

    def summary(self) -> dict:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        out = {
            "calls": len(self.latency_ms),
            "latency_ms": {q: float(np.percentile(lat, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
            "iterations_mean": float(np.mean(self.rounds)) if self.rounds else 0.0,
            "nfe_mean": float(np.mean(self.nfe)) if self.nfe else 0.0,
            "unconverged_calls": int(len(self.converged) - sum(self.converged)),
            "budget_hits": self.budget_hits,
            "delay_ticks": tick_counts(self.delays),
            "arrival_ticks": {**tick_counts([a for _, a in self.arrivals]),
                              "by_delay": {str(d): value_counts([a for g, a in self.arrivals if g == d])
                                           for d in sorted({g for g, _ in self.arrivals})}},
        }
        for name in ("network_ms", "queue_ms"):
            values = getattr(self, name)
            if values:
                out[name] = {q: float(np.percentile(values, p)) for q, p in (("p50", 50), ("p95", 95), ("max", 100))}
        if self.faults:
            out["faults"] = {"calls": len(self.faults), "first": self.faults[0]}
        out["latency_ms"]["max"] = float(lat.max())
        out["latency_ms"]["mean"] = float(lat.mean())
        enc = np.asarray(self.encoder_ms) if self.encoder_ms else np.zeros(1)  # appended with every latency
        out["encoder_ms"] = {q: float(np.percentile(enc, p)) for q, p in (("p50", 50), ("p95", 95))}
        out["sampling_ms"] = {q: float(np.percentile(lat - enc, p)) for q, p in (("p50", 50), ("p95", 95))}
        return out

    def record(self, stats: CallStats) -> None:
        """Append one call's statistics."""
        self.latency_ms.append(stats.latency_ms)
        self.encoder_ms.append(stats.encoder_ms)
        self.rounds.append(stats.rounds)
        self.nfe.append(stats.nfe)
        self.converged.append(stats.converged)
        self.budget_hits += int(stats.budget_hit)
        if stats.delay is not None:
            self.delays.append(stats.delay)
        if stats.reference_dev is not None:
            self.reference_dev.append(stats.reference_dev)
            self.reference_ratio.append(stats.reference_ratio)
        if stats.network_ms is not None:
            self.network_ms.append(stats.network_ms)
            self.queue_ms.append(stats.queue_ms)

    def record_fault(self, reason: str) -> None:
        """A call that failed for the machinery (its worker died, its server was unreachable)."""
        self.faults.append(reason)

    def record_arrival(self, delay: int, ticks: int) -> None:
        """A chunk whose call was given ``delay`` is put to use ``ticks`` after its observation."""
        self.arrivals.append((int(delay), int(ticks)))

    def extend(self, other: "InferenceLog") -> None:
        for name in ("latency_ms", "encoder_ms", "rounds", "nfe", "converged", "reference_dev", "reference_ratio", "delays",
                     "arrivals", "network_ms", "queue_ms", "faults"):
            getattr(self, name).extend(getattr(other, name))
        self.budget_hits += other.budget_hits


class PolicyAgent:
    """Keeps the last ``To`` observations and produces chunks; one noise stream per episode.

    Args:
        policy: the policy.
        sampler: the sampler of every call (from ``policy.make_sampler``); default the policy's.
        reference: a second sampler (the sequential reference) run on the same observation and
            noise after every call, to measure the deviation and the per-call latency ratio.
        warm_start: start each call from the previous call's trajectory and noise, shifted by the
            ticks elapsed (changes the iteration count, not the sample).
        budget_s: cap on each call's seconds (Picard returns its current estimate past it).
        join: how a call given a ``delay`` joins the previous chunk (see ``control/join.py``);
            default :class:`JoinConfig`'s (``auto``: ``trained`` for a policy trained with the committed
            prefix, else ``naive``). Calls without a delay are never conditioned.
    """

    def __init__(self, policy: DiffusionPolicy, sampler: Sampler | None = None, reference: Sampler | None = None,
                 warm_start: bool = False, budget_s: float | None = None, join: JoinConfig | None = None):
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s={budget_s} must be > 0 or None")
        self.policy = policy
        self.sampler = sampler or policy.sampler
        self.reference = reference
        self.warm_start = warm_start
        self.budget_s = budget_s
        self.join = (join or JoinConfig()).for_policy(policy.config)
        self.previous: Chunk | None = None  # the last chunk of this episode
        self.warm: WarmState | None = None
        self.history: deque = deque(maxlen=policy.config.n_obs_steps)  # per step: an array, or a dict of arrays
        self.log = InferenceLog()
        self.generator = torch.Generator()

    def reset(self, obs, seed: int) -> None:
        """Start an episode at ``obs`` (checked; the history is padded with it), noise stream
        ``seed``, and a fresh :attr:`log`."""
        obs = self.policy.check_step(obs)
        self.history.clear()
        for _ in range(self.policy.config.n_obs_steps):
            self.history.append(_copy_step(obs))
        self.generator.manual_seed(seed)
        self.warm = None
        self.previous = None
        self.log = InferenceLog()

    def recover(self) -> None:
        """Make the next call possible after :class:`~paradiffpolicy.errors.InferenceUnavailable`
        (a worker agent restarts its process; a remote one's channel reconnects by itself)."""

    def observe(self, obs) -> None:
        """Append one step's observation; a bad one raises here and does not enter the history."""
        self.history.append(_copy_step(self.policy.check_step(obs)))

    def snapshot(self):
        """The current history (To, ...) — an array, or a dict of arrays for named features —
        copied (safe to hand to another thread)."""
        return stack_history(list(self.history))

    def infer(self, obs_tick: int, history=None, delay: int | None = None) -> Chunk:
        """One policy call (blocking) on ``history`` (To, ...), default the current one. ``delay``:
        the ticks this call is expected to take, during which the previous chunk keeps executing;
        with it, the new chunk joins the previous one by :attr:`join`'s method."""
        return self.infer_together([self], [obs_tick], None if history is None else [history], [delay])[0]

    @staticmethod
    def infer_together(agents: list["PolicyAgent"], obs_ticks: list[int], histories: list | None = None,
                       delays: list[int | None] | None = None) -> list[Chunk]:
        """One batched policy call for several agents of the same policy and settings (vectorised
        evaluation). Each agent keeps its own noise stream, warm start and previous chunk; Picard
        rows converge independently, so each chunk is the one the agent would get alone. Latency is
        the batched call's. ``delays``: per agent, as for :meth:`infer`."""
        lead = agents[0]
        policy, sampler = lead.policy, lead.sampler
        if histories is None:
            histories = [a.snapshot() for a in agents]
        obs = batch_histories(histories)
        streams = [a.generator.get_state() for a in agents]
        noises = [policy.draw_noise(1, a.generator, sampler) for a in agents]
        warm = None
        shifts = {t - a.warm.obs_tick for t, a in zip(obs_ticks, agents) if a.warm is not None}
        if lead.warm_start and all(a.warm is not None for a in agents) and len(shifts) == 1:
            # the previous tick's noise and trajectory, both moved by the ticks elapsed: the sample is
            # still the sequential sample for this observation and this noise
            shift = shifts.pop()
            noises = [a.warm.noise.shifted(shift, n) for a, n in zip(agents, noises)]
            warm = WarmStart.from_previous(Trajectory.cat([a.warm.trajectory for a in agents]), shift)
        noise = SamplerNoise(torch.cat([n.initial for n in noises]), torch.cat([n.steps for n in noises], dim=1))
        delays = delays or [None] * len(agents)
        cfg = policy.config
        prefix = committed_prefix(lead.join, [a.previous for a in agents], obs_ticks, delays, cfg.executed_start, cfg.horizon)
        try:
            call = lead.call(obs, noise, prefix, warm)
        except InferenceUnavailable:
            for agent, state in zip(agents, streams):  # a retried call draws the same noise
                agent.generator.set_state(state)
            raise
        chunks = []
        for i, agent in enumerate(agents):
            if lead.warm_start:
                agent.warm = WarmState(obs_ticks[i], noises[i], call.trajectory.rows(slice(i, i + 1)))
            stats = CallStats(call.latency_ms, call.encoder_ms, call.iterations[i], call.nfe[i], call.converged[i],
                              call.deadline_hit, delay=None if delays[i] is None or agent.previous is None else int(delays[i]),
                              reference_dev=None if call.reference_dev is None else call.reference_dev[i],
                              reference_ratio=call.reference_ratio, network_ms=call.network_ms, queue_ms=call.queue_ms)
            agent.log.record(stats)
            agent.previous = Chunk(obs_ticks[i], call.upcoming[i], call.normalized[i], stats)
            chunks.append(agent.previous)
        return chunks

    def call(self, obs, noise: SamplerNoise, prefix, warm: WarmStart | None) -> "CallResult":
        """One network call of this agent's policy on a batch (the part of :meth:`infer_together`
        that a remote agent makes elsewhere): encode, sample, and the reference sampler if any."""
        policy = self.policy
        t0 = time.perf_counter()
        cond = policy.encode_observation(obs)  # once per call; the samplers iterate only the U-Net
        t_enc = time.perf_counter()
        out = policy.sample_from_condition(cond, noise=noise, sampler=self.sampler, warm_start=warm, return_trajectory=self.warm_start,
                                           deadline=None if self.budget_s is None else t0 + self.budget_s, prefix=prefix)
        t_done = time.perf_counter()
        devs, ratio = None, None
        if self.reference is not None:  # the same conditioning and noise: the ratio compares the samplers
            ref = policy.sample_from_condition(cond, noise=noise, sampler=self.reference, prefix=prefix)
            ratio = (time.perf_counter() - t_done) / (t_done - t_enc)
            devs = [float(d) for d in max_abs_deviation(out.actions_normalized, ref.actions_normalized)]
        st = out.stats
        return CallResult(out.upcoming.cpu().numpy().astype(np.float64), out.action_pred_normalized.cpu().numpy(),
                          [int(v) for v in st.iterations], [float(v) for v in st.nfe], [bool(v) for v in st.converged],
                          bool(st.deadline_hit), (t_done - t0) * 1e3, (t_enc - t0) * 1e3, out.trajectory, devs, ratio)


@dataclass
class CallResult:
    """One batched call's outputs as an agent uses them: per row the actions from the executed start
    on (environment units), the whole trajectory in network units and the sampler's statistics;
    the call's latency (observation to action) and, for a remote call, its network and queue time."""

    upcoming: np.ndarray  # (B, T - start, Da)
    normalized: np.ndarray  # (B, T, Da)
    iterations: list
    nfe: list
    converged: list
    deadline_hit: bool
    latency_ms: float
    encoder_ms: float
    trajectory: Trajectory | None = None
    reference_dev: list | None = None
    reference_ratio: float | None = None
    network_ms: float | None = None
    queue_ms: float | None = None


def infer_with_recovery(agents: list["PolicyAgent"], attempt: Callable[[], list[Chunk]], timeout_s: float = 60.0,
                        first_wait_s: float = 0.05) -> list[Chunk]:
    """``attempt()`` (a call of ``agents``), retried while it raises
    :class:`~paradiffpolicy.errors.InferenceUnavailable`: each failure is recorded in the agents'
    logs (their episodes are marked faulted), the agents :meth:`~PolicyAgent.recover`, and the
    wait doubles from ``first_wait_s`` up to 2 s; after ``timeout_s`` of failures the last one is
    raised. A retried call draws the same noise, so it returns what the first attempt would have."""
    waited, wait = 0.0, first_wait_s
    while True:
        try:
            return attempt()
        except InferenceUnavailable as e:
            for agent in agents:
                agent.log.record_fault(str(e))
            if waited >= timeout_s:
                raise InferenceUnavailable(f"{e} (still failing after {waited:.1f} s of retries)") from None
            time.sleep(wait)
            waited += wait
            wait = min(2 * wait, 2.0)
            for agent in {id(a): a for a in agents}.values():
                try:
                    agent.recover()
                except Exception:  # noqa: BLE001 - not back yet: the next attempt fails and waits longer
                    pass


def _copy_step(obs):
    """One step of observation as the history keeps it: float32 for flat arrays, dict entries as given
    (images stay uint8)."""
    if isinstance(obs, dict):
        return {k: np.array(v) for k, v in obs.items()}
    return np.asarray(obs, dtype=np.float32)
