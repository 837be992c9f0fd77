"""PolicyRunner: a diffusion policy inside your own control loop.

    runner = PolicyRunner(policy, hz=20, hold="zero_motion")
    runner.reset(obs, seed=0)
    while running:                       # your loop, one iteration per control tick
        action = runner.step(obs)         # never blocks on inference after the first call
        obs = robot.apply(action)
    runner.close()

``step`` runs inference of the next chunk in a background thread, one call every ``s`` ticks
(``execute``; default ``Ta``, as the simulated ``controller=delay``), each from the observation of
the tick it starts at. A chunk predicted from the observation at tick ``t`` holds the action for
tick ``t + j``; it is used from the tick after it arrives, at its index for that tick (latency
matching), so with a call of ``d`` ticks every chunk executes its actions ``d .. d + s - 1``. While
the next chunk is late, the current chunk's remaining actions (up to its horizon) are used; after
that the hold action is sent and a deadline miss counted. A call is expected to take
``d = ceil(p95 latency / period)`` ticks (of this episode's calls; at least 1); the default ``s``
shrinks to the chunk's length minus ``d`` when ``Ta`` would not leave the old chunk enough
actions to cover the call. Calling more often than every ``Ta`` ticks re-plans from fresher
observations but executes each plan for fewer ticks; on PushT at d = 4 that costs a third of the
success or more (``benchmarks/README.md``).

The ``d`` actions the current chunk executes during a call are committed; ``join``
(``control/join.py``) can make the new chunk agree with them inside every denoising step
(``"hard"``), and also softly with the rest of the current chunk (``"soft"``, ``"guided"``);
``"naive"``, the default, conditions nothing, ``"blend"`` mixes old and new actions where both exist.
``budget_s`` caps each Picard call: past it the sampler returns its current estimate (counted in
``budget_hits``). Everything is reported by :meth:`stats`.

A call that fails for the machinery (the worker process died, the server is unreachable:
:class:`~paradiffpolicy.errors.InferenceUnavailable`) is a fault, not an error of your loop:
``step`` keeps executing the current chunk and then the hold action (deadline misses), the agent
recovers (a new worker; a reconnected channel) and the call is retried after a backoff that
doubles up to ``max_backoff_s``; ``stats()["faults"]`` counts them. The episode's first call, made
synchronously by ``reset``/the first ``step``, is retried for up to ``fault_timeout_s``.

``act`` is the synchronous alternative (LeRobot's ``select_action``): no thread; when the chunk's
``Ta`` actions are used up, the call infers the next chunk from this tick's observation and blocks.

``inference_process=True`` runs the policy in a separate worker process
(:class:`~paradiffpolicy.control.worker.ProcessAgent`, ``threads`` torch threads) instead of a
thread of yours, so the inference does not queue for the GIL behind your loop's Python code.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from paradiffpolicy.control.agent import Chunk, PolicyAgent, infer_with_recovery
from paradiffpolicy.control.join import JoinConfig
from paradiffpolicy.control.worker import ProcessAgent
from paradiffpolicy.errors import InferenceUnavailable
from paradiffpolicy.policy import DiffusionPolicy, Sampler

HOLDS = ("zero_motion", "repeat")


def hold_action(last: np.ndarray, kind: str) -> np.ndarray:
    """What to send when no valid action exists: the last action again (absolute targets), or
    zeros with the gripper command kept (delta actions)."""
    if kind == "repeat":
        return last
    held = np.zeros_like(last)
    held[-1] = last[-1]
    return held


def default_interval(n_action_steps: int, chunk_length: int, delay: int) -> int:
    """``s`` when none is given, for calls expected to take ``delay`` ticks: ``Ta``, shrunk to the
    chunk's length minus ``delay`` where ``Ta`` would not leave the old chunk enough actions to
    cover the call (the simulated ``controller=delay`` replays the same rule)."""
    return max(1, min(n_action_steps, chunk_length - delay))


class PolicyRunner:
    """Args:
        policy: the policy.
        hz: the control rate (``step`` paces background inference by it; ``act`` needs none).
        hold: ``"zero_motion"`` (delta actions) or ``"repeat"`` (absolute targets); see
            :func:`hold_action`.
        sampler: the sampler of every call (``policy.make_sampler(...)``); default the policy's.
        reference: a sampler run after every call on the same input (deviation and latency ratio
            in :meth:`stats`; in-process only).
        warm_start, budget_s: see :class:`~paradiffpolicy.control.agent.PolicyAgent`.
        inference_process, threads: run inference in a worker process with ``threads`` threads.
        join: how a background chunk joins the executing one (see the module docstring).
        execute: ``s``, ticks between background calls (None: ``Ta``, see the module docstring).
        agent: the agent that makes the calls, instead of one built from the arguments above (e.g.
            a :class:`~paradiffpolicy.control.remote.RemoteAgent` for a policy server); ``policy``
            is then ignored (pass None).
        max_backoff_s, fault_timeout_s: see the module docstring.
    """

    def __init__(self, policy: DiffusionPolicy, hz: float | None = None, hold: str = "zero_motion", *,
                 sampler: Sampler | None = None, reference: Sampler | None = None, warm_start: bool = False,
                 budget_s: float | None = None, inference_process: bool = False, threads: int = 1,
                 join: JoinConfig | None = None, execute: int | None = None, agent: PolicyAgent | None = None,
                 max_backoff_s: float = 2.0, fault_timeout_s: float = 60.0):
        if hz is not None and not hz > 0:
            raise ValueError(f"hz={hz} must be > 0 (or None for act() only)")
        if hold not in HOLDS:
            raise ValueError(f"hold={hold!r} must be one of {HOLDS}")
        if not max_backoff_s > 0 or not fault_timeout_s >= 0:
            raise ValueError(f"max_backoff_s={max_backoff_s} must be > 0 and fault_timeout_s={fault_timeout_s} >= 0")
        config = (agent.policy if agent is not None else policy).config
        chunk_length = config.horizon - config.executed_start
        if execute is not None and not 1 <= execute <= chunk_length:
            raise ValueError(f"execute={execute} must lie in [1, {chunk_length}] (the actions a chunk holds), or None (Ta)")
        if agent is not None:
            if inference_process or sampler is not None or reference is not None:
                raise ValueError("agent= brings its own inference: inference_process, sampler and reference need it off")
            self.agent: PolicyAgent = agent
        elif inference_process:
            if reference is not None or sampler is not None:
                raise ValueError("inference_process=True runs the policy's own sampler; sampler= and reference= need it off")
            self.agent: PolicyAgent = ProcessAgent(policy, warm_start=warm_start, budget_s=budget_s, threads=threads, join=join)
        else:
            self.agent = PolicyAgent(policy, sampler=sampler, reference=reference, warm_start=warm_start, budget_s=budget_s,
                                     join=join)
        self.join = self.agent.join
        self.execute = execute
        self.period = None if hz is None else 1.0 / hz
        self.hold = hold
        self._pool: ThreadPoolExecutor | None = None  # started by the first background call
        self._pending: Future | None = None
        self._chunk: Chunk | None = None
        self._seed: int | None = None  # set by reset(); the episode starts at the first observation
        self._closed = False
        self.tick = 0
        self.deadline_misses = 0
        self._last: np.ndarray | None = None
        self._previous: Chunk | None = None  # the chunk executing before the current one (blend)
        self._latency_ms: list[float] = []  # of the chunks received: what schedules the next call
        self._source: Chunk | None = None  # the chunk the last action came from
        self.switched = False  # the last action came from a newer chunk than the one before it
        self.max_backoff_s = max_backoff_s
        self.fault_timeout_s = fault_timeout_s
        self.faults = 0  # calls of this episode that failed for the machinery
        self._retry_tick = 0  # after a fault, no call before this tick
        self._backoff_ticks = 1

    @property
    def chunk(self) -> Chunk | None:
        """The chunk executing now (its ``actions`` start at its ``obs_tick``); None before the
        episode's first call."""
        return self._chunk

    @property
    def log(self):
        """This episode's per-call statistics (:class:`~paradiffpolicy.control.agent.InferenceLog`)."""
        return self.agent.log

    def reset(self, obs=None, seed: int = 0) -> None:
        """Start an episode with noise stream ``seed``. With ``obs``, the first chunk is computed
        now (before your clock starts); without, at the first ``step``/``act``."""
        self._check_open()
        self._drain()  # no inference is running past this point
        self._seed, self._chunk, self._previous, self._source = seed, None, None, None
        self._latency_ms = []
        self.tick = 0
        self.deadline_misses = 0
        self.switched = False
        self.faults, self._retry_tick, self._backoff_ticks = 0, 0, 1
        if obs is not None:
            self._begin(obs)

    def _begin(self, obs) -> None:
        self.agent.reset(obs, self._seed)
        (self._chunk,) = infer_with_recovery([self.agent], lambda: [self.agent.infer(0)], self.fault_timeout_s)
        self.faults = len(self.agent.log.faults)
        self._latency_ms.append(self._chunk.stats.latency_ms)
        self._last = self._chunk.actions[0]

    def _observe(self, obs) -> None:
        """This tick's observation: the episode's first (blocking first call), or the newest one
        (tick 0's observation is the one the episode began with)."""
        self._check_open()
        if self._seed is None:
            raise RuntimeError("call reset() before step(obs) or act(obs)")
        if self._chunk is None:
            self._begin(obs)
        elif self.tick > 0:
            self.agent.observe(obs)
        else:
            self.agent.policy.check_step(obs)  # checked all the same: a bad one raises here

    def step(self, obs) -> np.ndarray:
        """The action for this tick, given this tick's observation; the next chunk is inferred in
        the background (see the module docstring)."""
        if self.period is None:
            raise RuntimeError("step() paces background inference by the control rate: construct PolicyRunner(policy, hz=...) "
                               "or call act(obs)")
        self._observe(obs)
        if self._pending is not None and self._pending.done():
            pending, self._pending = self._pending, None
            try:
                new = pending.result()  # re-raises inference errors
            except InferenceUnavailable as e:
                self._fault(e)
            else:
                self._previous, self._chunk = self._chunk, new
                self._latency_ms.append(new.stats.latency_ms)
                self._backoff_ticks = 1
                if new.delay is not None:
                    self.agent.log.record_arrival(new.delay, self.tick - new.obs_tick)
        delay = self.expected_delay()
        if self._pending is None and self.tick >= max(self._chunk.obs_tick + self.interval(delay), self._retry_tick):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-inference")
            self._pending = self._pool.submit(self._infer, self.tick, self.agent.snapshot(), delay, self.faults > 0)
        return self._emit()

    def _infer(self, tick: int, history, delay: int, recover: bool) -> Chunk:
        """A background call; after a fault the agent recovers first (a new worker, a reconnect)."""
        if recover:
            self.agent.recover()
        return self.agent.infer(tick, history, delay)

    def _fault(self, error: Exception) -> None:
        """A call failed for the machinery: count it, keep executing what there is (then hold), and
        retry after a backoff that doubles up to ``max_backoff_s``."""
        self.faults += 1
        self.agent.log.record_fault(str(error))
        cap = max(1, int(self.max_backoff_s / self.period)) if self.period else 20  # act() without hz: ticks
        self._retry_tick = self.tick + min(self._backoff_ticks, cap)
        self._backoff_ticks = min(2 * self._backoff_ticks, cap)

    def interval(self, delay: int) -> int:
        """``s``: ticks from a chunk's observation to the next call, for calls of ``delay`` ticks."""
        if self.execute is not None:
            return self.execute
        return default_interval(self.agent.policy.config.n_action_steps, len(self._chunk.actions), delay)

    def expected_delay(self) -> int:
        """Ticks a background call is expected to take: ``ceil(p95 latency / period)`` of this
        episode's chunks so far (the first one's included), at least 1 (a chunk is used from the
        tick after it arrives)."""
        if not self._latency_ms:
            return 1
        return max(1, math.ceil(np.percentile(self._latency_ms, 95) / 1e3 / self.period))

    def act(self, obs) -> np.ndarray:
        """The action for this tick, synchronously: when the current chunk's ``Ta`` actions are
        used up, infer the next chunk from this observation (blocking)."""
        self._observe(obs)
        if self.tick - self._chunk.obs_tick >= self.agent.policy.config.n_action_steps and self.tick >= self._retry_tick:
            try:
                if self.faults:
                    self.agent.recover()
                new = self.agent.infer(self.tick)
            except InferenceUnavailable as e:  # hold this tick; retry after the backoff
                self._fault(e)
            else:
                self._chunk, self._previous = new, None  # nothing ran while it inferred
                self._latency_ms.append(self._chunk.stats.latency_ms)
        return self._emit()

    def _emit(self) -> np.ndarray:
        off = self.tick - self._chunk.obs_tick
        source = self._chunk
        if off < len(self._chunk.actions):
            action = self._chunk.actions[off]
            old = self._previous
            if self.join.method == "blend" and old is not None and self.tick - old.obs_tick < len(old.actions):
                action = (1 - self.join.blend) * old.actions[self.tick - old.obs_tick] + self.join.blend * action
        else:
            action, source = hold_action(self._last, self.hold), None
            self.deadline_misses += 1
        self.switched = source is not None and self._source is not None and source is not self._source
        self._source = source
        self._last = action
        self.tick += 1
        return action

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this PolicyRunner is closed; create a new one")

    def stats(self) -> dict:
        return {"ticks": self.tick, "deadline_misses": self.deadline_misses, **self.agent.log.summary()}

    def wait(self) -> None:
        """Block until a background call still running has finished; its chunk is used from the
        next ``step`` (e.g. a simulated loop that wants every call in time, or a test)."""
        if self._pending is not None:
            wait([self._pending])

    def _drain(self) -> None:
        """Wait for a background call still running; its chunk (or error) is no longer wanted."""
        if self._pending is not None:
            wait([self._pending])
            self._pending = None

    def close(self) -> None:
        """Wait for a running inference and stop the thread (and the worker process, if any).
        Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if hasattr(self.agent, "close"):  # a worker process, a channel
            self.agent.close()

    def __enter__(self) -> "PolicyRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
