"""Success against inference delay: how each way of joining chunks holds up when a call spans ticks.

    python -m paradiffpolicy.bench.delay task=pusht_keypoints                       # closed loop (resumable)
    python -m paradiffpolicy.bench.delay task=pusht_keypoints delays=[1,3,6] n_episodes=50
    python -m paradiffpolicy.bench.delay phase=cost task=pusht_keypoints            # per-call cost of each join, run alone
    python -m paradiffpolicy.bench.delay phase=report task=pusht_keypoints          # JSON + Markdown + plot
    python -m paradiffpolicy.bench.delay phase=summary tasks=[lift,stack]           # the tasks' reports side by side
    python -m paradiffpolicy.bench.delay task=pusht_keypoints checkpoint=<trained with the prefix> \
        label=picard-trained methods=[trained,naive] baseline=picard             # another policy, paired against picard's
    python -m paradiffpolicy.bench.delay phase=policies label=picard-trained baseline=picard tasks=[lift,pusht_keypoints]
    python -m paradiffpolicy.bench.delay task=lift seed=20000000 runs=<another folder>        # a second seed set ...
    python -m paradiffpolicy.bench.delay phase=report task=lift "more_runs=[<that folder>]"  # ... pooled with the first

``success`` runs ``paradiffpolicy.eval controller=delay`` once per (join method, delay d) on the
same ``n_episodes`` seeds, into ``<runs>/<task>/<sampler label>/<method>/d<d>/``, skipping points
already complete, so it resumes after an interruption. The simulated delay is deterministic and
machine independent (no wall clock), so it may run beside other work. ``report`` gathers every
complete point of the task: success with its 95% Wilson interval, paired on the seeds against
``naive`` at the same d and against the method's own d = 0, and the action jump at seams and
within chunks; ``benchmarks/results/delay-<task>.{json,md,png}``. ``cost`` times one batch-1
call per join method on the observations shipped with the checkpoint (each call joining a chunk
sampled for the same observation, shifted by Ta, at d = ``cost_delay``), methods interleaved in an
order that rotates per trial, with the Picard iterations and the deviation from the sequential
sampler under the same condition; run it with nothing else on the machine
(``<out>/delay-cost-<task>.json``). ``summary`` puts the reports of ``tasks`` side by side and
compares every two joins over all of them at once: episodes won / lost on the shared seeds of every
(task, d > 0) where both ran, pooled, with the exact McNemar p-value, Holm-adjusted over the pairs
(``delay-summary.{json,md}``; ``delay-summary-<label>`` for another sampler than ``picard``).

``checkpoint`` evaluates another policy of the task (e.g. one trained with the committed prefix,
``join.method=trained``) under its own ``label``; its report points are also paired, seed for
seed, against the ``naive`` and ``hard`` points of the ``baseline`` label at the same d.
``policies`` puts the two policies side by side over ``tasks`` (from their reports): success per d,
the cost of delay (d against the same policy's d = 0), and the policy's join against each of the
baseline's joins pooled over every (task, d > 0) both ran, Holm-adjusted
(``delay-policies-<label>.{json,md,png}``).

``more_runs`` pools disjoint seed sets: a point's episodes from every runs folder are joined (each
set kept in ``seed_sets``, named by its first seed), and every comparison pairs episodes within a
set both ran, on that set's shared seeds; summary and policies read the pooled reports.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

from paradiffpolicy.config import from_argv
from paradiffpolicy.control.join import JOIN_METHODS
from paradiffpolicy.runtime import REPO_ROOT, cpu_model, versions
from paradiffpolicy.success_stats import (finish_success_plot, holm, new_success_plot, paired, sign_test, success_cell,
                                          success_summary, write_report)



@dataclass
class DelayBenchConfig:
    phase: str = "success"  # success | report | cost | summary | policies
    task: str = "pusht_keypoints"
    tasks: List[str] = field(default_factory=lambda: ["lift", "stack", "pusht_keypoints", "pusht_image"])  # summary, policies
    sampler: str = "picard"  # a preset of conf/sampler
    sampler_overrides: List[str] = field(default_factory=list)  # e.g. [sampler.num_inference_steps=8]
    label: str = ""  # the runs' folder for this sampler (default: the preset's name)
    checkpoint: str = ""  # another policy of the task (default: the task's own checkpoint)
    baseline: str = ""  # report, policies: pair this label's points with the naive and hard points of that label
    methods: List[str] = field(default_factory=lambda: ["naive", "soft"])
    inpaint: str = "x0"
    delays: List[int] = field(default_factory=lambda: [0, 2, 4])
    execute: int = 0  # s, ticks between calls (0: the policy's Ta; -1: s = d, a call as soon as the last one ends)
    n_episodes: int = 100
    n_envs: int = 10
    seed: int = 10_000_000
    backend: str = "jit"
    threads: int = 2
    runs: str = "outputs/delay"
    # report: further runs folders holding the same points on other, disjoint seed sets (e.g. one run
    # with seed=20000000): pooled point by point, each comparison paired within its seed set
    more_runs: List[str] = field(default_factory=list)
    out: str = "benchmarks/results"
    max_steps: int = 0  # 0: the task's episode length (smoke tests shorten it)
    # report only: a fast-mode eval_info.json on the same seeds (e.g. the frontier's run of this
    # sampler) standing in for naive at d = 0 when that point was not run (fast mode is naive d = 0)
    fast_run: str = ""
    fast_run_label: str = ""  # report only: whose naive d = 0 fast_run stands in for (default: label)
    cost_delay: int = 4  # cost only: the d of the timed calls
    trials: int = 20  # cost only
    warmup: int = 2  # cost only

    def __post_init__(self) -> None:
        if self.phase not in ("success", "report", "cost", "summary", "policies"):
            raise ValueError(f"phase={self.phase!r} must be success, report, cost, summary or policies")
        if self.phase == "policies" and not (self.label and self.baseline):
            raise ValueError("phase=policies compares label=<a policy's runs> with baseline=<another's>; give both")
        unknown = [m for m in self.methods if m not in JOIN_METHODS]
        if unknown:
            raise ValueError(f"methods {unknown} are unknown; expected some of {list(JOIN_METHODS)}")
        if any(d < 0 for d in self.delays):
            raise ValueError(f"delays={list(self.delays)} must be >= 0")
        if self.execute < -1:
            raise ValueError(f"execute={self.execute} must be >= 0 (0: Ta) or -1 (s = d)")
        for key in ("n_episodes", "n_envs", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")

    @property
    def sampler_label(self) -> str:
        return self.label or self.sampler

    def method_label(self, method: str) -> str:
        """``soft``; ``soft-noised`` for an inpainting mode other than x0; ``-sd`` (s = d) or ``-s<s>``
        appended for an execution horizon other than Ta."""
        label = method if method not in ("hard", "soft") or self.inpaint == "x0" else f"{method}-{self.inpaint}"
        return label + {0: "", -1: "-sd"}.get(self.execute, f"-s{self.execute}")

    def execute_for(self, delay: int) -> int:
        """The ``controller.execute`` of a point at ``delay`` (0: Ta)."""
        return max(delay, 1) if self.execute == -1 else self.execute


def success_phase(cfg: DelayBenchConfig) -> None:
    """Each point's episodes; a complete point with fewer episodes than ``n_episodes`` grows by the
    missing seeds, run into ``more-<first seed>/`` beside it (the report pools the parts)."""
    from paradiffpolicy.eval import run_point

    for d in cfg.delays:
        for method in cfg.methods:
            run = Path(cfg.runs) / cfg.task / cfg.sampler_label / cfg.method_label(method) / f"d{d}"
            name = f"{cfg.task} {cfg.sampler_label} {cfg.method_label(method)} d={d}"
            parts = point_parts(run)
            have = sum(info["overall"]["n_episodes"] for info in parts)
            if have >= cfg.n_episodes:
                print(f"{name}: {have} episodes, done, skipped", flush=True)
            elif not parts:
                run_point(run, point_overrides(cfg, method, d, cfg.seed, cfg.n_episodes), cfg.n_episodes, name)
            else:
                run_point(run / f"more-{cfg.seed + have}", point_overrides(cfg, method, d, cfg.seed + have, cfg.n_episodes - have),
                          cfg.n_episodes - have, f"{name} (seeds {cfg.seed + have}+)")


def point_overrides(cfg: DelayBenchConfig, method: str, delay: int, seed: int, n_episodes: int) -> list[str]:
    """The ``paradiffpolicy.eval`` overrides of one point's episodes."""
    return [f"task={cfg.task}", *([f"checkpoint={cfg.checkpoint}"] if cfg.checkpoint else []),
            f"sampler={cfg.sampler}", *cfg.sampler_overrides, f"backend={cfg.backend}",
            "controller=delay", f"controller.delay={delay}", f"controller.execute={cfg.execute_for(delay)}",
            f"controller.join.method={method}", f"controller.join.inpaint={cfg.inpaint}", f"n_episodes={n_episodes}",
            f"n_envs={cfg.n_envs}", f"seed={seed}", f"threads={cfg.threads}",
            *([f"task.max_steps={cfg.max_steps}"] if cfg.max_steps else [])]


