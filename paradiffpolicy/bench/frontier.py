"""Success × latency for every sampler a user would consider, on the same episodes.

    python -m paradiffpolicy.bench.frontier phase=success task=lift       # closed-loop episodes (hours; resumable)
    python -m paradiffpolicy.bench.frontier phase=latency task=lift       # batch-1 latency, run alone
    python -m paradiffpolicy.bench.frontier phase=report task=lift        # JSON + Markdown + plot
    python -m paradiffpolicy.bench.frontier phase=summary tasks=[lift,stack,pusht_keypoints]  # one table, all tasks
    python -m paradiffpolicy.bench.frontier phase=pooled task=stack "pooled_runs=[runs/a,runs/b]"  # seed sets pooled

``success`` runs ``paradiffpolicy.eval`` once per sampler setting (``n_episodes`` fixed seeds, the
same for every setting; ``n_envs`` environments batched for throughput, which changes no episode)
into ``runs/<task>/<setting>/`` and skips settings already complete, so it resumes after an
interruption. ``latency`` times one policy call per setting at batch 1 on the same observation and
noise, settings interleaved in an order that rotates per trial, all on one network backend, on the
observations shipped with the checkpoint; run it with nothing else on the machine. ``report`` joins
both: success with its standard error sqrt(p(1-p)/n), mean max reward, latency p50/p95.
``summary`` puts the reports of ``tasks`` side by side (``frontier-summary.md``). ``pooled`` joins
the success runs of disjoint seed sets (each written by ``success`` with its own ``seed`` and
``runs``) and compares every pair of settings episode by episode on all of them, with the exact
McNemar test, Holm-adjusted over the pairs: a difference is stated only where the adjusted p <
``alpha`` (``frontier-pooled-<task>``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from paradiffpolicy import SamplerConfig, load_policy
from paradiffpolicy.backends import check_backend
from paradiffpolicy.config import from_argv
from paradiffpolicy.data.obs_sample import load_observation_sample
from paradiffpolicy.eval import run_complete
from paradiffpolicy.measure import interleaved, percentiles, provenance
from paradiffpolicy.presets import LABELS, SETTINGS, named_sampler
from paradiffpolicy.runtime import REPO_ROOT, cpu_model
from paradiffpolicy.success_stats import (finish_success_plot, holm, new_success_plot, paired, success_cell,
                                          success_summary, wilson_interval, write_report)


@dataclass
class FrontierConfig:
    phase: str = "success"  # success | latency | report | summary
    task: str = "lift"
    tasks: List[str] = field(default_factory=lambda: ["lift", "stack", "pusht_keypoints"])  # summary only
    settings: List[str] = field(default_factory=lambda: list(SETTINGS))
    n_episodes: int = 100
    n_envs: int = 10
    seed: int = 10_000_000
    # success phase: the network backend of the episodes (None: eval's default, eager); episodes on
    # two backends differ only by the backends' float error, so a setting keeps its seed set's backend
    backend: Optional[str] = None
    # latency phase: every setting on each of these backends, interleaved; each row reports its fastest
    backends: List[str] = field(default_factory=lambda: ["jit", "onnxruntime", "openvino"])
    threads: int = 2
    trials: int = 30
    warmup: int = 3
    runs: str = "outputs/frontier"
    out: str = "benchmarks/results"
    max_steps: int = 0  # 0: the task's episode length (smoke tests shorten it)
    pooled_runs: List[str] = field(default_factory=list)  # pooled only: the runs folders of disjoint seed sets
    alpha: float = 0.05  # pooled only: the p-value below which a difference is stated

    def __post_init__(self) -> None:
        if self.phase not in ("success", "latency", "report", "summary", "pooled"):
            raise ValueError(f"phase={self.phase!r} must be success, latency, report, summary or pooled")
        if self.phase == "pooled" and len(self.pooled_runs) < 1:
            raise ValueError("pooled_runs=[] is empty; expected the runs folders of the seed sets to pool")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha} must lie in (0, 1)")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"settings {unknown} are unknown; expected some of {list(SETTINGS)}")
        for key in ("n_episodes", "n_envs", "threads", "trials"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.backend is not None:
            check_backend(self.backend, key="backend")
        if self.phase == "latency":
            if not self.backends:
                raise ValueError("backends=[] is empty; expected some of jit, onnxruntime, openvino, eager")
            for b in self.backends:
                check_backend(b, key="backends")


def sampler_config(cfg: FrontierConfig, name: str) -> SamplerConfig:
    """A setting's sampler (:data:`~paradiffpolicy.presets.SETTINGS`)."""
    return named_sampler(name)


