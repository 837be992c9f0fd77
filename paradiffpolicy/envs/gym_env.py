"""Gymnasium adapter (PushT with state observations, 10 Hz)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from paradiffpolicy.envs.base import PolicyEnv, StepResult, TaskConfig


class GymEnv(PolicyEnv):
    def __init__(self, task: TaskConfig, render: bool = False, render_size: int = 256):
        if task.env_name.startswith("gym_pusht/"):
            import gym_pusht  # noqa: F401 - registers the env
        kwargs = dict(task.env_kwargs)
        if render:
            kwargs.setdefault("render_mode", "rgb_array")
        self.env = gym.make(task.env_name, max_episode_steps=task.max_steps, disable_env_checker=True, **kwargs)
        self.task = task
        self._render = render
        space = self.env.observation_space
        self.obs_dim = int(np.prod(space.shape))
        self.action_low = np.asarray(self.env.action_space.low, dtype=np.float64)
        self.action_high = np.asarray(self.env.action_space.high, dtype=np.float64)
        self.action_dim = int(self.action_low.shape[0])
        self.control_hz = task.control_hz
        self.max_steps = task.max_steps
        self._last = None

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=int(seed))
        self._last = obs
        return np.asarray(obs, dtype=np.float32).reshape(-1)

    def step(self, action: np.ndarray) -> StepResult:
        a = self._check_action(action)
        obs, reward, terminated, truncated, info = self.env.step(a.astype(np.float32))
        self._last = obs
        success = bool(info.get("is_success", False))
        return StepResult(np.asarray(obs, dtype=np.float32).reshape(-1), float(reward), bool(terminated or truncated or success), success, info)

    def render(self) -> np.ndarray | None:
        return self.env.render() if self._render else None

    def expert_state(self) -> np.ndarray:
        return np.asarray(self._last, dtype=np.float64)

    def close(self) -> None:
        self.env.close()
