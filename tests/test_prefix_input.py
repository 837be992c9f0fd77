"""Training-time action conditioning: a U-Net that reads the committed prefix.

A policy converted to take the prefix computes the original function until it is fine-tuned; the
``trained`` prefix reaches the network in every sampler (Picard's fixed point is the conditioned
sequential sample) and every backend; the training loss ignores the committed positions; the
``trained`` join is the default for such a policy and refused for the others."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_backend, tiny_policy
from paradiffpolicy import SamplerConfig, load_policy, save_policy
from paradiffpolicy.config import PolicyConfig
from paradiffpolicy.control.join import JoinConfig
from paradiffpolicy.data.replay_buffer import ReplayBuffer
from paradiffpolicy.envs import TaskConfig
from paradiffpolicy.policy import with_prefix_input
from paradiffpolicy.sampling import SamplerNoise
from paradiffpolicy.sampling.prefix import ActionPrefix, prefix_weights
from paradiffpolicy.schedulers import SchedulerConfig
from paradiffpolicy.train import PrefixTrainingConfig, TrainConfig, Trainer
from test_interop import FIXTURES, TOL, observations, reference

B, T, DA = 3, 16, 2
SCHEDULERS = {
    "ddpm": None,
    "ddim": SchedulerConfig(name="ddim", num_train_timesteps=20, num_inference_steps=8),
    "dpmsolver++": SchedulerConfig(name="dpmsolver++", num_train_timesteps=20, num_inference_steps=8),
}


def conditioned_policy(scheduler=None, sampler=None):
    """A tiny policy with the prefix input, its prefix convolution given weights (as after a
    fine-tune) so the committed actions change what the network predicts."""
    policy = with_prefix_input(tiny_policy(sampler, **({} if scheduler is None else {"scheduler": scheduler})))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in policy.model.prefix_conv.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return policy


def inputs(policy, bsz=B):
    obs = torch.rand(bsz, 2, 5, generator=torch.Generator().manual_seed(0))
    return obs, policy.draw_noise(bsz, torch.Generator().manual_seed(1))


def trained_prefix(committed=(5, 3, 0)):
    target = 0.5 * torch.tanh(torch.randn(len(committed), T, DA, generator=torch.Generator().manual_seed(2)))
    weights = torch.stack([prefix_weights(c, T, T, "hard") for c in committed])
    return ActionPrefix(target, weights, mode="trained")


def test_a_converted_policy_is_the_original_until_fine_tuned():
    original = tiny_policy(SamplerConfig(name="sequential"))
    converted = with_prefix_input(original)
    assert converted.config.prefix_input and not original.config.prefix_input
    obs, noise = inputs(original)
    for sampler in (SamplerConfig(name="sequential"), SamplerConfig(name="picard", window=4, tol=0.05)):
        a = original.predict_action(obs, noise=noise, sampler=original.make_sampler(sampler)).action_pred
        b = converted.predict_action(obs, noise=noise, sampler=converted.make_sampler(sampler)).action_pred
        assert (a - b).abs().max() <= 1e-6
    # the training loss too (same noise draws): the zero prefix convolution adds nothing
    action = torch.rand(B, T, DA) * 2 - 1
    cond = original.encode_observation(obs)
    loss_a = original.denoising_loss(cond, action, torch.Generator().manual_seed(3))
    loss_b = converted.denoising_loss(cond, action, torch.Generator().manual_seed(3))
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6
    with pytest.raises(ValueError, match="already reads"):
        with_prefix_input(converted)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_trained_prefix_picard_fixed_point_is_the_conditioned_sequential_sample(scheduler):
    policy = conditioned_policy(SCHEDULERS[scheduler], SamplerConfig(name="sequential"))
    obs, noise = inputs(policy)
    prefix = trained_prefix()
    ref = policy.predict_action(obs, noise=noise, prefix=prefix).action_pred_normalized
    free = policy.predict_action(obs, noise=noise).action_pred_normalized
    assert (ref[:2, 5:] - free[:2, 5:]).abs().max() > 1e-3  # the network reads the committed actions
    torch.testing.assert_close(ref[2], free[2], atol=0, rtol=0)  # a row with nothing committed is unconditioned
    torch.testing.assert_close(ref[0, :5], prefix.target[0, :5], atol=1e-5, rtol=0)  # the committed come out as given
    for exact in (dict(window=1, tol=0.1), dict(window=4, tol=0.0)):
        out = policy.predict_action(obs, noise=noise, prefix=prefix, sampler=policy.make_sampler(SamplerConfig(name="picard", **exact)))
        assert out.stats.converged.all()
        torch.testing.assert_close(out.action_pred_normalized, ref, atol=2e-5, rtol=0)


JIT_AND_EXPORTED = ["jit", pytest.param("onnxruntime", marks=needs_backend("onnxruntime")),
                    pytest.param("openvino", marks=[needs_backend("openvino"), pytest.mark.slow])]


@pytest.mark.parametrize("backend", JIT_AND_EXPORTED)
def test_trained_prefix_on_every_backend_is_the_eager_sample(backend):
    """The prefix is an input of the traced and exported graphs: the same numbers as eager, with and
    without a prefix, and Picard reaches that backend's sequential sample."""
    policy = conditioned_policy(sampler=SamplerConfig(name="sequential"))
    obs, noise = inputs(policy)
    prefix = trained_prefix()
    picard = policy.make_sampler(SamplerConfig(name="picard", window=8, tol=0.0))
    for pre in (None, prefix):
        eager = policy.predict_action(obs, noise=noise, prefix=pre).action_pred_normalized
        seq = policy.predict_action(obs, noise=noise, prefix=pre, backend=backend).action_pred_normalized
        par = policy.predict_action(obs, noise=noise, prefix=pre, backend=backend, sampler=picard).action_pred_normalized
        assert (seq - eager).abs().max() < 1e-5
        assert (par - seq).abs().max() < 1e-5