def checkpoint_of(task: str) -> Path:
    return REPO_ROOT / "checkpoints" / task


def success_phase(cfg: FrontierConfig) -> None:
    from paradiffpolicy.eval import run_point

    for name in cfg.settings:
        run_point(Path(cfg.runs) / cfg.task / name,
                  [f"task={cfg.task}", f"n_episodes={cfg.n_episodes}", f"n_envs={cfg.n_envs}", f"seed={cfg.seed}",
                   f"threads={cfg.threads}", *([f"backend={cfg.backend}"] if cfg.backend else []),
                   *([f"task.max_steps={cfg.max_steps}"] if cfg.max_steps else []),
                   *[f"sampler.{k}={v}" for k, v in dataclasses.asdict(sampler_config(cfg, name)).items() if v is not None]],
                  cfg.n_episodes, f"{cfg.task} {name}")


def latency_phase(cfg: FrontierConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    ckpt = checkpoint_of(cfg.task)
    policy = load_policy(ckpt, sampler=SamplerConfig(name="sequential"))
    sample = load_observation_sample(ckpt)
    if sample is None:
        raise SystemExit(f"{ckpt} has no observation sample ({ckpt}/observations.safetensors); see python -m paradiffpolicy.data.make_obs_sample")
    obs_all, obs_meta = sample
    samplers = {name: policy.make_sampler(sampler_config(cfg, name)) for name in cfg.settings}
    for b in cfg.backends:
        for s in samplers.values():
            policy.warm_up(1, s, b)
    gen = torch.Generator().manual_seed(0)
    k = next(iter(obs_all.values())).shape[0]
    windows = [int(torch.randint(k, (1,), generator=gen)) for _ in range(cfg.warmup + cfg.trials)]
    iters = {(n, b): [] for n in samplers for b in cfg.backends}

    def call(name: str, backend: str):
        def run(trial: int):
            i = windows[trial]
            noise = policy.draw_noise(1, torch.Generator().manual_seed(trial), samplers[name])
            out = policy.predict_action({f: v[i : i + 1] for f, v in obs_all.items()}, noise=noise, sampler=samplers[name],
                                        backend=backend)
            if trial >= cfg.warmup:
                iters[name, backend].append(out.stats.rounds)
        return run

    lat = interleaved({(n, b): call(n, b) for n in samplers for b in cfg.backends}, cfg.trials, cfg.warmup)
    settings = {}
    for n in samplers:
        by_backend = {b: {"latency_ms": percentiles(lat[n, b]), "iterations_mean": float(np.mean(iters[n, b]))}
                      for b in cfg.backends}
        best = min(cfg.backends, key=lambda b: by_backend[b]["latency_ms"]["p50"])
        settings[n] = {**by_backend[best], "backend": best, "by_backend": by_backend}
    result = {
        "task": cfg.task, "checkpoint": str(ckpt.relative_to(REPO_ROOT)), "backends": list(cfg.backends), "batch": 1,
        "trials": cfg.trials, "observations": obs_meta, "cpu": cpu_model(), "threads": cfg.threads,
        "provenance": provenance(cfg.threads, backends=list(cfg.backends)),
        "settings": settings,
    }
    path = Path(cfg.runs) / cfg.task / "latency.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    for n in samplers:
        s = result["settings"][n]
        print(f"{cfg.task} {n}: p50 {s['latency_ms']['p50']:.1f} ms, p95 {s['latency_ms']['p95']:.1f} ms on {s['backend']}, "
              f"{s['iterations_mean']:.1f} rounds", flush=True)
    return result


def report_phase(cfg: FrontierConfig) -> dict:
    runs = Path(cfg.runs) / cfg.task
    lat_path = runs / "latency.json"
    latency = json.loads(lat_path.read_text()) if lat_path.exists() else None
    rows, seeds = {}, None
    for name in cfg.settings:
        if not run_complete(runs / name, cfg.n_episodes):
            print(f"{cfg.task} {name}: success phase not complete, left out", flush=True)
            continue
        info = json.loads((runs / name / "eval_info.json").read_text())
        if seeds is None:
            seeds = info["seeds"]
        if info["seeds"] != seeds:
            raise SystemExit(f"{runs / name} ran other seeds than the first setting: not comparable")
        n = info["overall"]["n_episodes"]
        p = info["overall"]["pc_success"] / 100
        rows[name] = {
            "label": LABELS[name], "sampler": dataclasses.asdict(sampler_config(cfg, name)), "n_episodes": n, "pc_success": 100 * p,
            "pc_success_se": 100 * float(np.sqrt(p * (1 - p) / n)),
            "pc_success_ci95": [100 * b for b in wilson_interval(round(p * n), n)],
            "avg_max_reward": info["overall"]["avg_max_reward"],
            "success_per_seed": [bool(e["success"]) for e in sorted(info["per_episode"], key=lambda e: e["seed"])],
            "latency_ms": None if latency is None else latency["settings"].get(name, {}).get("latency_ms"),
            "backend": None if latency is None else latency["settings"].get(name, {}).get("backend", latency.get("backend")),
            "rounds": None if latency is None else latency["settings"].get(name, {}).get("iterations_mean"),
        }
    ref = rows.get("ddpm100")
    for r in rows.values():  # paired on the seeds: episodes this sampler wins / loses against sequential DDPM-100
        r["vs_ddpm100"] = None if ref is None else paired(r["success_per_seed"], ref["success_per_seed"])
    result = {"task": cfg.task, "seeds": seeds and [seeds[0], seeds[-1]], "episodes_per_setting": cfg.n_episodes,
              "success_machine": "episodes are deterministic given the seeds (fast mode, no wall clock)",
              "latency": None if latency is None else {k: latency.get(k) for k in ("backends", "batch", "trials", "observations",
                                                                                  "cpu", "threads", "provenance")},
              "settings": rows}
    return write_report(Path(cfg.out) / f"frontier-{cfg.task}", result, markdown, plot)


def summary_phase(cfg: FrontierConfig) -> str:
    """One Markdown table from the ``report`` JSONs of ``tasks``: per sampler, latency p50 and
    success ± SE on each task (every task's own seeds and latency run)."""
    out = Path(cfg.out)
    missing = [t for t in cfg.tasks if not (out / f"frontier-{t}.json").is_file()]
    if missing:
        raise SystemExit(f"no report for {missing} in {out}; run phase=report task=<task> first")
    reports = {t: json.loads((out / f"frontier-{t}.json").read_text()) for t in cfg.tasks}
    names = [n for n in cfg.settings if all(n in r["settings"] for r in reports.values())]
    tasks = " / ".join(cfg.tasks)
    cpus = sorted({r["latency"]["cpu"] for r in reports.values() if r["latency"]})
    episodes = sorted({r["episodes_per_setting"] for r in reports.values()})
    lines = [f"Every sampler on the same {'/'.join(map(str, episodes))} episodes "
             f"per task ({tasks}); batch-1 latency measured alone ({'; '.join(cpus)}), each sampler on its fastest "
             "backend (named per row).\n",
             f"| sampler | latency p50 ms ({tasks}) | backend ({tasks}) | " + " | ".join(f"{t} success % ± SE" for t in cfg.tasks) + " |",
             "|---|---|---|" + "---|" * len(cfg.tasks)]
    for n in names:
        rows = [reports[t]["settings"][n] for t in cfg.tasks]
        lat = " / ".join("-" if r["latency_ms"] is None else f"{r['latency_ms']['p50']:.0f}" for r in rows)
        backend = " / ".join(r.get("backend") or "-" for r in rows)
        lines.append(f"| {LABELS[n]} | {lat} | {backend} | " + " | ".join(success_cell(r) for r in rows) + " |")
    text = "\n".join(lines) + "\n"
    (out / "frontier-summary.md").write_text(text)
    print(text)
    return text


def pooled_phase(cfg: FrontierConfig) -> dict:
    """Every setting complete in every seed set of ``pooled_runs``, pooled; each pair of settings
    compared on the pooled episodes (:func:`~paradiffpolicy.success_stats.paired`)."""
    sets, names = [], list(cfg.settings)
    for runs in cfg.pooled_runs:
        infos = {}
        for name in cfg.settings:
            path = Path(runs) / cfg.task / name / "eval_info.json"
            info = json.loads(path.read_text()) if path.is_file() else None
            if info is None or info.get("interrupted"):
                print(f"{path}: missing or interrupted, {name} left out of the pooled report", flush=True)
                names = [n for n in names if n != name]
                continue
            infos[name] = info
        sets.append((runs, infos))
    if len(names) < 2:
        raise SystemExit(f"fewer than two settings are complete in every one of {list(cfg.pooled_runs)}")
    per_seed: dict[str, list[bool]] = {n: [] for n in names}
    seen: set[int] = set()
    seed_sets = []
    for runs, infos in sets:
        seeds = sorted(e["seed"] for e in infos[names[0]]["per_episode"])
        for n in names:
            eps = sorted(infos[n]["per_episode"], key=lambda e: e["seed"])
            if [e["seed"] for e in eps] != seeds:
                raise SystemExit(f"{runs}: {n} ran other seeds than {names[0]}; a seed set must be shared by every setting")
            per_seed[n] += [bool(e["success"]) for e in eps]
        if seen & set(seeds):
            raise SystemExit(f"{runs}: seeds {sorted(seen & set(seeds))[:3]}... appear in another seed set; pooled sets must be disjoint")
        seen |= set(seeds)
        seed_sets.append({"runs": str(runs), "seeds": [seeds[0], seeds[-1]], "n_episodes": len(seeds),
                          "backend": infos[names[0]].get("backend"), "cpu": infos[names[0]].get("cpu"),
                          "pc_success": {n: infos[n]["overall"]["pc_success"] for n in names}})
    rows = {n: {"label": LABELS[n], **success_summary(per_seed[n]), "success_per_seed": per_seed[n]} for n in names}
    pairs = [{"a": a, "b": b, **paired(per_seed[a], per_seed[b])} for i, a in enumerate(names) for b in names[i + 1:]]
    for pair, p_holm in zip(pairs, holm([p["p_value"] for p in pairs])):  # every pair of the task is one family
        better = pair["a"] if pair["won"] > pair["lost"] else pair["b"]
        pair.update(p_holm=p_holm, verdict=f"{LABELS[better]} better" if p_holm < cfg.alpha else "no measurable difference")
    result = {"task": cfg.task, "alpha": cfg.alpha, "seed_sets": seed_sets, "episodes_per_setting": len(seen),
              "settings": rows, "pairs": pairs}
    return write_report(Path(cfg.out) / f"frontier-pooled-{cfg.task}", result, pooled_markdown, None)


def pooled_markdown(result: dict) -> str:
    sets = result["seed_sets"]
    lines = [f"# Success on pooled seed sets: {result['task']}\n",
             f"{result['episodes_per_setting']} episodes per setting: " + "; ".join(
                 f"seeds {s['seeds'][0]}..{s['seeds'][1]} ({s['n_episodes']}, backend {s['backend'] or 'eager'}, {s['cpu']})"
                 for s in sets) + ". Fast mode, every setting on the same episodes. Pairs: episodes the first setting "
             "wins / loses against the second, the exact McNemar p-value on them and that p adjusted over all the pairs "
             f"(Holm); a difference is stated only where the adjusted p < {result['alpha']}.\n",
             "| sampler | pooled success % (± SE) | 95% interval | " + " | ".join(f"seeds {s['seeds'][0]}.." for s in sets) + " |",
             "|---|---|---|" + "---|" * len(sets)]
    for n, r in result["settings"].items():
        lo, hi = r["pc_success_ci95"]
        lines.append(f"| {r['label']} | {success_cell(r)} | {lo:.0f}-{hi:.0f} | "
                     + " | ".join(f"{s['pc_success'][n]:.0f}" for s in sets) + " |")
    lines += ["", "| pair | won / lost | p | p (Holm) | verdict |", "|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {LABELS[p['a']]} vs {LABELS[p['b']]} | +{p['won']} / −{p['lost']} | {p['p_value']:.3f} | "
                     f"{p['p_holm']:.3f} | {p['verdict']} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    lat = result["latency"]
    head = (f"# Success × latency frontier: {result['task']}\n\n{result['episodes_per_setting']} episodes per setting, "
            f"seeds {result['seeds'][0]}..{result['seeds'][1]}, the same for every setting. ")
    head += ("Latency: one call at batch 1 on each of the backends " f"{', '.join(lat.get('backends') or [])}, the fastest per "
             f"setting shown, {lat['trials']} trials interleaved, {lat['cpu']}, {lat['threads']} threads, "
             f"observations: {lat['observations'].get('source', '?')}.\n" if lat else "Latency not measured yet.\n")
    head += ("\nSuccess: ± its standard error sqrt(p(1-p)/n), and the 95% Wilson interval. \"vs DDPM-100\": episodes "
             "(same seeds) this sampler succeeds in and sequential DDPM-100 fails / the reverse, with the exact McNemar p-value.\n")
    lines = [head, "| sampler | success % (± SE) | 95% interval | vs DDPM-100 won / lost | avg max reward | latency p50 ms | p95 ms | "
             "backend | network rounds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["settings"].values():
        l50 = "" if r["latency_ms"] is None else f"{r['latency_ms']['p50']:.0f}"
        l95 = "" if r["latency_ms"] is None else f"{r['latency_ms']['p95']:.0f}"
        rounds = "" if r["rounds"] is None else f"{r['rounds']:.1f}"
        lo, hi = r["pc_success_ci95"]
        vs = r["vs_ddpm100"]
        vs = "" if vs is None else f"+{vs['won']} / −{vs['lost']}" + (f" (p {vs['p_value']:.2f})" if "p_value" in vs else "")
        lines.append(f"| {r['label']} | {success_cell(r)} | {lo:.0f}-{hi:.0f} | {vs} | "
                     f"{r['avg_max_reward']:.3f} | {l50} | {l95} | {r.get('backend') or ''} | {rounds} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig, ax = new_success_plot()
    import matplotlib.ticker

    for name, r in result["settings"].items():
        if r["latency_ms"] is None:
            continue
        marker = "o" if r["sampler"]["name"] == "sequential" else "s"
        ax.errorbar(r["latency_ms"]["p50"], r["pc_success"], yerr=r["pc_success_se"], fmt=marker, capsize=3, label=r["label"])
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    finish_success_plot(fig, ax, path, "latency per chunk, batch 1, p50 (ms, log)",
                        f"{result['task']}: {result['episodes_per_setting']} episodes per sampler, same seeds")


def main(argv: list[str]):
    cfg = from_argv(FrontierConfig, argv)
    return {"success": success_phase, "latency": latency_phase, "report": report_phase, "summary": summary_phase,
            "pooled": pooled_phase}[cfg.phase](cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
