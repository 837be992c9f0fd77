"""Closed-loop episodes.

* ``fast``: call the policy, execute ``Ta`` actions, repeat — as fast as the machine allows
  (Diffusion Policy's simulation eval); :func:`run_vector` does the same over several environments
  in lockstep with one batched policy call.
* ``realtime``: one environment step per tick of the task's control clock, through
  :class:`~paradiffpolicy.control.runner.PolicyRunner` (background inference, latency matching,
  deadline misses counted). Ticks that start late are counted as ``late_ticks``.
* ``delay``: a simulated inference delay, deterministic and machine independent (Real-Time
  Chunking's benchmark): a call starts every ``s`` ticks from that tick's observation; for its
  first ``d`` ticks the previous chunk keeps executing, then the new chunk from its index ``d``.
  ``d`` is fixed (``delay``), drawn per call from a latency distribution (``delay_ms``), or replayed
  from the delays a wall-clock run measured (``delay_from``); how the new chunk joins the old one is
  ``join`` (``control/join.py``). ``d = 0`` with ``join.method=naive``
  is ``fast`` mode, episode for episode.

All share :class:`Episode`: the bookkeeping of one episode (steps, rewards, success, the failure
reason of an environment or policy fault, wall time, achieved rate, and the action jumps at chunk
seams and within chunks).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import numpy as np

from paradiffpolicy.control.agent import Chunk, InferenceLog, PolicyAgent, infer_with_recovery
from paradiffpolicy.control.join import JoinConfig
from paradiffpolicy.control.runner import PolicyRunner, default_interval, hold_action
from paradiffpolicy.envs.base import PolicyEnv
from paradiffpolicy.errors import InferenceUnavailable

MODES = ("fast", "realtime", "delay")


@dataclass
class ControllerConfig:
    mode: str = "fast"
    hz: float = 0.0  # 0: the task's control rate
    late_tolerance: float = 0.5  # a tick that starts later than this fraction of a period is late
    # realtime only: run the policy in a worker process (see control/worker.py), not a thread; null:
    # yes on the wall clock unless eval's server= or compare=true needs otherwise (eval.choose_inference_process)
    inference_process: Optional[bool] = None
    # delay only: the ticks d each call takes; or, when delay_ms is given, d = ceil(ms * hz / 1000)
    # for a latency drawn per call from delay_ms (a measured distribution), seeded by the episode
    delay: int = 0
    delay_ms: List[float] = field(default_factory=list)
    # delay only: or the calls a controller=realtime run measured (the d each was given, the ticks
    # until its chunk was used), the path of its eval_info.json: what that machine saw; an episode
    # it played replays its own calls in order, the others draw from all of them
    delay_from: str = ""
    # realtime and delay: s, ticks between calls (0: the policy's n_action_steps, shrunk where d + s
    # would exceed a chunk; PolicyRunner.interval)
    execute: int = 0
    # realtime and delay: how a new chunk joins the executing one
    join: JoinConfig = field(default_factory=JoinConfig)

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key."""
        if self.mode not in MODES:
            raise ValueError(f"controller.mode={self.mode!r} is unknown; expected one of {MODES}")
        if self.hz < 0:
            raise ValueError(f"controller.hz={self.hz} must be >= 0 (0 = the task's rate)")
        if self.late_tolerance < 0:
            raise ValueError(f"controller.late_tolerance={self.late_tolerance} must be >= 0")
        if self.inference_process is True and self.mode != "realtime":
            raise ValueError("controller.inference_process=true needs controller.mode=realtime")
        if self.delay < 0 or self.execute < 0:
            raise ValueError(f"controller.delay={self.delay} and controller.execute={self.execute} must be >= 0")
        if any(not math.isfinite(ms) or ms < 0 for ms in self.delay_ms):
            raise ValueError(f"controller.delay_ms={list(self.delay_ms)} must be finite latencies >= 0")
        if (self.delay or self.delay_ms or self.delay_from) and self.mode != "delay":
            raise ValueError("controller.delay, controller.delay_ms and controller.delay_from need controller.mode=delay")
        if sum(map(bool, (self.delay, self.delay_ms, self.delay_from))) > 1:
            raise ValueError("give one of controller.delay, controller.delay_ms and controller.delay_from")
        if self.delay_from:
            measured_delays(self.delay_from)  # refused here, naming the key, if it is not a realtime run's record
        if self.execute and self.mode == "fast":
            raise ValueError("controller.execute needs controller.mode=realtime or delay (fast mode executes Ta)")


