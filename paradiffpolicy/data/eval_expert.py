"""Score a scripted expert on the evaluation seeds (the same initial states the policies see).

    python -m paradiffpolicy.data.eval_expert task=pusht n_episodes=50 out=checkpoints/pusht/expert_eval.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from paradiffpolicy.config import script_arguments
from paradiffpolicy.control.controller import Episode
from paradiffpolicy.data.experts import make_expert
from paradiffpolicy.envs import make_env
import paradiffpolicy.eval  # noqa: F401 - registers the eval schema with Hydra
from paradiffpolicy.runtime import REPO_ROOT


@dataclass
class Args:
    task: str = "pusht"
    n_episodes: int = 50
    seed: int = 10_000_000
    out: str = ""


def main(argv: list[str]) -> dict:
    args, rest = script_arguments(Args, argv)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"task={args.task}", *rest])
    task = OmegaConf.to_object(cfg).task
    env = make_env(task)
    rows = []
    try:
        for i in range(args.n_episodes):
            episode = Episode(env, args.seed + i)  # the bookkeeping the policies' episodes get
            episode.start()
            expert = make_expert(task.expert, args.seed + i)
            while not episode.step(expert.act(env.expert_state())):
                pass
            rows.append(episode.finish().to_json())
    finally:
        env.close()
    report = {"task": task.name, "expert": task.expert, "n_episodes": args.n_episodes, "max_steps": task.max_steps,
              "seeds": [args.seed, args.seed + args.n_episodes - 1],
              "pc_success": 100.0 * np.mean([r["success"] for r in rows]),
              "avg_max_reward": float(np.mean([r["max_reward"] for r in rows])),
              "avg_length": float(np.mean([r["length"] for r in rows])), "per_episode": rows}
    if all("max_coverage" in r for r in rows):
        report["avg_max_coverage"] = float(np.mean([r["max_coverage"] for r in rows]))
    print(json.dumps({k: v for k, v in report.items() if k != "per_episode"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
