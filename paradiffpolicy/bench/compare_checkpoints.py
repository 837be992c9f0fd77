"""How far two checkpoints of one policy act apart, against how far the samplers we ship act apart.

    python -m paradiffpolicy.bench.compare_checkpoints a=checkpoints/pusht_image b=outputs/pusht_image_f32

Typical use: ``a`` the float16 export, ``b`` the same EMA exported in float32 (``train ...
export_dtype=float32`` on the finished run re-exports it). Both checkpoints get the same
observation windows (``a``'s shipped ``observations.safetensors``, else ``b``'s) and the same
pre-drawn noise, with sequential DDPM (the policy's own schedule). The reference scale is the
deviation the README's Picard preset (p=16, τ=0.1) makes from that sequential sample on ``b``:
a weight format that moves actions far less than a sampler whose success matches the sequential
one changes nothing that matters. Deviations are in normalised action units (the network's
[-1, 1]), over the executed chunk, per window the max over steps and action dimensions.
Writes JSON to ``out`` when given.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paradiffpolicy import SamplerConfig, load_policy
from paradiffpolicy.config import from_argv
from paradiffpolicy.data.obs_sample import load_observation_sample
from paradiffpolicy.measure import max_abs_deviation, provenance
from paradiffpolicy.presets import sampler_preset
from paradiffpolicy.runtime import cpu_model, versions


@dataclass
class CompareConfig:
    a: str = ""  # the two checkpoint directories
    b: str = ""
    out: str = ""  # a JSON report here too ("": printed only)
    windows: int = 32
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if not self.a or not self.b:
            raise ValueError("a= and b= (two checkpoint directories) are required")
        if self.windows < 1:
            raise ValueError(f"windows={self.windows} must be >= 1")


def weights_dtype(checkpoint: str) -> str:
    return json.loads((Path(checkpoint) / "config.json").read_text()).get("weights_dtype", "float32")


def summary(d: np.ndarray) -> dict:
    return {"max": float(d.max()), "p50": float(np.median(d)), "mean": float(d.mean())}


def compare(cfg: CompareConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    a, b = load_policy(cfg.a), load_policy(cfg.b)
    if a.config != b.config:
        raise SystemExit(f"{cfg.a} and {cfg.b} are different policies (configs differ); nothing to compare")
    sample = load_observation_sample(cfg.a) or load_observation_sample(cfg.b)
    if sample is None:
        raise SystemExit(f"neither {cfg.a} nor {cfg.b} has observations.safetensors; see python -m paradiffpolicy.data.make_obs_sample")
    obs_all, obs_meta = sample
    k = min(cfg.windows, next(iter(obs_all.values())).shape[0])
    sequential = SamplerConfig(name="sequential")
    picard = sampler_preset("picard")
    seq_a, seq_b, pic_b = a.make_sampler(sequential), b.make_sampler(sequential), b.make_sampler(picard)
    weights, sampler = [], []
    for i in range(k):
        obs = {f: v[i : i + 1] for f, v in obs_all.items()}
        noise = b.draw_noise(1, torch.Generator().manual_seed(cfg.seed + i), seq_b)
        ya = a.predict_action(obs, noise=noise, sampler=seq_a).actions_normalized
        yb = b.predict_action(obs, noise=noise, sampler=seq_b).actions_normalized
        yp = b.predict_action(obs, noise=noise, sampler=pic_b).actions_normalized
        weights.append(max_abs_deviation(ya, yb).numpy())  # per window, over the executed chunk
        sampler.append(max_abs_deviation(yp, yb).numpy())
    w, s = np.concatenate(weights), np.concatenate(sampler)
    return {
        "a": cfg.a, "b": cfg.b, "a_weights_dtype": weights_dtype(cfg.a), "b_weights_dtype": weights_dtype(cfg.b),
        "windows": k, "observations": obs_meta, "sampler": "sequential DDPM, same noise",
        "a_vs_b": summary(w), "picard_p16_tol0.1_vs_sequential_on_b": summary(s),
        "cpu": cpu_model(), "threads": cfg.threads, "versions": versions(), "provenance": provenance(cfg.threads),
    }


def main(argv: list[str]) -> dict:
    cfg = from_argv(CompareConfig, argv)
    result = compare(cfg)
    print(f"{result['windows']} windows, max |Δ action| (normalised units) over the executed chunk:")
    for key in ("a_vs_b", "picard_p16_tol0.1_vs_sequential_on_b"):
        r = result[key]
        print(f"  {key}: max {r['max']:.2e}, median {r['p50']:.2e}, mean {r['mean']:.2e}")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
