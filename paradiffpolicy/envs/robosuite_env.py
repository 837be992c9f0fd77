"""robosuite adapter (OSC_POSE actions, 20 Hz): low-dimensional observations, or named features
including camera images (``task.features`` naming ``<camera>_image`` keys; rendered offscreen,
headless with ``MUJOCO_GL=osmesa``; frames are returned upright, uint8 (H, W, 3))."""

from __future__ import annotations

import logging

import numpy as np

from paradiffpolicy.envs.base import PolicyEnv, StepResult, TaskConfig


#: robosuite's start-up warnings that concern no user of this package, matched by their beginning:
#: the private macro file (its defaults are the settings we use) and optional robots we never build
#: (``robosuite_models``, GR1's mink IK). Any other robosuite warning still shows.
STARTUP_NOISE = (
    "No private macro file found!",
    "It is recommended to use a private macro file",
    "To setup, run: python ",
    "Could not import robosuite_models.",
    "Could not load the mink-based whole-body IK.",
)


class DropStartupNoise(logging.Filter):
    """Drops exactly :data:`STARTUP_NOISE` from robosuite's logger (before its handlers and Hydra's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(STARTUP_NOISE)


def import_robosuite():
    """``import robosuite`` without its start-up noise: the filter sits on the ``robosuite_logs``
    logger itself, which robosuite's own console handler and Hydra's propagation both go through."""
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, DropStartupNoise) for f in logger.filters):
        logger.addFilter(DropStartupNoise())
    import robosuite

    return robosuite


class RobosuiteEnv(PolicyEnv):
    def __init__(self, task: TaskConfig, render: bool = False, render_size: int = 256):
        suite = import_robosuite()
        self.task = task
        self.render_size = render_size
        self._render = render
        self.task = task
        cameras = [k[: -len("_image")] for k in self._feature_keys() if k.endswith("_image")]
        camera_kwargs = dict(camera_names=cameras, camera_heights=task.camera_size, camera_widths=task.camera_size) if cameras else {}
        self.env = suite.make(
            task.env_name,
            robots=task.robots,
            has_renderer=False,
            has_offscreen_renderer=render or bool(cameras),
            use_camera_obs=bool(cameras),
            **camera_kwargs,
            use_object_obs=True,
            control_freq=int(task.control_hz),
            horizon=task.max_steps + 1,  # we end episodes ourselves; robosuite must not first
            ignore_done=True,
            **task.env_kwargs,
        )
        self._raw = self.env.reset()
        missing = [k for k in (self._feature_keys() if task.features else task.obs_keys) if k not in self._raw]
        if missing:
            raise ValueError(f"task.obs_keys {missing} are not observations of {task.env_name}; available: {sorted(self._raw)}")
        self.obs_dim = 0 if task.features else int(sum(np.asarray(self._raw[k]).size for k in task.obs_keys))
        low, high = self.env.action_spec
        self.action_low, self.action_high = np.asarray(low), np.asarray(high)
        self.action_dim = int(self.action_low.shape[0])
        self.control_hz = task.control_hz
        self.max_steps = task.max_steps

    def _seed(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.env.rng = rng
        stack = [getattr(self.env, "placement_initializer", None)]
        while stack:  # composite samplers hold sub-samplers, each with its own rng reference
            s = stack.pop()
            if s is None:
                continue
            s.rng = rng
            stack.extend(getattr(s, "samplers", {}).values())

    def _last_raw(self):
        return self._raw

    def _named(self, raw) -> dict:
        # robosuite renders with OpenGL's origin (bottom-left): flip camera frames upright
        return {name: (np.array(raw[keys][::-1]) if isinstance(keys, str) and keys.endswith("_image") else self._feature(raw, keys))
                for name, keys in self.task.features.items()}

    def _obs(self):
        if self.task.features:
            return self._named(self._raw)
        return np.concatenate([np.asarray(self._raw[k], dtype=np.float32).reshape(-1) for k in self.task.obs_keys])

    def reset(self, seed: int) -> np.ndarray:
        self._seed(seed)
        self._raw = self.env.reset()
        self._t = 0
        return self._obs()

    def step(self, action: np.ndarray) -> StepResult:
        a = self._check_action(action)
        self._raw, reward, _, info = self.env.step(a)
        self._t += 1
        success = bool(self.env._check_success())
        return StepResult(self._obs(), float(reward), success or self._t >= self.max_steps, success, info)

    def render(self) -> np.ndarray | None:
        if not self._render:
            return None
        frame = self.env.sim.render(camera_name="agentview", width=self.render_size, height=self.render_size)
        return frame[::-1].copy()

    def expert_state(self) -> dict:
        return self._raw

    def close(self) -> None:
        self.env.close()
