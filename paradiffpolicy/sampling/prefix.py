"""Committed actions as a condition of every denoising step (inpainting the action prefix).

In a closed loop the next chunk is computed while the current one executes: the ``d`` actions that
run during inference are already committed, and the rest of the current chunk is what the robot is
about to do. An :class:`ActionPrefix` asks the sampler for a new chunk that agrees with them: a
``target`` trajectory (the current chunk moved to the new observation's tick, normalised units)
and per-position ``weights`` in [0, 1] (1 where an action is committed or already executed, a decay
over the rest of the overlap, 0 beyond; Real-Time Chunking's eq. 5, Black et al. 2025).

The condition is part of each step's map ``x_{k+1} = G_k(x_k)``, so every sampler of this package
(sequential, Picard over DDPM / DDIM / DPM-Solver++) has the same fixed point with it as without
it: Picard at ``window=1`` or ``tol=0`` returns the conditioned sequential sample. With ``W`` the
weights and ``a`` the target, the modes are (``docs/realtime.md`` has the derivations):

* ``x0`` — the data prediction is pulled to the target, ``x̂0' = x̂0 + W (a - x̂0)``, and ε̂ is
  re-derived from it. For DDPM the state then moves by the exact posterior ``q(x_{k+1} | x_k,
  x0 = a)`` where ``W = 1``, and the last step returns ``a`` there.
* ``noised`` — RePaint: after each step the state is pulled to the target noised to the state's
  level with the call's pre-drawn ``x_T``: ``x_j' = x_j + W (√ᾱ_j a + √(1-ᾱ_j) x_T - x_j)``.
* ``clean`` — diffusion_policy's ``conditional_sample``: the state is pulled to the clean target,
  ``x_j' = x_j + W (a - x_j)``, at every level.
* ``guided`` — ΠGDM guidance as in Real-Time Chunking: ``x̂0' = x̂0 + c_k J^T W (a - x̂0)``, ``J``
  the Jacobian of x̂0 in the state (one vector-Jacobian product through the network per row),
  ``c_k = min(β, 1/√ᾱ_k)``. Needs gradients through the denoiser (eager or jit backend).
* ``trained`` — for a network trained with the committed prefix as an input (training-time action
  conditioning, Black et al. 2025; ``models/unet1d.py``): the network is given the target where
  ``W = 1`` (weights must be 0 or 1) and predicts the rest knowing it; x̂0 is then set to the
  target there, as in ``x0``. No extra network calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from paradiffpolicy.models.unet1d import prefix_channels
from paradiffpolicy.schedulers import StepTable

INPAINT_MODES = ("x0", "noised", "clean", "guided", "trained")
SCHEDULES = ("hard", "linear", "exp")


def prefix_weights(committed: int, overlap_end: int, total: int, schedule: str) -> Tensor:
    """Weights (total,) over a chunk's positions: 1 before ``committed``, 0 from ``overlap_end``
    on, and between them ``hard`` 0, ``linear`` a ramp from 1 to 0, or ``exp`` the ramp times
    ``expm1(w)/(e-1)`` (Real-Time Chunking, eq. 5 and ``get_prefix_weights``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; expected one of {SCHEDULES}")
    overlap_end = max(0, min(overlap_end, total))
    committed = max(0, min(committed, overlap_end))
    idx = torch.arange(total, dtype=torch.float64)
    if schedule == "hard":
        w = (idx < committed).double()
    else:
        w = ((committed - 1 - idx) / (overlap_end - committed + 1) + 1).clamp(0, 1)
        if schedule == "exp":
            w = w * torch.expm1(w) / (math.e - 1)
        w = torch.where(idx < committed, torch.ones_like(w), w)
    return torch.where(idx >= overlap_end, torch.zeros_like(w), w).float()


@dataclass
class ActionPrefix:
    """What a new chunk must agree with (see the module docstring).

    ``target``: (B, T, Da) actions in the network's (normalised) units; ``weights``: (B, T) in
    [0, 1] (a row of zeros leaves that row unconditioned); ``mode``: one of ``INPAINT_MODES``;
    ``max_guidance``: β, the cap on the ``guided`` step size.
    """

    target: Tensor
    weights: Tensor
    mode: str = "x0"
    max_guidance: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in INPAINT_MODES:
            raise ValueError(f"prefix mode={self.mode!r} is unknown; expected one of {INPAINT_MODES}")
        if self.target.dim() != 3 or tuple(self.weights.shape) != tuple(self.target.shape[:2]):
            raise ValueError(f"prefix target must be (B, T, Da) and weights (B, T); got {tuple(self.target.shape)} "
                             f"and {tuple(self.weights.shape)}")
        if not torch.isfinite(self.target).all() or not torch.isfinite(self.weights).all():
            raise ValueError("prefix target or weights contain NaN or inf")
        if ((self.weights < 0) | (self.weights > 1)).any():
            raise ValueError("prefix weights must lie in [0, 1]")
        if not self.max_guidance > 0:
            raise ValueError(f"prefix max_guidance={self.max_guidance} must be > 0")
        if self.mode == "trained" and ((self.weights != 0) & (self.weights != 1)).any():
            raise ValueError("prefix mode='trained' takes weights of 0 or 1 (committed or not), as the network was trained")

    @cached_property
    def channels(self) -> Tensor:
        """The network's prefix input (B, T, Da + 1) of mode ``trained``, built once per call, not
        per network evaluation."""
        return prefix_channels(self.target, self.weights)

    def to(self, device) -> "ActionPrefix":
        return ActionPrefix(self.target.to(device, torch.float32), self.weights.to(device, torch.float32), self.mode,
                            self.max_guidance)

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise unless the target matches a sample of ``shape`` (B, T, Da)."""
        if tuple(self.target.shape) != tuple(shape):
            raise ValueError(f"prefix target has shape {tuple(self.target.shape)}; the sample is {tuple(shape)}")

    @property
    def changes_state(self) -> bool:
        """Whether the condition acts on the states (``noised``, ``clean``) rather than on x̂0."""
        return self.mode in ("noised", "clean")

    def _rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.target[rows], self.weights[rows].unsqueeze(-1)

    def _level_target(self, j: Tensor, rows: Tensor, x_t: Tensor, table: StepTable) -> Tensor:
        """c_j (M, T, Da): the target at the levels ``j`` (M,) of states of batch rows ``rows``,
        noised with x_t (``noised``) or clean (``clean``); level N is clean."""
        a = self.target[rows]
        if self.mode == "noised":
            n = table.num_steps
            signal = torch.cat([table.sqrt_alpha_prod, table.sqrt_alpha_prod.new_ones(1)])[j].view(-1, 1, 1)
            noise = torch.cat([table.sqrt_one_minus_alpha_prod, table.sqrt_alpha_prod.new_zeros(1)])[j].view(-1, 1, 1)
            a = torch.where((j < n).view(-1, 1, 1), signal * a + noise * x_t[rows], a)
        return a

    def pull(self, x: Tensor, j: Tensor, rows: Tensor, x_t: Tensor, table: StepTable) -> Tensor:
        """How far states ``x`` (M, T, Da) at levels ``j`` (M,) (0..N; N is clean) of batch rows
        ``rows`` (M,) move towards the target, ``W (c_j - x)`` (``noised``, ``clean``; x_t
        (B, T, Da) the call's pre-drawn x_T); zero for the x̂0 modes (exactly zero where W is 0)."""
        if not self.changes_state:
            return torch.zeros_like(x)
        return self.weights[rows].unsqueeze(-1) * (self._level_target(j, rows, x_t, table) - x)

    def pin(self, x: Tensor, j: Tensor, rows: Tensor, x_t: Tensor, table: StepTable) -> Tensor:
        """``x`` with the positions of weight 1 set to c_j exactly (``noised``, ``clean``).

        Picard's update adds the increments ``G(x_j) - x_j`` along the window; where a state is
        pinned, that increment's Jacobian is ``-I`` instead of near zero, so any error in a pinned
        state (a guess, or float rounding) would be carried, summed, into every later state of the
        window. The pinned values are known in closed form, so they are restored after every
        update; at ``W = 1`` the pull is idempotent, so the fixed point does not change."""
        if not self.changes_state:
            return x
        hard = (self.weights[rows] == 1).unsqueeze(-1)
        return torch.where(hard, self._level_target(j, rows, x_t, table), x)

    def state(self, x: Tensor, j: Tensor, rows: Tensor, x_t: Tensor, table: StepTable) -> Tensor:
        """The states after the pull (:meth:`pull`), pinned exactly where W = 1 (:meth:`pin`)."""
        if not self.changes_state:
            return x
        return self.pin(x + self.pull(x, j, rows, x_t, table), j, rows, x_t, table)

    def predict(self, model, table: StepTable, x: Tensor, k: Tensor, cond: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor]:
        """One network call on states ``x`` (M, T, Da) at steps ``k`` (M,) of batch rows ``rows``:
        (x̂0, ε̂) with the condition applied (``x0``, ``guided``, ``trained``)."""
        if self.mode == "trained":
            if not getattr(model, "prefix_input", False):
                raise ValueError("prefix mode 'trained' needs a network trained with the committed prefix as an input "
                                 "(policy.prefix_input=true, train prefix.max_delay > 0); this one has none: use join.method=hard")
            a, w = self._rows(rows)
            out = model(x, table.timesteps[k], global_cond=cond, prefix=self.channels[rows])
            x0, eps = table.predict_x0_eps(out, x, k)
            return self._moved(table, x0, eps, k, w * (a - x0))
        if self.mode != "guided":
            x0, eps = table.predict_x0_eps(model(x, table.timesteps[k], global_cond=cond), x, k)
            if self.mode != "x0":
                return x0, eps
            a, w = self._rows(rows)
            return self._moved(table, x0, eps, k, w * (a - x0))
        if not getattr(model, "differentiable", True):
            raise ValueError("join.method=guided needs gradients through the network; this backend's exported "
                             "network has none: use backend=eager or backend=jit")
        a, w = self._rows(rows)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0, eps = table.predict_x0_eps(model(xg, table.timesteps[k], global_cond=cond), xg, k)
            err = (w * (a - x0)).detach()
            (vjp,) = torch.autograd.grad(x0, xg, err)
        gain = (1.0 / table.sqrt_alpha_prod[k]).clamp(max=self.max_guidance).view(-1, 1, 1)
        return self._moved(table, x0.detach(), eps.detach(), k, gain * vjp)

    @staticmethod
    def _moved(table: StepTable, x0: Tensor, eps: Tensor, k: Tensor, dx0: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂0 + Δ, ε̂ moved so the pair stays consistent with the state: ε̂ - √ᾱ/√(1-ᾱ) Δ)."""
        ratio = (table.sqrt_alpha_prod[k] / table.sqrt_one_minus_alpha_prod[k]).view(-1, 1, 1)
        return x0 + dx0, eps - ratio * dx0


def predict(model, table: StepTable, x: Tensor, k: Tensor, cond: Tensor | None, rows: Tensor,
            prefix: ActionPrefix | None) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) of one network call, conditioned on ``prefix`` when there is one."""
    if prefix is None:
        return table.predict_x0_eps(model(x, table.timesteps[k], global_cond=cond), x, k)
    return prefix.predict(model, table, x, k, cond, rows)
