#!/usr/bin/env python
"""Collect a Hydra eval sweep into one table (CSV + Markdown) and plots (PNG).

    python -m paradiffpolicy.eval -m sampler.window=4,8 sampler.tol=0.3,0.1 compare=true
    python scripts/plot_sweep.py multirun/eval/lift/<date>

Reads every ``eval_info.json`` under the sweep directory; writes ``sweep.csv``, ``sweep.md`` and
``sweep.png`` (speed-up vs success, latency vs window) next to them.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

COLUMNS = ["run", "sampler", "window", "tol", "warm_start", "n_episodes", "pc_success", "pc_success_sequential",
           "latency_p50_ms", "latency_p95_ms", "iterations", "nfe", "speedup", "max_abs_dev", "deadline_misses"]


def rows(sweep: Path) -> list[dict]:
    out = []
    for path in sorted(sweep.rglob("eval_info.json")):
        info = json.loads(path.read_text())
        s, cmp = info["sampler"], info.get("compare") or {}
        out.append({
            "run": str(path.parent.relative_to(sweep)), "sampler": s["name"], "window": s.get("window"), "tol": s.get("tol"),
            "warm_start": s.get("warm_start"), "n_episodes": info["overall"]["n_episodes"],
            "pc_success": info["overall"]["pc_success"], "pc_success_sequential": cmp.get("pc_success_sequential"),
            "latency_p50_ms": round(info["inference"]["latency_ms"]["p50"], 1),
            "latency_p95_ms": round(info["inference"]["latency_ms"]["p95"], 1),
            "iterations": round(info["inference"]["iterations_mean"], 2), "nfe": round(info["inference"]["nfe_mean"], 1),
            "speedup": None if cmp.get("speedup") is None else round(cmp["speedup"], 2),
            "max_abs_dev": cmp.get("max_abs_dev"), "deadline_misses": info["control"]["deadline_misses"],
        })
    return out


def write(sweep: Path, table: list[dict]) -> None:
    with open(sweep / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(table)
    md = ["| " + " | ".join(COLUMNS[1:]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    md += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in COLUMNS[1:]) + " |" for r in table]
    (sweep / "sweep.md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in table:
        x = r["speedup"] if r["speedup"] is not None else 1.0
        a.scatter(x, r["pc_success"])
        a.annotate(f"p={r['window']}, τ={r['tol']}", (x, r["pc_success"]), fontsize=7)
    a.set_xlabel("speed-up vs sequential (median per call)")
    a.set_ylabel("success %")
    for tol in sorted({r["tol"] for r in table if r["tol"] is not None}):
        pts = sorted((r["window"], r["latency_p50_ms"]) for r in table if r["tol"] == tol)
        b.plot(*zip(*pts), marker="o", label=f"τ={tol}")
    b.set_xlabel("window p")
    b.set_ylabel("latency p50 (ms)")
    b.legend()
    fig.tight_layout()
    fig.savefig(sweep / "sweep.png", dpi=120)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: plot_sweep.py <multirun directory>")
    sweep = Path(argv[0])
    table = rows(sweep)
    if not table:
        raise SystemExit(f"no eval_info.json under {sweep}")
    write(sweep, table)
    print((sweep / "sweep.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
