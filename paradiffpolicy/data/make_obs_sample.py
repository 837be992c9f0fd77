"""Ship real observation windows with a checkpoint (``<checkpoint>/observations.safetensors``).

    python -m paradiffpolicy.data.make_obs_sample task=lift                    # checkpoint=checkpoints/lift
    python -m paradiffpolicy.data.make_obs_sample task=pusht_keypoints windows=256 seed=7

Runs the task's scripted expert on collection seeds ``seed * 1e6 + attempt`` (``seed`` other than
the training data's, 0 by default, so no window comes from a training episode) and keeps
``windows`` windows of ``To`` consecutive observations drawn uniformly over the episodes' steps.
Benchmarks and ``tune`` use them by default, and say so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from paradiffpolicy import load_policy
from paradiffpolicy.collect import SEED_STRIDE, run_expert_episode
from paradiffpolicy.config import from_dict
from paradiffpolicy.data.obs_sample import save_observation_sample
from paradiffpolicy.envs import make_env
from paradiffpolicy.envs.base import TaskConfig
from paradiffpolicy.runtime import REPO_ROOT



@dataclass
class SampleConfig:
    task: str = "lift"
    checkpoint: str = ""  # default checkpoints/<task>
    episodes: int = 8
    windows: int = 256
    seed: int = 7  # collection seed namespace; the shipped checkpoints were trained on seed 0
    training_seed: int = 0

    def __post_init__(self) -> None:
        if self.seed == self.training_seed:
            raise ValueError(f"seed={self.seed} is the training data's collection seed; pick another (held-out episodes)")
        if self.episodes < 1 or self.windows < 1:
            raise ValueError(f"episodes={self.episodes} and windows={self.windows} must be >= 1")


def main(argv: list[str]) -> Path:
    try:
        cfg = from_dict(SampleConfig, OmegaConf.to_container(OmegaConf.from_dotlist(argv)), name="override")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    ckpt = Path(cfg.checkpoint or REPO_ROOT / "checkpoints" / cfg.task)
    policy = load_policy(ckpt)
    to = policy.config.n_obs_steps
    task = from_dict(TaskConfig, OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "task" / f"{cfg.task}.yaml")), name="task")
    env = make_env(task)
    episodes, seeds, attempt = [], [], 0
    try:
        while len(episodes) < cfg.episodes and attempt < 3 * cfg.episodes:
            seed = cfg.seed * SEED_STRIDE + attempt
            attempt += 1
            episode, success = run_expert_episode(env, task.expert, seed)
            if success and len(episode["action"]) >= to:
                episodes.append({f.name: episode["obs" if not task.features else f.name] for f in policy.features})
                seeds.append(seed)
    finally:
        env.close()
    if not episodes:
        raise SystemExit(f"the {task.expert} expert succeeded in none of {attempt} episodes")
    rng = np.random.default_rng(cfg.seed)
    starts = [(e, t) for e, obs in enumerate(episodes) for t in range(len(obs[policy.features[0].name]) - to + 1)]
    picks = [starts[i] for i in sorted(rng.choice(len(starts), size=min(cfg.windows, len(starts)), replace=False))]
    # images stay uint8 frames as the environment gives them; low-dim features float32
    windows = {f.name: torch.from_numpy(np.stack([episodes[e][f.name][t : t + to] for e, t in picks])
                                        .astype(np.uint8 if f.is_image else np.float32)) for f in policy.features}
    source = {"source": f"{len(picks)} windows from {len(episodes)} held-out scripted-expert episodes of task {cfg.task}",
              "task": cfg.task, "expert": task.expert, "episode_seeds": seeds, "held_out": True,
              "training_collection_seed": cfg.training_seed, "command": "python -m paradiffpolicy.data.make_obs_sample " + " ".join(argv)}
    path = save_observation_sample(ckpt, windows, source)
    print(f"{path}: {source['source']}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
