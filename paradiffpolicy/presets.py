"""Sampler settings tuned for a checkpoint on a machine, saved beside the checkpoint.

``python -m paradiffpolicy.tune`` writes ``sampler_tuned.json`` into the checkpoint's directory (for
a diffusion_policy ``.ckpt`` file: ``<file>.sampler_tuned.json`` beside it); ``sampler=tuned`` in
eval and ``load_policy(path, sampler="tuned")`` read it back. The file also records the deviation
budget, the machine and what was measured, so a preset tuned elsewhere is recognisable as such.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from paradiffpolicy.backends import check_backend
from paradiffpolicy.config import SamplerConfig, from_dict
from paradiffpolicy.runtime import REPO_ROOT

FILENAME = "sampler_tuned.json"
CONF = REPO_ROOT / "conf" / "sampler"


def sampler_preset(name: str, **overrides) -> SamplerConfig:
    """A preset of ``conf/sampler/<name>.yaml`` (what ``sampler=<name>`` selects; the one place the
    presets' numbers live), with ``overrides``."""
    path = CONF / f"{name}.yaml"
    if not path.is_file() or name == "tuned":
        raise ValueError(f"sampler preset {name!r} is not in {CONF}; expected one of "
                         f"{sorted(p.stem for p in CONF.glob('*.yaml') if p.stem != 'tuned')}")
    settings = yaml.safe_load(path.read_text()) or {}
    return from_dict(SamplerConfig, {**settings, **overrides}, name=f"sampler preset {path}")


# named sampler settings: what a user would pick instead of (or as) Picard, all from the same
# DDPM-100-trained network (the frontier benchmark's settings, the samplers a server may offer)
SETTINGS: dict[str, dict] = {
    "ddpm100": dict(name="sequential"),
    "ddim8": dict(name="sequential", scheduler="ddim", num_inference_steps=8),
    "ddim10": dict(name="sequential", scheduler="ddim", num_inference_steps=10),
    "ddim16": dict(name="sequential", scheduler="ddim", num_inference_steps=16),
    "dpmsolver10": dict(name="sequential", scheduler="dpmsolver++", num_inference_steps=10),
    "picard-p16-tol0.1": dict(preset="picard"),  # conf/sampler/picard.yaml
    "picard-p8-tol0.005": dict(name="picard", window=8, tol=0.005),
    "paraddim10-p4": dict(preset="paraddim", num_inference_steps=10),
    "paraddim16-p4": dict(preset="paraddim"),  # conf/sampler/paraddim.yaml
}
LABELS = {
    "ddpm100": "sequential DDPM-100", "ddim8": "sequential DDIM-8", "ddim10": "sequential DDIM-10",
    "ddim16": "sequential DDIM-16", "dpmsolver10": "sequential DPM-Solver++-10",
    "picard-p16-tol0.1": "Picard DDPM-100 p=16 τ=0.1", "picard-p8-tol0.005": "Picard DDPM-100 p=8 τ=0.005",
    "paraddim10-p4": "ParaDDIM-10 p=4 τ=1e-3", "paraddim16-p4": "ParaDDIM-16 p=4 τ=1e-3",
}


def named_sampler(name: str, key: str = "settings") -> SamplerConfig:
    """The sampler of a named setting of :data:`SETTINGS` (a preset of ``conf/sampler/`` with
    overrides, or the settings given); ``ValueError`` naming ``key`` for an unknown name."""
    if name not in SETTINGS:
        raise ValueError(f"{key}: {name!r} is unknown; expected some of {list(SETTINGS)}")
    settings = dict(SETTINGS[name])
    preset = settings.pop("preset", None)
    return sampler_preset(preset, **settings) if preset else SamplerConfig(**settings)


def tuned_path(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return path / FILENAME if path.is_dir() else path.with_name(path.name + "." + FILENAME)


def save_tuned(checkpoint: str | Path, sampler: SamplerConfig, backend: str, report: dict) -> Path:
    path = tuned_path(checkpoint)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"sampler": dataclasses.asdict(sampler), "backend": backend, **report}, indent=2))
    tmp.replace(path)
    return path


def load_tuned(checkpoint: str | Path, requested: SamplerConfig | None = None) -> tuple[SamplerConfig, str]:
    """The tuned sampler settings of ``checkpoint`` and the backend they were timed on;
    ``warm_start`` (a closed-loop choice, not tuned) is taken from ``requested``. Files written
    before the backend became a load-time option keep it inside ``sampler``: read from there."""
    path = tuned_path(checkpoint)
    if not path.is_file():
        raise ValueError(f"sampler=tuned: {path} does not exist; run python -m paradiffpolicy.tune checkpoint={checkpoint}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"sampler=tuned: {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "sampler" not in doc:
        raise ValueError(f"sampler=tuned: {path} has no 'sampler' entry")
    settings = dict(doc["sampler"]) if isinstance(doc["sampler"], dict) else doc["sampler"]
    backend = doc.get("backend") or (settings.pop("backend", None) if isinstance(settings, dict) else None) or "eager"
    cfg = from_dict(SamplerConfig, settings, name=f"tuned sampler in {path}")
    check_backend(backend, key=f"backend in {path}")
    if cfg.name == "tuned":
        raise ValueError(f"sampler=tuned: {path} names no sampler ('tuned' refers to itself)")
    warm = requested.warm_start if requested is not None else cfg.warm_start
    return dataclasses.replace(cfg, warm_start=warm), backend
