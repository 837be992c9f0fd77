"""Gymnasium adapter (PushT, 10 Hz): flat observations, dict observations flattened in
``task.obs_keys`` order (PushT keypoints: ``obs_type=environment_state_agent_pos``), or named
features (``task.features``; PushT pixels: ``obs_type=pixels_agent_pos``, a 96x96 uint8 frame).

``obs_keys`` may also name ``block_xy``, the T's position in pixels (computed from the simulator),
for layouts such as diffusion_policy's low-dim PushT (block keypoints, then the agent)."""

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
        if task.features:
            keys = list(space.spaces) if isinstance(space, gym.spaces.Dict) else []
            missing = [k for k in self._feature_keys() if k not in keys]
            if missing:
                raise ValueError(f"task.features={dict(task.features)}: {task.env_name} with {dict(task.env_kwargs)} "
                                 f"has no observation {missing}; available: {keys}")
            self.obs_dim = 0
        elif isinstance(space, gym.spaces.Dict):
            keys = list(space.spaces) + ["block_xy"]
            if not task.obs_keys or any(k not in keys for k in task.obs_keys):
                raise ValueError(f"task.obs_keys={list(task.obs_keys)}: {task.env_name} with {dict(task.env_kwargs)} "
                                 f"has dict observations; list the keys to concatenate, from {keys}")
            self.obs_dim = int(sum(2 if k == "block_xy" else np.prod(space[k].shape) for k in task.obs_keys))
        else:
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
        return self._flat(obs)

    def step(self, action: np.ndarray) -> StepResult:
        a = self._check_action(action)
        obs, reward, terminated, truncated, info = self.env.step(a.astype(np.float32))
        self._last = obs
        success = bool(info.get("is_success", False))
        return StepResult(self._flat(obs), float(reward), bool(terminated or truncated or success), success, info)

    def render(self) -> np.ndarray | None:
        return self.env.render() if self._render else None

    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        """From the observation space: asking does not reset the environment."""
        if not self.task.features:
            return {"observation.state": (self.obs_dim,)}
        space = self.env.observation_space
        return {name: tuple(space[keys].shape) if isinstance(keys, str) else (int(sum(np.prod(space[k].shape) for k in keys)),)
                for name, keys in self.task.features.items()}

    def _flat(self, obs):
        if self.task.features:
            return self._named(obs)
        if isinstance(obs, dict):
            parts = [np.asarray(self.env.unwrapped.block.position if k == "block_xy" else obs[k], dtype=np.float32).reshape(-1)
                     for k in self.task.obs_keys]
            return np.concatenate(parts)
        return np.asarray(obs, dtype=np.float32).reshape(-1)

    def expert_state(self) -> np.ndarray:
        sim = self.env.unwrapped
        if hasattr(sim, "block") and hasattr(sim, "agent"):
            # PushT: the scripted expert plans on (agent xy, block xy, block angle), whatever the
            # policy observes (gym-pusht's obs_type=state vector)
            return np.array([*sim.agent.position, *sim.block.position, sim.block.angle % (2 * np.pi)], dtype=np.float64)
        return np.asarray(self._last, dtype=np.float64)

    def close(self) -> None:
        self.env.close()
