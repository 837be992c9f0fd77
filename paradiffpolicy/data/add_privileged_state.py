"""Add the simulator's state to a camera store collected by a scripted expert, for training only.

    python -m paradiffpolicy.data.add_privileged_state store=data/pusht_image_600.zarr state_task=pusht_keypoints [task.KEY=VALUE ...]

A camera policy learns to read the scene from pixels; with few training steps (a CPU) its image
encoder is what stays weak. The simulator knows the scene exactly, so a trainer can use it as an
auxiliary target (``train aux_state=privileged.state``): the encoder is also asked to regress it,
and the exported policy still sees only its camera and proprioception.

The expert and the physics are deterministic, so the store's attempts are replayed (no rendering)
in ``state_task`` (the same environment observed as a state vector, e.g. PushT's agent xy and the
8 keypoints of the T) and its observations are written to ``data/privileged.state``, row for row.
Every replayed episode must reproduce the stored actions and rewards exactly, or nothing is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from paradiffpolicy.collect import SEED_STRIDE, run_expert_episode  # noqa: E402 - also registers collect's schema
from paradiffpolicy.config import script_arguments
from paradiffpolicy.data.replay_buffer import ReplayBuffer, ReplayBufferError
from paradiffpolicy.envs import make_env
from paradiffpolicy.runtime import REPO_ROOT, exit_on_bad_input

KEY = "privileged.state"


@dataclass
class Args:
    store: str = ""
    state_task: str = "pusht_keypoints"
    progress: bool = True


def replay_states(buf: ReplayBuffer, state_task, progress: bool = False) -> np.ndarray:
    """(n_steps, D) float32: ``state_task``'s observation at every stored step, from replaying the
    store's expert attempts; raises if a replay departs from what the store holds."""
    attrs = buf.attrs
    if state_task.features:
        raise ValueError(f"state_task={state_task.name} observes named features {list(state_task.features)}; "
                         "choose a task with one flat state vector (e.g. pusht_keypoints)")
    if attrs.get("expert") != state_task.expert:
        raise ReplayBufferError(f"{buf.path} was collected by expert {attrs.get('expert')!r}; state_task "
                                f"{state_task.name} uses {state_task.expert!r}")
    env = make_env(state_task)
    ends, data = buf.episode_ends, buf.group["data"]
    states, episode, attempt = [], 0, 0
    try:
        while episode < len(ends):
            if attempt >= int(attrs.get("next_attempt", 0)):
                raise ReplayBufferError(f"{buf.path}: replaying {attempt} attempts gave {episode} of {len(ends)} episodes")
            replay, success = run_expert_episode(env, attrs["expert"], int(attrs["seed"]) * SEED_STRIDE + attempt)
            attempt += 1
            if not (success or attrs.get("keep_failed")):
                continue
            start, end = (0 if episode == 0 else int(ends[episode - 1])), int(ends[episode])
            for key in ("action", "reward"):
                if not np.array_equal(data[key][start:end], replay[key]):
                    raise ReplayBufferError(f"{buf.path}: episode {episode} (attempt {attempt - 1}) replays with a different "
                                            f"{key} in {state_task.name}; the store cannot be replayed, nothing written")
            states.append(replay["obs"].astype(np.float32))
            episode += 1
            if progress and episode % 50 == 0:
                print(f"{episode}/{len(ends)} episodes replayed", flush=True)
    finally:
        env.close()
    return np.concatenate(states)


def main(argv: list[str]) -> np.ndarray:
    args, rest = script_arguments(Args, argv)
    if not args.store:
        raise SystemExit("store=<path to a zarr ReplayBuffer> is required")
    buf = ReplayBuffer.open(args.store, mode="a")
    if "max_steps" in buf.attrs:  # stores from before collect recorded it: pass task.max_steps=... if not the default
        rest.insert(0, f"task.max_steps={buf.attrs['max_steps']}")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        task = OmegaConf.to_object(compose(config_name="collect", overrides=[f"task={args.state_task}", *rest])).task
    states = replay_states(buf, task, args.progress)
    buf.set_array(KEY, states)
    buf.group.attrs["privileged_state"] = {"task": task.name, "obs_keys": list(task.obs_keys), "dim": int(states.shape[1])}
    print(f"wrote data/{KEY} {states.shape} ({task.name}: {list(task.obs_keys)}) to {args.store}")
    return states


if __name__ == "__main__":
    with exit_on_bad_input():
        main(sys.argv[1:])
