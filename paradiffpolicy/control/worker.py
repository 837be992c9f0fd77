"""Policy inference in its own process, so it does not share the GIL with the control loop.

On a small CPU a thread-based runner loses much of its speed to the loop it serves: every one of
the U-Net's tensor ops has to win the GIL back from the simulator's Python code.
:class:`ProcessAgent` is a :class:`PolicyAgent` whose network calls (:meth:`PolicyAgent.call`:
encode, sample) run in a spawned worker process holding its own copy of the policy; the
observation history, noise stream, previous chunk, statistics and the API stay in the caller's
process, so :class:`PolicyRunner` and the realtime controller use it unchanged, and the worker keeps
no state a crash could lose.

If the worker dies (an out-of-memory kill, a crash), a call raises
:class:`~paradiffpolicy.errors.InferenceUnavailable` and :meth:`ProcessAgent.recover` starts a new
one; the runner holds meanwhile and counts the fault.

The worker receives the policy as its config and state dict through a pipe from this process (our
own objects between our own processes, never a file or a message from elsewhere).
"""

from __future__ import annotations

import multiprocessing as mp

import torch

from paradiffpolicy.control.agent import CallResult, PolicyAgent
from paradiffpolicy.control.join import JoinConfig
from paradiffpolicy.errors import InferenceUnavailable
from paradiffpolicy.policy import DiffusionPolicy

ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError, "FloatingPointError": FloatingPointError}


def _serve(conn, payload: dict) -> None:
    """Worker main: build the policy, then answer ("call", obs, noise, prefix, warm) / ("close",)
    messages until closed. Errors are sent back, never raised here."""
    torch.set_num_threads(payload["threads"])
    try:
        policy = DiffusionPolicy(payload["config"], payload["sampler"], backend=payload["backend"]).eval()
        policy.load_state_dict(payload["state"])
        policy.to(payload["device"])
        agent = PolicyAgent(policy, warm_start=payload["warm_start"], budget_s=payload["budget_s"], join=payload["join"])
        if payload["backend"] != "eager":
            policy.warm_up(1)  # trace / compile now: the episode's first calls must not pay for it
        conn.send(("ready",))
    except Exception as e:  # noqa: BLE001 - report to the parent
        conn.send(("error", type(e).__name__, str(e)))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "close":
            return
        try:
            if msg[0] == "call":
                conn.send(("ok", agent.call(*msg[1:])))
            else:
                conn.send(("error", "ValueError", f"unknown message {msg[0]!r}"))
        except Exception as e:  # noqa: BLE001 - the caller decides; the worker stays usable
            conn.send(("error", type(e).__name__, str(e)))


class ProcessAgent(PolicyAgent):
    """A PolicyAgent whose network calls run in a separate process (see the module docstring).

    Args:
        policy: the policy (its config, sampler and weights are copied into the worker).
        threads: torch threads of the worker (1 leaves a core to the simulator on 2 cores).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, policy: DiffusionPolicy, warm_start: bool = False, budget_s: float | None = None,
                 threads: int = 1, start_timeout_s: float = 120.0, join: JoinConfig | None = None):
        super().__init__(policy, warm_start=warm_start, budget_s=budget_s, join=join)
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self._payload = {"config": policy.config, "sampler": policy.sampler_config, "backend": policy.backend, "threads": threads,
                         "state": {k: v.detach().cpu() for k, v in policy.state_dict().items()},
                         "warm_start": warm_start, "budget_s": budget_s, "device": str(policy.device), "join": self.join}
        self._start_timeout_s = start_timeout_s
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # fork is unsafe with torch's thread pools
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self._payload), daemon=True, name="policy-inference")
        self._proc.start()
        child.close()
        if not self._conn.poll(self._start_timeout_s):
            self.close()
            raise RuntimeError(f"the inference process did not start within {self._start_timeout_s} s")
        self._reply()

    @property
    def pid(self) -> int | None:
        """The worker's process id (e.g. to watch its memory)."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the worker process is running (False after :meth:`close`)."""
        return self._proc.is_alive()

    def recover(self) -> None:
        """Start a new worker if this one died (a no-op while it runs)."""
        if self._proc.is_alive():
            return
        self._conn.close()
        self._start()
        self.restarts += 1

    def _reply(self) -> tuple:
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise InferenceUnavailable(f"the inference process died (exit code {self._proc.exitcode})") from None
        if msg[0] == "error":
            raise ERRORS.get(msg[1], RuntimeError)(f"inference process: {msg[2]}")
        return msg

    def call(self, obs, noise, prefix, warm) -> CallResult:
        """:meth:`PolicyAgent.call` in the worker."""
        try:
            self._conn.send(("call", obs, noise, prefix, warm))
        except (BrokenPipeError, OSError):
            raise InferenceUnavailable(f"the inference process died (exit code {self._proc.exitcode})") from None
        return self._reply()[1]

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()

    def __enter__(self) -> "ProcessAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
