"""How many Picard iterations each window update takes, against the ⌈N/p⌉ floor, and what the
sample gives up for them.

    python -m paradiffpolicy.bench.iterations task=lift
    python -m paradiffpolicy.bench.iterations task=pusht_keypoints "windows=[8,16]" "tols=[0.005,0.1]"

On the checkpoint's shipped held-out observation windows, with one noise draw per window, every
combination of window ``p``, tolerance ``τ``, window update (``sampler.update``: ParaDiGMS' running
sum or a Newton-type step with the scheduler's linear part; see ``sampling/picard.py``) and
Anderson memory samples the whole batch; each row reports the iterations per sample (mean, max),
the floor ⌈N/p⌉, and the deviation of each sample from the sequential sample on the same noise
(max, p99, and the share within ``within``). Iteration counts do not depend on the clock, so this
command may run beside other work. Writes ``<out>/iterations-<task>.{json,md}``, rewritten after
every row (an interrupted run keeps what it measured).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

from paradiffpolicy.config import UPDATES, SamplerConfig, require_list
from paradiffpolicy.measure import max_abs_deviation, provenance
from paradiffpolicy.runtime import REPO_ROOT



@dataclass
class IterationBenchConfig:
    task: str = "lift"
    windows: List[int] = field(default_factory=lambda: [8, 16])
    tols: List[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.1])
    updates: List[str] = field(default_factory=lambda: list(UPDATES))
    andersons: List[int] = field(default_factory=lambda: [0, 2])
    n_windows: int = 64  # held-out observation windows (an even spread over the shipped sample)
    within: float = 1e-2  # deviation budget, normalised action units
    backend: str = "eager"
    seed: int = 0
    out: str = "benchmarks/results"

    def __post_init__(self) -> None:
        from paradiffpolicy.backends import check_backend

        check_backend(self.backend, key="backend")
        bad = [u for u in self.updates if u not in UPDATES]
        if bad or not self.updates:
            raise ValueError(f"updates={list(self.updates)}: expected a non-empty list of {UPDATES}")
        require_list(self, "windows", 1)
        require_list(self, "tols", 0, "numbers")
        if self.n_windows < 1:
            raise ValueError(f"n_windows={self.n_windows} must be >= 1")


def run(cfg: IterationBenchConfig) -> dict:
    from paradiffpolicy.checkpoint import load_policy
    from paradiffpolicy.data.obs_sample import load_observation_sample
    from paradiffpolicy.success_stats import write_report

    torch.set_num_threads(1)
    checkpoint = REPO_ROOT / "checkpoints" / cfg.task
    policy = load_policy(checkpoint, backend=cfg.backend)
    sample = load_observation_sample(checkpoint)
    if sample is None:
        raise SystemExit(f"{checkpoint} ships no observations.safetensors (python -m paradiffpolicy.data.make_obs_sample)")
    windows, source = sample
    total = next(iter(windows.values())).shape[0]
    pick = torch.from_numpy(np.linspace(0, total - 1, min(cfg.n_windows, total)).round().astype(np.int64))
    with torch.no_grad():
        cond = policy.encode_observation({k: v[pick] for k, v in windows.items()})
    noise = policy.draw_noise(len(pick), torch.Generator().manual_seed(cfg.seed))
    ref = policy.sample_from_condition(cond, noise, sampler=policy.make_sampler(SamplerConfig(name="sequential")))
    n = policy.config.scheduler.num_inference_steps
    result = {"task": cfg.task, "checkpoint": str(checkpoint.relative_to(REPO_ROOT)), "observations": source.get("source"),
              "n_windows": len(pick), "num_steps": n, "within": cfg.within, "backend": cfg.backend,
              "provenance": provenance(1, backends=[cfg.backend]), "rows": []}
    stem = Path(cfg.out) / f"iterations-{cfg.task}"
    for p in cfg.windows:
        for tol in cfg.tols:
            for update in cfg.updates:
                for anderson in cfg.andersons:
                    scfg = SamplerConfig(name="picard", window=p, tol=tol, update=update, anderson=anderson)
                    out = policy.sample_from_condition(cond, noise, sampler=policy.make_sampler(scfg))
                    dev = max_abs_deviation(out.actions_normalized, ref.actions_normalized).double().numpy()
                    it = out.stats.iterations.double().numpy()
                    row = {"window": p, "tol": tol, "update": update, "anderson": anderson, "floor": math.ceil(n / p),
                           "iterations_mean": float(it.mean()), "iterations_max": int(it.max()),
                           "dev_max": float(dev.max()), "dev_p99": float(np.percentile(dev, 99)),
                           "share_within": float((dev <= cfg.within).mean())}
                    result["rows"].append(row)
                    print(f"p={p} τ={tol:g} {update} aa{anderson}: {row['iterations_mean']:.1f} iterations "
                          f"(max {row['iterations_max']}, floor {row['floor']}), dev max {row['dev_max']:.1e}, "
                          f"{100 * row['share_within']:.0f}% within {cfg.within:g}", flush=True)
                    write_report(stem, result, markdown, None, echo=False)
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    prov = r["provenance"]
    lines = [f"# Picard iterations per window update: `{r['task']}`", "",
             f"{r['n_windows']} held-out observation windows ({r['observations']}), one noise draw each; N = {r['num_steps']}; "
             f"backend {r['backend']}; git {prov['git']}. Deviation: max |a - a_seq| over the chunk (normalised units) "
             f"against the sequential sample on the same noise. Written by `python -m paradiffpolicy.bench.iterations`.", "",
             "| p | τ | update | Anderson | iterations mean (max) | floor ⌈N/p⌉ | dev max | dev p99 | within " + f"{r['within']:g} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in r["rows"]:
        lines.append(f"| {w['window']} | {w['tol']:g} | {w['update']} | {w['anderson']} | {w['iterations_mean']:.1f} "
                     f"({w['iterations_max']}) | {w['floor']} | {w['dev_max']:.1e} | {w['dev_p99']:.1e} | "
                     f"{100 * w['share_within']:.0f}% |")
    # the cheapest setting per window that keeps every sample within the budget
    lines += ["", f"Fewest iterations with every sample within {r['within']:g}:", ""]
    for p in sorted({w["window"] for w in r["rows"]}):
        ok = [w for w in r["rows"] if w["window"] == p and w["share_within"] == 1.0]
        if ok:
            b = min(ok, key=lambda w: w["iterations_mean"])
            lines.append(f"- p = {p}: {b['update']}, τ = {b['tol']:g}, Anderson {b['anderson']}: "
                         f"{b['iterations_mean']:.1f} iterations (floor {b['floor']})")
        else:
            lines.append(f"- p = {p}: none of the settings tried")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    from paradiffpolicy.config import from_argv

    return run(from_argv(IterationBenchConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