def point_parts(run: Path) -> list[dict]:
    """The finished evaluations of a point, in seed order: ``run`` itself, then each ``more-<seed>/``
    that continues the seeds without a gap (a part that does not is left out, and rerun)."""
    parts: list[dict] = []
    for path in [run, *sorted(run.glob("more-*"), key=lambda p: int(p.name.split("-")[1]))]:
        try:
            info = json.loads((path / "eval_info.json").read_text())
        except (OSError, ValueError):
            break
        seeds = sorted(e["seed"] for e in info["per_episode"])
        if info.get("interrupted") or (parts and seeds[0] != max(e["seed"] for e in parts[-1]["per_episode"]) + 1):
            break
        parts.append(info)
    return parts


def merged_point(parts: list[dict]) -> dict:
    """One point's parts as one ``eval_info``: episodes joined; means weighted by their counts;
    a jump's p95 over parts is their p95s weighted by count (an approximation, exact for one part)."""
    if len(parts) == 1:
        return parts[0]
    info = {**parts[0], "per_episode": [e for p in parts for e in p["per_episode"]], "parts": len(parts)}
    calls = [p["inference"]["calls"] for p in parts]
    info["inference"] = {**parts[0]["inference"], "calls": sum(calls),
                         "iterations_mean": float(np.average([p["inference"]["iterations_mean"] for p in parts], weights=calls))}
    jumps = [p["control"].get("jumps") for p in parts]
    if all(jumps):
        merged = {}
        for where in ("seam", "inner"):
            live = [j[where] for j in jumps if j[where]["n"]]
            merged[where] = {"n": sum(x["n"] for x in live), "mean": None, "p95": None}
            if live:
                merged[where].update({k: float(np.average([x[k] for x in live], weights=[x["n"] for x in live]))
                                      for k in ("mean", "p95")})
        info["control"] = {**parts[0]["control"], "jumps": merged}
    return info


