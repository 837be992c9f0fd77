"""Convert a LeRobot folder or a diffusion_policy ``.ckpt`` to our format, once; or ours out to LeRobot.

    python -m paradiffpolicy.convert SRC DST [--float16] [--overwrite]
    python -m paradiffpolicy.convert checkpoints/lift DST format=lerobot      # a LeRobot 0.6 folder

``DST`` gets ``model.safetensors`` + ``config.json`` (pickle-free from then on), with the source
path, its detected format and this package's version recorded in the metadata. The conversion is
checked before it is reported done: the written checkpoint is reloaded and must give the same
chunk as the source for a fixed observation and noise (bitwise; to LeRobot, within float rounding
where our ``affine`` statistics become LeRobot's MIN_MAX range: the deviation is printed).
``format=lerobot`` writes LeRobot's ``save_pretrained`` layout (``interop/lerobot_export.py``,
``docs/lerobot-export.md``) and refuses, naming it, what LeRobot cannot express.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from paradiffpolicy.checkpoint import CheckpointError, load_policy, save_policy
from paradiffpolicy.config import SamplerConfig
from paradiffpolicy.interop import detect_format


def check_destination(dst: str | Path, overwrite: bool = False) -> Path:
    """``dst`` as a directory a checkpoint may be written to; ``CheckpointError`` naming it when it
    is an existing file, or a directory that already holds a checkpoint (unless ``overwrite``).
    Checked before anything is loaded or written, so a refused destination is left untouched."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} is an existing file; expected a directory (new or empty)")
    held = [f for f in ("config.json", "model.safetensors") if (dst / f).exists()]
    if held and not overwrite:
        raise CheckpointError(f"destination {dst} already holds a checkpoint ({', '.join(held)}); "
                              "choose another directory or pass --overwrite")
    return dst


def chunk_difference(a, b, batch: int, field: str) -> float:
    """Largest |difference| between two policies' ``PolicyOutput.<field>`` for one fixed observation
    batch and noise: how a written checkpoint is checked against its source."""
    obs = a.dummy_observation(batch)
    noise = a.draw_noise(batch, torch.Generator().manual_seed(0))
    return float((getattr(a.predict_action(obs, noise=noise), field) - getattr(b.predict_action(obs, noise=noise), field)).abs().max())


def convert(src: str | Path, dst: str | Path, weights_dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write ``src`` (any supported format) to ``dst`` in ours; returns a summary."""
    from paradiffpolicy import __version__

    check_destination(dst, overwrite)
    fmt = detect_format(src)
    seq = SamplerConfig(name="sequential")
    policy = load_policy(src, sampler=seq)
    meta = {**policy.metadata, "converted_from": str(src), "converted_from_format": fmt,
            "converted_by": f"paradiffpolicy {__version__}"}
    save_policy(policy, dst, metadata=meta, weights_dtype=weights_dtype)
    dev = chunk_difference(policy, load_policy(dst, sampler=seq), batch=1, field="action_pred")
    if weights_dtype == "float32" and dev != 0.0:
        raise CheckpointError(f"conversion check failed: {dst} gives a chunk {dev:.3g} away from {src}")
    return {"source": str(src), "format": fmt, "destination": str(dst), "check_max_abs_diff": dev,
            "features": [f.name for f in policy.features]}


LEROBOT_CHECK_TOL = 1e-4  # normalised units: float rounding of the statistics' rewrite, nothing structural


def export(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict:
    """Write ``src`` (any supported format) to ``dst`` as a LeRobot folder; returns a summary."""
    from paradiffpolicy.interop.diffusion_policy import UnsupportedCheckpoint
    from paradiffpolicy.interop.lerobot_export import export_lerobot

    check_destination(dst, overwrite)
    fmt = detect_format(src)
    seq = SamplerConfig(name="sequential")
    policy = load_policy(src, sampler=seq)
    try:
        export_lerobot(policy, dst)
    except UnsupportedCheckpoint as e:
        raise CheckpointError(f"{src} cannot be written as a LeRobot diffusion policy: {e}") from None
    dev = chunk_difference(policy, load_policy(dst, sampler=seq), batch=2, field="action_pred_normalized")
    if dev > LEROBOT_CHECK_TOL:
        raise CheckpointError(f"export check failed: {dst} gives a chunk {dev:.3g} (normalised) away from {src}")
    return {"source": str(src), "format": fmt, "destination": str(dst), "check_max_abs_diff": dev, "to": "lerobot",
            "features": [f.name for f in policy.features]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paradiffpolicy.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a LeRobot policy folder, a diffusion_policy .ckpt, or one of ours")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--float16", action="store_true", help="store network weights as float16 (statistics stay float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")
    parser.add_argument("--format", choices=("paradiffpolicy", "lerobot"), default="paradiffpolicy",
                        help="what DST becomes: ours (default) or a LeRobot 0.6 folder (also written format=lerobot)")
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [a for arg in argv for a in (["--format", arg.split("=", 1)[1]] if arg.startswith("format=") else [arg])]
    args = parser.parse_args(argv)
    try:
        if args.format == "lerobot":
            if args.float16:
                raise ValueError("--float16 applies to our format; LeRobot folders hold float32 weights")
            out = export(args.src, args.dst, overwrite=args.overwrite)
        else:
            out = convert(args.src, args.dst, "float16" if args.float16 else "float32", overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {out['format']} checkpoint {out['source']} -> {out['destination']}"
          f"{' (LeRobot folder)' if out.get('to') == 'lerobot' else ''} "
          f"(features {out['features']}; reload check max |diff| {out['check_max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
