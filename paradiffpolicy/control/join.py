"""How a new chunk joins the one executing while it was computed.

A call that starts at tick ``t`` and takes ``d`` ticks returns a chunk predicted from the
observation at ``t``; the ``d`` actions executed meanwhile came from the previous chunk. The
methods:

* ``naive`` — today's asynchronous chunking: the new chunk knows nothing of them; the controller
  switches to it at ``t + d`` (latency matching).
* ``hard`` — the new chunk is sampled with the executed and committed actions (ticks before
  ``t + d``) inpainted (:class:`~paradiffpolicy.sampling.prefix.ActionPrefix`, weight 1).
* ``soft`` — as ``hard``, plus the rest of the previous chunk's overlap with a weight that decays
  to 0 (Real-Time Chunking's exponential schedule).
* ``guided`` — Real-Time Chunking's ΠGDM guidance with the ``soft`` weights (a vector-Jacobian
  product through the network at every step).
* ``blend`` — a baseline that conditions nothing: where both chunks have an action for a tick, the
  executed action is ``(1 - blend) old + blend new`` (LeRobot's async inference, 0.3 / 0.7).
* ``trained`` — for a policy trained with the committed prefix as a network input (``train
  prefix.max_delay=...``, training-time action conditioning): the committed positions of ``hard``
  go into the network itself (``ActionPrefix`` mode ``trained``); no extra network calls.

``auto``, the default, is ``trained`` for a policy trained that way and ``naive`` otherwise
(:meth:`JoinConfig.for_policy`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from paradiffpolicy.sampling.prefix import INPAINT_MODES, ActionPrefix, prefix_weights

JOIN_METHODS = ("naive", "hard", "soft", "guided", "blend", "trained")
CONDITIONED = ("hard", "soft", "guided", "trained")


@dataclass
class JoinConfig:
    """``method``: one of ``JOIN_METHODS``, or ``auto`` (the default): ``trained`` for a policy
    trained with the committed prefix, else ``naive``; for the policies without it no join kept
    measurably more success than naive in the simulated delays with Picard / DDPM-100 (``hard`` the
    most, measurably more than ``soft``), and with DDIM-8 ``hard`` kept measurably less
    (``benchmarks/results/delay-summary*.md``). ``inpaint``: how ``hard`` / ``soft`` enter each step
    (``x0``, ``noised`` or ``clean``; see ``sampling/prefix.py``); ``max_guidance``: β of
    ``guided``; ``blend``: the new chunk's share under ``blend``."""

    method: str = "auto"
    inpaint: str = "x0"
    max_guidance: float = 5.0
    blend: float = 0.7

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key."""
        if self.method not in ("auto", *JOIN_METHODS):
            raise ValueError(f"controller.join.method={self.method!r} is unknown; expected auto or one of {JOIN_METHODS}")
        if self.inpaint not in INPAINT_MODES or self.inpaint == "guided":
            raise ValueError(f"controller.join.inpaint={self.inpaint!r} is unknown; expected x0, noised or clean")
        if not self.max_guidance > 0:
            raise ValueError(f"controller.join.max_guidance={self.max_guidance} must be > 0")
        if not 0 <= self.blend <= 1:
            raise ValueError(f"controller.join.blend={self.blend} must lie in [0, 1]")

    def for_policy(self, config) -> "JoinConfig":
        """This join for a policy of ``config`` (a ``PolicyConfig``): ``auto`` resolved, and
        ``ValueError`` for ``trained`` on a policy that was not trained with the committed prefix."""
        takes_prefix = bool(getattr(config, "prefix_input", False))
        if self.method == "auto":
            return dataclasses.replace(self, method="trained" if takes_prefix else "naive")
        if self.method == "trained" and not takes_prefix:
            raise ValueError("controller.join.method=trained needs a policy trained with the committed prefix "
                             "(python -m paradiffpolicy.train prefix.max_delay=...); this one was not: use naive or hard")
        return self

    @property
    def conditions(self) -> bool:
        """Whether the sampler is asked to agree with the previous chunk."""
        return self.method in CONDITIONED

    def mode(self) -> str:
        """The :class:`ActionPrefix` mode of a conditioned method."""
        return self.method if self.method in ("guided", "trained") else self.inpaint

    def weights(self, start: int, delay: int, shift: int, horizon: int) -> torch.Tensor:
        """Weights (T,) over the new chunk's positions. Position ``start`` holds the action for the
        observation's tick; positions before ``start + delay`` were executed or are committed, and
        the previous chunk (``shift`` ticks older) covers positions before ``horizon - shift``."""
        schedule = "hard" if self.method in ("hard", "trained") else "exp"
        return prefix_weights(start + delay, horizon - shift, horizon, schedule)


def committed_prefix(join: JoinConfig, previous: list, obs_ticks: list[int], delays: list[int | None], start: int,
                     horizon: int) -> ActionPrefix | None:
    """The :class:`ActionPrefix` of one batched call: row ``i`` agrees with ``previous[i]`` (a
    :class:`~paradiffpolicy.control.agent.Chunk` or None) moved to ``obs_ticks[i]``, for a call
    expected to take ``delays[i]`` ticks (None: this row is not conditioned). None when no row is
    (the call is then the unconditioned one, bit for bit)."""
    if join.method == "auto":
        raise ValueError("join.method=auto must be resolved for a policy first (JoinConfig.for_policy)")
    if not join.conditions:
        return None
    rows = [(i, p, d) for i, (p, d) in enumerate(zip(previous, delays)) if p is not None and d is not None]
    if not rows:
        return None
    dim = rows[0][1].normalized.shape[-1]
    target = torch.zeros(len(previous), horizon, dim)
    weights = torch.zeros(len(previous), horizon)
    for i, prev, d in rows:
        shift = obs_ticks[i] - prev.obs_tick
        if shift < 0:
            raise ValueError(f"the previous chunk is from tick {prev.obs_tick}, after this call's tick {obs_ticks[i]}")
        if shift >= horizon:
            continue  # nothing of it overlaps
        target[i, : horizon - shift] = torch.from_numpy(np.ascontiguousarray(prev.normalized[shift:], dtype=np.float32))
        weights[i] = join.weights(start, d, shift, horizon)
    return ActionPrefix(target, weights, join.mode(), join.max_guidance)