def cost_phase(cfg: DelayBenchConfig) -> dict:
    """Batch-1 latency of one call per join method (see the module docstring)."""
    import torch

    from paradiffpolicy.checkpoint import load_policy
    from paradiffpolicy.control.agent import Chunk
    from paradiffpolicy.control.join import JoinConfig, committed_prefix
    from paradiffpolicy.data.obs_sample import load_observation_sample
    from paradiffpolicy.eval import compose_eval_config
    from paradiffpolicy.measure import max_abs_deviation

    torch.set_num_threads(cfg.threads)
    sampler_cfg = compose_eval_config([f"task={cfg.task}", f"sampler={cfg.sampler}", *cfg.sampler_overrides]).sampler
    ckpt = REPO_ROOT / "checkpoints" / cfg.task
    policy = load_policy(ckpt, sampler=sampler_cfg, backend=cfg.backend)
    reference = policy.make_sampler(dataclasses.replace(sampler_cfg, name="sequential"))
    sample = load_observation_sample(ckpt)
    if sample is None:
        raise SystemExit(f"{ckpt} ships no observation sample (observations.safetensors)")
    windows, source = sample
    pc = policy.config
    policy.warm_up(1)
    policy.warm_up(1, reference)
    count = next(iter(windows.values())).shape[0]
    lat: dict[str, list] = {m: [] for m in cfg.methods}
    rounds: dict[str, list] = {m: [] for m in cfg.methods}
    dev: dict[str, list] = {m: [] for m in cfg.methods}
    for trial in range(cfg.warmup + cfg.trials):
        obs = {k: v[trial % count: trial % count + 1] for k, v in windows.items()}
        cond = policy.encode_observation(obs)
        noise = policy.draw_noise(1, torch.Generator().manual_seed(trial))
        prev = policy.sample_from_condition(cond, noise=policy.draw_noise(1, torch.Generator().manual_seed(10**6 + trial)))
        previous = Chunk(0, prev.upcoming[0].numpy(), prev.action_pred_normalized[0].numpy())
        order = cfg.methods[trial % len(cfg.methods):] + cfg.methods[: trial % len(cfg.methods)]
        for method in order:
            prefix = committed_prefix(JoinConfig(method=method, inpaint=cfg.inpaint), [previous], [pc.n_action_steps],
                                      [cfg.cost_delay], pc.executed_start, pc.horizon)
            t0 = time.perf_counter()
            out = policy.sample_from_condition(cond, noise=noise, prefix=prefix)
            dt = time.perf_counter() - t0
            if trial >= cfg.warmup:
                ref = policy.sample_from_condition(cond, noise=noise, sampler=reference, prefix=prefix)
                lat[method].append(dt * 1e3)
                rounds[method].append(out.stats.rounds)
                dev[method].append(float(max_abs_deviation(out.action_pred_normalized, ref.action_pred_normalized).max()))
    result = {"task": cfg.task, "sampler": dataclasses.asdict(sampler_cfg), "batch": 1, "delay": cfg.cost_delay,
              "inpaint": cfg.inpaint, "trials": cfg.trials, "observations": source, "cpu": cpu_model(),
              "threads": cfg.threads, "versions": versions(),
              "methods": {m: {"latency_ms": {"p50": float(np.median(lat[m])), "p5": float(np.percentile(lat[m], 5)),
                                             "p95": float(np.percentile(lat[m], 95))},
                              "rounds_mean": float(np.mean(rounds[m])),
                              "max_abs_dev_vs_sequential": float(np.max(dev[m]))} for m in cfg.methods}}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"delay-cost-{cfg.task}.json").write_text(json.dumps(result, indent=2))
    for m, r in result["methods"].items():
        print(f"{cfg.task} {m}: p50 {r['latency_ms']['p50']:.1f} ms (p5-p95 {r['latency_ms']['p5']:.1f}-"
              f"{r['latency_ms']['p95']:.1f}), {r['rounds_mean']:.1f} rounds, max dev vs sequential "
              f"{r['max_abs_dev_vs_sequential']:.1e}", flush=True)
    return result


