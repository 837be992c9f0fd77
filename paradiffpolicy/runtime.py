"""Process-level helpers shared by the entry points: versions, seeding, signal handling."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

#: The repository checkout the package runs from: ``conf/`` (Hydra presets) and ``checkpoints/`` live here.
REPO_ROOT = Path(__file__).resolve().parents[1]


def versions() -> dict[str, str | None]:
    """Versions of the interpreter and every package that changes results."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("paradiffpolicy", "torch", "numpy", "mujoco", "robosuite", "gymnasium", "gym-pusht", "zarr", "hydra-core"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere) and CPU
    count, e.g. ``"AMD EPYC, 2 cpus"``: speed ratios differ between processors, so results name
    the one they ran on."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cpus"


def resolve_device(device: str, key: str = "device") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available) → a device this
    machine has; ``ValueError`` naming ``key`` otherwise (e.g. ``device=cuda`` without CUDA)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{key}={device!r} is not a device; expected cpu, cuda, cuda:<index> or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={device!r} but this machine has no usable CUDA device "
                             f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); use {key}=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{key}={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"{key}={device!r} is unsupported; expected cpu, cuda, cuda:<index> or auto")
    return dev


@contextmanager
def exit_on_bad_input():
    """For command-line entry points: a ``ValueError`` (bad config value, missing or mismatched
    checkpoint or dataset; each names what is wrong) ends the program with ``error: ...`` and
    exit status 1 instead of a traceback."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def run_dir(output_dir: str) -> Path:
    """Where an entry point writes: ``output_dir`` when given, else the Hydra run directory."""
    if output_dir:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def sigterm_as_keyboard_interrupt():
    """Treat SIGTERM like Ctrl-C inside the block, so one ``except KeyboardInterrupt`` path keeps
    finished work for both."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