@dataclass
class MeasuredDelays:
    """What a ``controller=realtime`` run measured (see :func:`measured_delays`)."""

    calls: list[tuple[int, int]]  # every chunk put to use: (the d its call was given, ticks until used)
    hz: float  # the rate the run ticked at
    by_seed: dict[int, list[tuple[int, int]]]  # each episode's calls in order, where the record has them


def measured_delays(path: str) -> MeasuredDelays:
    """What a ``controller=realtime`` run measured, one entry per chunk put to use: (the delay its
    call was given, i.e. the runner's estimate, the ticks from its observation to its first executed
    action), and the rate it ran at: its ``eval_info.json``'s ``inference.arrival_ticks.by_delay``
    and ``control.target_hz``; and, in records that have them, each episode's calls in the order
    they ran (``per_episode[i].inference.arrivals``). ``ValueError`` naming ``controller.delay_from``
    for a file that is not such a record (records made before arrivals were measured hold only the
    estimates)."""
    key = f"controller.delay_from={path!r}"
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}: cannot read it as an eval_info.json ({e})") from None
    mode = (info.get("control") or {}).get("mode") if isinstance(info, dict) else None
    if mode != "realtime":
        raise ValueError(f"{key} is a controller.mode={mode} record; expected the eval_info.json of a controller=realtime run")
    by_delay = ((info.get("inference") or {}).get("arrival_ticks") or {}).get("by_delay") or {}
    try:
        calls = [(int(d), int(a)) for d, counts in by_delay.items() for a, n in counts.items() for _ in range(int(n))]
    except (TypeError, ValueError, AttributeError):
        calls = []
    if not calls or min(min(c) for c in calls) < 0:
        raise ValueError(f"{key} records no measured arrivals (inference.arrival_ticks.by_delay: {by_delay}); "
                         "records of realtime runs older than the arrival measurement hold only estimated delays")
    by_seed = {}
    for i, ep in enumerate(info.get("per_episode") or []):
        sequence = (ep.get("inference") or {}).get("arrivals") if isinstance(ep, dict) else None
        if sequence:
            try:
                by_seed[int(ep["seed"])] = [(int(d), int(a)) for d, a in sequence]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{key}: per_episode[{i}] has no seed or its inference.arrivals {sequence!r} is not a "
                                 "list of [d, ticks] pairs") from None
    return MeasuredDelays(sorted(calls), float(info["control"]["target_hz"]), by_seed)


