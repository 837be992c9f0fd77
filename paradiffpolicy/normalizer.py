"""Min-max normaliser to [-1, 1] (Diffusion Policy's ``limits`` mode), stored with the weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

RANGE_EPS = 1e-4


class MinMaxNormalizer(nn.Module):
    """``y = scale * x + offset`` per feature, mapping [min, max] to [-1, 1].

    Features whose range is below ``1e-4`` map to 0 (their value carries no information).
    Buffers ``scale``, ``offset``, ``input_min``, ``input_max`` all have shape (D,).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("input_min", -torch.ones(dim))
        self.register_buffer("input_max", torch.ones(dim))

    @torch.no_grad()
    def fit(self, data: Tensor) -> "MinMaxNormalizer":
        """Fit on ``data`` (..., D)."""
        flat = torch.as_tensor(data, dtype=torch.float32).reshape(-1, self.scale.shape[0])
        if not torch.isfinite(flat).all():
            raise ValueError("normaliser data contains NaN or inf")
        lo, hi = flat.min(0).values, flat.max(0).values
        rng = hi - lo
        const = rng < RANGE_EPS
        scale = torch.where(const, torch.ones_like(rng), 2.0 / rng.clamp(min=RANGE_EPS))
        offset = torch.where(const, -lo, -1.0 - scale * lo)
        self.scale.copy_(scale)
        self.offset.copy_(offset)
        self.input_min.copy_(lo)
        self.input_max.copy_(hi)
        return self

    def normalize(self, x: Tensor) -> Tensor:
        return x * self.scale + self.offset

    def unnormalize(self, y: Tensor) -> Tensor:
        return (y - self.offset) / self.scale