def test_trained_mode_needs_a_network_with_the_prefix_input_and_binary_weights():
    policy = tiny_policy()
    obs, noise = inputs(policy)
    with pytest.raises(ValueError, match="trained with the committed prefix"):
        policy.predict_action(obs, noise=noise, prefix=trained_prefix())
    with pytest.raises(ValueError, match="weights of 0 or 1"):
        ActionPrefix(torch.zeros(1, T, DA), torch.full((1, T), 0.5), mode="trained")
    with pytest.raises(ValueError, match="no prefix input"):
        policy.model(torch.zeros(1, T, DA), torch.zeros(1, dtype=torch.long), torch.zeros(1, 10), prefix=torch.zeros(1, T, DA + 1))


def test_the_loss_ignores_the_committed_positions():
    """Gradients reach the prediction only where nothing is committed, and the committed actions
    reach the network (the loss depends on them)."""
    policy = conditioned_policy()
    policy.train()
    obs, _ = inputs(policy)
    cond = policy.encode_observation(obs).detach()
    action = torch.rand(B, T, DA) * 2 - 1
    committed = torch.tensor([4, 0, 9])
    loss = lambda a: policy.denoising_loss(cond, a, torch.Generator().manual_seed(0), committed=committed)  # noqa: E731
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    hook = policy.model.final_conv.register_forward_hook(keep)
    loss(action).backward()
    hook.remove()
    grad = outputs[0].grad.transpose(1, 2)  # (B, T, Da)
    assert grad[0, :4].abs().max() == 0 and grad[2, :9].abs().max() == 0
    assert grad[0, 4:].abs().min() > 0 and grad[1].abs().min() > 0
    moved = action.clone()
    moved[0, :4] += 0.5
    assert loss(moved).item() != loss(action).item()
    with pytest.raises(ValueError, match="has none"):
        tiny_policy().denoising_loss(cond, action, committed=committed)


def test_the_prefix_offset_moves_each_rows_committed_actions_by_one_constant():
    """``prefix_offset`` shifts what the network reads at the committed positions by one offset per
    row and action dimension, leaves the free positions unread, and its size follows the bound."""
    policy = conditioned_policy()
    obs, _ = inputs(policy)
    cond = policy.encode_observation(obs).detach()
    action = torch.rand(B, T, DA) * 2 - 1
    committed = torch.tensor([4, 0, 9])
    seen = []
    hook = policy.model.prefix_conv.register_forward_hook(lambda m, args, out: seen.append(args[0].transpose(1, 2)))
    policy.denoising_loss(cond, action, torch.Generator().manual_seed(0), committed=committed)
    policy.denoising_loss(cond, action, torch.Generator().manual_seed(0), committed=committed, prefix_offset=0.3)
    hook.remove()
    x0 = policy.action_normalizer.normalize(action)
    plain, moved = seen
    assert torch.allclose(plain[0, :4, :DA], x0[0, :4]) and plain[1].abs().max() == 0
    shift = moved[..., :DA] - plain[..., :DA]
    for row, n in enumerate(committed.tolist()):
        assert torch.equal(moved[row, :, DA], plain[row, :, DA])  # the mask is unchanged
        assert shift[row, n:].abs().max() == 0
        if n:
            assert (shift[row, :n] - shift[row, :1]).abs().max() < 1e-6  # one offset over the positions
            assert 0 < shift[row, 0].abs().max() < 0.3 * 5