class DelaySchedule:
    """When calls start and how long they take in ``delay`` mode: a call every ``execute`` ticks,
    each taking ``delay`` ticks or, with ``delay_ms``, ``ceil(ms * hz / 1000)`` ticks for a latency
    drawn per call from ``delay_ms``, or with ``delay_from`` the calls a wall-clock run measured at
    the same rate: an episode whose seed that run played gets its calls in the order they ran, then
    (and every other episode) draws from all of them; draws by an RNG seeded per episode. ``calls``
    holds what is drawn: (the d the call is given, the ticks until its chunk is used); they differ
    only where a wall-clock runner's estimate did.

    A given ``delay`` or ``delay_ms`` must satisfy ``d <= s`` with ``d + s`` within the chunk (the
    previous chunk must still hold the actions of the next call's first ``d`` ticks), else
    ``ValueError`` naming the keys. Measured arrivals (``delay_from``) are replayed as the clock ran
    them, late ones included: a call that arrives after ``s`` ticks starts the next call when it
    arrives, and a tick past the executing chunk's actions sends the ``hold`` action and counts a
    deadline miss, as :class:`~paradiffpolicy.control.runner.PolicyRunner` does."""

    def __init__(self, cfg: ControllerConfig, n_action_steps: int, chunk_length: int, hz: float, hold: str = "zero_motion"):
        self.execute = cfg.execute or n_action_steps
        self.execute_given = bool(cfg.execute)
        self.chunk_length = chunk_length
        self.join = cfg.join
        self.hold = hold
        self.by_seed: dict[int, list[tuple[int, int]]] = {}
        if cfg.delay_from:
            measured = measured_delays(cfg.delay_from)
            if not math.isclose(measured.hz, hz):
                raise ValueError(f"controller.delay_from={cfg.delay_from!r} was measured at {measured.hz:g} Hz; this run "
                                 f"ticks at {hz:g} Hz (delays in ticks do not carry over)")
            self.calls, self.by_seed = measured.calls, measured.by_seed
        else:
            ticks = [math.ceil(ms * hz / 1000 - 1e-9) for ms in cfg.delay_ms] or [cfg.delay]
            self.calls = [(d, d) for d in ticks]
        worst = max(max(c) for c in self.calls)
        if self.execute > chunk_length:
            raise ValueError(f"controller.execute={self.execute} exceeds the {chunk_length} actions a chunk holds")
        if not cfg.delay_from and (worst > self.execute or worst + self.execute > chunk_length):
            what = f"controller.delay_ms (up to {max(cfg.delay_ms)} ms = {worst} ticks at {hz} Hz)" if cfg.delay_ms \
                else f"controller.delay={worst}"
            raise ValueError(f"{what} with controller.execute={self.execute}: need d <= s and d + s <= {chunk_length} "
                             f"(the actions a chunk holds from its observation on)")

    @property
    def blend(self) -> float | None:
        """The new chunk's share in executed actions under ``join.method=blend``, else None."""
        return self.join.blend if self.join.method == "blend" else None

    def interval(self, given: int) -> int:
        """``s``, the ticks from a chunk's observation to the next call, when that call is given
        ``d = given``: ``controller.execute``, or by default PolicyRunner's rule, ``Ta`` shrunk to
        the chunk's length minus ``d`` where ``Ta`` would not leave the old chunk enough actions
        (only replayed estimates can be that large: a given ``delay`` must fit)."""
        return self.execute if self.execute_given else default_interval(self.execute, self.chunk_length, given)

    def episode(self, seed: int) -> "EpisodeCalls":
        """The calls of the episode with ``seed``: the measured run's own calls for this seed in the
        order they ran, where its record has them, then draws by an RNG seeded by the episode."""
        return EpisodeCalls(self.by_seed.get(seed, []), self.calls, np.random.default_rng([seed, 0xD1A7]))


