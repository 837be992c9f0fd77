"""Checkpoints: ``model.safetensors`` (weights and normaliser statistics) + ``config.json``.

No pickle is ever unpickled by :func:`load_policy`: ours are safetensors + JSON, LeRobot folders
too, and a diffusion_policy ``.ckpt`` is read by :mod:`paradiffpolicy.interop.safe_pickle`, which
rebuilds only inert data and refuses any other global the file names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from paradiffpolicy.backends import check_backend
from paradiffpolicy.config import PolicyConfig, SamplerConfig, from_dict, to_dict
from paradiffpolicy.errors import CheckpointError

__all__ = ["CheckpointError", "build_policy", "load_policy", "read_config", "save_policy"]

FORMAT = "paradiffpolicy/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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
    if weights_dtype == "float16":  # the networks; normaliser statistics and the keypoint grid stay float32
        net = ("model.", "obs_encoder.rgb_encoders.")
        tensors = {k: v.half() if k.startswith(net) and v.is_floating_point() and not k.endswith("pos_grid") else v
                   for k, v in tensors.items()}
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
        cfg.require_dims()
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, doc.get("metadata", {})


def load_policy(path: str | os.PathLike, sampler: SamplerConfig | str | None = None, device: str | torch.device = "cpu",
                backend: str | None = None):
    """Load a policy from ``path``, whichever of the three formats it holds (chosen by content):

    * ours (a directory with ``config.json`` of format ``paradiffpolicy/1`` and ``model.safetensors``);
    * a LeRobot diffusion policy (``save_pretrained`` folder: ``config.json`` with ``"type": "diffusion"``);
    * a diffusion_policy workspace checkpoint (a ``.ckpt`` file; read without unpickling any code).

    ``sampler``: a :class:`SamplerConfig`, or ``"tuned"`` (or ``SamplerConfig(name="tuned")``) for
    the settings ``python -m paradiffpolicy.tune`` saved beside the checkpoint.
    ``backend``: how the networks run (:mod:`paradiffpolicy.backends`); default ``eager``, or the
    backend the tuned preset was timed on.
    Errors name the file, the format detected and what does not match or is unsupported.
    """
    from paradiffpolicy.interop import detect_format, load_foreign

    path = Path(path)
    if backend is not None:
        check_backend(backend)
    fmt = detect_format(path)
    if sampler == "tuned" or (isinstance(sampler, SamplerConfig) and sampler.name == "tuned"):
        from paradiffpolicy.presets import load_tuned

        sampler, tuned_backend = load_tuned(path, sampler if isinstance(sampler, SamplerConfig) else None)
        backend = backend or tuned_backend
    elif isinstance(sampler, str):
        raise ValueError(f"sampler={sampler!r}: pass a SamplerConfig or 'tuned'")
    backend = backend or "eager"
    if fmt != "paradiffpolicy":
        cfg, tensors, metadata = load_foreign(path, fmt)
        return build_policy(cfg, tensors, metadata, sampler, device, source=str(path), backend=backend)
    cfg, metadata = read_config(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint weights {wpath} do not exist")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights {wpath} are truncated or corrupted: {e}") from None
    return build_policy(cfg, tensors, metadata, sampler, device, source=str(wpath), backend=backend)


def build_policy(cfg: PolicyConfig, tensors: dict, metadata: dict, sampler: SamplerConfig | None = None,
                 device: str | torch.device = "cpu", source: str = "checkpoint", backend: str = "eager"):
    """A policy from a config and a complete state dict: every tensor consumed, every parameter
    and buffer filled, shapes equal, values finite; errors name ``source`` and the keys."""
    from paradiffpolicy.policy import DiffusionPolicy, upgrade_legacy_keys

    wpath = source
    tensors = upgrade_legacy_keys(tensors)
    try:
        policy = DiffusionPolicy(cfg, sampler, backend=backend)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
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
    policy.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    policy.metadata = dict(metadata)
    return policy.to(device).eval()
