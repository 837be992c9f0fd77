"""Observation features: what a policy reads, by name, and how an observation is checked against it.

A policy declares its inputs as LeRobot's ``input_features`` do: a name (``observation.state``,
``observation.image``, ``observation.environment_state``, ...), a kind and a per-step shape.
Observations are a mapping from feature name to an array with a batch and a time axis,
``(B, To, *shape)``. A plain ``(B, To, Do)`` array is accepted when the policy has exactly one
low-dimensional feature, so code written for flat observations keeps working.

Images are accepted as an environment returns them (uint8, ``(H, W, 3)`` per step) or as LeRobot
hands them to its policy (float in [0, 1], ``(3, H, W)``); both become float32 CHW in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping

import numpy as np
import torch
from torch import Tensor

KINDS = ("state", "image", "env_state")
# how a feature is normalised (see normalizer.py): our own and diffusion_policy's scale/offset, LeRobot's
# processor rules, LeRobot's pre-0.4 rules (epsilon added to the range), or not at all
NORMALIZATIONS = ("affine", "min_max", "min_max_legacy", "mean_std", "identity")
STATE = "observation.state"


@dataclass
class FeatureSpec:
    """One input feature. ``shape`` is per time step: ``(D,)`` for low-dim, ``(3, H, W)`` for images."""

    name: str = STATE
    kind: str = "state"
    shape: List[int] = field(default_factory=list)
    normalization: str = "affine"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("feature name must not be empty")
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name!r}: kind={self.kind!r} is unknown; expected one of {KINDS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"feature {self.name!r}: normalization={self.normalization!r} is unknown; expected one of {NORMALIZATIONS}")
        shape = list(self.shape)
        if any(int(d) < 1 for d in shape):
            raise ValueError(f"feature {self.name!r}: shape {shape} must have positive sizes")
        if self.kind == "image":
            if len(shape) != 3 or shape[0] != 3:
                raise ValueError(f"feature {self.name!r}: an image feature has shape (3, H, W), got {shape}")
        elif len(shape) != 1:
            raise ValueError(f"feature {self.name!r}: a {self.kind} feature has shape (D,), got {shape}")

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    @property
    def dim(self) -> int:
        """Size of one step of a low-dim feature (images: 0, their width comes from the encoder)."""
        return 0 if self.is_image else int(self.shape[0])


def _as_tensor(name: str, value: Any, expect: str) -> Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"observation {name!r} has dtype object; expected {expect}")
        return torch.from_numpy(np.ascontiguousarray(value))
    if torch.is_tensor(value):
        return value
    raise TypeError(f"observation {name!r} must be a numpy array or torch tensor {expect}, got {type(value).__name__}")


def _check_finite(name: str, x: Tensor) -> None:
    finite = torch.isfinite(x)
    if not finite.all():
        bad = (~finite).nonzero()[0].tolist()
        rest = bad[2:]
        where = f"feature {rest[0]}" if len(rest) == 1 else f"element {tuple(rest)}"
        raise ValueError(f"observation {name!r} contains NaN or inf (first at batch {bad[0]}, step {bad[1]}, {where}); "
                         "refusing to act on it")


def coerce_image(spec: FeatureSpec, value: Any, n_obs_steps: int) -> Tensor:
    """(B, To, 3, H, W) float32 in [0, 1] from uint8 HWC or float CHW input; errors say what arrived."""
    c, h, w = spec.shape
    expect = f"(B, {n_obs_steps}, {h}, {w}, 3) uint8 or (B, {n_obs_steps}, 3, {h}, {w}) float in [0, 1]"
    x = _as_tensor(spec.name, value, expect)
    if x.dim() != 5 or x.shape[0] < 1 or x.shape[1] != n_obs_steps:
        raise ValueError(f"observation {spec.name!r} has shape {tuple(x.shape)}; expected {expect}")
    if x.dtype == torch.uint8:
        if tuple(x.shape[2:]) == (h, w, c):
            x = x.permute(0, 1, 4, 2, 3)
        elif tuple(x.shape[2:]) != (c, h, w):
            raise ValueError(f"observation {spec.name!r}: uint8 image of shape {tuple(x.shape)}; expected {expect}")
        return x.float() / 255.0
    if not x.dtype.is_floating_point:
        raise TypeError(f"observation {spec.name!r} has dtype {x.dtype}; expected {expect}")
    if tuple(x.shape[2:]) != (c, h, w):
        hint = " (channels last? float images must be channels first)" if tuple(x.shape[2:]) == (h, w, c) else ""
        raise ValueError(f"observation {spec.name!r} has shape {tuple(x.shape)}{hint}; expected {expect}")
    _check_finite(spec.name, x)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (pixel values 0..255? pass uint8, or divide by 255)" if hi > 1.0 else ""
        raise ValueError(f"observation {spec.name!r}: float image values span [{lo:.3g}, {hi:.3g}]; expected [0, 1]{hint}")
    return x.float()


def coerce_lowdim(spec: FeatureSpec, value: Any, n_obs_steps: int) -> Tensor:
    expect = f"(B, {n_obs_steps}, {spec.dim}) float"
    x = _as_tensor(spec.name, value, expect)
    if not x.dtype.is_floating_point:
        raise TypeError(f"observation {spec.name!r} has dtype {x.dtype}, not floating point; expected {expect}")
    if x.dim() != 3 or x.shape[0] < 1 or x.shape[1] != n_obs_steps or x.shape[2] != spec.dim:
        raise ValueError(f"observation {spec.name!r} has shape {tuple(x.shape)}; expected {expect}")
    _check_finite(spec.name, x)
    return x.float()


def coerce_observation(features: list[FeatureSpec], obs: Any, n_obs_steps: int) -> dict[str, Tensor]:
    """Check ``obs`` against ``features``; return ``{name: float32 tensor (B, To, ...)}`` on the CPU
    or the input's device. Images come back CHW in [0, 1]. Unknown keys are an error (a misspelt
    feature would otherwise be silently ignored)."""
    if not isinstance(obs, Mapping):
        lowdim = [f for f in features if not f.is_image]
        if len(features) != 1 or len(lowdim) != 1:
            names = [f.name for f in features]
            raise TypeError(f"this policy reads several features {names}; pass a dict of arrays keyed by those names, "
                            f"got a single {type(obs).__name__}")
        obs = {features[0].name: obs}
    names = [f.name for f in features]
    missing = [n for n in names if n not in obs]
    unknown = [k for k in obs if k not in names]
    if missing or unknown:
        raise KeyError(f"observation keys {sorted(obs)} do not match the policy's features {names}: "
                       f"missing {missing}, unknown {unknown}")
    out = {}
    for spec in features:
        fn = coerce_image if spec.is_image else coerce_lowdim
        out[spec.name] = fn(spec, obs[spec.name], n_obs_steps)
    sizes = {k: v.shape[0] for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"observation features have different batch sizes: {sizes}")
    return out


def check_step(features: list[FeatureSpec], n_obs_steps: int, obs: Any) -> Any:
    """Check one time step of an observation (no batch or time axis), as a control loop receives
    it; return it as numpy (a dict stays a dict; a flat array becomes float32). Raises like
    :func:`coerce_observation`."""
    if isinstance(obs, Mapping):
        arrays = {k: np.asarray(v) for k, v in obs.items()}
        coerce_observation(features, {k: v[None, None] for k, v in arrays.items()}, 1)
        return arrays
    a = np.asarray(obs)
    if a.dtype.kind != "f":
        raise TypeError(f"observation dtype {a.dtype} is not floating point; expected float32 or float64")
    if len(features) != 1 or features[0].is_image:
        raise TypeError(f"this policy reads features {[f.name for f in features]}; pass a dict keyed by those names")
    if a.shape != (features[0].dim,):
        raise ValueError(f"observation shape {a.shape} is wrong; expected ({features[0].dim},)")
    if not np.isfinite(a).all():
        raise ValueError(f"observation contains NaN or inf at {np.flatnonzero(~np.isfinite(a)).tolist()}; refusing to act on it")
    return a.astype(np.float32)


def stack_history(steps: list) -> Any:
    """A list of per-step observations (arrays, or dicts of arrays) → one array (To, ...) or a dict of them."""
    if isinstance(steps[0], Mapping):
        return {k: np.stack([np.asarray(s[k]) for s in steps]) for k in steps[0]}
    return np.stack([np.asarray(s, dtype=np.float32) for s in steps])


def batch_histories(histories: list) -> Any:
    """Histories of several agents (each from :func:`stack_history`) → one batch (B, To, ...)."""
    if isinstance(histories[0], Mapping):
        return {k: np.stack([h[k] for h in histories]) for k in histories[0]}
    return np.stack(histories)
