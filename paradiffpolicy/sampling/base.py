"""Shared pieces of every sampler: the denoiser signature, pre-drawn noise, warm starts and typed
outputs (statistics, trajectory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    """``model(sample (M, T, Da), timestep (M,) int64, global_cond=(M, Dc) | None) -> (M, T, Da)``.

    ConditionalUnet1D has this signature; each row carries its own timestep. A network trained
    with the committed action prefix as an input (``prefix_input`` true) also takes
    ``prefix=(M, T, Da + 1)`` (``models/unet1d.py``); only ``ActionPrefix(mode="trained")`` passes it.
    """

    def __call__(self, sample: Tensor, timestep: Tensor, global_cond: Tensor | None = None) -> Tensor: ...


@dataclass
class SamplerNoise:
    """All randomness of one sampling call, drawn before it starts.

    ``initial``: x_T, shape (B, T, Da). ``steps``: z_k for k = 0..N-1, shape (N, B, T, Da).
    With the noise fixed, sampling is a deterministic map, so sequential and Picard sampling
    must return the same sample.
    """

    initial: Tensor
    steps: Tensor

    def __post_init__(self) -> None:
        if self.steps.dim() != self.initial.dim() + 1 or self.steps.shape[1:] != self.initial.shape:
            raise ValueError(
                f"noise.steps must have shape (N, *{tuple(self.initial.shape)}), got {tuple(self.steps.shape)}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.steps.shape[0])

    def to(self, device: torch.device | str) -> "SamplerNoise":
        return SamplerNoise(self.initial.to(device), self.steps.to(device))

    def shifted(self, shift: int, fresh: "SamplerNoise") -> "SamplerNoise":
        """This noise moved ``shift`` positions earlier along the horizon (dim 1 of (B, T, Da)),
        the vacated tail taken from ``fresh``. Used between control ticks so that the noise of an
        action keeps following the action's time: consecutive chunks then share their noise where
        they overlap, and the previous trajectory is a good guess for the next."""
        horizon = self.initial.shape[1]
        if shift <= 0 or shift >= horizon:
            return fresh if shift >= horizon else self
        initial = torch.cat([self.initial[:, shift:], fresh.initial[:, horizon - shift :]], dim=1)
        steps = torch.cat([self.steps[:, :, shift:], fresh.steps[:, :, horizon - shift :]], dim=2)
        return SamplerNoise(initial, steps)


def draw_noise(
    shape: tuple[int, ...],
    num_steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> SamplerNoise:
    """Draw x_T then z_0..z_{N-1} (float32) from ``generator``; x_T does not depend on N."""
    initial = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    steps = torch.randn((num_steps, *shape), generator=generator, device=device, dtype=torch.float32)
    return SamplerNoise(initial, steps)


@dataclass
class WarmStart:
    """A guess for a whole Picard trajectory: ``states`` (B, N+1, T, Da) (``states[:, 0]`` is
    ignored: x_0 is the noise), used along the horizon where ``valid`` (T,) is True.

    ``x0`` (optional, (B, N+1, T, Da)): the data prediction x̂0 made at each state of that
    trajectory (``x0[:, k]`` at state k). With it the sampler also moves the guess by how much the
    new x̂0 differs from the old one (see ``PicardSampler._fill_tail``).
    """

    states: Tensor
    valid: Tensor
    x0: Tensor | None = None

    @classmethod
    def from_previous(cls, previous: "Trajectory", shift: int) -> "WarmStart | None":
        """The previous trajectory (B, N+1, T, Da) (and its x̂0) moved ``shift`` positions earlier
        in time; the last ``shift`` positions are left to the sampler's own guess."""
        states, x0 = previous.states, previous.x0
        horizon = states.shape[2]
        if shift < 0 or shift >= horizon:
            return None
        valid = torch.arange(horizon) < horizon - shift
        moved_x0 = None if x0 is None else torch.roll(x0, -shift, dims=2)
        return cls(torch.roll(states, -shift, dims=2), valid, moved_x0)

    def mask(self, sample_shape: tuple[int, ...], device) -> Tensor:
        """(1, 1, T, 1) boolean mask broadcastable over the (B, N+1, T, Da) state buffer."""
        return self.valid.to(device).view(1, 1, -1, *[1] * (len(sample_shape) - 1))


@dataclass
class SampleStats:
    """What one sampling call cost, per sample in the batch (tensors of shape (B,)).

    ``iterations``: sequential rounds of network calls the sample took part in;
    ``nfe``: network evaluations spent on the sample (window padding included);
    ``residual``: the last convergence error (0 for the sequential sampler);
    ``converged``: whether the sample is the sampler's fixed point within tolerance.
    ``rounds`` is the number of batched network calls the whole call made (its latency driver);
    ``deadline_hit``: the call stopped at its deadline with some sample unconverged.
    """

    iterations: Tensor
    nfe: Tensor
    residual: Tensor
    converged: Tensor
    rounds: int
    deadline_hit: bool = False

    def summary(self) -> dict:
        """Plain-Python summary for logs and JSON."""
        return {
            "rounds": self.rounds,
            "iterations_mean": float(self.iterations.float().mean()),
            "nfe_mean": float(self.nfe.float().mean()),
            "residual_max": float(self.residual.max()),
            "all_converged": bool(self.converged.all()),
            "deadline_hit": self.deadline_hit,
        }


@dataclass
class Trajectory:
    """A sampling call's whole path: ``states`` x_0..x_N (B, N+1, T, Da) and, from the Picard
    sampler, ``x0`` the data prediction made at each state (B, N+1, T, Da; slot N unused). The
    next control tick's :class:`WarmStart` is built from it."""

    states: Tensor
    x0: Tensor | None = None

    def rows(self, index: slice) -> "Trajectory":
        return Trajectory(self.states[index], None if self.x0 is None else self.x0[index])

    @staticmethod
    def cat(parts: "list[Trajectory]") -> "Trajectory":
        x0 = None if any(p.x0 is None for p in parts) else torch.cat([p.x0 for p in parts])
        return Trajectory(torch.cat([p.states for p in parts]), x0)


@dataclass
class SamplerOutput:
    """What a sampler returns: the sample x_N (B, T, Da), its statistics and, when asked for,
    its trajectory."""

    sample: Tensor
    stats: SampleStats
    trajectory: Trajectory | None = None