class EpisodeCalls:
    """One episode's calls in ``delay`` mode, each (d it is given, ticks until its chunk is used):
    ``recorded`` in order, then draws from ``pool`` by ``rng``. :meth:`peek` sees the next one
    before its turn (how long the current chunk runs depends on the next call's d, as in
    PolicyRunner)."""

    def __init__(self, recorded: list[tuple[int, int]], pool: list[tuple[int, int]], rng: np.random.Generator):
        self._recorded = iter(recorded)
        self._pool = pool
        self._rng = rng
        self._next: tuple[int, int] | None = None

    def peek(self) -> tuple[int, int]:
        if self._next is None:
            self._next = next(self._recorded, None) or (
                self._pool[0] if len(self._pool) == 1 else self._pool[int(self._rng.integers(len(self._pool)))])
        return self._next

    def pop(self) -> tuple[int, int]:
        call = self.peek()
        self._next = None
        return call


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
    seam_jumps: list = field(default_factory=list)  # |a_t - a_{t-1}| (L2) where a_t came from a newer chunk
    inner_jumps: list = field(default_factory=list)  # |a_t - a_{t-1}| within one chunk
    fault: str | None = None  # a machinery fault that ended the episode (worker died, server unreachable)

    @property
    def faulted(self) -> bool:
        """Whether a fault of the machinery hit this episode (a call failed, or it ended it): such
        an episode is counted apart, never as a policy failure."""
        return self.fault is not None or bool(self.inference.faults)

    def to_json(self) -> dict:
        return {
            "seed": self.seed, "success": self.success, "sum_reward": self.sum_reward, "max_reward": self.max_reward,
            **({} if self.max_coverage is None else {"max_coverage": self.max_coverage}),
            "length": self.length, "failure_reason": self.failure_reason, "deadline_misses": self.deadline_misses,
            "late_ticks": self.late_ticks, "wall_s": round(self.wall_s, 3), "achieved_hz": round(self.achieved_hz, 2),
            # the calls' (d given, ticks until used) in order: what controller.delay_from replays for this seed
            "inference": {**self.inference.summary(), "arrivals": [list(c) for c in self.inference.arrivals]},
            "jumps": jump_summary(self.seam_jumps, self.inner_jumps),
            "faulted": self.faulted, **({"fault": self.fault or self.inference.faults[0]} if self.faulted else {}),
        }


def jump_summary(seam: list, inner: list) -> dict:
    """Mean and p95 of the action jump |Δa| at chunk seams and within chunks."""
    def stats(v: list) -> dict:
        return {"n": len(v), "mean": float(np.mean(v)) if v else 0.0, "p95": float(np.percentile(v, 95)) if v else 0.0}
    return {"seam": stats(seam), "inner": stats(inner)}


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
        self._last_action: np.ndarray | None = None

    def start(self):
        self.obs = self.env.reset(self.result.seed)
        return self.obs

    def step(self, action: np.ndarray, seam: bool = False) -> bool:
        """Execute one action; returns whether the episode is over (success or time limit).
        ``seam``: the action comes from a newer chunk than the previous action did."""
        action = np.asarray(action)
        if self._last_action is not None:
            (self.result.seam_jumps if seam else self.result.inner_jumps).append(float(np.linalg.norm(action - self._last_action)))
        self._last_action = action
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
        except InferenceUnavailable as e:  # the machinery, not the policy: marked, counted apart
            self.result.fault = str(e)
            self.result.failure_reason = f"fault: {e}"
            self.result.success = False
            self.done = True
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
            (chunk,) = infer_with_recovery([agent], lambda: [agent.infer(ep.result.length)])
            for j in range(ta):
                if ep.step(chunk.actions[j], seam=j == 0):
                    break
                agent.observe(ep.obs)
    return ep.finish(agent.log)


def run_realtime(env: PolicyEnv, runner: PolicyRunner, seed: int, hz: float, late_tolerance: float = 0.5,
                 record_video: bool = False, clock: Clock | None = None,
                 after_tick: Callable[[EpisodeResult], bool] | None = None) -> EpisodeResult:
    """One environment step per tick at ``hz`` on ``clock``, the action from ``runner.step``. The
    first chunk is computed before the clock starts. ``achieved_hz`` is the paced loop's rate.
    ``after_tick(result so far)`` runs after every step (a long-running loop's reporting); when it
    returns True the episode stops there, unfinished."""
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
            ep.step(runner.step(ep.obs), seam=runner.switched)
            elapsed = ep.clock.now() - start
            achieved = runner.tick / elapsed if elapsed > 0 else 0.0
            if after_tick is not None and after_tick(ep.result):
                break
    ep.result.deadline_misses = runner.deadline_misses
    log = runner.log
    runner.reset()  # waits for a call still running; ready for the next episode
    return ep.finish(log, achieved)


