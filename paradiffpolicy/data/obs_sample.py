"""A small sample of real observation windows shipped beside a checkpoint.

Benchmarks and ``tune`` measure a sampler's deviation and iteration count on observations the
policy will meet; those depend on the observation (an untrained-looking input is a harder fixed
point), so a fresh clone, which has no training data, needs real ones. The sample lives in
``<checkpoint>/observations.safetensors``: one tensor per feature, (K, To, ...) windows in
environment units (images uint8 (K, To, H, W, 3)), plus JSON metadata saying where they came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILENAME = "observations.safetensors"


def save_observation_sample(checkpoint: str | Path, windows: dict[str, torch.Tensor], source: dict) -> Path:
    """Write ``windows`` ({feature: (K, To, ...)}, the same K for all) with ``source`` (where they
    came from: task, seeds, episodes, whether held out from training) beside ``checkpoint``."""
    sizes = {k: int(v.shape[0]) for k, v in windows.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"observation sample features have different window counts: {sizes}")
    path = Path(checkpoint) / FILENAME
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in windows.items()}, str(tmp), metadata={"source": json.dumps(source)})
    tmp.replace(path)
    return path


def load_observation_sample(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``({feature: (K, To, ...)}, source)`` from ``checkpoint``, or None when it ships none."""
    path = Path(checkpoint) / FILENAME
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    windows = load_file(str(path))
    try:
        source = json.loads(meta.get("source", "{}"))
    except ValueError:
        source = {}
    return windows, source
