"""Success rates over a finite set of episodes: standard error, Wilson interval, paired counts.

Closed-loop success is a proportion over few episodes (50-300), so every report gives its
uncertainty, and two settings run on the same seeds are compared episode by episode (wins and
losses), not by their rates alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate k/n (Wilson 1927): unlike p ± z·SE it stays inside
    [0, 1] and does not collapse to a point at 0 or n successes."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def success_summary(successes: list[bool]) -> dict:
    """``pc_success``, its standard error sqrt(p(1-p)/n) and 95% Wilson interval, in percent."""
    n = len(successes)
    k = int(sum(successes))
    p = k / n
    return {"n_episodes": n, "pc_success": 100 * p, "pc_success_se": 100 * float(np.sqrt(p * (1 - p) / n)),
            "pc_success_ci95": [100 * b for b in wilson_interval(k, n)]}


def paired(these: list[bool], reference: list[bool]) -> dict:
    """Episodes (same seeds, same order) these succeed in and the reference fails ("won"), the
    reverse ("lost"), and the exact McNemar p-value of the two (:func:`sign_test`)."""
    if len(these) != len(reference):
        raise ValueError(f"paired comparison needs the same episodes: {len(these)} vs {len(reference)}")
    won = sum(a and not b for a, b in zip(these, reference))
    lost = sum(b and not a for a, b in zip(these, reference))
    return {"won": won, "lost": lost, "p_value": sign_test(won, lost)}


def sign_test(won: int, lost: int) -> float:
    """Two-sided exact McNemar test: the probability, were both settings equally good, of a split
    of the ``won + lost`` discordant episodes at least as uneven as this one (each discordant
    episode a fair coin; episodes both settings win or both lose say nothing about the difference)."""
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (Holm 1979): with m tests, the i-th
    smallest is multiplied by m - i + 1 (i from 1) and the results made monotone, so a difference
    stated where the adjusted p < α holds at family-wise error α, whichever of the tests are true."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def success_cell(row: dict) -> str:
    """"70 ± 5"; at 0 or n successes, where the standard error is 0, the 95% Wilson bound instead."""
    lo, hi = row["pc_success_ci95"]
    if row["pc_success_se"] > 0:
        return f"{row['pc_success']:.0f} ± {row['pc_success_se']:.0f}"
    return f"{row['pc_success']:.0f} (95%: ≥ {lo:.0f})" if row["pc_success"] > 0 else f"0 (95%: ≤ {hi:.0f})"


def write_report(stem: Path, result: dict, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None] | None,
                 echo: bool = True) -> dict:
    """A report as ``<stem>.json``, ``<stem>.md`` and (with ``plot``) ``<stem>.png`` side by side;
    prints the Markdown (``echo``) and returns ``result``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    if plot is not None:
        plot(result, stem.with_suffix(".png"))
    if echo:
        print(text)
    return result


def new_success_plot():
    """A figure and axes for a success-rate plot, drawn headless (Agg); ``finish_success_plot`` labels and saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.5, 4.5))


def finish_success_plot(fig, ax, path: Path, xlabel: str, title: str) -> None:
    """Label a success-rate plot (y: success % ± standard error), save it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("success % (± standard error)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