def report_phase(cfg: DelayBenchConfig) -> dict:
    """Every complete point under ``<runs>/<task>``; points of one sampler must share their seeds
    where they share an episode count (a 50-episode point is paired on its first 50 seeds)."""
    base = Path(cfg.runs) / cfg.task
    sets = [collect_points(Path(runs) / cfg.task) for runs in (cfg.runs, *cfg.more_runs)]
    if not sets[0]:
        raise SystemExit(f"no complete point under {base}; run phase=success first")
    fast_label = cfg.fast_run_label or cfg.sampler_label
    if cfg.fast_run and not any((p["sampler"], p["method"], p["delay"]) == (fast_label, "naive", 0) for p in sets[0]):
        info = json.loads(Path(cfg.fast_run).read_text())
        if info["controller"]["mode"] != "fast":
            raise SystemExit(f"fast_run={cfg.fast_run} is a controller.mode={info['controller']['mode']} run, not fast")
        sets[0].append(_point(info, fast_label, "naive", 0, cfg.fast_run))
    points = pool_seed_sets(sets)
    by_key = {(p["sampler"], p["method"], p["delay"]): p for p in points}
    for p in points:
        # against the method's own d = 0, or fast mode (naive d = 0) for a schedule without one
        d0 = by_key.get((p["sampler"], p["method"], 0)) or by_key.get((p["sampler"], "naive", 0))
        schedule = re.search(r"-s(d|\d+)$", p["method"])  # naive on the same schedule, else at Ta
        naive = by_key.get((p["sampler"], "naive" + (schedule.group(0) if schedule else ""), p["delay"])) \
            or by_key.get((p["sampler"], "naive", p["delay"]))
        refs = [("vs_naive", naive), ("vs_d0", d0)]
        if cfg.baseline and p["sampler"] == cfg.sampler_label:
            refs += [(f"vs_baseline_{m}", by_key.get((cfg.baseline, m, p["delay"]))) for m in ("naive", "hard")]
        for ref_name, ref in refs:
            mine, theirs = ([], []) if ref is None else aligned(p, ref)
            p[ref_name] = None if ref is None or ref is p or not mine else {
                "reference": f"{ref['sampler']} {ref['method']} d={ref['delay']}", "episodes": len(mine), **paired(mine, theirs)}
    result = {"task": cfg.task, "mode": "controller=delay: simulated delay, deterministic given the seeds (no wall clock)",
              "points": sorted(points, key=lambda p: (p["sampler"], _join_order(p["method"]), p["method"], p["delay"])),
              "pooled_vs_naive": pooled_vs_naive(points)}
    if cfg.baseline:
        result["baseline"] = {"label": cfg.baseline, "policy": cfg.sampler_label}
    return write_report(Path(cfg.out) / f"delay-{cfg.task}", result, markdown, plot)


