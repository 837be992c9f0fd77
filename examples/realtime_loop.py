"""A robot-style control loop: robosuite at 20 Hz on the wall clock, driven by PolicyRunner.

    python examples/realtime_loop.py seconds=60        # Lift, ParaDDIM-16 p=4, worker process
    python examples/realtime_loop.py seconds=60 sampler.scheduler=null sampler.num_inference_steps=null window=8 tol=0.1
    # soak: 20,000 ticks, one row of memory and latency every 60 s, appended as it goes
    python examples/realtime_loop.py ticks=20000 interval_s=60 out=benchmarks/results/cpu-2core-soak.json

Episodes restart when they end; each is ``control.controller.run_realtime`` (what ``eval
controller=realtime`` runs), the last one stopped when the tick or time budget is spent. Prints
latency percentiles, deadline misses and late ticks, and writes them as JSON (``out=...``).
With ``interval_s`` > 0, a row per interval (resident memory, latency percentiles of that
interval's calls, misses) is appended to ``<out>.intervals.jsonl`` as it is measured, so an
interrupted soak keeps its rows; the report compares the first and last intervals.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from paradiffpolicy import SamplerConfig, load_policy
from paradiffpolicy.config import from_dict
from paradiffpolicy.presets import sampler_preset
from paradiffpolicy.control.agent import InferenceLog
from paradiffpolicy.control.controller import run_realtime
from paradiffpolicy.control.runner import PolicyRunner
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.runtime import versions


@dataclass
class LoopConfig:
    checkpoint: str = "checkpoints/lift"
    task: TaskConfig = field(default_factory=TaskConfig)
    # ParaDDIM-16 (conf/sampler/paraddim.yaml): a DDPM-100 chunk is too slow for 20 Hz on 2 cores
    sampler: SamplerConfig = field(default_factory=lambda: sampler_preset("paraddim"))
    seconds: float = 60.0
    ticks: int = 0  # stop after this many control ticks instead (0: use ``seconds``)
    interval_s: float = 0.0  # > 0: report memory and latency every interval (soak)
    threads: int = 1  # leave a core to the simulator
    inference_process: bool = True  # run the policy in a worker process (no GIL sharing with the loop)
    budget_s: Optional[float] = None
    seed: int = 20_000_000
    out: str = ""


def main(argv: list[str]) -> dict:
    # short forms: window=, tol=, warm_start= go to the sampler
    argv = [f"sampler.{a}" if a.split("=")[0] in ("window", "tol", "warm_start", "name") else a for a in argv]
    given = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    if isinstance(given.get("task"), str):  # task=pusht: the task preset from conf/task/
        preset = Path(__file__).resolve().parents[1] / "conf" / "task" / f"{given['task']}.yaml"
        if not preset.exists():
            raise SystemExit(f"task={given['task']!r}: no preset {preset}")
        given["task"] = OmegaConf.to_container(OmegaConf.load(preset))
    if given.get("checkpoint") is None and "task" in given:
        given["checkpoint"] = given["task"].get("checkpoint", LoopConfig.checkpoint)
    cfg = from_dict(LoopConfig, given, name="override")
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, sampler=cfg.sampler)
    env = make_env(cfg.task)
    hz = cfg.task.control_hz
    series_path = Path(cfg.out + ".intervals.jsonl") if cfg.out and cfg.interval_s > 0 else None
    if series_path is not None:
        series_path.parent.mkdir(parents=True, exist_ok=True)
        series_path.write_text("")
    series: list[dict] = []
    episodes: list = []  # EpisodeResult of every finished (or stopped) episode
    t0 = time.perf_counter()
    soak = {"next": t0 + cfg.interval_s, "calls": 0, "misses": 0, "done_ticks": 0}  # done_ticks: finished episodes

    def soak_row(now: float, current) -> None:
        """One soak row: memory, and the latencies and misses of the calls since the last row."""
        lat = [ms for e in episodes for ms in e.inference.latency_ms] + list(runner.log.latency_ms)
        misses = sum(e.deadline_misses for e in episodes) + runner.deadline_misses
        new = lat[soak["calls"]:]
        row = {"elapsed_s": round(now - t0, 1), "ticks": sum(e.length for e in episodes) + current.length, "rss_mb": rss_mb(),
               "worker_rss_mb": rss_mb(getattr(runner.agent, "pid", None)) if cfg.inference_process else None,
               "calls": len(new), "deadline_misses": misses - soak["misses"],
               "late_ticks_total": sum(e.late_ticks for e in episodes) + current.late_ticks,
               **{f"latency_{q}_ms": float(np.percentile(new, v)) if new else None
                  for q, v in (("p50", 50), ("p99", 99), ("max", 100))}}
        series.append(row)
        if series_path is not None:
            with open(series_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        soak.update(next=soak["next"] + cfg.interval_s, calls=len(lat), misses=misses)

    def spent(ticks: int, now: float) -> bool:
        """Whether the loop's budget (``ticks``, else ``seconds``) is used up."""
        return ticks >= cfg.ticks if cfg.ticks > 0 else now >= t0 + cfg.seconds

    def after_tick(current) -> bool:
        now = time.perf_counter()
        if cfg.interval_s > 0 and now >= soak["next"]:
            soak_row(now, current)
        return spent(soak["done_ticks"] + current.length, now)

    with PolicyRunner(policy, hz=hz, hold=cfg.task.hold, budget_s=cfg.budget_s, warm_start=cfg.sampler.warm_start,
                      inference_process=cfg.inference_process, threads=cfg.threads) as runner:
        try:
            stop = False
            while not stop:  # episodes restart when they end, until the tick or time budget is spent
                result = run_realtime(env, runner, cfg.seed + len(episodes), hz, after_tick=after_tick)
                episodes.append(result)
                soak["done_ticks"] += result.length
                stop = result.failure_reason is not None or spent(soak["done_ticks"], time.perf_counter())
        except KeyboardInterrupt:
            print("interrupted; reporting what was measured", file=sys.stderr)
    total_ticks = sum(e.length for e in episodes)
    misses = sum(e.deadline_misses for e in episodes)
    late = sum(e.late_ticks for e in episodes)
    log = InferenceLog()
    for e in episodes:
        log.extend(e.inference)
    stats = log.summary()
    report = {"seconds": round(time.perf_counter() - t0, 1), "ticks": total_ticks, "hz": cfg.task.control_hz,
              "deadline_misses": misses, "late_ticks": late,
              "episodes": len(episodes), "successes": sum(e.success for e in episodes),
              "failures": [e.failure_reason for e in episodes if e.failure_reason], "latency_ms": stats["latency_ms"],
              "calls": stats["calls"], "iterations_mean": stats["iterations_mean"], "sampler": OmegaConf.to_container(OmegaConf.structured(cfg.sampler)),
              "threads": cfg.threads, "inference_process": cfg.inference_process, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "versions": versions()}
    if len(series) >= 2:
        first, last = series[0], series[-1]
        report["soak"] = {"intervals": len(series), "interval_s": cfg.interval_s,
                          "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
                          "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
                          "worker_rss_mb_first": first["worker_rss_mb"], "worker_rss_mb_last": last["worker_rss_mb"],
                          "worker_rss_growth_mb": None if first["worker_rss_mb"] is None else round(last["worker_rss_mb"] - first["worker_rss_mb"], 1),
                          "latency_p99_ms_first": first["latency_p99_ms"], "latency_p99_ms_last": last["latency_p99_ms"],
                          "rows": series}
    print(json.dumps(report, indent=2))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
        Path(cfg.out).with_suffix(".md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as a short Markdown summary plus one row per soak interval."""
    s, lat = report["sampler"], report["latency_ms"]
    sched = f"{s.get('scheduler') or 'training scheduler'}-{s.get('num_inference_steps') or 'N'}"
    lines = [f"# Realtime loop: {report['ticks']} ticks at {report['hz']} Hz, {report['seconds']} s",
             "",
             f"Sampler {s['name']} p={s['window']} τ={s['tol']} ({sched}); {report['threads']} torch thread(s), "
             f"inference {'in a worker process' if report.get('inference_process') else 'in a thread'}; {report['machine']}; "
             f"torch {report['versions'].get('torch')}, mujoco {report['versions'].get('mujoco')}, robosuite {report['versions'].get('robosuite')}.",
             "",
             f"Deadline misses **{report['deadline_misses']}**, late ticks {report['late_ticks']}, {report['calls']} calls "
             f"(iterations mean {report['iterations_mean']:.1f}), episodes {report['episodes']} "
             f"({report['successes']} successes). Latency ms: p50 {lat['p50']:.0f}, p95 {lat['p95']:.0f}, "
             f"p99 {lat['p99']:.0f}, max {lat['max']:.0f}."]
    soak = report.get("soak")
    if soak:
        worker = "" if soak.get("worker_rss_mb_first") is None else (
            f"; the inference worker {soak['worker_rss_mb_first']} → {soak['worker_rss_mb_last']} MB (growth {soak['worker_rss_growth_mb']} MB)")
        lines += ["", f"Resident memory of the loop process {soak['rss_mb_first']} MB after the first interval, {soak['rss_mb_last']} MB after the last "
                  f"(growth {soak['rss_growth_mb']} MB){worker}; latency p99 {_ms(soak['latency_p99_ms_first'])} ms first interval, "
                  f"{_ms(soak['latency_p99_ms_last'])} ms last.", "",
                  "| elapsed s | ticks | RSS MB | worker RSS MB | calls | misses | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|---|---|"]
        for r in soak["rows"]:
            lines.append(f"| {r['elapsed_s']} | {r['ticks']} | {r['rss_mb']} | {r['worker_rss_mb'] or '-'} | {r['calls']} | {r['deadline_misses']} | "
                         f"{_ms(r['latency_p50_ms'])} | {_ms(r['latency_p99_ms'])} | {_ms(r['latency_max_ms'])} |")
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    """A latency for the table; "-" for an interval without calls."""
    return "-" if value is None else f"{value:.0f}"


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of this process (or ``pid``) now, from Linux /proc; else this process's peak
    (getrusage), or None for another process."""
    try:
        pages = int(Path(f"/proc/{pid or 'self'}/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None if pid else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    main(sys.argv[1:])
