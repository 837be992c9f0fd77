"""ReplayBuffer (real zarr stores on disk), sequence padding, and collect → train → load."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from paradiffpolicy.data.replay_buffer import ReplayBuffer, ReplayBufferError
from paradiffpolicy.data.sequence import SequenceSampler

ROOT = Path(__file__).resolve().parents[1]


def _episode(length, seed=0):
    rng = np.random.default_rng(seed)
    return {"obs": rng.normal(size=(length, 4)).astype(np.float32),
            "action": rng.normal(size=(length, 2)).astype(np.float32)}


def test_round_trip_and_append(tmp_path):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", attrs={"task": "x"})
    eps = [_episode(5, 0), _episode(3, 1), _episode(7, 2)]
    for ep in eps:
        buf.add_episode(ep)
    again = ReplayBuffer.open(tmp_path / "b.zarr")
    assert again.n_episodes == 3 and again.n_steps == 15
    assert again.episode_ends.tolist() == [5, 8, 15]
    assert again.attrs["task"] == "x"
    for i, ep in enumerate(eps):
        got = again.get_episode(i)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
    np.testing.assert_array_equal(again["obs"], np.concatenate([e["obs"] for e in eps]))


def test_store_cut_mid_episode_stays_readable_and_repairs_on_append(tmp_path):
    buf = ReplayBuffer.create(tmp_path / "b.zarr")
    buf.add_episode(_episode(5, 0))
    # a kill between the data append and the episode_ends append leaves trailing rows
    buf.group["data/obs"].append(np.ones((3, 4), np.float32))
    again = ReplayBuffer.open(tmp_path / "b.zarr", mode="a")
    assert again.n_episodes == 1 and again["obs"].shape == (5, 4)
    again.add_episode(_episode(2, 1))
    assert again.group["data/obs"].shape[0] == again.group["data/action"].shape[0] == 7
    np.testing.assert_array_equal(again.get_episode(1)["obs"], _episode(2, 1)["obs"])


def test_inconsistent_stores_are_rejected(tmp_path):
    buf = ReplayBuffer.create(tmp_path / "b.zarr")
    buf.add_episode(_episode(5, 0))
    buf.group["meta/episode_ends"].append(np.array([3]))  # decreasing
    with pytest.raises(ReplayBufferError, match="strictly increasing"):
        ReplayBuffer.open(tmp_path / "b.zarr")
    buf2 = ReplayBuffer.create(tmp_path / "c.zarr")
    buf2.add_episode(_episode(5, 0))
    buf2.group["data/obs"].resize((3, 4))  # data truncated below the index
    with pytest.raises(ReplayBufferError, match="truncated"):
        ReplayBuffer.open(tmp_path / "c.zarr")
    with pytest.raises(ReplayBufferError, match="does not exist"):
        ReplayBuffer.open(tmp_path / "missing.zarr")
    with pytest.raises(ReplayBufferError, match="already exists"):
        ReplayBuffer.create(tmp_path / "c.zarr")
    with pytest.raises(ReplayBufferError, match="equal length"):
        buf.add_episode({"obs": np.zeros((3, 4)), "action": np.zeros((2, 2))})


def test_sequence_padding_matches_diffusion_policy():
    # one episode of length 5, horizon 4, pad_before 1 (To=2), pad_after 2 (Ta=3)
    s = SequenceSampler(np.array([5]), horizon=4, pad_before=1, pad_after=2)
    assert len(s) == 5 - 4 + 1 + 1 + 2
    pos = s.positions(np.arange(len(s)))
    assert pos[0].tolist() == [0, 0, 1, 2]  # first frame repeated before the start
    assert pos[-1].tolist() == [3, 4, 4, 4]  # last frame repeated after the end
    # windows never cross into another episode
    s2 = SequenceSampler(np.array([3, 6]), horizon=4, pad_before=1, pad_after=1)
    for row in s2.positions(np.arange(len(s2))):
        assert set(row) <= {0, 1, 2} or set(row) <= {3, 4, 5}


@pytest.mark.slow
def test_collect_train_load_end_to_end(tmp_path):
    from paradiffpolicy import load_policy
    from paradiffpolicy.collect import CollectConfig, collect
    from paradiffpolicy.envs import TaskConfig
    from paradiffpolicy.train import TrainConfig, Trainer
    from safetensors.torch import load_file

    task = TaskConfig(max_steps=120)
    store = tmp_path / "lift.zarr"
    buf = collect(CollectConfig(task=task, n_episodes=2, seed=3, output=str(store), progress=False))
    assert buf.n_episodes == 2 and buf.attrs["attempts_ok"] >= 2
    assert buf["obs"].shape[1] == 19 and buf["action"].shape[1] == 7
    # rerun: resumes (nothing to do) instead of duplicating
    assert collect(CollectConfig(task=task, n_episodes=2, seed=3, output=str(store), progress=False)).n_episodes == 2
    with pytest.raises(ReplayBufferError, match="was collected with"):
        collect(CollectConfig(task=task, n_episodes=2, seed=4, output=str(store), progress=False))

    from paradiffpolicy.config import PolicyConfig
    pcfg = PolicyConfig(down_dims=[16, 32], diffusion_step_embed_dim=16)
    cfg = TrainConfig(task=task, policy=pcfg, dataset=str(store), output_dir=str(tmp_path / "run"), steps=6,
                      batch_size=8, checkpoint_every=3, warmup_steps=2, export=str(tmp_path / "ck"), progress=False)
    Trainer(cfg).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and np.isfinite(log[-1]["loss"])
    policy = load_policy(tmp_path / "ck")
    assert policy.metadata["dataset"]["episodes"] == 2
    actions = policy.predict_action(torch.from_numpy(buf["obs"][:2][None])).actions
    assert actions.shape == (1, 8, 7)
    # resume continues from the saved step with the same weights
    cfg.steps = 8
    with open(tmp_path / "run" / "train_log.jsonl", "a") as f:  # as if a run had died after step 6's checkpoint
        f.write(json.dumps({"step": 7, "loss": 1.0, "lr": 0.0, "elapsed_s": 0.0}) + "\n")
        f.write('{"step": 7, "lo')  # and was killed in the middle of the next line
    trainer = Trainer(cfg)
    assert trainer.step == 6
    trainer.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [6, 8]  # the stale step-7 line is gone; step 8 logged once
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"] == 8

    # a state written before a policy field existed (here the trunk's stage count) still resumes
    state_path = tmp_path / "run" / "last" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["policy"]["vision"]["backbone_stages"]
    state_path.write_text(json.dumps(state))
    assert Trainer(cfg).step == 8

    # more data: the old run refuses to resume on it; fine-tuning starts from its weights instead
    ReplayBuffer.open(store, mode="a").add_episode({k: np.asarray(buf[k][:30]) for k in buf.keys})
    with pytest.raises(ValueError, match="had 2 episodes, now 3"):
        Trainer(cfg)
    for source in (tmp_path / "ck", tmp_path / "run" / "last"):
        tune = TrainConfig(task=task, policy=pcfg, dataset=str(store), output_dir=str(tmp_path / f"tune_{source.name}"),
                           steps=2, batch_size=8, warmup_steps=1, init_from=str(source), export=str(tmp_path / "ck2"),
                           progress=False)
        trainer = Trainer(tune)
        assert trainer.step == 0
        start = load_policy(tmp_path / "ck") if source.name == "ck" else None
        expected = start.state_dict() if start else load_file(str(source / "ema.safetensors"))
        for k, v in trainer.ema.state_dict().items():  # normalisers included: the source's, not refit
            torch.testing.assert_close(v, expected[k].to(v.dtype), msg=k)
        trainer.train()
    train_meta = load_policy(tmp_path / "ck2").metadata["train"]
    assert train_meta["init_from"] == str(tmp_path / "run" / "last")
    assert train_meta["init_from_train"]["steps"] == 8 and train_meta["init_from_train"]["dataset"] == str(store)
    # the model card accounts for the training the fine-tune started from
    card = subprocess.run([sys.executable, str(ROOT / "scripts" / "model_card.py"), str(tmp_path / "ck2"), "--collect", "collect ..."],
                          capture_output=True, text=True, check=True).stdout
    assert f"Initialised from `{tmp_path / 'run' / 'last'}`, itself trained 8 steps" in card
    # the source fixes the policy config: a preset's other values give way, an explicit override that
    # contradicts the source is refused by name
    other = TrainConfig(task=task, policy=PolicyConfig(down_dims=[16, 16], diffusion_step_embed_dim=16), dataset=str(store),
                        output_dir=str(tmp_path / "tune_other"), init_from=str(tmp_path / "ck"), progress=False)
    assert Trainer(other).policy.config == load_policy(tmp_path / "ck").config
    with pytest.raises(ValueError, match=r"policy.down_dims=\[16, 16\] conflicts with init_from=.*drop the override"):
        Trainer(other, explicit_policy_keys=("policy.down_dims",))


@pytest.mark.slow
def test_sigterm_during_training_keeps_a_resumable_state(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    buf = ReplayBuffer.create(tmp_path / "d.zarr")
    for i in range(3):
        buf.add_episode({"obs": np.random.default_rng(i).normal(size=(20, 19)).astype(np.float32),
                         "action": np.random.default_rng(i).uniform(-1, 1, size=(20, 7)).astype(np.float32)})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "paradiffpolicy.train", f"dataset={tmp_path / 'd.zarr'}", f"output_dir={out}",
           "steps=100000", "batch_size=4", "checkpoint_every=100000", "policy.down_dims=[16,32]",
           "policy.diffusion_step_embed_dim=16", "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # the trainer logs every 50th step: interrupt it once the first is out
        seen.append(line)
        if "step 50/100000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert any("step 50/100000" in line for line in seen), "".join(seen) + rest
    state = json.loads((out / "last" / "state.json").read_text())
    assert state["step"] >= 50  # saved on the signal although no periodic checkpoint was due
    assert not (out / "last.tmp").exists()


@pytest.mark.slow
def test_pixel_demonstrations_train_an_image_policy_that_resumes(tmp_path):
    """pusht_image: frames stored uint8, one chunk per frame; the trainer builds the camera policy
    from the store, trains encoder and U-Net (EMA of both), resumes, and the export runs."""
    from omegaconf import OmegaConf

    from paradiffpolicy import load_policy
    from paradiffpolicy.collect import CollectConfig, collect
    from paradiffpolicy.config import PolicyConfig, from_dict
    from paradiffpolicy.envs import TaskConfig
    from paradiffpolicy.models.vision import VisionConfig
    from paradiffpolicy.train import TrainConfig, Trainer

    task = from_dict(TaskConfig, OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / "pusht_image.yaml")), name="task")
    task.max_steps = 40
    store = tmp_path / "pusht_image.zarr"
    buf = collect(CollectConfig(task=task, n_episodes=2, seed=3, output=str(store), progress=False, keep_failed=True))
    assert set(buf.keys) == {"action", "observation.image", "observation.state", "reward"}
    frames = buf.group["data"]["observation.image"]
    assert frames.dtype == np.uint8 and frames.shape[1:] == (96, 96, 3) and frames.chunks == (1, 96, 96, 3)
    assert buf.attrs["features"] == {"observation.image": "pixels", "observation.state": "agent_pos"}

    pcfg = PolicyConfig(down_dims=[16, 32], diffusion_step_embed_dim=16,
                        vision=VisionConfig(backbone_width=16, spatial_softmax_num_keypoints=8))
    cfg = TrainConfig(task=task, policy=pcfg, dataset=str(store), output_dir=str(tmp_path / "run"), steps=2, batch_size=4,
                      checkpoint_every=2, warmup_steps=1, export=str(tmp_path / "ck"), progress=False)
    trainer = Trainer(cfg)
    assert [f.name for f in trainer.policy.features] == ["observation.image", "observation.state"]
    encoder_before = trainer.policy.obs_encoder.state_dict()["rgb_encoders.0.out.weight"].clone()
    trainer.train()
    assert not torch.equal(trainer.policy.obs_encoder.state_dict()["rgb_encoders.0.out.weight"], encoder_before)  # trained
    cfg.steps = 3
    resumed = Trainer(cfg)
    assert resumed.step == 2
    resumed.train()
    policy = load_policy(tmp_path / "ck")
    obs = {"observation.image": torch.from_numpy(np.asarray(buf["observation.image"][:2]))[None],
           "observation.state": torch.from_numpy(np.asarray(buf["observation.state"][:2]))[None]}
    assert policy.predict_action(obs).actions.shape == (1, 8, 2)


@pytest.mark.slow
def test_privileged_state_replays_the_store_and_trains_the_encoder_as_an_auxiliary_target(tmp_path):
    """python -m paradiffpolicy.data.add_privileged_state replays a pixel store's expert attempts in the state task
    (row for row, actions and rewards exactly as stored; a store that does not replay is refused
    and left as it was); ``aux_state`` then adds a head on the encoded observation, saved with the
    run state and resumed, never exported."""
    from omegaconf import OmegaConf

    from paradiffpolicy import load_policy
    from paradiffpolicy.collect import CollectConfig, collect
    from paradiffpolicy.config import PolicyConfig, from_dict
    from paradiffpolicy.envs import TaskConfig
    from paradiffpolicy.models.vision import VisionConfig
    from paradiffpolicy.train import TrainConfig, Trainer

    script = importlib.import_module("paradiffpolicy.data.add_privileged_state")
    task = from_dict(TaskConfig, OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / "pusht_image.yaml")), name="task")
    task.max_steps = 30
    store = tmp_path / "pusht_image.zarr"
    buf = collect(CollectConfig(task=task, n_episodes=2, seed=5, output=str(store), progress=False, keep_failed=True))
    assert buf.attrs["max_steps"] == 30

    states = script.main([f"store={store}", "state_task=pusht_keypoints", "progress=false"])
    buf = ReplayBuffer.open(store)
    assert states.shape == (buf.n_steps, 18) and np.array_equal(buf["privileged.state"], states)
    # pusht_keypoints observes [agent xy, 8 T keypoints]: the agent matches the pixel store's own state
    np.testing.assert_allclose(states[:, :2], buf["observation.state"], atol=1e-3)
    assert buf.attrs["privileged_state"]["task"] == "pusht_keypoints"

    actions = ReplayBuffer.open(store, mode="a").group["data"]["action"]
    actions[3] = actions[3] + 1.0  # a store that no longer replays
    with pytest.raises(ReplayBufferError, match="episode 0 .*different action"):
        script.main([f"store={store}", "progress=false"])
    np.testing.assert_array_equal(ReplayBuffer.open(store)["privileged.state"], states)  # left as it was
    with pytest.raises(ValueError, match="state_task=pusht_image observes named features"):
        script.main([f"store={store}", "state_task=pusht_image", "progress=false"])

    pcfg = PolicyConfig(down_dims=[16, 32], diffusion_step_embed_dim=16,
                        vision=VisionConfig(backbone_width=16, spatial_softmax_num_keypoints=8))
    cfg = TrainConfig(task=task, policy=pcfg, dataset=str(store), output_dir=str(tmp_path / "run"), steps=2, batch_size=4,
                      checkpoint_every=2, warmup_steps=1, aux_state="privileged.state", aux_weight=0.5,
                      export=str(tmp_path / "ck"), progress=False)
    trainer = Trainer(cfg)
    head_before = trainer.aux_head.linear.weight.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.aux_head.linear.weight, head_before)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["aux_loss"]) and log[-1]["aux_loss"] > 0
    cfg.steps = 3
    resumed = Trainer(cfg)
    assert resumed.step == 2 and torch.equal(resumed.aux_head.linear.weight, trainer.aux_head.linear.weight)
    resumed.train()
    exported = load_policy(tmp_path / "ck")
    assert exported.metadata["train"]["aux_state"] == "privileged.state"
    assert not any("aux" in k for k in exported.state_dict())
    assert [f.name for f in exported.features] == ["observation.image", "observation.state"]

    with pytest.raises(ValueError, match="cannot resume .*aux_state"):
        Trainer(TrainConfig(**{**cfg.__dict__, "aux_state": None}))
    with pytest.raises(ValueError, match="aux_state='privileged.nothing' is not an array"):
        Trainer(TrainConfig(**{**cfg.__dict__, "aux_state": "privileged.nothing", "output_dir": str(tmp_path / "run2")}))
    with pytest.raises(ValueError, match="aux_weight=-1"):
        TrainConfig(aux_weight=-1)
