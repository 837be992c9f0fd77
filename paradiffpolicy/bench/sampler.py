"""Sequential vs Picard sampling latency, side by side, interleaved, in one run.

    python -m paradiffpolicy.bench.sampler checkpoint=random window=16 tol=0.1 out=benchmarks/results/cpu-2core.json
    python -m paradiffpolicy.bench.sampler checkpoint=checkpoints/lift device=cuda

Overrides are Hydra-style ``key=value`` (see ``BenchConfig``). Each trial draws a fresh observation
and noise, then times the sequential sampler and every Picard variant on exactly that input, in an
order that rotates per trial. ``speedup`` is the median of the per-trial sequential/Picard latency
ratios. ``tols=[...]`` and ``windows=[...]`` put several settings in one run. Deviation from the
sequential sample is reported per sample (median, p95, max, count over 1e-2) over the timed trials
plus ``dev_samples`` untimed observations sampled in one batch: it is heavy-tailed, and a dozen
trials can miss the few observations whose sampling dynamics amplify small errors.
``checkpoint`` is anything :func:`~paradiffpolicy.load_policy` reads (ours, a LeRobot folder, a
diffusion_policy ``.ckpt``). ``checkpoint=random`` builds an untrained policy of the given size
(``image_shape=[3,96,96]`` adds a camera through LeRobot's RGB encoder): fine for timing, not for
iteration counts (an untrained network is a harder fixed point than a trained one). The observation
encoder runs once per call and is timed on its own (``encoder_ms``); sampler latencies and
speed-ups are of the sampling that follows it, on the same conditioning.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from paradiffpolicy import DiffusionPolicy, PolicyConfig, PolicyOutput, SamplerConfig, __version__, load_policy
from paradiffpolicy.config import from_dict
from paradiffpolicy.data.obs_sample import load_observation_sample
from paradiffpolicy.features import FeatureSpec
from paradiffpolicy.measure import interleaved, max_abs_deviation, percentiles
from paradiffpolicy.sampling import SamplerNoise, draw_noise
from paradiffpolicy.models.vision import VisionConfig
from paradiffpolicy.runtime import cpu_model


@dataclass
class BenchConfig:
    checkpoint: str = "random"
    device: str = "cpu"
    threads: int = 2
    batch: int = 1
    trials: int = 20
    warmup: int = 3
    seed: int = 0
    # Picard settings; one variant per entry of ``inits`` (the first is reported as ``picard``)
    window: int = 16
    windows: List[int] = field(default_factory=list)  # several windows in one run (overrides window)
    tol: float = 0.1
    tols: List[float] = field(default_factory=list)  # several tolerances in one run (overrides tol)
    max_iters: Optional[int] = None
    inits: List[str] = field(default_factory=lambda: ["rollout"])
    andersons: List[int] = field(default_factory=lambda: [0])  # Anderson memories (0: plain Picard)
    # network backends (eager, jit); each adds a sequential-<backend> reference and Picard variants
    backends: List[str] = field(default_factory=lambda: ["eager"])
    scheduler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    # what users would run instead, timed in the same loop: sequential samplers of another scheduler
    # ("ddim:16", "dpmsolver++:10"), per backend. They compute a different sample, so no deviation.
    baselines: List[str] = field(default_factory=list)
    # size of the random policy (checkpoint=random)
    obs_dim: int = 19
    action_dim: int = 7
    down_dims: List[int] = field(default_factory=lambda: [64, 128, 256])
    diffusion_step_embed_dim: int = 64
    # checkpoint=random only: add an image feature of this (3, H, W) shape (LeRobot's RGB encoder)
    image_shape: List[int] = field(default_factory=list)
    crop_shape: List[int] = field(default_factory=lambda: [84, 84])
    machine: str = ""
    out: str = ""
    # observations: "auto" (the sample shipped with the checkpoint, else its training data when
    # present, else uniform), "sample", "dataset" or "uniform" (over the normaliser's range)
    obs: str = "auto"
    # untimed deviation check: this many extra observations (and noises), sampled in one batch by
    # the sequential sampler and every variant. The deviation is heavy-tailed (a few observations
    # sit where the sampler's dynamics amplify small errors), so a dozen timed trials can miss it.
    dev_samples: int = 64


def parse(argv: list[str]) -> BenchConfig:
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"argument {arg!r} is not key=value; keys: {[f.name for f in dataclasses.fields(BenchConfig)]}")
    try:
        dot = OmegaConf.from_dotlist(argv)
    except Exception as e:  # noqa: BLE001 - report the offending argument
        raise SystemExit(f"cannot parse overrides {argv}: {e}") from None
    try:
        return from_dict(BenchConfig, OmegaConf.to_container(dot), name="override")
    except ValueError as e:
        raise SystemExit(str(e)) from None


def build_policy(cfg: BenchConfig) -> DiffusionPolicy:
    if cfg.checkpoint == "random":
        torch.manual_seed(cfg.seed)
        extra = {}
        if cfg.image_shape:
            extra = dict(obs_dim=0, input_features=[FeatureSpec("observation.state", "state", [cfg.obs_dim], "min_max"),
                                                    FeatureSpec("observation.image", "image", list(cfg.image_shape), "mean_std")],
                         action_normalization="min_max", vision=VisionConfig(crop_shape=list(cfg.crop_shape) or None))
        pcfg = PolicyConfig(**{"obs_dim": cfg.obs_dim, "action_dim": cfg.action_dim, "down_dims": list(cfg.down_dims),
                               "diffusion_step_embed_dim": cfg.diffusion_step_embed_dim, **extra})
        return DiffusionPolicy(pcfg).to(cfg.device).eval()
    return load_policy(cfg.checkpoint, device=cfg.device)


def observation_source(cfg: BenchConfig, policy: DiffusionPolicy, gen: torch.Generator):
    """A function ``draw(batch=cfg.batch)`` returning one observation (batch, To, ...) per call;
    ``draw.kind`` says which observations they are (reported with the results)."""
    if cfg.obs not in ("auto", "sample", "dataset", "uniform"):
        raise SystemExit(f"obs={cfg.obs!r} must be auto, sample, dataset or uniform")
    pc = policy.config
    sample = None if cfg.checkpoint == "random" else load_observation_sample(cfg.checkpoint)
    if cfg.obs == "sample" and sample is None:
        raise SystemExit(f"obs=sample: {cfg.checkpoint} ships no observations.safetensors (python -m paradiffpolicy.data.make_obs_sample)")
    if cfg.obs in ("auto", "sample") and sample is not None:
        windows, source = sample

        def draw_sample(batch: int = cfg.batch):
            idx = torch.randint(next(iter(windows.values())).shape[0], (batch,), generator=gen)
            return {k: v[idx].to(policy.device) for k, v in windows.items()}

        draw_sample.kind = f"shipped sample {cfg.checkpoint}/observations.safetensors: {source.get('source', '?')}"
        return draw_sample
    dataset = policy.metadata.get("dataset", {}).get("path")
    flat = len(policy.features) == 1 and not policy.features[0].is_image
    if cfg.obs in ("auto", "dataset") and dataset and Path(dataset).exists() and flat:
        from paradiffpolicy.data.replay_buffer import ReplayBuffer

        buf = ReplayBuffer.open(dataset)
        data, ends = torch.from_numpy(np.asarray(buf["obs"], dtype=np.float32)), buf.episode_ends
        starts = np.concatenate([[0], ends[:-1]])

        def draw(batch: int = cfg.batch):
            ep = torch.randint(len(ends), (batch,), generator=gen).numpy()
            t = [int(torch.randint(int(starts[e]), int(ends[e]) - pc.n_obs_steps + 1, (1,), generator=gen)) for e in ep]
            return torch.stack([data[i : i + pc.n_obs_steps] for i in t]).to(policy.device)

        draw.kind = f"training data {dataset}"
        return draw
    if cfg.obs == "dataset":
        raise SystemExit(f"obs=dataset: the training data of {cfg.checkpoint} ({dataset}) is not here")

    def draw_uniform(batch: int = cfg.batch):
        obs = {}
        for f, norm in zip(policy.features, policy.obs_encoder.normalizers):
            unit = torch.rand(batch, pc.n_obs_steps, *f.shape, generator=gen)
            if f.is_image:
                obs[f.name] = unit
                continue
            lo_hi = norm.input_range()
            lo, hi = (-torch.ones(f.dim), torch.ones(f.dim)) if lo_hi is None else (t.cpu() for t in lo_hi)
            obs[f.name] = lo + unit * (hi - lo)
        return obs

    draw_uniform.kind = "uniform over the normaliser range (images: uniform pixels); no real observations available"
    return draw_uniform


def main(argv: list[str]) -> dict:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("device=cuda but torch.cuda.is_available() is False")
    policy = build_policy(cfg)
    common = dict(scheduler=cfg.scheduler, num_inference_steps=cfg.num_inference_steps)
    # "sequential" (eager) is the reference every speedup is measured against
    # name -> (sampler settings, network backend)
    samplers = {"sequential": (SamplerConfig(name="sequential", **common), "eager")}
    for backend in cfg.backends:
        if backend != "eager":
            samplers[f"sequential-{backend}"] = (SamplerConfig(name="sequential", **common), backend)
    for spec in cfg.baselines:
        sched, _, steps = spec.partition(":")
        if not steps.isdigit():
            raise SystemExit(f"baselines entry {spec!r} must be <scheduler>:<steps>, e.g. ddim:16")
        for backend in cfg.backends:
            samplers[f"baseline-{sched}{steps}" + (f"-{backend}" if backend != "eager" else "")] = (SamplerConfig(
                name="sequential", scheduler=sched, num_inference_steps=int(steps)), backend)
    windows = list(cfg.windows) or [cfg.window]
    tols = list(cfg.tols) or [cfg.tol]
    for window, tol, init, m, backend in itertools.product(windows, tols, cfg.inits, cfg.andersons, cfg.backends):
        name = (f"picard-{init}" + (f"-aa{m}" if m else "") + (f"-p{window}" if len(windows) > 1 else "")
                + (f"-tol{tol:g}" if len(tols) > 1 else "") + (f"-{backend}" if backend != "eager" else ""))
        samplers[name] = (SamplerConfig(name="picard", window=window, tol=tol, max_iters=cfg.max_iters,
                                        init=init, anderson=m, **common), backend)
    # one policy, its network on each backend; each sampler and backend passed per call
    built = {name: (backend, policy.make_sampler(scfg, backend)) for name, (scfg, backend) in samplers.items()}
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    pc = policy.config
    gen = torch.Generator().manual_seed(cfg.seed)
    names = list(built)
    rounds = {n: [] for n in names}
    nfe = {n: [] for n in names}
    conv = {n: [] for n in names}
    devs = {n: [] for n in names}  # per sample: largest |a - a_sequential| over the executed actions
    ratios = {n: [] for n in names if n != "sequential"}  # vs sequential on the eager backend
    same_ref = {n: "sequential" if samplers[n][1] == "eager" else f"sequential-{samplers[n][1]}" for n in names}
    same = {n: [] for n in names if not n.startswith("sequential")}  # vs sequential on the variant's own backend
    refs = [n for n in names if n.startswith("sequential-")]  # other sequential references (e.g. jit)
    ratios_ref = {(n, r): [] for n in names if not n.startswith(("sequential", "baseline-")) for r in refs}
    draw_obs = observation_source(cfg, policy, gen)
    print(f"observations: {draw_obs.kind}", file=sys.stderr)

    def run(name: str, cond: torch.Tensor, noise) -> PolicyOutput:
        """Sampler ``name`` on conditioning ``cond`` with (the first steps of) ``noise``."""
        backend, sampler = built[name]
        steps = sampler.table.num_steps  # baselines take fewer steps: the first ones of the same draw
        return policy.sample_from_condition(cond, noise=SamplerNoise(noise.initial, noise.steps[:steps]), sampler=sampler,
                                            backend=backend)

    def encode(obs) -> tuple[torch.Tensor, float]:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            cond = policy.encode_observation(obs)
        sync()
        return cond, time.perf_counter() - t0

    n_max = max(b[1].table.num_steps for b in built.values())

    def draw(batch: int):
        return draw_noise((batch, pc.horizon, pc.action_dim), n_max, gen).to(policy.device)

    enc_ms, draws = [], []
    for trial in range(cfg.warmup + cfg.trials):
        cond, t_enc = encode(draw_obs())  # the encoder runs once per call, whatever the sampler
        if trial >= cfg.warmup:
            enc_ms.append(t_enc * 1e3)
        draws.append((cond, draw(cfg.batch)))  # one draw per trial, shared by every sampler
    outputs: dict[tuple[str, int], PolicyOutput] = {}

    def timed(name: str):
        def call(trial: int):
            outputs[name, trial] = run(name, *draws[trial])
        return call

    lat = interleaved({name: timed(name) for name in names}, cfg.trials, cfg.warmup, sync)  # per trial, aligned
    for i, trial in enumerate(range(cfg.warmup, cfg.warmup + cfg.trials)):
        times = {name: lat[name][i] for name in names}
        for name in names:
            st = outputs[name, trial].stats
            rounds[name].append(st.rounds)
            nfe[name].append(float(st.nfe.float().mean()))
            conv[name].append(bool(st.converged.all()))
        for name in ratios:
            ratios[name].append(times["sequential"] / times[name])
            if not name.startswith("baseline-"):
                devs[name].extend(max_abs_deviation(outputs[name, trial].actions_normalized,
                                                    outputs["sequential", trial].actions_normalized).tolist())
        for name in same:
            same[name].append(times[same_ref[name]] / times[name])
        for name, ref in ratios_ref:
            ratios_ref[name, ref].append(times[ref] / times[name])

    if cfg.dev_samples > 0:
        cond, noise = encode(draw_obs(cfg.dev_samples))[0], draw(cfg.dev_samples)
        ref = run("sequential", cond, noise).actions_normalized
        for name in ratios:
            if not name.startswith("baseline-"):
                devs[name].extend(max_abs_deviation(run(name, cond, noise).actions_normalized, ref).tolist())

    results = {}
    for name in names:
        results[name] = {
            "settings": {**built[name][1].settings(), "backend": samplers[name][1]},
            "latency_ms": percentiles(lat[name]),
            "iterations": {"mean": float(np.mean(rounds[name])), "max": int(np.max(rounds[name]))},
            "nfe": {"mean": float(np.mean(nfe[name]))},
            "converged_fraction": float(np.mean(conv[name])),
        }
        if name in ratios:
            results[name]["speedup"] = float(np.median(ratios[name]))
            results[name]["speedup_spread"] = percentiles(ratios[name])
        if name in same:
            results[name]["speedup_same_backend"] = {"reference": same_ref[name], "median": float(np.median(same[name])),
                                                     "spread": percentiles(same[name])}
        if devs.get(name):
            d = np.asarray(devs[name])
            results[name]["max_abs_dev"] = float(d.max())
            results[name]["abs_dev"] = {"samples": len(d), "p50": float(np.median(d)), "p95": float(np.percentile(d, 95)),
                                        "over_1e-2": int((d > 1e-2).sum())}
        for ref in refs:
            if (name, ref) in ratios_ref:
                results[name].setdefault("speedup_vs", {})[ref] = float(np.median(ratios_ref[name, ref]))
    main_name = next(n for n in names if n.startswith("picard"))
    report = {
        # the headline: against the sequential sampler on the same network backend
        "speedup": results[main_name]["speedup_same_backend"]["median"],
        "speedup_reference": results[main_name]["speedup_same_backend"]["reference"],
        "max_abs_dev": results[main_name]["max_abs_dev"],
        "sequential": results["sequential"],
        "picard": results[main_name],
        "variants": {n: results[n] for n in names[1:]},
        "device": cfg.device if not cfg.device.startswith("cuda") else torch.cuda.get_device_name(),
        "machine": cfg.machine or platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "paradiffpolicy_version": __version__,
        "python": platform.python_version(),
        "num_inference_steps": built["sequential"][1].table.num_steps,
        "observations": draw_obs.kind,
        "encoder_ms": percentiles(enc_ms),
        "features": [dataclasses.asdict(f) for f in policy.features],
        "settings": dataclasses.asdict(cfg),
        "policy": {"down_dims": list(pc.down_dims), "horizon": pc.horizon, "action_dim": pc.action_dim,
                   "params_m": sum(p.numel() for p in policy.model.parameters()) / 1e6,
                   "encoder_params_m": sum(p.numel() for p in policy.obs_encoder.parameters()) / 1e6},
    }
    table = markdown(report)
    print(table)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    return report


def markdown(report: dict) -> str:
    s = report["settings"]
    enc = report.get("encoder_ms")
    encoder = (f"; observation encoder ({report['policy'].get('encoder_params_m', 0):.1f}M params) once per call: "
               f"p50 {enc['p50']:.1f} ms, p95 {enc['p95']:.1f} ms, not included in the sampler latencies below"
               if enc and report["policy"].get("encoder_params_m") else "")
    head = (f"checkpoint `{s['checkpoint']}`, U-Net {report['policy']['params_m']:.1f}M params, device {report['device']} "
            f"({report.get('cpu', 'cpu model not recorded')}), "
            f"{report['threads']} threads, batch {s['batch']}, {report['num_inference_steps']} steps, "
            f"{s['trials']} trials, torch {report['torch_version']}, observations: {report.get('observations')}{encoder}; "
            f"deviation from the sequential sample per sample over the timed trials and {s['dev_samples']} more "
            f"observations (executed actions, normalised units)\n\n")
    refs = sorted({ref for r in report["variants"].values() for ref in r.get("speedup_vs", {})})
    rows = ["| sampler | backend | window | tol | latency p50 (ms) | p95 (ms) | iterations | NFE | "
            "speed-up vs sequential, same backend (median) | vs sequential, eager | "
            + "".join(f"vs {ref} | " for ref in refs) + "dev p50 | dev p95 | max abs dev | samples over 1e-2 |",
            "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(refs) + "---|---|---|---|"]
    for name, r in [("sequential", report["sequential"]), *report["variants"].items()]:
        st = r["settings"]
        vs = "".join(f"{r['speedup_vs'][ref]:.2f}x | " if ref in r.get("speedup_vs", {}) else "- | " for ref in refs)
        d = r.get("abs_dev")
        dev = f"{d['p50']:.1e} | {d['p95']:.1e} | {r['max_abs_dev']:.1e} | {d['over_1e-2']}/{d['samples']}" if d else "- | - | - | -"
        backend = st.get("backend", "eager")
        own = r.get("speedup_same_backend")
        own_txt = f"{own['median']:.2f}x" if own else "1.00x (reference)" if name.startswith("sequential") else "-"
        eager_txt = f"{r.get('speedup', 1.0):.2f}x" + (" (cross-backend)" if backend != "eager" else "")
        rows.append(
            f"| {name} | {backend} | {st.get('window', '-')} | {st.get('tol', '-')} | {r['latency_ms']['p50']:.1f} | "
            f"{r['latency_ms']['p95']:.1f} | {r['iterations']['mean']:.1f} | {r['nfe']['mean']:.0f} | "
            f"{own_txt} | {eager_txt} | {vs}{dev} |"
        )
    return head + "\n".join(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
