"""What a network call and a whole policy call cost on each backend, on this machine.

    python -m paradiffpolicy.bench.backends task=lift
    python -m paradiffpolicy.bench.backends task=pusht_image "threads=[1,2]" trials=20

Two measurements per torch thread count, each interleaved across backends (``paradiffpolicy.measure``):

1. **cost curve**: one U-Net call at each batch size (Picard's windows are batches), and one call
   of the observation encoder at batch 1;
2. **policy calls** at batch 1 on the checkpoint's shipped observation windows, encoder included:
   sequential DDPM (the policy's own scheduler), sequential DDIM-8 and DDIM-16 (what users pick
   for speed), and Picard at the README preset, on every backend. Speed-ups are given against the
   same backend's sequential sampler and against **the fastest sequential sampler of the policy's
   scheduler on any backend**, both measured in the same run; the deviation of every sample from
   the eager sequential sample on the same noise says what each backend changes.

Writes ``<out>/backend-cost-<task>.{json,md,png}``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

from paradiffpolicy.config import require_list
from paradiffpolicy.sampling import SamplerNoise
from paradiffpolicy.measure import interleaved, max_abs_deviation, network_costs, percentiles, provenance, ratios
from paradiffpolicy.runtime import REPO_ROOT



@dataclass
class BackendBenchConfig:
    task: str = "lift"
    backends: List[str] = field(default_factory=lambda: ["eager", "jit", "onnxruntime", "openvino"])
    threads: List[int] = field(default_factory=lambda: [1, 2])
    batches: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    trials: int = 15  # policy calls per sampler and backend (the cost curve takes 2x as many)
    warmup: int = 2
    seed: int = 0
    out: str = "benchmarks/results"

    def __post_init__(self) -> None:
        from paradiffpolicy.backends import check_backend

        for b in self.backends:
            check_backend(b, key="backends")
        require_list(self, "threads", 1)
        require_list(self, "batches", 1)
        if self.trials < 3:
            raise ValueError(f"trials={self.trials} must be >= 3 (percentiles)")


def samplers(policy) -> dict:
    """The sampler settings every backend runs: the policy's scheduler sequentially, DDIM-8/16, and
    the Picard preset (``conf/sampler/picard.yaml``)."""
    from paradiffpolicy.config import SamplerConfig
    from paradiffpolicy.presets import sampler_preset

    n = policy.config.scheduler.num_inference_steps
    return {
        f"sequential {policy.config.scheduler.name}-{n}": SamplerConfig(name="sequential"),
        "sequential ddim-8": SamplerConfig(name="sequential", scheduler="ddim", num_inference_steps=8),
        "sequential ddim-16": SamplerConfig(name="sequential", scheduler="ddim", num_inference_steps=16),
        "picard (preset)": sampler_preset("picard"),
    }


def measure(cfg: BackendBenchConfig, threads: int, policy, windows: dict) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    count = next(iter(windows.values())).shape[0]
    obs1 = {k: v[:1] for k, v in windows.items()}
    cond1 = policy.encode_observation(obs1)

    # 1. cost curve: one network call per batch size, backends interleaved at each size
    curve = network_costs(policy, cfg.backends, cfg.batches, cond1, 2 * cfg.trials, cfg.warmup, seed=cfg.seed)
    with torch.no_grad():
        valid = policy.validate_obs(obs1)
        ms = interleaved({b: (lambda _, e=policy.network(b).encoder: e(valid)) for b in cfg.backends}, 2 * cfg.trials, cfg.warmup)
    encoder = {b: percentiles(ms[b]) for b in cfg.backends}

    # 2. whole policy calls at batch 1, every (sampler, backend), interleaved; the same window and
    # noise for all within a trial
    settings = samplers(policy)
    built = {name: policy.make_sampler(s) for name, s in settings.items()}
    longest = max(built.values(), key=lambda s: s.table.num_steps)  # shorter samplers use the first steps' noise
    draws = [({k: v[i % count : i % count + 1] for k, v in windows.items()}, policy.draw_noise(1, gen, longest))
             for i in range(cfg.warmup + cfg.trials)]

    outputs: dict[tuple[str, str], list] = {}

    def call(name: str, backend: str):
        sampler = built[name]
        steps = sampler.table.num_steps

        def run(trial: int):
            obs, noise = draws[trial]
            out = policy.predict_action(obs, noise=SamplerNoise(noise.initial, noise.steps[:steps]), sampler=sampler,
                                        backend=backend)
            outputs.setdefault((name, backend), []).append((trial, out))
        return run

    for b in cfg.backends:  # build / trace each network and shape before timing
        for s in built.values():
            policy.warm_up(1, s, b)
    ms = interleaved({f"{name} | {b}": call(name, b) for name in settings for b in cfg.backends}, cfg.trials, cfg.warmup)
    reference = next(iter(settings))  # the policy's own scheduler, sequentially
    ref_outputs = dict(outputs[(reference, "eager")])
    calls = {}
    for name in settings:
        for b in cfg.backends:
            mine = dict(outputs[(name, b)])
            dev = torch.cat([max_abs_deviation(mine[i].action_pred_normalized, ref_outputs[i].action_pred_normalized)
                             for i in range(cfg.warmup, cfg.warmup + cfg.trials)])
            iters = [float(mine[i].stats.rounds) for i in range(cfg.warmup, cfg.warmup + cfg.trials)]
            calls[f"{name} | {b}"] = {"sampler": name, "backend": b, "latency_ms": percentiles(ms[f"{name} | {b}"]),
                                      "iterations": float(np.mean(iters)), "max_abs_dev_vs_eager_reference": float(dev.max())}
    seq_keys = [f"{reference} | {b}" for b in cfg.backends]
    fastest = min(seq_keys, key=lambda k: calls[k]["latency_ms"]["p50"])
    for key, row in calls.items():
        row["speedup_vs_same_backend_sequential"] = ratios(ms[f"{reference} | {row['backend']}"], ms[key])
        row["speedup_vs_fastest_sequential"] = ratios(ms[fastest], ms[key])
    return {"threads": threads, "network_ms": curve, "encoder_ms": encoder, "calls": calls,
            "reference": reference, "fastest_sequential": fastest}


def run(cfg: BackendBenchConfig) -> dict:
    from paradiffpolicy.checkpoint import load_policy
    from paradiffpolicy.data.obs_sample import load_observation_sample

    ckpt = REPO_ROOT / "checkpoints" / cfg.task
    policy = load_policy(ckpt)
    sample = load_observation_sample(ckpt)
    if sample is None:
        raise SystemExit(f"error: {ckpt} ships no observation sample ({ckpt}/observations.safetensors)")
    windows, source = sample
    result = {"task": cfg.task, "checkpoint": str(ckpt.relative_to(REPO_ROOT)), "observations": source,
              "trials": cfg.trials, "batches": list(cfg.batches),
              "provenance": provenance(list(cfg.threads), backends=list(cfg.backends)),
              "by_threads": [measure(cfg, t, policy, windows) for t in cfg.threads]}
    from paradiffpolicy.success_stats import write_report

    return write_report(Path(cfg.out) / f"backend-cost-{cfg.task}", result, markdown, plot)


def markdown(r: dict) -> str:
    from paradiffpolicy.backends import EXPORTED

    prov = r["provenance"]
    lines = [f"# What a call costs per backend: `{r['task']}`", "",
             f"{prov['cpu']}; torch {prov['versions']['torch']}, "
             + ", ".join(f"{b} {v}" for b, v in prov["backends"].items() if b in EXPORTED)
             + f"; git {prov['git']}. Interleaved across backends, median (p5-p95) ms; "
             f"policy calls: {r['trials']} trials at batch 1 on the shipped observation windows, encoder included. "
             "Written by `python -m paradiffpolicy.bench.backends`.", ""]
    for m in r["by_threads"]:
        t = m["threads"]
        backends = list(m["network_ms"])
        lines += [f"## {t} intra-op thread{'s' if t > 1 else ''}", "", "U-Net, one call (ms, median):", "",
                  "| batch | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
        for batch in r["batches"]:
            row = [m["network_ms"][b][str(batch)]["p50"] if str(batch) in m["network_ms"][b] else m["network_ms"][b][batch]["p50"]
                   for b in backends]
            best = min(row)
            lines.append(f"| {batch} | " + " | ".join(f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in row) + " |")
        lines += ["", "Observation encoder, batch 1: " + ", ".join(f"{b} {m['encoder_ms'][b]['p50']:.2f} ms" for b in backends), "",
                  f"Policy calls (reference for the last column: **{m['fastest_sequential']}**, the fastest sequential "
                  "sampler of the policy's own scheduler on any backend, in this run):", "",
                  "| sampler | backend | latency p50 (p5-p95) ms | iterations | speed-up vs same-backend sequential | "
                  "vs fastest sequential | max dev vs eager sequential |", "|---|---|---|---|---|---|---|"]
        for row in sorted(m["calls"].values(), key=lambda c: (c["sampler"], c["latency_ms"]["p50"])):
            lat, s1, s2 = row["latency_ms"], row["speedup_vs_same_backend_sequential"], row["speedup_vs_fastest_sequential"]
            dev = row["max_abs_dev_vs_eager_reference"]
            lines.append(f"| {row['sampler']} | {row['backend']} | {lat['p50']:.1f} ({lat['p5']:.1f}-{lat['p95']:.1f}) | "
                         f"{row['iterations']:.1f} | {s1['p50']:.2f}x | {s2['p50']:.2f}x | {dev:.1e} |")
        lines.append("")
    lines += ["DDIM rows compute another sample (a different scheduler): their deviation is a distance, not an error.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(r["by_threads"]), figsize=(5.5 * len(r["by_threads"]), 4), squeeze=False)
    for ax, m in zip(axes[0], r["by_threads"]):
        for b, curve in m["network_ms"].items():
            xs = r["batches"]
            ys = [(curve.get(str(x)) or curve.get(x))["p50"] for x in xs]
            ax.plot(xs, ys, marker="o", label=b)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows per U-Net call)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"{r['task']}: {m['threads']} thread(s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    from paradiffpolicy.config import from_argv

    return run(from_argv(BackendBenchConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
