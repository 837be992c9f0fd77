"""Checkpoints: ``model.safetensors`` (weights and normaliser statistics) + ``config.json``.

No pickle is ever loaded by :func:`load_policy`. Foreign ``.ckpt``/``.pt`` files (e.g. from
real-stanford/diffusion_policy) go through :func:`load_foreign_state_dict`, which must be called
explicitly and unpickles with ``weights_only=True`` (tensors and plain containers only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from paradiffpolicy.config import PolicyConfig, SamplerConfig, from_dict, to_dict

FORMAT = "paradiffpolicy/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match its configuration."""


def save_policy(policy, directory: str | os.PathLike, metadata: dict[str, Any] | None = None,
                weights_dtype: str = "float32") -> Path:
    """Write ``policy`` to ``directory``; files are written to temporaries and renamed, so an
    interrupted save never leaves a half-written checkpoint under the final names.

    ``weights_dtype="float16"`` halves the file (network weights only; normaliser statistics stay
    float32). Loading casts back to float32, so what is evaluated is exactly what is shipped."""
    from paradiffpolicy import __version__

    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype={weights_dtype!r} must be 'float32' or 'float16'")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    if weights_dtype == "float16":
        tensors = {k: v.half() if k.startswith("model.") and v.is_floating_point() else v for k, v in tensors.items()}
    tmp_w, tmp_c = out / (WEIGHTS + ".tmp"), out / (CONFIG + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "version": __version__, "policy": to_dict(policy.config), "weights_dtype": weights_dtype,
           "metadata": metadata or {}}
    tmp_c.write_text(json.dumps(doc, indent=2))
    os.replace(tmp_w, out / WEIGHTS)
    os.replace(tmp_c, out / CONFIG)
    return out


def read_config(directory: str | os.PathLike) -> tuple[PolicyConfig, dict]:
    """(PolicyConfig, metadata) of a checkpoint directory, validated."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"checkpoint config {path} does not exist (expected {CONFIG} beside {WEIGHTS})")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"checkpoint config {path} has format {found!r}; expected {FORMAT!r}")
    try:
        cfg = from_dict(PolicyConfig, doc.get("policy"), name="checkpoint policy config")
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, doc.get("metadata", {})


def load_policy(directory: str | os.PathLike, sampler: SamplerConfig | None = None, device: str | torch.device = "cpu"):
    """Load a policy saved by :func:`save_policy`; errors name the file and the mismatching keys."""
    from paradiffpolicy.policy import DiffusionPolicy

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg, metadata = read_config(directory)
    wpath = directory / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint weights {wpath} do not exist")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights {wpath} are truncated or corrupted: {e}") from None
    policy = DiffusionPolicy(cfg, sampler)
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights {wpath} do not match its config (another architecture?): "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs expected {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"checkpoint weights {wpath} have wrong shapes: {'; '.join(wrong[:5])}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint weights {wpath} contain NaN/inf in {bad[:5]}")
    policy.load_state_dict(tensors)
    policy.metadata = metadata
    return policy.to(device).eval()


def load_foreign_state_dict(path: str | os.PathLike, allow: tuple[type, ...] = ()) -> dict:
    """Explicitly read a foreign PyTorch pickle (e.g. a diffusion_policy ``.ckpt``).

    Uses ``torch.load(weights_only=True)``: only tensors, primitive containers and the types in
    ``allow`` are reconstructed; anything else raises instead of running code.
    """
    with torch.serialization.safe_globals(list(allow)):
        return torch.load(path, map_location="cpu", weights_only=True)
