"""Per-feature normalisers, each reproducing its source's arithmetic exactly.

* ``affine`` — ``y = x·scale + offset``, ``x = (y - offset) / scale``: ours and diffusion_policy's
  ``LinearNormalizer`` (its ``limits`` mode maps [min, max] to [-1, 1]; a constant feature gets
  scale 1 and an offset that maps it to 0).
* ``min_max`` — LeRobot's normaliser processor: ``y = 2 (x - min) / d - 1`` with ``d = max - min``
  (``eps`` where the range is exactly 0), ``x = (y + 1) / 2 · d + min``.
* ``min_max_legacy`` — LeRobot before the processor pipelines (normaliser buffers inside
  ``model.safetensors``): ``y = 2 (x - min) / (max - min + eps) - 1``, ``x = (y + 1) / 2 · (max - min) + min``.
* ``mean_std`` — both LeRobot layouts: ``y = (x - mean) / (std + eps)``, ``x = y · std + mean``.
* ``identity`` — a feature type without an entry in LeRobot's ``normalization_mapping``.

Statistics are buffers (saved with the weights) shaped like one step of the feature, e.g. (D,) or
(3, 1, 1) for an image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paradiffpolicy.features import NORMALIZATIONS

RANGE_EPS = 1e-4
LEROBOT_EPS = 1e-8
_BUFFERS = {
    "affine": ("scale", "offset", "input_min", "input_max"),
    "min_max": ("min", "max"),
    "min_max_legacy": ("min", "max"),
    "mean_std": ("mean", "std"),
    "identity": (),
}


class Normalizer(nn.Module):
    """``normalize`` / ``unnormalize`` one feature by ``mode`` (see the module docstring)."""

    def __init__(self, mode: str, stat_shape: tuple[int, ...] | int, eps: float = LEROBOT_EPS):
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization={mode!r} is unknown; expected one of {NORMALIZATIONS}")
        self.mode = mode
        self.eps = eps
        shape = (stat_shape,) if isinstance(stat_shape, int) else tuple(stat_shape)
        for name in _BUFFERS[mode]:
            init = {"scale": torch.ones, "std": torch.ones, "max": torch.ones, "input_max": torch.ones}.get(name, torch.zeros)
            self.register_buffer(name, init(shape))
        if mode == "affine":
            self.input_min.fill_(-1.0)

    def normalize(self, x: Tensor) -> Tensor:
        m = self.mode
        if m == "affine":
            return x * self.scale + self.offset
        if m == "min_max":
            d = self.max - self.min
            d = torch.where(d == 0, torch.full_like(d, self.eps), d)
            return 2 * (x - self.min) / d - 1
        if m == "min_max_legacy":
            return (x - self.min) / (self.max - self.min + self.eps) * 2 - 1
        if m == "mean_std":
            return (x - self.mean) / (self.std + self.eps)
        return x

    def unnormalize(self, y: Tensor) -> Tensor:
        m = self.mode
        if m == "affine":
            return (y - self.offset) / self.scale
        if m == "min_max":
            d = self.max - self.min
            d = torch.where(d == 0, torch.full_like(d, self.eps), d)
            return (y + 1) / 2 * d + self.min
        if m == "min_max_legacy":
            return (y + 1) / 2 * (self.max - self.min) + self.min
        if m == "mean_std":
            return y * self.std + self.mean
        return y

    @torch.no_grad()
    def fit(self, data: Tensor) -> "Normalizer":
        """Fit an ``affine`` normaliser on ``data`` (..., D) in Diffusion Policy's ``limits`` mode:
        [min, max] → [-1, 1]; features whose range is below 1e-4 map to 0."""
        if self.mode != "affine":
            raise ValueError(f"fit() builds an affine normaliser; this one is {self.mode!r}")
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

    def input_range(self) -> tuple[Tensor, Tensor] | None:
        """(low, high) of the data the statistics describe, where the mode knows it."""
        if self.mode == "affine":
            return self.input_min, self.input_max
        if self.mode in ("min_max", "min_max_legacy"):
            return self.min, self.max
        if self.mode == "mean_std":
            return self.mean - 2 * self.std, self.mean + 2 * self.std
        return None

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def MinMaxNormalizer(dim: int) -> Normalizer:  # noqa: N802 - the historical name of the affine normaliser
    """An ``affine`` normaliser of ``dim`` features, to be :meth:`~Normalizer.fit` on data."""
    return Normalizer("affine", dim)
