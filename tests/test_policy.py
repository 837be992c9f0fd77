"""DiffusionPolicy: shapes, validation of bad input, reproducibility, save/load round trip."""

import json

import numpy as np
import pytest
import torch

from paradiffpolicy import CheckpointError, SamplerConfig, load_policy, save_policy
from paradiffpolicy.config import from_dict

from conftest import tiny_policy


def test_chunk_shapes_and_slice():
    policy = tiny_policy(SamplerConfig(name="sequential"))  # DDPM's last step returns the clipped x̂0
    obs = torch.randn(3, 2, 5)
    info = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    actions = info.actions
    assert actions.shape == (3, 8, 2)
    assert info.action_pred.shape == (3, 16, 2)
    assert torch.equal(actions, info.action_pred[:, 1:9])  # executed slice starts at To-1
    # clip_sample keeps the normalised trajectory in [-1, 1] → actions within the data range
    assert (info.action_pred_normalized.abs() <= 1 + 1e-5).all()


def test_same_noise_same_chunk_for_sequential_and_picard():
    policy = tiny_policy(SamplerConfig(window=8, tol=0.05))
    obs = np.random.default_rng(0).normal(size=(2, 2, 5)).astype(np.float64)
    noise = policy.draw_noise(2, torch.Generator().manual_seed(1))
    picard = policy.predict_action(obs, noise=noise)
    policy.set_sampler(SamplerConfig(name="sequential"))
    seq_info = policy.predict_action(obs, noise=noise)
    seq = seq_info.actions
    policy.set_sampler(SamplerConfig(name="picard", window=8, tol=0.0))
    exact = policy.predict_action(obs, noise=noise).actions
    assert (exact - seq).abs().max() < 1e-4
    # an untrained network is a hard fixed point; tol=0.05 still lands close (normalised units)
    assert (picard.action_pred_normalized - seq_info.action_pred_normalized).abs().max() < 0.1
    again = policy.predict_action(obs, generator=torch.Generator().manual_seed(5)).actions
    again2 = policy.predict_action(obs, generator=torch.Generator().manual_seed(5)).actions
    assert torch.equal(again, again2)


def test_warm_up_builds_a_lazy_backend_before_the_first_call():
    policy = tiny_policy(SamplerConfig(name="picard", window=8, tol=0.05))
    policy.set_backend("jit")
    assert not policy.denoiser.ready
    policy.warm_up(2)
    assert policy.denoiser.ready


@pytest.mark.parametrize("backend", ["jit", pytest.param("compile", marks=pytest.mark.slow)])
def test_backend_gives_the_eager_chunk(backend):
    """The traced graph (jit) and torch.compile (inductor on this CPU, CUDA graphs on a GPU) compute
    what the modules compute: the eager chunk and iteration count for the sequential and the Picard
    sampler, with the checkpoint's keys unchanged. jit follows in-place weight updates; with
    compile, Picard feeds one input shape, so each sampler compiles once."""
    from torch._dynamo.utils import counters

    policy = tiny_policy()
    keys = set(policy.state_dict())
    obs = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    noise = policy.draw_noise(3, torch.Generator().manual_seed(1))
    for name in ("sequential", "picard"):
        policy.set_sampler(SamplerConfig(name=name, window=8, tol=0.05))
        ref_info = policy.predict_action(obs, noise=noise)
        eager = ref_info.actions
        policy.set_backend(backend)
        counters.clear()
        info = policy.predict_action(obs, noise=noise)
        fast = info.actions
        assert (fast - eager).abs().max() < (1e-5 if backend == "jit" else 1e-4), name  # compile reorders sums
        assert info.stats.iterations.tolist() == ref_info.stats.iterations.tolist()
        assert policy.denoiser is not policy.model
        if backend == "compile":
            assert counters["stats"]["unique_graphs"] == 1, name  # one shape: no recompilation
        policy.set_backend("eager")
    policy.set_backend(backend)
    assert set(policy.state_dict()) == keys  # the wrapped network is not a submodule
    if backend == "jit":
        x, t, c = torch.randn(5, 16, 2), torch.arange(5), torch.randn(5, 10)
        with torch.no_grad():
            policy.model.final_conv[1].bias.add_(0.5)
            assert torch.allclose(policy.denoiser(x, t, global_cond=c), policy.model(x, t, global_cond=c), atol=1e-6)


