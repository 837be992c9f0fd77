"""Zarr ReplayBuffer in Diffusion Policy's layout: ``data/<key>`` concatenated over episodes and
``meta/episode_ends`` (exclusive end index of each episode).

Crash safety: an episode's data arrays are appended first and ``meta/episode_ends`` last, so a
process killed mid-episode leaves at most some trailing rows past the last episode end. Readers
ignore them; the next append cuts them off. ``episode_ends`` is the single source of truth.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

CHUNK_ROWS = 4096


class ReplayBufferError(ValueError):
    """A store is missing, malformed, or inconsistent with its episode index."""


class ReplayBuffer:
    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        self._validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, attrs: dict[str, Any] | None = None) -> "ReplayBuffer":
        """A new empty store; refuses to overwrite an existing one."""
        path = Path(path)
        if path.exists():
            raise ReplayBufferError(f"{path} already exists; open it to append, or remove it first")
        group = zarr.open_group(str(path), mode="w-", zarr_format=2)
        group.create_array("meta/episode_ends", shape=(0,), chunks=(CHUNK_ROWS,), dtype="i8")
        group.attrs.update(attrs or {})
        return cls(group, path)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "ReplayBuffer":
        path = Path(path)
        if not path.exists():
            raise ReplayBufferError(f"replay buffer {path} does not exist")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for unreadable stores
            raise ReplayBufferError(f"replay buffer {path} is not a readable zarr group: {e}") from None
        return cls(group, path)

    def _validate(self) -> None:
        if "meta" not in self.group or "episode_ends" not in self.group["meta"]:
            raise ReplayBufferError(f"replay buffer {self.path} has no meta/episode_ends")
        ends = self.episode_ends
        if ends.size and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
            raise ReplayBufferError(
                f"replay buffer {self.path}: meta/episode_ends must be positive and strictly increasing, got {ends[:10].tolist()}..."
            )
        n = int(ends[-1]) if ends.size else 0
        for key in self.keys:
            if self.group["data"][key].shape[0] < n:
                raise ReplayBufferError(
                    f"replay buffer {self.path}: data/{key} has {self.group['data'][key].shape[0]} rows but "
                    f"meta/episode_ends says {n} (truncated store?)"
                )

    # -- reading ------------------------------------------------------------------------------

    @property
    def episode_ends(self) -> np.ndarray:
        return np.asarray(self.group["meta/episode_ends"][:], dtype=np.int64)

    @property
    def keys(self) -> list[str]:
        return sorted(self.group["data"].keys()) if "data" in self.group else []

    @property
    def n_episodes(self) -> int:
        return int(self.group["meta/episode_ends"].shape[0])

    @property
    def n_steps(self) -> int:
        ends = self.episode_ends
        return int(ends[-1]) if ends.size else 0

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def __getitem__(self, key: str) -> np.ndarray:
        """All valid rows of ``data/<key>`` (trailing rows of an interrupted episode excluded)."""
        return self.group["data"][key][: self.n_steps]

    def get_episode(self, i: int) -> dict[str, np.ndarray]:
        ends = self.episode_ends
        if not 0 <= i < len(ends):
            raise IndexError(f"episode {i} out of range [0, {len(ends)})")
        start = 0 if i == 0 else int(ends[i - 1])
        return {k: self.group["data"][k][start : ends[i]] for k in self.keys}

    # -- writing ------------------------------------------------------------------------------

    def set_array(self, key: str, values: np.ndarray) -> None:
        """Write ``data/<key>``, one row per stored step (replacing an array of that name): a
        per-step annotation of episodes already stored, such as simulator state from a replay."""
        values = np.asarray(values)
        if values.ndim < 1 or len(values) != self.n_steps:
            raise ReplayBufferError(f"data/{key} needs {self.n_steps} rows (one per stored step), got shape {values.shape}")
        if key in self.keys:
            del self.group["data"][key]
        self.group.create_array(f"data/{key}", data=values, chunks=(CHUNK_ROWS, *values.shape[1:]))

    def add_episode(self, episode: dict[str, np.ndarray]) -> None:
        """Append one episode; every array has the same first dimension (its length)."""
        lengths = {k: len(v) for k, v in episode.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ReplayBufferError(f"episode arrays must be non-empty and of equal length, got {lengths}")
        if self.keys and set(episode) != set(self.keys):
            raise ReplayBufferError(f"episode keys {sorted(episode)} differ from the store's {self.keys}")
        n = self.n_steps
        length = next(iter(lengths.values()))
        for key, value in episode.items():
            value = np.asarray(value)
            if key not in self.keys:
                # images (N, H, W, C) uint8: one compressed chunk per frame, as Diffusion Policy stores them
                rows = 1 if value.ndim == 4 and value.dtype == np.uint8 else CHUNK_ROWS
                self.group.create_array(f"data/{key}", shape=(0, *value.shape[1:]),
                                        chunks=(rows, *value.shape[1:]), dtype=value.dtype)
            arr = self.group["data"][key]
            if arr.shape[1:] != value.shape[1:]:
                raise ReplayBufferError(f"data/{key} rows have shape {arr.shape[1:]}, episode has {value.shape[1:]}")
            if arr.shape[0] != n:  # leftovers of an interrupted episode
                arr.resize((n, *arr.shape[1:]))
            arr.append(value)
        self.group["meta/episode_ends"].append(np.array([n + length], dtype=np.int64))
