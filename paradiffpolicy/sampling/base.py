"""Shared pieces of every sampler: the denoiser signature, pre-drawn noise and call statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    """``model(sample (M, T, Da), timestep (M,) int64, global_cond=(M, Dc) | None) -> (M, T, Da)``.

    ConditionalUnet1D has this signature; each row carries its own timestep.
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
class SampleStats:
    """What one sampling call cost, per sample in the batch (tensors of shape (B,)).

    ``iterations``: sequential rounds of network calls the sample took part in;
    ``nfe``: network evaluations spent on the sample (window padding included);
    ``residual``: the last convergence error (0 for the sequential sampler);
    ``converged``: whether the sample is the sampler's fixed point within tolerance.
    ``rounds`` is the number of batched network calls the whole call made (its latency driver).
    """

    iterations: Tensor
    nfe: Tensor
    residual: Tensor
    converged: Tensor
    rounds: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Plain-Python summary for logs and JSON."""
        return {
            "rounds": self.rounds,
            "iterations_mean": float(self.iterations.float().mean()),
            "nfe_mean": float(self.nfe.float().mean()),
            "residual_max": float(self.residual.max()),
            "all_converged": bool(self.converged.all()),
            **self.extra,
        }