@pytest.mark.parametrize("obs,err,match", [
    (torch.randn(2, 3, 5), ValueError, r"'observation.state' has shape \(2, 3, 5\); expected \(B, 2, 5\)"),
    (torch.randn(2, 5), ValueError, r"has shape \(2, 5\)"),
    (torch.randn(2, 2, 4), ValueError, r"\(2, 2, 4\); expected \(B, 2, 5\)"),
    (torch.ones(2, 2, 5, dtype=torch.int64), TypeError, "not floating point"),
    (np.ones((2, 2, 5), dtype=np.int32), TypeError, "not floating point"),
    ([[0.0] * 5] * 2, TypeError, "numpy array or torch tensor"),
])
def test_bad_observations_name_the_problem(obs, err, match):
    policy = tiny_policy()
    with pytest.raises(err, match=match):
        policy.predict_action(obs)
    actions = policy.predict_action(torch.zeros(1, 2, 5)).actions  # still usable
    assert torch.isfinite(actions).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_observation_is_refused(value):
    policy = tiny_policy()
    obs = torch.zeros(2, 2, 5)
    obs[1, 0, 3] = value
    with pytest.raises(ValueError, match=r"NaN or inf \(first at batch 1, step 0, feature 3\)"):
        policy.predict_action(obs)


def test_non_finite_network_output_never_reaches_the_caller():
    policy = tiny_policy()
    with torch.no_grad():
        policy.model.final_conv[1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        policy.predict_action(torch.zeros(1, 2, 5))


@pytest.mark.parametrize("kw,match", [
    (dict(name="magic"), "sampler.name"), (dict(window=0), "sampler.window"), (dict(tol=-1.0), "sampler.tol"),
    (dict(scheduler="euler"), "sampler.scheduler"), (dict(num_inference_steps=0), "num_inference_steps"),
])
def test_bad_sampler_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_policy(sampler=SamplerConfig(**kw))


@pytest.mark.parametrize("kw,match", [
    (dict(horizon=18, down_dims=[16, 32, 64]), "policy.horizon"), (dict(n_action_steps=16), "policy.n_action_steps"),
    (dict(obs_dim=0), "policy.obs_dim"), (dict(down_dims=[12]), "policy.down_dims"),
])
def test_bad_policy_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_policy(**kw)


def test_from_dict_rejects_unknown_and_mistyped_keys():
    with pytest.raises(ValueError, match="windw"):
        from_dict(SamplerConfig, {"windw": 3})
    with pytest.raises(ValueError, match="window"):
        from_dict(SamplerConfig, {"window": "big"})
    assert from_dict(SamplerConfig, {"window": "4"}).window == 4


def test_switching_scheduler_at_inference():
    policy = tiny_policy(sampler=SamplerConfig(name="sequential", scheduler="ddim", num_inference_steps=5))
    assert policy.num_inference_steps == 5
    info = policy.predict_action(torch.zeros(1, 2, 5))
    actions = info.actions
    assert info.stats.rounds == 5 and torch.isfinite(actions).all()


def test_compute_loss_is_finite_and_backpropagates():
    policy = tiny_policy().train()
    loss = policy.compute_loss(torch.randn(4, 2, 5), torch.rand(4, 16, 2), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and policy.model.final_conv[1].weight.grad is not None


# -- checkpoints ---------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    policy = tiny_policy(SamplerConfig(window=8, tol=0.05))
    save_policy(policy, tmp_path / "ck", metadata={"task": "test"})
    loaded = load_policy(tmp_path / "ck", sampler=SamplerConfig(window=8, tol=0.05))
    assert loaded.metadata == {"task": "test"}
    for k, v in policy.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    noise = policy.draw_noise(1, torch.Generator().manual_seed(0))
    a = policy.predict_action(torch.ones(1, 2, 5), noise=noise).actions
    b = loaded.predict_action(torch.ones(1, 2, 5), noise=noise).actions
    assert torch.equal(a, b)
    assert not list(tmp_path.glob("ck/*.tmp"))


def test_float16_weights_halve_the_file_and_load_as_float32(tmp_path):
    policy = tiny_policy()
    save_policy(policy, tmp_path / "a")
    save_policy(policy, tmp_path / "b", weights_dtype="float16")
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("b") < 0.6 * size("a")
    loaded = load_policy(tmp_path / "b")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.obs_normalizer.scale, policy.obs_normalizer.scale)  # stats stay float32
    w = policy.model.final_conv[1].weight
    assert torch.equal(loaded.model.final_conv[1].weight, w.half().float())


@pytest.mark.slow
def test_shipped_camera_policy_samples_exactly_on_its_held_out_windows():
    """checkpoints/pusht_image as shipped (float16 weights, camera + agent xy): on its held-out
    observation windows, Picard at window=1/tol=0 returns the sequential sample with the same noise,
    and the README preset stays close to it."""
    from pathlib import Path

    from paradiffpolicy.data.obs_sample import load_observation_sample

    ck = Path(__file__).resolve().parents[1] / "checkpoints" / "pusht_image"
    policy = load_policy(ck)
    assert [f.name for f in policy.features] == ["observation.image", "observation.state"]
    assert json.loads((ck / "config.json").read_text())["weights_dtype"] == "float16"
    windows, source = load_observation_sample(ck)
    assert source["held_out"]
    obs = {k: v[:2] for k, v in windows.items()}
    noise = policy.draw_noise(2, torch.Generator().manual_seed(0))
    seq = policy.predict_action(obs, noise=noise, sampler=policy.make_sampler(SamplerConfig(name="sequential")))
    exact = policy.predict_action(obs, noise=noise, sampler=policy.make_sampler(SamplerConfig(window=1, tol=0.0)))
    preset = policy.predict_action(obs, noise=noise, sampler=policy.make_sampler(SamplerConfig(window=16, tol=0.1)))
    torch.testing.assert_close(exact.actions_normalized, seq.actions_normalized, atol=1e-5, rtol=0)
    assert (preset.actions_normalized - seq.actions_normalized).abs().max() < 5e-2
    assert seq.actions.shape == (2, 8, 2) and torch.isfinite(seq.actions).all()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_policy(tmp_path / "empty")


def test_truncated_and_corrupted_weights(tmp_path):
    save_policy(tiny_policy(), tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_policy(tmp_path / "ck")
    w.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_policy(tmp_path / "ck")


def test_corrupted_config(tmp_path):
    save_policy(tiny_policy(), tmp_path / "ck")
    c = tmp_path / "ck" / "config.json"
    doc = json.loads(c.read_text())
    c.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_policy(tmp_path / "ck")
    doc["policy"]["horizonn"] = 3
    c.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="horizonn"):
        load_policy(tmp_path / "ck")
    doc["policy"].pop("horizonn")
    doc["format"] = "diffusion_policy"
    c.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="format"):
        load_policy(tmp_path / "ck")