def test_committed_draws_follow_the_configuration():
    rng = np.random.default_rng(0)
    cfg = PrefixTrainingConfig(max_delay=6, p_none=0.25)
    n = cfg.draw_committed(rng, 20000, start=1)
    assert set(np.unique(n)) == {0, 1, 2, 3, 4, 5, 6, 7}
    assert abs((n == 0).mean() - 0.25) < 0.02
    counts = np.bincount(n[n > 0] - 1, minlength=7) / (n > 0).sum()
    assert np.abs(counts - 1 / 7).max() < 0.02  # uniform over d = 0..6
    exp = PrefixTrainingConfig(max_delay=6, distribution="exp", exp_scale=2.0, p_none=0.0)
    n = exp.draw_committed(rng, 20000, start=1) - 1
    p = np.exp(-np.arange(7) / 2.0)
    assert np.abs(np.bincount(n, minlength=7) / len(n) - p / p.sum()).max() < 0.02
    for bad, key in ((dict(max_delay=-1), "max_delay"), (dict(distribution="beta"), "distribution"),
                     (dict(p_none=1.5), "p_none"), (dict(exp_scale=0.0), "exp_scale"), (dict(offset=-0.1), "offset")):
        with pytest.raises(ValueError, match=f"prefix.{key}"):
            PrefixTrainingConfig(**bad)


def test_the_trained_join_is_the_default_only_for_a_policy_trained_with_the_prefix():
    plain, conditioned = tiny_policy().config, conditioned_policy().config
    assert JoinConfig().for_policy(plain).method == "naive"
    assert JoinConfig().for_policy(conditioned).method == "trained"
    assert JoinConfig(method="hard").for_policy(conditioned).method == "hard"  # an explicit choice stays
    with pytest.raises(ValueError, match="join.method=trained needs a policy trained"):
        JoinConfig(method="trained").for_policy(plain)
    weights = JoinConfig(method="trained").weights(start=1, delay=3, shift=8, horizon=T)
    assert torch.equal(weights, prefix_weights(4, 8, T, "hard"))


