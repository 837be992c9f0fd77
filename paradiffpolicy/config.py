"""Typed configuration: the policy (saved with every checkpoint) and the sampler (chosen at run time).

Both are plain dataclasses, usable from Python and registered with Hydra's ConfigStore by the entry
points. :func:`from_dict` builds one from untrusted data (a checkpoint's JSON, ``key=value``
overrides) and rejects unknown keys and wrong types with the key's name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, List, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from paradiffpolicy.features import NORMALIZATIONS, STATE, FeatureSpec
from paradiffpolicy.models.vision import VisionConfig
from paradiffpolicy.schedulers import SCHEDULERS, SchedulerConfig

T = TypeVar("T")

SAMPLERS = ("sequential", "picard", "tuned")
INITS = ("rollout", "copy")
UPDATES = ("picard", "frozen_x0", "frozen_eps")


@dataclass
class PolicyConfig:
    """Diffusion Policy (Chi et al. 2023): observation encoder → ConditionalUnet1D → action chunk.

    Inputs are ``input_features`` (named, LeRobot style; their order is the order of the
    conditioning vector). Left empty, the policy reads one flat low-dimensional feature
    ``observation.state`` of size ``obs_dim`` (our own checkpoints). Shapes: predicted trajectory
    (B, T, Da); executed chunk (B, Ta, Da) = trajectory[:, s : s+Ta] with s = ``action_start``
    (default To-1, both upstreams' convention).
    """

    obs_dim: int = 0
    action_dim: int = 0
    n_obs_steps: int = 2  # To
    horizon: int = 16  # T
    n_action_steps: int = 8  # Ta
    down_dims: List[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    cond_predict_scale: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    input_features: List[FeatureSpec] = field(default_factory=list)
    action_normalization: str = "affine"
    vision: VisionConfig = field(default_factory=VisionConfig)
    action_start: Optional[int] = None
    # the U-Net also reads the committed action prefix (training-time action conditioning;
    # models/unet1d.py); such a policy is trained with train's ``prefix.max_delay`` > 0
    prefix_input: bool = False

    def features(self) -> list[FeatureSpec]:
        """The declared features, or the one flat feature of an ``obs_dim`` policy."""
        if self.input_features:
            return list(self.input_features)
        return [FeatureSpec(STATE, "state", [self.obs_dim], "affine")]

    @property
    def executed_start(self) -> int:
        return self.n_obs_steps - 1 if self.action_start is None else self.action_start

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key. ``obs_dim`` and
        ``action_dim`` may be 0 here (unset: the trainer takes them from the dataset); a policy
        cannot be built until they are set."""
        if self.input_features:
            names = [f.name for f in self.input_features]
            if len(set(names)) != len(names):
                raise ValueError(f"policy.input_features has duplicate names: {names}")
            lowdim = sum(f.dim for f in self.input_features)
            if self.obs_dim not in (0, lowdim):
                raise ValueError(f"policy.obs_dim={self.obs_dim} disagrees with input_features (low-dim total {lowdim}); leave it 0")
            self.obs_dim = lowdim
        for key in ("obs_dim", "action_dim"):
            if getattr(self, key) < 0:
                raise ValueError(f"policy.{key}={getattr(self, key)} must be >= 1 (0: taken from the dataset)")
        for key in ("n_obs_steps", "horizon", "n_action_steps", "kernel_size", "n_groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"policy.{key}={getattr(self, key)} must be >= 1")
        if self.action_normalization not in NORMALIZATIONS:
            raise ValueError(f"policy.action_normalization={self.action_normalization!r} is unknown; expected one of {NORMALIZATIONS}")
        if self.action_start is not None and self.action_start < 0:
            raise ValueError(f"policy.action_start={self.action_start} must be >= 0 or null")
        if self.executed_start + self.n_action_steps > self.horizon:
            raise ValueError(
                f"policy.n_action_steps={self.n_action_steps}: the executed slice [{self.executed_start}, "
                f"{self.executed_start}+Ta) must fit in horizon={self.horizon} (To={self.n_obs_steps})"
            )
        if not self.down_dims or any(d < 1 or d % self.n_groups for d in self.down_dims):
            raise ValueError(f"policy.down_dims={list(self.down_dims)} must be non-empty multiples of n_groups={self.n_groups}")
        if any(d % 8 for d in self.down_dims[:1]):
            raise ValueError(f"policy.down_dims[0]={self.down_dims[0]} must be a multiple of 8 (the final block's GroupNorm(8))")
        levels = 2 ** (len(self.down_dims) - 1)
        if self.horizon % levels:
            raise ValueError(f"policy.horizon={self.horizon} must be divisible by {levels} for down_dims={list(self.down_dims)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"policy.kernel_size={self.kernel_size} must be odd")
        if self.diffusion_step_embed_dim < 4 or self.diffusion_step_embed_dim % 2:
            raise ValueError(f"policy.diffusion_step_embed_dim={self.diffusion_step_embed_dim} must be even and >= 4")

    def require_dims(self) -> None:
        """Raise unless the observation and action sizes are known (a policy can be built)."""
        if self.obs_dim < 1:
            raise ValueError(f"policy.obs_dim={self.obs_dim} must be >= 1 (or declare policy.input_features)")
        if self.action_dim < 1:
            raise ValueError(f"policy.action_dim={self.action_dim} must be >= 1")


@dataclass
class SamplerConfig:
    """How to sample at inference. ``scheduler``/``num_inference_steps`` override the policy's
    (e.g. DDIM-16 on a DDPM-100-trained policy); None keeps the training scheduler.
    ``name="tuned"`` stands for the settings ``python -m paradiffpolicy.tune`` saved beside the
    checkpoint (resolved when the checkpoint is loaded; see :mod:`paradiffpolicy.presets`)."""

    name: str = "picard"
    window: int = 16
    tol: float = 0.1
    max_iters: Optional[int] = None
    init: str = "rollout"
    # Picard only: Anderson acceleration with this many past iterations (0: plain Picard)
    anderson: int = 0
    # Picard only: how a correction of one window state is carried to the next ones (see
    # sampling/picard.py): "picard" (ParaDiGMS' running sum), "frozen_x0" or "frozen_eps" (a
    # Newton-type step with the step's linear part, x̂0 or ε̂ held fixed)
    update: str = "picard"
    scheduler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    # closed loop only: start each tick from the previous tick's trajectory and (time-shifted) noise
    warm_start: bool = False

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key."""
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler.name={self.name!r} is unknown; expected one of {SAMPLERS}")
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"sampler.window={self.window!r} must be an integer >= 1")
        if not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"sampler.tol={self.tol!r} must be a finite number >= 0")
        if self.max_iters is not None and (not _is_int(self.max_iters) or self.max_iters < 1):
            raise ValueError(f"sampler.max_iters={self.max_iters!r} must be an integer >= 1 or null (N)")
        if not _is_int(self.anderson) or self.anderson < 0:
            raise ValueError(f"sampler.anderson={self.anderson!r} must be an integer >= 0 (0 turns it off)")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"sampler.scheduler={self.scheduler!r} is unknown; expected one of {SCHEDULERS} or null")
        if self.init not in INITS:
            raise ValueError(f"sampler.init={self.init!r} is unknown; expected one of {INITS}")
        if self.update not in UPDATES:
            raise ValueError(f"sampler.update={self.update!r} is unknown; expected one of {UPDATES}")
        if self.num_inference_steps is not None and (not _is_int(self.num_inference_steps) or self.num_inference_steps < 1):
            raise ValueError(f"sampler.num_inference_steps={self.num_inference_steps!r} must be an integer >= 1 or null")


def require_list(cfg: Any, key: str, minimum: float, what: str = "integers") -> None:
    """``ValueError`` naming ``key`` unless ``cfg.<key>`` is a non-empty list whose least value is
    at least ``minimum`` (the commands' lists of windows, batch sizes, tolerances, threads)."""
    values = getattr(cfg, key)
    if not values or min(values) < minimum:
        raise ValueError(f"{key}={list(values)} must be a non-empty list of {what} >= {minimum}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def from_dict(cls: type[T], data: Any, name: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{name} must be a mapping, got {type(data).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ValueError(f"invalid {name}{f' key {key!r}' if key else ''}: {e.msg if hasattr(e, 'msg') else e}") from None
    return obj  # type: ignore[return-value]


def from_argv(cls: type[T], argv: list[str]) -> T:
    """``cls`` from a command's ``key=value`` arguments; a bad one ends the command with a one-line
    ``error: ...`` naming the key."""
    try:
        return from_dict(cls, OmegaConf.to_container(OmegaConf.from_dotlist(argv)), name="override")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def script_arguments(cls: type[T], argv: list[str]) -> tuple[T, list[str]]:
    """A script's ``key=value`` arguments: (``cls`` built from the keys it declares, the other
    arguments left for a Hydra composition, e.g. ``task.max_steps=...``)."""
    mine = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in {f.name for f in dataclasses.fields(cls)})
    rest = [a for a in argv if a.split("=", 1)[0] not in mine]
    return from_dict(cls, mine, name="argument"), rest


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
