"""Fixed-length training windows with Diffusion Policy's padding.

Every window of ``horizon`` steps whose start lies in ``[-pad_before, L - horizon + pad_after]`` is
a sample; positions outside the episode repeat its first or last frame. With
``pad_before = To - 1`` and ``pad_after = Ta - 1`` the policy also learns the first and last steps.
"""

from __future__ import annotations

import numpy as np


class SequenceSampler:
    def __init__(self, episode_ends: np.ndarray, horizon: int, pad_before: int = 0, pad_after: int = 0):
        if horizon < 1 or pad_before < 0 or pad_after < 0:
            raise ValueError(f"horizon={horizon}, pad_before={pad_before}, pad_after={pad_after} must be >= 1, >= 0, >= 0")
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        rows = []
        for s, e in zip(starts, ends):
            length = e - s
            first = np.arange(-pad_before, length - horizon + pad_after + 1)
            rows.append(np.stack([np.full_like(first, s), np.full_like(first, length), first], axis=1))
        self.index = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)
        self.horizon = horizon

    def __len__(self) -> int:
        return len(self.index)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Buffer row of every window position, edge-padded: (len(ids), horizon) int64."""
        start, length, first = self.index[ids].T
        offs = first[:, None] + np.arange(self.horizon)[None, :]
        return start[:, None] + np.clip(offs, 0, length[:, None] - 1)
