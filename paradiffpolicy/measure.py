"""Measuring, once: interleaved timing, percentiles, deviation and the provenance record.

Timings of several settings are only comparable when they share the machine's state, so every
command that reports a ratio times its settings *interleaved*, one call of each per trial, in an
order that rotates every trial (no setting always runs after the same one), with the device
synchronised around each call. Ratios are then taken per trial and summarised by median and p5-p95.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Callable

import numpy as np
import torch

from paradiffpolicy.runtime import REPO_ROOT, cpu_model, versions


def percentiles(values) -> dict[str, float]:
    """``{"p5", "p50", "p95", "min", "max", "n"}`` of a list of numbers (median, the 90% spread, extremes)."""
    a = np.asarray(values, dtype=float)
    return {"p5": float(np.percentile(a, 5)), "p50": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def interleaved(calls: dict[str, Callable[[int], Any]], trials: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each ``calls[name](trial)``, one call of every name per trial, the order
    rotating each trial; ``warmup`` trials first, not recorded."""
    sync = sync or (lambda: None)
    names = list(calls)
    out: dict[str, list[float]] = {n: [] for n in names}
    for trial in range(warmup + trials):
        for name in names[trial % len(names):] + names[: trial % len(names)]:
            sync()
            t0 = time.perf_counter()
            calls[name](trial)
            sync()
            if trial >= warmup:
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def wall_seconds(run: Callable[[], Any]) -> float:
    """Seconds ``run()`` takes on the wall clock: a whole load of concurrent calls, whose own
    latencies overlap (throughput = calls answered / this)."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def network_costs(policy, backends: list[str], batches: list[int], cond: torch.Tensor, trials: int, warmup: int = 1,
                  sync: Callable[[], None] | None = None, seed: int = 0) -> dict[str, dict[int, dict[str, float]]]:
    """Milliseconds of one U-Net call of ``policy`` at each batch size (rows: Picard's windows are
    batches), per backend, backends interleaved at each size; ``cond`` (1, D) is repeated per row."""
    pc = policy.config
    gen = torch.Generator().manual_seed(seed)
    nets = {b: policy.network(b).denoiser for b in backends}
    out: dict[str, dict[int, dict[str, float]]] = {b: {} for b in backends}
    for batch in batches:
        x = torch.randn(batch, pc.horizon, pc.action_dim, generator=gen).to(policy.device)
        t = torch.randint(0, pc.scheduler.num_train_timesteps, (batch,), generator=gen).to(policy.device)
        c = cond[:1].expand(batch, -1).contiguous()
        with torch.no_grad():
            ms = interleaved({b: (lambda _, d=d: d(x, t, global_cond=c)) for b, d in nets.items()}, trials, warmup, sync)
        for b in backends:
            out[b][batch] = percentiles(ms[b])
    return out


def ratios(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Per-trial ratios of two interleaved timings (e.g. reference / candidate = speed-up)."""
    return percentiles(np.asarray(numerator) / np.asarray(denominator))


def max_abs_deviation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0): the largest |a - b| over everything else."""
    return (a - b).abs().flatten(1).amax(dim=1)


def git_revision() -> str | None:
    """The repository's commit (``+dirty`` with uncommitted changes), or None outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(threads: int | list[int], device: str = "cpu", backends: list[str] = ()) -> dict:
    """What a measurement ran on: processor, device, threads, each backend's runtime version, the
    package versions and the git revision. Every command that writes results records this."""
    from paradiffpolicy.backends import runtime_version

    dev = torch.cuda.get_device_name() if str(device).startswith("cuda") and torch.cuda.is_available() else str(device)
    return {"cpu": cpu_model(), "device": dev, "threads": threads,
            "backends": {b: runtime_version(b) for b in backends}, "git": git_revision(), "versions": versions()}