def collect_points(base: Path) -> list[dict]:
    """Every complete point under ``<runs>/<task>`` (``<sampler label>/<join>/d<d>``)."""
    points = []
    for info_path in sorted(base.glob("*/*/d*/eval_info.json")):
        parts = point_parts(info_path.parent)
        if parts:
            sampler_label, method, dname = info_path.parts[-4:-1]
            points.append(_point(merged_point(parts), sampler_label, method, int(dname[1:]), str(info_path.parent)))
    return points


def pool_seed_sets(sets: list[list[dict]]) -> list[dict]:
    """One point per (sampler, join, d) over disjoint seed sets: episodes joined, each set kept in
    ``seed_sets`` (its first seed names it) so comparisons pair only within a set."""
    pooled: dict = {}
    for points in sets:
        for p in points:
            key = (p["sampler"], p["method"], p["delay"])
            part = {"first_seed": p["seeds"][0], "seeds": p["seeds"], "source": p["source"],
                    "success_per_seed": p["success_per_seed"]}
            if key not in pooled:
                pooled[key] = {**p, "seed_sets": [part]}
                continue
            q = pooled[key]
            if any(s["first_seed"] == part["first_seed"] for s in q["seed_sets"]):
                raise SystemExit(f"{key}: two runs folders hold seeds from {part['first_seed']}; more_runs must be disjoint seed sets")
            n_before, n_new = len(q["success_per_seed"]), len(p["success_per_seed"])
            flags = q["success_per_seed"] + p["success_per_seed"]
            q["seed_sets"].append(part)
            q.update(success_summary(flags), success_per_seed=flags, source=[s["source"] for s in q["seed_sets"]],
                     **{k: (q[k] * n_before + p[k] * n_new) / len(flags) for k in ("iterations_mean", "avg_max_reward")})
    return list(pooled.values())


def aligned(p: dict, q: dict) -> tuple[list[bool], list[bool]]:
    """Two points' episodes paired seed for seed: within each seed set both ran, on its shared first
    seeds (a 50-episode point pairs with the first 50 of a 100-episode one)."""
    def sets(x):
        return {s["first_seed"]: s["success_per_seed"] for s in x.get("seed_sets") or
                [{"first_seed": x["seeds"][0], "success_per_seed": x["success_per_seed"]}]}
    a, b = [], []
    theirs = sets(q)
    for first, mine in sets(p).items():
        if first in theirs:
            n = min(len(mine), len(theirs[first]))
            a, b = a + mine[:n], b + theirs[first][:n]
    return a, b


def pooled_vs_naive(points: list[dict]) -> list[dict]:
    """Per sampler and method, its episodes against naive's at every d > 0 where both ran (on their
    shared seeds), pooled: one paired comparison over all delays, with its exact McNemar p-value."""
    out = []
    for sampler, method in dict.fromkeys((p["sampler"], p["method"]) for p in points):
        pairs = [p["vs_naive"] for p in points if (p["sampler"], p["method"]) == (sampler, method) and p["delay"] > 0
                 and p["vs_naive"] is not None]
        if method.startswith("naive") or not pairs:
            continue
        won, lost = sum(r["won"] for r in pairs), sum(r["lost"] for r in pairs)
        out.append({"sampler": sampler, "method": method, "delays": [p["delay"] for p in points if (p["sampler"], p["method"]) ==
                                                                    (sampler, method) and p["delay"] > 0 and p["vs_naive"]],
                    "episodes": sum(r["episodes"] for r in pairs), "won": won, "lost": lost, "p_value": sign_test(won, lost)})
    return out


def _point(info: dict, sampler_label: str, method: str, delay: int, source: str) -> dict:
    eps = sorted(info["per_episode"], key=lambda e: e["seed"])
    ctl = info["controller"]
    return {
        "sampler": sampler_label, "sampler_settings": info["sampler"], "method": method, "delay": delay,
        "join": ctl.get("join"), "execute": ctl.get("execute") or None, "source": source,
        "seeds": [eps[0]["seed"], eps[-1]["seed"]], **success_summary([bool(e["success"]) for e in eps]),
        "success_per_seed": [bool(e["success"]) for e in eps], "avg_max_reward": info["overall"]["avg_max_reward"],
        "jumps": info["control"].get("jumps"), "iterations_mean": info["inference"]["iterations_mean"],
        "versions": info["versions"], "cpu": info["cpu"],
    }


