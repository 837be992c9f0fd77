"""Typed configuration: the policy (saved with every checkpoint) and the sampler (chosen at run time).

Both are plain dataclasses, usable from Python and registered with Hydra's ConfigStore by the entry
points. :func:`from_dict` builds one from untrusted data (a checkpoint's JSON, ``key=value``
overrides) and rejects unknown keys and wrong types with the key's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from paradiffpolicy.schedulers import SchedulerConfig

T = TypeVar("T")

SAMPLERS = ("sequential", "picard")
BACKENDS = ("eager", "jit", "compile")


@dataclass
class PolicyConfig:
    """Diffusion Policy (Chi et al. 2023) with a ConditionalUnet1D and low-dimensional observations.

    Shapes: observations (B, To, Do), predicted trajectory (B, T, Da), executed chunk
    (B, Ta, Da) = trajectory[:, To-1 : To-1+Ta].
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

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending key."""
        for key in ("obs_dim", "action_dim", "n_obs_steps", "horizon", "n_action_steps", "kernel_size", "n_groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"policy.{key}={getattr(self, key)} must be >= 1")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"policy.n_action_steps={self.n_action_steps}: the executed slice [To-1, To-1+Ta) must fit in "
                f"horizon={self.horizon} (To={self.n_obs_steps})"
            )
        if not self.down_dims or any(d < 1 or d % self.n_groups for d in self.down_dims):
            raise ValueError(f"policy.down_dims={list(self.down_dims)} must be non-empty multiples of n_groups={self.n_groups}")
        levels = 2 ** (len(self.down_dims) - 1)
        if self.horizon % levels:
            raise ValueError(f"policy.horizon={self.horizon} must be divisible by {levels} for down_dims={list(self.down_dims)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"policy.kernel_size={self.kernel_size} must be odd")
        if self.diffusion_step_embed_dim < 4 or self.diffusion_step_embed_dim % 2:
            raise ValueError(f"policy.diffusion_step_embed_dim={self.diffusion_step_embed_dim} must be even and >= 4")
        self.scheduler.validate()


@dataclass
class SamplerConfig:
    """How to sample at inference. ``scheduler``/``num_inference_steps`` override the policy's
    (e.g. DDIM-16 on a DDPM-100-trained policy); None keeps the training scheduler."""

    name: str = "picard"
    window: int = 16
    tol: float = 0.1
    max_iters: Optional[int] = None
    init: str = "rollout"
    # Picard only: Anderson acceleration with this many past iterations (0: plain Picard)
    anderson: int = 0
    scheduler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    # closed loop only: start each tick from the previous tick's trajectory and (time-shifted) noise
    warm_start: bool = False
    # how the network runs: "eager" (PyTorch modules), "jit" (a traced TorchScript graph, same
    # numbers, less Python per call; see models/jit.py) or "compile" (torch.compile: CUDA graphs on
    # a GPU, fixed-shape Picard windows; see models/compiled.py)
    backend: str = "eager"

    def validate(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler.name={self.name!r} is unknown; expected one of {SAMPLERS}")
        if self.window < 1:
            raise ValueError(f"sampler.window={self.window} must be >= 1")
        if not self.tol >= 0 or self.tol == float("inf"):
            raise ValueError(f"sampler.tol={self.tol} must be a finite number >= 0")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"sampler.max_iters={self.max_iters} must be >= 1 or null")
        if self.anderson < 0:
            raise ValueError(f"sampler.anderson={self.anderson} must be >= 0 (0 turns it off)")
        if self.backend not in BACKENDS:
            raise ValueError(f"sampler.backend={self.backend!r} is unknown; expected one of {BACKENDS}")


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


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
