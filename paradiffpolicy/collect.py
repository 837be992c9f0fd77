"""Collect scripted-expert demonstrations into a zarr ReplayBuffer.

    python -m paradiffpolicy.collect task=lift n_episodes=100 seed=0

Episode ``i`` uses environment and expert seed ``seed * 1_000_000 + i``; only successful episodes
are kept unless ``keep_failed=true``. Rerunning with the same settings resumes where the store ends;
different settings refuse with a message. Ctrl-C / SIGTERM keep every finished episode. A task
with named features (``task=pusht_image``) stores each feature under its name (``data/observation.image``
as uint8 frames, one compressed chunk per frame, as Diffusion Policy does); flat tasks store ``data/obs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from paradiffpolicy.data.experts import make_expert
from paradiffpolicy.data.replay_buffer import ReplayBuffer, ReplayBufferError
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.runtime import exit_on_bad_input, sigterm_as_keyboard_interrupt, versions

log = logging.getLogger(__name__)
SEED_STRIDE = 1_000_000


@dataclass
class CollectConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    n_episodes: int = 100
    seed: int = 0
    output: str = "data/${task.name}.zarr"
    keep_failed: bool = False
    max_attempts: Optional[int] = None  # default 3 * n_episodes
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes={self.n_episodes} must be >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be >= 1 or null (3 x n_episodes)")


ConfigStore.instance().store(name="collect_schema", node=CollectConfig)


def collect(cfg: CollectConfig) -> ReplayBuffer:
    path = Path(cfg.output)
    identity = {"task": cfg.task.name, "env_name": cfg.task.env_name, "expert": cfg.task.expert, "seed": cfg.seed,
                "obs_keys": list(cfg.task.obs_keys), "keep_failed": cfg.keep_failed}
    if cfg.task.features:  # named features (cameras): stored under their names, images uint8 per frame
        identity["features"] = {k: v if isinstance(v, str) else list(v) for k, v in cfg.task.features.items()}
    if path.exists():
        buf = ReplayBuffer.open(path, mode="a")
        found = {k: buf.attrs.get(k) for k in identity}
        if found != identity:
            raise ReplayBufferError(f"{path} was collected with {found}, not {identity}; choose another output= or remove it")
        log.info("resuming %s: %d episodes stored", path, buf.n_episodes)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = ReplayBuffer.create(path, attrs={**identity, "next_attempt": 0, "attempts_ok": 0, "versions": versions(),
                                               "control_hz": cfg.task.control_hz,
                                               "max_steps": cfg.task.max_steps})
    env = make_env(cfg.task)
    max_attempts = cfg.max_attempts or 3 * cfg.n_episodes
    attempt = int(buf.attrs.get("next_attempt", 0))
    ok = int(buf.attrs.get("attempts_ok", 0))
    bar = tqdm(total=cfg.n_episodes, initial=buf.n_episodes, disable=not cfg.progress, desc=f"collect {cfg.task.name}")
    try:
        with sigterm_as_keyboard_interrupt():
            while buf.n_episodes < cfg.n_episodes and attempt < max_attempts:
                ep_seed = cfg.seed * SEED_STRIDE + attempt
                episode, success = run_expert_episode(env, cfg.task.expert, ep_seed)
                attempt += 1
                ok += int(success)
                if success or cfg.keep_failed:
                    buf.add_episode(episode)
                    bar.update(1)
                buf.group.attrs.update({"next_attempt": attempt, "attempts_ok": ok})
                bar.set_postfix(expert_success=f"{ok / attempt:.2f}")
    except KeyboardInterrupt:
        log.warning("interrupted: %d episodes kept in %s", buf.n_episodes, path)
    finally:
        bar.close()
        env.close()
    log.info("%s: %d episodes, %d steps; expert success %d/%d", path, buf.n_episodes, buf.n_steps, ok, attempt)
    return buf


def run_expert_episode(env, expert_name: str, seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """One scripted-expert episode: ``{"obs" or each feature name, "action", "reward": (L, ...)}``
    and whether it succeeded."""
    obs = env.reset(seed)
    expert = make_expert(expert_name, seed)
    rows: dict[str, list] = {"action": [], "reward": []}
    result = None
    for _ in range(env.max_steps):
        action = expert.act(env.expert_state())
        result = env.step(action)
        for key, value in (obs.items() if isinstance(obs, dict) else [("obs", obs)]):
            rows.setdefault(key, []).append(value)
        rows["action"].append(np.asarray(action, dtype=np.float32))
        rows["reward"].append(np.float32(result.reward))
        obs = result.obs
        if result.done:
            break
    episode = {k: np.stack(v) for k, v in rows.items()}
    return episode, bool(result is not None and result.success)


@hydra.main(config_path="../conf", config_name="collect", version_base="1.3")
def main(cfg) -> None:
    with exit_on_bad_input():
        collect(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
