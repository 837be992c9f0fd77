"""The reference sampler: one network call per step, in order."""

from __future__ import annotations

import torch
from torch import Tensor

from paradiffpolicy.sampling.base import Denoiser, SampleStats, SamplerNoise, SamplerOutput, Trajectory
from paradiffpolicy.sampling.prefix import ActionPrefix, predict
from paradiffpolicy.schedulers import StepTable


class SequentialSampler:
    """``x_{k+1} = A x_k + B x̂0_k + C x̂0_{k-1} + E ε̂_k + σ_k z_k`` for k = 0..N-1.

    Consumes exactly the pre-drawn noise that :class:`PicardSampler` consumes, so the two are
    comparable sample for sample.
    """

    name = "sequential"

    def __init__(self, table: StepTable):
        self.table = table

    def to(self, device: torch.device | str) -> "SequentialSampler":
        self.table = self.table.to(device)
        return self

    def settings(self) -> dict:
        return {"name": self.name}

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        noise: SamplerNoise,
        global_cond: Tensor | None = None,
        warm_start=None,
        return_trajectory: bool = False,
        deadline: float | None = None,
        prefix: ActionPrefix | None = None,
    ) -> SamplerOutput:
        """Sample x_N (B, T, Da). ``warm_start`` is accepted for interface parity and ignored
        (there is nothing to guess), so is ``deadline`` (a partly denoised sample is no action);
        ``return_trajectory`` also returns the states x_0..x_N (B, N+1, ...); ``prefix``: actions
        the sample must agree with, applied inside every step (see ``sampling/prefix.py``)."""
        table = self.table
        n = table.num_steps
        if noise.num_steps != n:
            raise ValueError(f"noise has {noise.num_steps} steps, the scheduler has {n}")
        x = noise.initial.clone()
        bsz = x.shape[0]
        rows = torch.arange(bsz, device=x.device)
        if prefix is not None:
            prefix.check(tuple(x.shape))
            x = prefix.state(x, torch.zeros_like(rows), rows, noise.initial, table)
        x0_prev = torch.zeros_like(x)
        states = [x] if return_trajectory else None
        for k in range(n):
            kk = torch.full((bsz,), k, dtype=torch.long, device=x.device)
            x0, eps = predict(model, table, x, kk, global_cond, rows, prefix)
            x = table.noise_free_step(x, x0, eps, x0_prev, kk) + table.noise_std[k] * noise.steps[k]
            if prefix is not None:
                x = prefix.state(x, kk + 1, rows, noise.initial, table)
            x0_prev = x0
            if states is not None:
                states.append(x)
        full = torch.full((bsz,), n, dtype=torch.long)
        stats = SampleStats(
            iterations=full, nfe=full.clone(), residual=torch.zeros(bsz), converged=torch.ones(bsz, dtype=torch.bool), rounds=n
        )
        trajectory = None if states is None else Trajectory(torch.stack(states, dim=1))
        return SamplerOutput(x, stats, trajectory)