def test_training_with_the_prefix_fine_tunes_a_checkpoint_and_records_how(tmp_path):
    """train prefix.max_delay=... init_from=<checkpoint without the prefix input>: the run starts
    from the converted weights (zero prefix convolution), trains the prefix convolution, exports a
    policy that reads the prefix and says how it was trained; resuming with other prefix settings
    is refused by name."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(tmp_path / "d.zarr")
    for length in (40, 30):
        buf.add_episode({"obs": rng.random((length, 5), dtype=np.float32), "action": rng.uniform(-1, 1, (length, 2)).astype(np.float32)})
    source = tiny_policy()
    save_policy(source, tmp_path / "src")
    pcfg = PolicyConfig(down_dims=[16, 32], diffusion_step_embed_dim=16, scheduler=source.config.scheduler)
    cfg = TrainConfig(task=TaskConfig(), policy=pcfg, dataset=str(tmp_path / "d.zarr"), output_dir=str(tmp_path / "run"), steps=4,
                      batch_size=8, warmup_steps=1, checkpoint_every=2, init_from=str(tmp_path / "src"),
                      export=str(tmp_path / "out"), progress=False, prefix=PrefixTrainingConfig(max_delay=3))
    trainer = Trainer(cfg)
    assert trainer.policy.config.prefix_input
    assert all((p == 0).all() for p in trainer.ema.model.prefix_conv.parameters())  # converted, not yet trained
    trainer.train()
    out = load_policy(tmp_path / "out")
    assert out.config.prefix_input and out.metadata["train"]["prefix"]["max_delay"] == 3
    assert any((p != 0).any() for p in out.model.prefix_conv.parameters())
    assert json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 4
    other = TrainConfig(**{**cfg.__dict__, "steps": 6, "prefix": PrefixTrainingConfig(max_delay=5)})
    with pytest.raises(ValueError, match="prefix was"):
        Trainer(other)
    with pytest.raises(ValueError, match="prefix.max_delay=20 must leave a position"):
        Trainer(TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "r2"), "prefix": PrefixTrainingConfig(max_delay=20)}))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp_lowdim_tiny", "lerobot_lowdim_tiny"])
def test_a_foreign_checkpoint_fine_tunes_into_a_conditioned_policy(name, tmp_path):
    """train init_from=<diffusion_policy .ckpt or LeRobot folder> prefix.max_delay=... on a zarr store
    with the source's inputs: the run takes the source's policy config (the task preset's gives way),
    and after a step too small to move the weights the exported policy reads the prefix and, with
    nothing committed, still reproduces the upstream reference sample. A store with other inputs is
    refused by name."""
    source = load_policy(FIXTURES[name][0])
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(tmp_path / "d.zarr")
    for length in (40, 30):
        obs = {"obs": rng.random((length, 20), dtype=np.float32)} if name.startswith("dp") else \
            {f.name: rng.random((length, f.dim), dtype=np.float32) for f in source.features}
        buf.add_episode({**obs, "action": rng.uniform(-1, 1, (length, 2)).astype(np.float32)})
    cfg = TrainConfig(task=TaskConfig(), policy=PolicyConfig(down_dims=[16, 32]), dataset=str(tmp_path / "d.zarr"),
                      output_dir=str(tmp_path / "run"), steps=1, lr=1e-12, batch_size=8, warmup_steps=1,
                      init_from=str(FIXTURES[name][0]), export=str(tmp_path / "out"), export_dtype="float32",
                      progress=False, prefix=PrefixTrainingConfig(max_delay=4))
    Trainer(cfg).train()
    out = load_policy(tmp_path / "out", sampler=SamplerConfig(name="sequential"))
    assert out.config.prefix_input and out.config.down_dims == source.config.down_dims
    assert out.metadata["train"]["init_from"] == str(FIXTURES[name][0])
    ref = reference(name)
    info = out.predict_action(observations(name, ref), noise=SamplerNoise(ref["noise.x_T"], ref["noise.z"]))
    assert (info.action_pred_normalized - ref["sample"]).abs().max() < TOL
    card = subprocess.run([sys.executable, "scripts/model_card.py", str(tmp_path / "out"), "--collect", "collect ..."],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True).stdout
    assert f"Initialised from `{FIXTURES[name][0]}`." in card and "committed action prefix" in card

    other = ReplayBuffer.create(tmp_path / "other.zarr")
    other.add_episode({"obs": rng.random((30, 18), dtype=np.float32), "action": rng.uniform(-1, 1, (30, 2)).astype(np.float32)})
    with pytest.raises(ValueError, match="input_features .* do not match dataset"):
        Trainer(TrainConfig(**{**cfg.__dict__, "dataset": str(tmp_path / "other.zarr"), "output_dir": str(tmp_path / "r2")}))


@pytest.mark.slow
def test_train_cli_refuses_a_policy_override_that_contradicts_the_source(tmp_path):
    """``python -m paradiffpolicy.train init_from=<ckpt> policy.down_dims=...``: the fine-tune keeps its
    source's architecture, so an override that differs ends the command with an error naming both
    values; the task preset's own differing values do not."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(tmp_path / "d.zarr")
    buf.add_episode({"obs": rng.random((30, 20), dtype=np.float32), "action": rng.uniform(-1, 1, (30, 2)).astype(np.float32)})
    common = [sys.executable, "-m", "paradiffpolicy.train", f"dataset={tmp_path / 'd.zarr'}", f"init_from={FIXTURES['dp_lowdim_tiny'][0]}",
              "prefix.max_delay=4", "steps=1", "batch_size=8", "warmup_steps=1", "progress=false", f"hydra.run.dir={tmp_path / 'h'}"]
    bad = subprocess.run(common + [f"output_dir={tmp_path / 'r1'}", "policy.down_dims=[16,32]"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "policy.down_dims=[16, 32] conflicts with init_from=" in bad.stderr and "[32, 64, 128]" in bad.stderr
    ok = subprocess.run(common + [f"output_dir={tmp_path / 'r2'}", "policy.down_dims=[32,64,128]", f"export={tmp_path / 'out'}"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["policy"]["prefix_input"] is True