def run_vector(envs: list[PolicyEnv], agents: list[PolicyAgent], seeds: list[int],
               schedule: DelaySchedule | None = None) -> Iterator[EpisodeResult]:
    """``fast`` mode (``schedule`` None) or ``delay`` mode over several environments in lockstep,
    one batched policy call per cycle (throughput for success-rate evaluation; the latencies
    recorded are the batched calls'). Yields each EpisodeResult as its episode ends (in completion
    order). With one environment and no schedule this is :func:`run_fast`."""
    queue = list(seeds)
    slots: list[_Slot | None] = [None] * len(envs)
    finished: list[EpisodeResult] = []
    ta = agents[0].policy.config.n_action_steps  # fast mode's s; delay mode asks the schedule per call

    def start(i: int) -> None:
        while queue:
            ep = Episode(envs[i], queue.pop(0))
            with ep.guard():
                agents[i].reset(ep.start(), ep.result.seed)
            if not ep.done:
                slots[i] = _Slot(ep, None if schedule is None else schedule.episode(ep.result.seed))
                return
            finished.append(ep.finish(agents[i].log))
        slots[i] = None

    for i in range(len(envs)):
        start(i)
    while any(slots) or finished:
        yield from finished
        finished.clear()
        active = [i for i, slot in enumerate(slots) if slot is not None]
        if not active:
            break
        # a call that joins a previous chunk takes d ticks; an episode's first call is waited for
        calls = [None if schedule is None or slots[i].current is None else slots[i].calls.pop() for i in active]
        group = [agents[i] for i in active]
        chunks = infer_with_recovery(group, lambda: type(group[0]).infer_together(
            group, [slots[i].ep.result.length for i in active], delays=[None if c is None else c[0] for c in calls]))
        for i, chunk, call in zip(active, chunks, calls):
            slot = slots[i]
            if call is not None:
                agents[i].log.record_arrival(*call)
            s = ta if schedule is None else schedule.interval(slot.calls.peek()[0])
            with slot.ep.guard():
                _execute(slot, agents[i], chunk, 0 if call is None else call[1], s, schedule)
            slot.current = chunk
            if slot.ep.done:
                finished.append(slot.ep.finish(agents[i].log))
                start(i)


@dataclass
class _Slot:
    """One environment of :func:`run_vector`: its episode, its calls' delays and the executing chunk."""

    ep: Episode
    calls: EpisodeCalls | None  # delay mode: the episode's calls (d given, ticks until used)
    current: Chunk | None = None
    source: Chunk | None = None  # the chunk the last executed action came from (None: a hold)
    last: np.ndarray | None = None  # the last executed action


def _execute(slot: _Slot, agent: PolicyAgent, new: Chunk, delay: int, execute: int, schedule: DelaySchedule | None) -> None:
    """One cycle from the new chunk's observation tick: ``delay`` actions of the executing chunk,
    then the new chunk's from index ``delay`` (``join.method=blend``: mixed with the old chunk's
    action for the same tick where it has one), ``max(execute, delay)`` actions in all. A tick past
    the executing chunk's actions (a replayed late arrival) sends the schedule's hold action and
    counts a deadline miss."""
    old, ep = slot.current, slot.ep
    blend = None if schedule is None else schedule.blend
    for j in range(max(execute, delay)):
        k = new.obs_tick + j - (old.obs_tick if old is not None else 0)
        if j < delay and k < len(old.actions):
            action, source = old.actions[k], old
        elif j < delay:
            action, source = hold_action(slot.last, schedule.hold), None
            ep.result.deadline_misses += 1
        else:
            action, source = new.actions[j], new
            if blend is not None and old is not None and k < len(old.actions):
                action = (1 - blend) * old.actions[k] + blend * action
        seam = source is not None and slot.source is not None and source is not slot.source
        slot.source, slot.last = source, action
        if ep.step(action, seam=seam):
            return
        agent.observe(ep.obs)
