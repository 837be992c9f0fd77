"""Find the fastest Picard setting that keeps a deviation budget, on this machine, for a checkpoint.

    python -m paradiffpolicy.tune checkpoint=checkpoints/lift max_dev=1e-2
    python -m paradiffpolicy.tune checkpoint=... scheduler=ddim num_inference_steps=16 device=cuda

The best window and tolerance depend on what a batched network call costs here (on a small CPU a
batch of 8 costs several batch-1 calls, on a GPU about one), so they are measured, not assumed:

1. **Cost of a batched call**: the network's latency against batch size, per backend, and the
   sampler loop's own cost per iteration.
2. **Deviation and iterations**: on real observation windows (the sample shipped with the
   checkpoint, or a zarr store), split into a tuning half and a held-out half. For each window,
   init and Anderson memory, tolerances are tried from the loosest down; the first whose executed
   chunk stays within ``margin * max_dev`` of the sequential sample (same noise) for ``coverage``
   of the tuning samples is that combination's candidate (the margin because the deviation is
   heavy-tailed: a setting right at the budget on some samples exceeds it on others). Its batch-1 latency is predicted from its
   iterations and windows with the cost curve.
3. **Verification**: the fastest predicted candidates, and the README's preset for this budget,
   are timed at batch 1, interleaved with the sequential sampler on the same backend; the fastest
   measured wins (the sequential sampler itself when no Picard setting beats it here). Its
   deviation is then checked on the held-out half it was not tuned on.

Writes ``sampler_tuned.json`` beside the checkpoint (``sampler=tuned`` reads it) and
``tune_report.json`` into the run directory. Scheduler and step count are held as given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from paradiffpolicy.checkpoint import load_policy
from paradiffpolicy.backends import BACKENDS, EXPORTED, FLOAT32, available_backends, check_backend
from paradiffpolicy.measure import interleaved, max_abs_deviation, network_costs, provenance, ratios
from paradiffpolicy.config import INITS, UPDATES, SamplerConfig, require_list
from paradiffpolicy.data.obs_sample import load_observation_sample
from paradiffpolicy.presets import sampler_preset, save_tuned
from paradiffpolicy.runtime import cpu_model, exit_on_bad_input, resolve_device, run_dir, versions
from paradiffpolicy.sampling import PicardSampler, draw_noise

log = logging.getLogger(__name__)

# tolerance grids, loosest first: DDPM's τ is relative to the injected noise σ_k, the ODE samplers'
# an absolute RMS change in normalised action units (see sampling/picard.py)
TOLS_STOCHASTIC = [0.3, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001]
TOLS_ODE = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4]


@dataclass
class TuneConfig:
    checkpoint: str = "checkpoints/lift"
    max_dev: float = 1e-2  # largest |chunk - sequential chunk| (normalised units) allowed ...
    coverage: float = 0.99  # ... for this fraction of samples
    # tuning asks for max_dev * margin: the deviation is heavy-tailed, and a setting right at the
    # budget on the tuning samples tends to exceed it on others
    margin: float = 0.5
    scheduler: Optional[str] = None  # held fixed; None: the checkpoint's
    num_inference_steps: Optional[int] = None
    windows: List[int] = field(default_factory=lambda: [4, 8, 12, 16, 24, 32])
    tols: List[float] = field(default_factory=list)  # default: TOLS_STOCHASTIC or TOLS_ODE
    inits: List[str] = field(default_factory=lambda: ["rollout", "copy"])
    andersons: List[int] = field(default_factory=lambda: [0])
    updates: List[str] = field(default_factory=lambda: ["picard", "frozen_x0"])  # Picard's window update
    # network backends searched; []: jit and every installed float32 exported runtime on a CPU, eager and
    # jit on a GPU (paradiffpolicy.backends)
    backends: List[str] = field(default_factory=list)
    batch_sizes: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    observations: str = ""  # "": the sample shipped with the checkpoint; or a zarr store (its "obs")
    tune_samples: int = 128  # observation windows tuned on; as many others are held out
    verify_top: int = 3  # candidates timed (besides the README preset)
    trials: int = 20
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    write: bool = True  # save the chosen setting beside the checkpoint
    output_dir: str = ""  # default: the Hydra run directory
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.max_dev > 0:
            raise ValueError(f"max_dev={self.max_dev} must be > 0")
        if not 0 < self.coverage <= 1:
            raise ValueError(f"coverage={self.coverage} must be in (0, 1]")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin={self.margin} must be in (0, 1]")
        for key in ("windows", "batch_sizes"):
            require_list(self, key, 1)
        if any(not t > 0 for t in self.tols):
            raise ValueError(f"tols={list(self.tols)} must be > 0 (tol=0 is the exact, slowest setting)")
        bad = [i for i in self.inits if i not in INITS] + [b for b in self.backends if b not in BACKENDS]
        if bad or not self.inits:
            raise ValueError(f"inits={list(self.inits)} / backends={list(self.backends)}: expected some of {INITS} / {BACKENDS}")
        if not self.updates or any(u not in UPDATES for u in self.updates):
            raise ValueError(f"updates={list(self.updates)}: expected a non-empty list of {UPDATES}")
        for b in self.backends:
            check_backend(b, key="backends")
        if not self.backends:
            on_cpu = resolve_device(self.device).type == "cpu"
            cpu = ("jit", *(b for b in EXPORTED if b in FLOAT32))  # bf16 changes the sample: only when asked for
            self.backends = [b for b in available_backends() if b in (cpu if on_cpu else ("eager", "jit"))]
        for key in ("tune_samples", "verify_top", "trials", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        resolve_device(self.device)


ConfigStore.instance().store(name="tune_schema", node=TuneConfig)


@dataclass
class Candidate:
    sampler: SamplerConfig
    tune_dev_max: float
    tune_over: int
    iterations: float  # mean over the tuning samples
    rows_per_iteration: float
    predicted_ms: float = 0.0
    label: str = ""
    backend: str = "eager"


def load_windows(cfg: TuneConfig, policy) -> tuple[dict[str, torch.Tensor], str]:
    if cfg.observations:
        from paradiffpolicy.data.replay_buffer import ReplayBuffer

        if len(policy.features) != 1 or policy.features[0].is_image:
            raise ValueError(f"observations={cfg.observations}: a zarr store feeds single low-dim policies; this one reads "
                             f"{[f.name for f in policy.features]}")
        buf = ReplayBuffer.open(cfg.observations)
        obs, ends = np.asarray(buf["obs"], dtype=np.float32), buf.episode_ends
        to = policy.config.n_obs_steps
        starts = [t for s, e in zip(np.concatenate([[0], ends[:-1]]), ends) for t in range(int(s), int(e) - to + 1)]
        pick = np.random.default_rng(cfg.seed).choice(len(starts), size=min(2 * cfg.tune_samples, len(starts)), replace=False)
        windows = np.stack([obs[starts[i] : starts[i] + to] for i in pick])
        return {policy.features[0].name: torch.from_numpy(windows)}, f"{len(windows)} windows from {cfg.observations}"
    sample = load_observation_sample(cfg.checkpoint)
    if sample is None:
        raise ValueError(f"{cfg.checkpoint} ships no observation sample (observations.safetensors); pass observations=<zarr>")
    windows, source = sample
    return windows, f"shipped sample: {source.get('source', '?')}"


def split(windows: dict[str, torch.Tensor], n_tune: int, seed: int):
    k = next(iter(windows.values())).shape[0]
    if k < 2:
        raise ValueError(f"need at least 2 observation windows (tuning and held out), got {k}")
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    n_tune = min(n_tune, k // 2)
    tune_idx, held_idx = perm[:n_tune], perm[n_tune : 2 * n_tune]
    return {f: v[tune_idx] for f, v in windows.items()}, {f: v[held_idx] for f, v in windows.items()}


def batch_costs(cfg: TuneConfig, policy, cond: torch.Tensor, sync) -> dict[str, dict[int, float]]:
    """Median milliseconds of one network call at each batch size, per backend."""
    costs = network_costs(policy, list(cfg.backends), list(cfg.batch_sizes), cond, trials=7, warmup=1, sync=sync, seed=cfg.seed)
    return {b: {n: c["p50"] for n, c in by_size.items()} for b, by_size in costs.items()}


def loop_overhead_ms(table, shape: tuple[int, int], device) -> float:
    """The Picard loop's own cost per iteration (a network that costs nothing), batch 1, samples
    of ``shape`` (T, Da)."""
    def free(sample, timestep, global_cond=None):
        return torch.zeros_like(sample)

    sampler = PicardSampler(table, window=8, tol=0.0)
    noise = draw_noise((1, *shape), table.num_steps, torch.Generator().manual_seed(0)).to(device)
    ms = interleaved({"loop": lambda _: sampler.sample(free, noise)}, trials=5, warmup=1)["loop"]
    return float(np.median(ms)) / table.num_steps


def estimate_minutes(cfg: TuneConfig, costs: dict[str, dict[int, float]], n_tune: int, n: int, settings: int, tols: int) -> float:
    """Rough wall time of the search and the timing, from the measured cost curve (the eager
    network's largest batch, scaled linearly in rows): the sequential reference at ``n_tune`` rows,
    about three tolerances per setting at ~2N/p iterations of ``n_tune * p`` rows, and ``trials``
    batch-1 calls of each timed sampler."""
    curve = costs.get("eager") or next(iter(costs.values()))
    biggest = max(curve)
    per_row = curve[biggest] / biggest
    windows = sorted(set(cfg.windows))
    search = n * n_tune * per_row + sum(min(3, tols) * (2 * n / p) * n_tune * p * per_row for p in windows) * settings / len(windows)
    fastest_single = min(c[1] if 1 in c else min(c.values()) for c in costs.values())
    timing = cfg.trials * (len(cfg.backends) + cfg.verify_top + 1) * n * fastest_single
    return (search + timing) / 60000.0


def predict_ms(cost: dict[int, float], overhead: float, iterations: float, rows: float) -> float:
    """Batch-1 latency of ``iterations`` network calls of ``rows`` rows each (cost interpolated
    in the batch size) plus the loop's own cost."""
    sizes = sorted(cost)
    per_call = float(np.interp(rows, sizes, [cost[s] for s in sizes]))
    return iterations * (per_call + overhead)


def deviation(a, b) -> torch.Tensor:
    """Per sample: the largest |a - b| over the executed chunks of two PolicyOutputs (normalised units)."""
    return max_abs_deviation(a.actions_normalized, b.actions_normalized)


def run_tune(cfg: TuneConfig, out_dir: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fixed = dict(scheduler=cfg.scheduler, num_inference_steps=cfg.num_inference_steps)
    base = load_policy(cfg.checkpoint, sampler=SamplerConfig(name="sequential", **fixed), device=device)
    windows, obs_source = load_windows(cfg, base)
    tune_obs, held_obs = split(windows, cfg.tune_samples, cfg.seed)
    table = base.sampler.table
    stochastic = bool(table.stochastic)
    tols = sorted(cfg.tols or (TOLS_STOCHASTIC if stochastic else TOLS_ODE), reverse=True)
    combos = [(w, i, m, u) for w in sorted(set(cfg.windows)) for i in cfg.inits for m in cfg.andersons for u in cfg.updates]
    bar = tqdm(total=2 + len(combos) + cfg.trials + 1, desc="tune", disable=not cfg.progress)

    # 1. what a batched call costs here
    cond_tune = base.encode_observation({f: v.to(device) for f, v in tune_obs.items()})
    costs = batch_costs(cfg, base, cond_tune, sync)
    overhead = loop_overhead_ms(table, (base.config.horizon, base.config.action_dim), device)
    bar.update(1)
    estimate = estimate_minutes(cfg, costs, cond_tune.shape[0], table.num_steps, len(combos), len(tols))
    bar.write(f"tune: about {estimate:.0f} min more on this machine (estimated from the cost curve; "
              f"{len(combos)} settings x up to {len(tols)} tolerances on {cond_tune.shape[0]} samples, {cfg.trials} timing trials)")

    # 2. deviation and iterations on the tuning half, the same noise for every setting
    n_tune = cond_tune.shape[0]
    noise = base.draw_noise(n_tune, torch.Generator().manual_seed(cfg.seed))
    ref = base.sample_from_condition(cond_tune, noise=noise)
    allowed = int(np.floor((1 - cfg.coverage) * n_tune + 1e-9))
    bar.update(1)
    candidates: list[Candidate] = []
    tried = []
    for window, init, anderson, update in combos:
        for tol in tols:
            scfg = SamplerConfig(name="picard", window=window, tol=tol, init=init, anderson=anderson, update=update, **fixed)
            out = base.sample_from_condition(cond_tune, noise=noise, sampler=base.make_sampler(scfg))
            dev = deviation(out, ref)
            over = int((dev > cfg.max_dev * cfg.margin).sum())
            iters = float(out.stats.iterations.float().mean())
            rows = float((out.stats.nfe.float() / out.stats.iterations.float()).mean())
            tried.append({"window": window, "tol": tol, "init": init, "anderson": anderson, "update": update, "over": over,
                          "dev_max": float(dev.max()), "iterations": iters})
            if over <= allowed:
                candidates.append(Candidate(scfg, float(dev.max()), over, iters, rows))
                break
        bar.update(1)
    if not candidates:
        raise ValueError(f"no setting keeps margin*max_dev={cfg.margin * cfg.max_dev:g} for {cfg.coverage:.0%} of {n_tune} samples; "
                         f"add smaller tols (tried down to {tols[-1]}) or use the sequential sampler")
    ranked = []
    for cand in candidates:
        for backend in cfg.backends:
            c = dataclasses.replace(cand, backend=backend)
            c.predicted_ms = predict_ms(costs[backend], overhead, c.iterations, c.rows_per_iteration)
            ranked.append(c)
    ranked.sort(key=lambda c: c.predicted_ms)
    verify = ranked[: cfg.verify_top]
    for v in verify:
        v.label = (f"p={v.sampler.window} τ={v.sampler.tol:g} {v.sampler.init}" + (f" aa{v.sampler.anderson}" if v.sampler.anderson else "")
                   + (f" {v.sampler.update}" if v.sampler.update != "picard" else "") + f" {v.backend}")
    preset = readme_preset(cfg, stochastic, fixed)
    if preset is not None:
        pbackend = verify[0].backend  # the preset on the same backend as the best candidate
        verify.append(Candidate(preset, float("nan"), -1, float("nan"), float("nan"), predicted_ms=float("nan"),
                                label=f"README preset p={preset.window} τ={preset.tol:g} {pbackend}", backend=pbackend))

    # 3. batch-1 timing on held-out observations, interleaved with the same-backend sequential sampler
    samplers = {v.label: (v.backend, base.make_sampler(v.sampler, v.backend)) for v in verify}
    for backend in cfg.backends:  # every backend's sequential sampler: the fastest is the reference users would pick
        samplers[f"sequential {backend}"] = (backend, base.make_sampler(base.sampler_config, backend))
    for backend, s in samplers.values():
        base.warm_up(1, s, backend)
    held_cond = base.encode_observation({f: v.to(device) for f, v in held_obs.items()})
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    draws = [(int(torch.randint(held_cond.shape[0], (1,), generator=gen)), base.draw_noise(1, gen)) for _ in range(cfg.trials)]

    def timed_call(backend, s):
        def call(trial: int):
            i, nz = draws[trial]
            base.sample_from_condition(held_cond[i : i + 1], noise=nz, sampler=s, backend=backend)
        return call

    lat = interleaved({name: timed_call(*bs) for name, bs in samplers.items()}, cfg.trials, warmup=0, sync=sync)
    bar.update(cfg.trials)
    fastest = min((f"sequential {b}" for b in cfg.backends), key=lambda n: np.median(lat[n]))
    timed = []
    for v in verify:
        seq = lat[f"sequential {v.backend}"]
        timed.append({"label": v.label, "sampler": dataclasses.asdict(v.sampler), "backend": v.backend, "predicted_ms": v.predicted_ms,
                      "latency_ms": {"p50": float(np.median(lat[v.label])), "p95": float(np.percentile(lat[v.label], 95))},
                      "speedup_vs_sequential_same_backend": {"reference": f"sequential, backend={v.backend}", **_ratio(seq, lat[v.label])},
                      "speedup_vs_fastest_sequential": {"reference": fastest, **_ratio(lat[fastest], lat[v.label])},
                      "tune_dev_max": v.tune_dev_max, "tune_over": v.tune_over})
    eligible = [t for t in timed if not t["label"].startswith("README") or meets(base, t, cond_tune, noise, ref, cfg, allowed)]
    for backend in cfg.backends:  # the sequential sampler is a candidate too (deviation 0)
        name = f"sequential {backend}"
        seq_cfg = dataclasses.asdict(base.sampler_config)
        eligible.append({"label": name, "sampler": seq_cfg, "backend": backend, "predicted_ms": float("nan"),
                         "latency_ms": {"p50": float(np.median(lat[name])), "p95": float(np.percentile(lat[name], 95))},
                         "speedup_vs_sequential_same_backend": {"reference": f"sequential, backend={backend}", "median": 1.0,
                                                                "p5_p95": [1.0, 1.0]},
                         "speedup_vs_fastest_sequential": {"reference": fastest, **_ratio(lat[fastest], lat[name])},
                         "tune_dev_max": 0.0, "tune_over": 0})
        timed.append(eligible[-1])
    best = min(eligible, key=lambda t: t["latency_ms"]["p50"])
    chosen = SamplerConfig(**best["sampler"])
    chosen_backend = best["backend"]

    # 4. the chosen setting on the held-out half it was not tuned on
    held_noise = base.draw_noise(held_cond.shape[0], torch.Generator().manual_seed(cfg.seed + 2))
    held_ref = base.sample_from_condition(held_cond, noise=held_noise)
    held_dev = deviation(base.sample_from_condition(held_cond, noise=held_noise, sampler=base.make_sampler(chosen)), held_ref)
    bar.update(1)
    bar.close()
    held = {"samples": int(held_dev.numel()), "max": float(held_dev.max()), "over": int((held_dev > cfg.max_dev).sum()),
            "fraction_within": float((held_dev <= cfg.max_dev).float().mean())}
    report = {
        "checkpoint": cfg.checkpoint, "max_dev": cfg.max_dev, "coverage": cfg.coverage, "margin": cfg.margin,
        "chosen": dataclasses.asdict(chosen), "chosen_backend": chosen_backend,
        "chosen_label": best["label"], "speedup": best["speedup_vs_sequential_same_backend"], "latency_ms": best["latency_ms"],
        "speedup_vs_fastest_sequential": best["speedup_vs_fastest_sequential"],
        "held_out": {**held, "meets_budget": held["fraction_within"] >= cfg.coverage},
        "observations": obs_source, "tune_samples": n_tune, "held_out_samples": int(held_cond.shape[0]),
        "batch_cost_ms": costs, "loop_overhead_ms_per_iteration": overhead, "timed": timed, "tried": tried,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(), "cpu": cpu_model(),
        "threads": cfg.threads, "versions": versions(), "trials": cfg.trials,
        "provenance": provenance(cfg.threads, str(device), list(cfg.backends)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune_report.json").write_text(json.dumps(report, indent=2))
    if cfg.write:
        keep = {k: report[k] for k in ("max_dev", "coverage", "margin", "speedup", "latency_ms", "held_out", "observations", "device", "cpu", "threads")}
        report["written"] = str(save_tuned(cfg.checkpoint, chosen, chosen_backend, {"tuned_on": keep}))
    print(summary(report))
    return report


def meets(policy, timed_row: dict, cond, noise, ref, cfg: TuneConfig, allowed: int) -> bool:
    """Whether a setting (the README preset) keeps the tuning budget (``margin * max_dev``)."""
    s = SamplerConfig(**timed_row["sampler"])
    dev = deviation(policy.sample_from_condition(cond, noise=noise, sampler=policy.make_sampler(s)), ref)
    timed_row["tune_dev_max"], timed_row["tune_over"] = float(dev.max()), int((dev > cfg.max_dev * cfg.margin).sum())
    return timed_row["tune_over"] <= allowed


def _ratio(reference: list[float], candidate: list[float]) -> dict:
    """Per-trial reference / candidate latency: median and p5-p95."""
    r = ratios(reference, candidate)
    return {"median": r["p50"], "p5_p95": [r["p5"], r["p95"]]}


def readme_preset(cfg: TuneConfig, stochastic: bool, fixed: dict) -> SamplerConfig | None:
    """The hand-picked setting the README recommends for agreement with the sequential sample
    (DDPM: p=8, τ=0.005; the ODE samplers: the paraddim preset, p=4, τ=1e-3)."""
    if stochastic:
        return SamplerConfig(name="picard", window=8, tol=0.005, **fixed)
    paraddim = sampler_preset("paraddim")
    return SamplerConfig(name="picard", window=paraddim.window, tol=paraddim.tol, **fixed)


def summary(report: dict) -> str:
    lines = [f"tuned {report['checkpoint']} for max_dev={report['max_dev']:g} (tuning at {report['margin']:g}x that) "
             f"on {report['tune_samples']} samples "
             f"({report['observations']}); {report['device']} ({report['cpu']}), {report['threads']} threads",
             "| setting | predicted ms | latency p50 ms | p95 ms | speed-up vs sequential, same backend (p5-p95) | "
             f"vs the fastest sequential ({report['speedup_vs_fastest_sequential']['reference']}) | tuning max dev |",
             "|---|---|---|---|---|---|---|"]
    for t in report["timed"]:
        s, f = t["speedup_vs_sequential_same_backend"], t["speedup_vs_fastest_sequential"]
        pred = "" if t["predicted_ms"] != t["predicted_ms"] else f"{t['predicted_ms']:.0f}"
        lines.append(f"| {t['label']} | {pred} | {t['latency_ms']['p50']:.0f} | {t['latency_ms']['p95']:.0f} | "
                     f"{s['median']:.2f}x ({s['p5_p95'][0]:.2f}-{s['p5_p95'][1]:.2f}) | {f['median']:.2f}x | {t['tune_dev_max']:.1e} |")
    h = report["held_out"]
    lines.append(f"chosen: {report['chosen_label']}; held out: {h['over']} of {h['samples']} samples over {report['max_dev']:g} "
                 f"(max {h['max']:.1e}) → {'meets' if h['meets_budget'] else 'MISSES'} the budget"
                 + (f"; written to {report['written']}" if report.get("written") else ""))
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="tune", version_base="1.3")
def main(cfg) -> None:
    with exit_on_bad_input():
        obj: TuneConfig = OmegaConf.to_object(cfg)
        run_tune(obj, run_dir(obj.output_dir))


if __name__ == "__main__":
    main()