def markdown(result: dict) -> str:
    p0 = result["points"][0]
    lines = [f"# Success against inference delay: {result['task']}\n",
             f"`{result['mode']}`. A call every s = Ta ticks from that tick's observation; for its first d ticks "
             "the previous chunk executes, then the new chunk from index d (s: ticks between calls; `-sd`: s = d). Seed sets "
             f"from {', '.join(f'{x:,}' for x in sorted({s['first_seed'] for p in result['points'] for s in p.get('seed_sets', [])}) or [p0['seeds'][0]])}"
             " (a point pools those it ran on); every point of a sampler on the same seeds. Success ± SE and the 95% Wilson "
             "interval; paired on the seeds: episodes won / lost against `naive` at the same d and against "
             "the method's own d = 0 (fast mode, i.e. naive d = 0, where it has none), with the exact McNemar p-value. Jumps: the "
             "L2 norm of the change between consecutive executed actions, at chunk seams and within chunks (environment "
             "units), mean / p95; a point grown by later seeds gives the p95s of its runs weighted by count.\n",
             "| sampler | join | d | s | episodes | success % | 95% interval | vs naive (same d) | vs d=0 | "
             "jump at seams | jump within chunks | Picard iterations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    vs = lambda r: "" if r is None else f"+{r['won']} / −{r['lost']} (p {r['p_value']:.2f})"  # noqa: E731
    for p in result["points"]:
        lo, hi = p["pc_success_ci95"]
        j = p["jumps"]
        seam, inner = ("n/a", "n/a") if j is None or not j["seam"]["n"] else (f"{j['seam']['mean']:.3g} / {j['seam']['p95']:.3g}",
                                                       f"{j['inner']['mean']:.3g} / {j['inner']['p95']:.3g}")
        lines.append(f"| {p['sampler']} | {p['method']} | {p['delay']} | {p['execute'] or 'Ta'} | {p['n_episodes']} | {success_cell(p)} | "
                     f"{lo:.0f}-{hi:.0f} | {vs(p['vs_naive'])} | {vs(p['vs_d0'])} | {seam} | {inner} | "
                     f"{p['iterations_mean']:.1f} |")
    if result.get("baseline"):
        b = result["baseline"]
        lines += ["", f"`{b['policy']}` against `{b['label']}` (another policy) on the same seeds and d: won / lost (p).", "",
                  f"| join | d | episodes | success % | vs {b['label']} naive | vs {b['label']} hard |", "|---|---|---|---|---|---|"]
        for p in result["points"]:
            if p["sampler"] == b["policy"]:
                lines.append(f"| {p['method']} | {p['delay']} | {p['n_episodes']} | {success_cell(p)} | "
                             f"{vs(p.get('vs_baseline_naive'))} | {vs(p.get('vs_baseline_hard'))} |")
    if result.get("pooled_vs_naive"):
        lines += ["", "Pooled over delays, each method against `naive` on the same seeds:", "",
                  "| sampler | join | delays | episodes | won / lost | p |", "|---|---|---|---|---|---|"]
        for r in result["pooled_vs_naive"]:
            lines.append(f"| {r['sampler']} | {r['method']} | {', '.join(map(str, r['delays']))} | {r['episodes']} | "
                         f"+{r['won']} / −{r['lost']} | {r['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def pooled_pair(a: str, b: str, compared: dict[str, tuple[dict, dict]]) -> dict | None:
    """Points of ``a`` against those of ``b`` ({where: (a's point, b's point)}), each pair's
    episodes aligned within its seed sets, pooled into one paired comparison with its exact
    McNemar p-value; None when nothing was compared."""
    if not compared:
        return None
    both = [aligned(p, q) for p, q in compared.values()]
    tests = [paired(x, y) for x, y in both]
    won, lost = sum(t["won"] for t in tests), sum(t["lost"] for t in tests)
    return {"a": a, "b": b, "points": list(compared), "episodes": sum(len(x) for x, _ in both), "won": won, "lost": lost,
            "p_value": sign_test(won, lost)}


def with_holm(pairs: list[dict]) -> list[dict]:
    """``pairs`` with each p-value also Holm-adjusted over all of them (``p_holm``)."""
    for pair, p_holm in zip(pairs, holm([p["p_value"] for p in pairs])):
        pair["p_holm"] = p_holm
    return pairs


def pairs_table(pairs: list[dict], where) -> list[str]:
    """The Markdown rows of pooled pairs; ``where(pair)`` fills the points column."""
    return ["", "| pair | points | episodes | won / lost | p | p (Holm) |", "|---|---|---|---|---|---|"] + [
        f"| {p['a']} vs {p['b']} | {where(p)} | {p['episodes']} | +{p['won']} / −{p['lost']} | {p['p_value']:.3f} | "
        f"{p['p_holm']:.3f} |" for p in pairs]


def summary_phase(cfg: DelayBenchConfig) -> dict:
    """The ``report`` JSONs of ``tasks`` for the sampler ``label`` (or preset): success per join and
    d on each task, and every two joins compared over all tasks and delays d > 0 at once."""
    out = Path(cfg.out)
    missing = [t for t in cfg.tasks if not (out / f"delay-{t}.json").is_file()]
    if missing:
        raise SystemExit(f"no report for {missing} in {out}; run phase=report task=<task> first")
    points = {t: {(p["method"], p["delay"]): p for p in json.loads((out / f"delay-{t}.json").read_text())["points"]
                  if p["sampler"] == cfg.sampler_label} for t in cfg.tasks}
    keys = sorted({k for ps in points.values() for k in ps}, key=lambda k: (_join_order(k[0]), k[0], k[1]))
    rows = [{"method": m, "delay": d, "tasks": {t: None if (m, d) not in points[t] else
                                                {"pc_success": points[t][m, d]["pc_success"], "n_episodes": points[t][m, d]["n_episodes"]}
                                                for t in cfg.tasks}} for m, d in keys]
    methods = [m for m in JOIN_METHODS if any(k[0] == m for k in keys)]  # the plain joins, at s = Ta
    pairs = [pooled_pair(a, b, {f"{t} d={d}": (p, ps[b, d]) for t, ps in points.items() for (m, d), p in ps.items()
                                 if m == a and d > 0 and (b, d) in ps})
             for i, a in enumerate(methods) for b in methods[i + 1:]]
    pairs = with_holm([p for p in pairs if p is not None])
    result = {"sampler": cfg.sampler_label, "tasks": list(cfg.tasks), "rows": rows, "pairs": pairs}
    suffix = "" if cfg.sampler_label == "picard" else f"-{cfg.sampler_label}"  # the preset the README quotes: no suffix
    return write_report(out / f"delay-summary{suffix}", result, summary_markdown, None)


def policies_phase(cfg: DelayBenchConfig) -> dict:
    """Two policies' delay points side by side over ``tasks`` (see the module docstring)."""
    out = Path(cfg.out)
    missing = [t for t in cfg.tasks if not (out / f"delay-{t}.json").is_file()]
    if missing:
        raise SystemExit(f"no report for {missing} in {out}; run phase=report task=<task> first")
    label, base = cfg.sampler_label, cfg.baseline
    points = {t: json.loads((out / f"delay-{t}.json").read_text())["points"] for t in cfg.tasks}
    mine = {t: {(p["method"], p["delay"]): p for p in ps if p["sampler"] == label} for t, ps in points.items()}
    theirs = {t: {(p["method"], p["delay"]): p for p in ps if p["sampler"] == base and p["method"] in ("naive", "hard")}
              for t, ps in points.items()}
    rows = []
    for t in cfg.tasks:
        for who, table in ((label, mine[t]), (base, theirs[t])):
            for (method, d), p in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                d0 = table.get((method, 0)) or table.get(("naive", 0))
                rows.append({"task": t, "policy": who, "method": method, "delay": d, "n_episodes": p["n_episodes"],
                             "pc_success": p["pc_success"], "pc_success_se": p["pc_success_se"],
                             "minus_d0": None if d0 is None or d == 0 else p["pc_success"] - d0["pc_success"]})
    pairs = []
    for m in sorted({m for t in mine for m, _ in mine[t]}, key=_join_order):
        for b in ("naive", "hard"):
            pairs.append(pooled_pair(f"{label} {m}", f"{base} {b}", {
                f"{t} d={d}": (p, theirs[t][b, d]) for t in cfg.tasks for (method, d), p in mine[t].items()
                if method == m and d > 0 and (b, d) in theirs[t]}))
        # d = 0: does conditioning cost anything without delay?
        pairs.append(pooled_pair(f"{label} {m}", f"{base} naive", {
            f"{t} d=0": (mine[t][m, 0], theirs[t]["naive", 0]) for t in cfg.tasks if (m, 0) in mine[t] and ("naive", 0) in theirs[t]}))
    pairs = with_holm([p for p in pairs if p is not None])
    result = {"policy": label, "baseline": base, "tasks": list(cfg.tasks), "rows": rows, "pairs": pairs}
    return write_report(out / f"delay-policies-{label}", result, policies_markdown, policies_plot)


def policies_markdown(result: dict) -> str:
    lines = [f"# Success against simulated delay: `{result['policy']}` and `{result['baseline']}`\n",
             "Per task, success % ± SE per join and delay d (ticks; a call every Ta ticks), and its change from the same "
             "policy's d = 0 (for `naive`/`hard` of the baseline: from its naive d = 0, which is fast mode). Below, the "
             "policy's join against each of the baseline's, pooled over every (task, d > 0) where both ran on the same seeds "
             "(and separately at d = 0): episodes won / lost, the exact McNemar p-value, Holm-adjusted over the rows.\n",
             "| task | policy | join | d | episodes | success % | vs its d = 0 |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        delta = "" if r["minus_d0"] is None else f"{r['minus_d0']:+.0f}"
        lines.append(f"| {r['task']} | {r['policy']} | {r['method']} | {r['delay']} | {r['n_episodes']} | "
                     f"{r['pc_success']:.0f} ± {r['pc_success_se']:.0f} | {delta} |")
    lines += pairs_table(result["pairs"], lambda p: ", ".join(p["points"]))
    return "\n".join(lines) + "\n"


def policies_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        curves: dict = {}
        for r in result["rows"]:
            if r["task"] == task:
                curves.setdefault((r["policy"], r["method"]), []).append(r)
        for (policy, method), rs in curves.items():
            rs = sorted(rs, key=lambda r: r["delay"])
            ax.errorbar([r["delay"] for r in rs], [r["pc_success"] for r in rs], yerr=[r["pc_success_se"] for r in rs],
                        marker="o", capsize=3, label=f"{policy} {method}")
        ax.set_title(task)
        ax.set_xlabel("delay d (ticks)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success %")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _join_order(method: str) -> int:
    return JOIN_METHODS.index(method.split("-")[0])


def summary_markdown(result: dict) -> str:
    tasks = result["tasks"]
    lines = [f"# Success against simulated delay, all tasks: {result['sampler']}\n",
             "Success % (episodes) per join and delay d (ticks), a call every Ta ticks unless the join says "
             "otherwise; per task `delay-<task>.md` has intervals and paired counts. Below, every two joins over "
             "all (task, d > 0) points where both ran, on their shared seeds: episodes the first wins / loses, the "
             "exact McNemar p-value and that p adjusted over the pairs (Holm).\n",
             "| join | d | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for r in result["rows"]:
        cells = ["" if c is None else f"{c['pc_success']:.0f} ({c['n_episodes']})" for c in (r["tasks"][t] for t in tasks)]
        lines.append(f"| {r['method']} | {r['delay']} | " + " | ".join(cells) + " |")
    lines += pairs_table(result["pairs"], lambda p: len(p["points"]))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig, ax = new_success_plot()
    curves: dict[tuple[str, str], list[dict]] = {}
    for p in result["points"]:
        curves.setdefault((p["sampler"], p["method"]), []).append(p)
    for (sampler, method), pts in curves.items():
        pts = sorted(pts, key=lambda p: p["delay"])
        ax.errorbar([p["delay"] + 0.04 * len(ax.lines) for p in pts], [p["pc_success"] for p in pts],
                    yerr=[p["pc_success_se"] for p in pts], marker="o", capsize=3, label=f"{sampler}, {method}")
    finish_success_plot(fig, ax, path, "inference delay d (control ticks)", f"{result['task']}: success against simulated delay")


def main(argv: list[str]):
    cfg = from_argv(DelayBenchConfig, argv)
    print(json.dumps({"cpu": cpu_model(), "versions": versions()}), flush=True)
    return {"success": success_phase, "report": report_phase, "cost": cost_phase, "summary": summary_phase,
            "policies": policies_phase}[cfg.phase](cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