def test_weights_of_another_architecture(tmp_path):
    save_policy(tiny_policy(), tmp_path / "a")
    save_policy(tiny_policy(down_dims=[16, 32, 64]), tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_policy(tmp_path / "a")
    save_policy(tiny_policy(obs_dim=6), tmp_path / "c")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "c" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_policy(tmp_path / "a")


def test_fewer_trunk_stages_give_a_finer_keypoint_map_under_the_same_names():
    from paradiffpolicy.models.vision import RgbEncoder, VisionConfig

    full = RgbEncoder(VisionConfig(backbone_width=16), (3, 96, 96)).backbone.state_dict()
    short = RgbEncoder(VisionConfig(backbone_width=16, backbone_stages=2), (3, 96, 96))
    assert (short.pool._h, short.pool._w) == (11, 11)  # 84x84 crop at stride 8 (3x3 at stride 32)
    assert short.pool.nets.in_channels == 32
    kept = short.backbone.state_dict()
    assert set(kept) < set(full) and all(kept[k].shape == full[k].shape for k in kept)  # names and shapes of layer1-2
    with pytest.raises(ValueError, match="backbone_stages=5"):
        VisionConfig(backbone_stages=5)


def test_sampler_presets_are_read_from_conf():
    from paradiffpolicy.presets import sampler_preset

    assert sampler_preset("picard") == SamplerConfig(name="picard", window=16, tol=0.1)
    assert sampler_preset("paraddim", num_inference_steps=10) == SamplerConfig(scheduler="ddim", num_inference_steps=10, window=4, tol=1e-3)
    with pytest.raises(ValueError, match="'fastest' is not in .*expected one of .*'picard'"):
        sampler_preset("fastest")
