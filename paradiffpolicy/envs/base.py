"""One interface for every simulator: flat float observations in, flat actions out, a success flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import numpy as np

SUITES = ("robosuite", "gym")


@dataclass
class TaskConfig:
    """A task: which simulator, which observation keys form the policy's vector, its control rate."""

    name: str = "lift"
    suite: str = "robosuite"
    env_name: str = "Lift"
    robots: str = "Panda"
    # robosuite: observation keys concatenated in this order (robomimic's low-dim convention)
    obs_keys: List[str] = field(default_factory=lambda: ["object-state", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"])
    control_hz: float = 20.0
    max_steps: int = 200
    expert: str = "lift"
    checkpoint: str = "checkpoints/lift"
    # what to send when no fresh action is available in time: "zero_motion" (delta actions: zeros,
    # gripper kept) or "repeat" (absolute targets: the last action again)
    hold: str = "zero_motion"
    env_kwargs: dict = field(default_factory=dict)
    # named-feature observations: {policy feature name: environment key, or a list of keys to
    # concatenate}, e.g. {observation.image: pixels, observation.state: agent_pos}. Empty: one flat
    # vector of obs_keys.
    features: dict = field(default_factory=dict)
    # robosuite camera observations: image size (square) of every camera named in features
    camera_size: int = 84

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key."""
        if self.suite not in SUITES:
            raise ValueError(f"task.suite={self.suite!r} is unknown; expected one of {SUITES}")
        if self.control_hz <= 0:
            raise ValueError(f"task.control_hz={self.control_hz} must be > 0")
        if self.hold not in ("zero_motion", "repeat"):
            raise ValueError(f"task.hold={self.hold!r} must be 'zero_motion' or 'repeat'")
        if self.max_steps < 1:
            raise ValueError(f"task.max_steps={self.max_steps} must be >= 1")
        if self.camera_size < 1:
            raise ValueError(f"task.camera_size={self.camera_size} must be >= 1")


@dataclass
class StepResult:
    obs: Any  # (Do,) float32, or {feature name: array} (images uint8 (H, W, 3))
    reward: float
    done: bool  # success or time limit
    success: bool
    info: dict = field(default_factory=dict)


class PolicyEnv:
    """Base class of the adapters. ``reset(seed) -> obs``; ``step(action (Da,)) -> StepResult``.

    ``obs`` is a flat float32 vector (Do,), or, when the task names ``features``, a dict
    ``{feature name: array}`` with images as uint8 (H, W, 3) frames.
    """

    obs_dim: int
    action_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    control_hz: float
    max_steps: int

    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-step shape of each feature this environment returns (images (H, W, 3))."""
        if self.task.features:
            return {name: tuple(np.shape(v)) for name, v in self._named(self._last_raw()).items()}
        return {"observation.state": (self.obs_dim,)}

    def _named(self, raw) -> dict:
        return {name: self._feature(raw, keys) for name, keys in self.task.features.items()}

    @staticmethod
    def _feature(raw, keys) -> np.ndarray:
        """One feature: an observation as given, or several concatenated as float32."""
        if isinstance(keys, str):
            return np.array(raw[keys])
        return np.concatenate([np.asarray(raw[k], dtype=np.float32).reshape(-1) for k in keys])

    def _feature_keys(self) -> list[str]:
        keys = []
        for v in self.task.features.values():
            keys.extend([v] if isinstance(v, str) else list(v))
        return keys

    def _last_raw(self):
        raise NotImplementedError

    def reset(self, seed: int) -> Any:
        raise NotImplementedError

    def step(self, action: np.ndarray) -> StepResult:
        raise NotImplementedError

    def render(self) -> np.ndarray | None:
        """An RGB frame (H, W, 3) uint8, or None if the adapter was made without rendering."""
        return None

    def expert_state(self) -> Any:
        """What the scripted expert looks at (the simulator's own observation)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _check_action(self, action: np.ndarray) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action shape {np.shape(action)} is wrong; expected ({self.action_dim},)")
        if not np.isfinite(a).all():
            raise ValueError("action contains NaN or inf; refusing to send it to the environment")
        return np.clip(a, self.action_low, self.action_high)
