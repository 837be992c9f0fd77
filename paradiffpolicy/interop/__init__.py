"""Foreign checkpoint formats, read without importing their code: LeRobot diffusion folders and
diffusion_policy workspace ``.ckpt`` files. :func:`detect_format` decides by content."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from paradiffpolicy.errors import CheckpointError

FORMATS = ("paradiffpolicy", "lerobot", "diffusion_policy")


def detect_format(path: str | Path) -> str:
    """``paradiffpolicy``, ``lerobot`` or ``diffusion_policy``; a ``CheckpointError`` says why not."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("/data.pkl") for n in z.namelist()):
                    return "diffusion_policy"
        raise CheckpointError(f"checkpoint file {path} is not a PyTorch zip checkpoint (expected a diffusion_policy "
                              f"workspace .ckpt; our and LeRobot checkpoints are directories)")
    config = path / "config.json"
    if not config.is_file():
        ckpts = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f"; it holds {ckpts}: pass that file" if ckpts else ""
        raise CheckpointError(f"checkpoint directory {path} has no config.json (neither ours nor LeRobot's){hint}")
    try:
        doc = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config {config} is not valid JSON: {e}") from None
    if isinstance(doc, dict) and str(doc.get("format", "")).startswith("paradiffpolicy/"):
        return "paradiffpolicy"
    if isinstance(doc, dict) and "type" in doc and "input_features" in doc:
        return "lerobot"
    found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    raise CheckpointError(f"checkpoint config {config} is neither ours (format {found!r}; expected 'paradiffpolicy/1') "
                          f"nor a LeRobot policy config (no 'type' / 'input_features')")


def load_foreign(path: str | Path, fmt: str):
    """(PolicyConfig, state dict, metadata) of a foreign checkpoint; errors name the format detected."""
    from paradiffpolicy.interop import diffusion_policy, lerobot

    reader = {"lerobot": lerobot.load, "diffusion_policy": diffusion_policy.load}[fmt]
    try:
        return reader(Path(path))
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"[detected format: {fmt}] {msg}") from None
