#!/usr/bin/env python
"""A robot-style control loop: robosuite at 20 Hz on the wall clock, driven by PolicyRunner.

    python scripts/run_realtime_loop.py checkpoint=checkpoints/lift seconds=60 window=16 tol=0.1

Episodes restart when they end. Prints latency percentiles, deadline misses and late ticks, and
writes them as JSON (``out=...``). The loop itself is what a user writes around PolicyRunner.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paradiffpolicy import SamplerConfig, load_policy  # noqa: E402
from paradiffpolicy.config import from_dict  # noqa: E402
from paradiffpolicy.control.runner import PolicyRunner  # noqa: E402
from paradiffpolicy.envs import TaskConfig, make_env  # noqa: E402
from paradiffpolicy.runtime import versions  # noqa: E402


@dataclass
class LoopConfig:
    checkpoint: str = "checkpoints/lift"
    task: TaskConfig = field(default_factory=TaskConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seconds: float = 60.0
    threads: int = 1  # leave a core to the simulator
    budget_s: Optional[float] = None
    seed: int = 20_000_000
    out: str = ""


def main(argv: list[str]) -> dict:
    # short forms: window=, tol=, warm_start= go to the sampler
    argv = [f"sampler.{a}" if a.split("=")[0] in ("window", "tol", "warm_start", "name") else a for a in argv]
    cfg = from_dict(LoopConfig, OmegaConf.to_container(OmegaConf.from_dotlist(argv)), name="override")
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, sampler=cfg.sampler)
    env = make_env(cfg.task)
    period = 1.0 / cfg.task.control_hz
    late = episodes = successes = 0
    with PolicyRunner(policy, hz=cfg.task.control_hz, hold=cfg.task.hold, budget_s=cfg.budget_s,
                      warm_start=cfg.sampler.warm_start) as runner:
        misses = 0
        obs = env.reset(cfg.seed)
        runner.reset(obs, seed=cfg.seed)
        t_end = time.perf_counter() + cfg.seconds
        start, tick = time.perf_counter(), 0
        while time.perf_counter() < t_end:
            due = start + tick * period
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            elif now - due > period / 2:
                late += 1
            step = env.step(runner.step(obs))
            obs, tick = step.obs, tick + 1
            if step.done:
                episodes += 1
                successes += step.success
                misses += runner.deadline_misses
                obs = env.reset(cfg.seed + episodes)
                runner.reset(obs, seed=cfg.seed + episodes)  # synchronous first chunk: restart the clock
                start, tick = time.perf_counter(), 0
        misses += runner.deadline_misses
        stats = runner.stats()
    report = {"seconds": cfg.seconds, "hz": cfg.task.control_hz, "deadline_misses": misses, "late_ticks": late,
              "episodes_finished": episodes, "successes": successes, "latency_ms": stats["latency_ms"],
              "calls": stats["calls"], "iterations_mean": stats["iterations_mean"], "sampler": OmegaConf.to_container(OmegaConf.structured(cfg.sampler)),
              "threads": cfg.threads, "versions": versions()}
    print(json.dumps(report, indent=2))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
