"""Exported backends (ONNX Runtime, OpenVINO): the eager numbers, the samplers' exactness on each
backend, the cache, and clear errors. Skipped with the reason where a runtime is not installed."""

import os

import pytest
import torch

from conftest import needs_backend
from paradiffpolicy import SamplerConfig, load_policy
from paradiffpolicy.backends import available_backends, cache_dir
from paradiffpolicy.sampling.prefix import ActionPrefix
from conftest import tiny_policy

# OpenVINO compiles each exported network for ~1-2 s: its cases are in the slow tier (with the
# other compilation tests); ONNX Runtime checks the same exported path in the fast tier.
EXPORTED = [pytest.param("onnxruntime", marks=needs_backend("onnxruntime")),
            pytest.param("openvino", marks=[needs_backend("openvino"), pytest.mark.slow])]


def _inputs(policy, bsz=3):
    obs = torch.randn(bsz, 2, 5, generator=torch.Generator().manual_seed(0))
    return obs, policy.draw_noise(bsz, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_sequential_sample_is_the_eager_one(backend):
    policy = tiny_policy(SamplerConfig(name="sequential"))
    obs, noise = _inputs(policy)
    eager = policy.predict_action(obs, noise=noise)
    out = policy.predict_action(obs, noise=noise, backend=backend)
    dev = (out.action_pred_normalized - eager.action_pred_normalized).abs().max()
    assert dev < 1e-5
    # the same network, not a coincidence: a changed weight moves both the same way once re-exported
    with torch.no_grad():
        policy.model.final_conv[1].bias.add_(0.3)
    moved = policy.predict_action(obs, noise=noise)
    stale = policy.predict_action(obs, noise=noise, backend=backend)  # holds the weights of its export
    assert (stale.actions - out.actions).abs().max() < 1e-5 < (moved.actions - eager.actions).abs().max()
    policy.load_state_dict(policy.state_dict())  # new weights: the exported network is rebuilt
    fresh = policy.predict_action(obs, noise=noise, backend=backend)
    assert (fresh.action_pred_normalized - moved.action_pred_normalized).abs().max() < 1e-5


@pytest.mark.parametrize("backend", EXPORTED)
@pytest.mark.parametrize("exact", [dict(window=1, tol=0.1), dict(window=8, tol=0.0)], ids=["w1", "tol0"])
def test_picard_reaches_the_sequential_sample_of_its_backend(backend, exact):
    """Picard's fixed point on an exported network is that network's sequential sample, with a
    committed prefix too (conditioned sampling on the same backend)."""
    policy = tiny_policy(SamplerConfig(name="sequential"))
    policy.set_backend(backend)
    obs, noise = _inputs(policy)
    picard = policy.make_sampler(SamplerConfig(name="picard", **exact))
    prefix = ActionPrefix(torch.full((3, 16, 2), 0.2), torch.cat([torch.ones(3, 4), torch.zeros(3, 12)], 1), mode="x0")
    for pre in (None, prefix):
        seq = policy.predict_action(obs, noise=noise, prefix=pre)
        par = policy.predict_action(obs, noise=noise, sampler=picard, prefix=pre)
        assert (par.action_pred_normalized - seq.action_pred_normalized).abs().max() < 1e-5


@pytest.mark.parametrize("backend", EXPORTED)
def test_export_is_cached_by_weights(backend):
    policy = tiny_policy()
    obs, noise = _inputs(policy, 1)
    policy.predict_action(obs, noise=noise, backend=backend)
    files = sorted((cache_dir() / "onnx").glob("unet-*.onnx"))
    assert files and os.environ["PARADIFFPOLICY_CACHE"] in str(files[0])  # the tests' cache, not the user's
    again = tiny_policy()  # same seed, same weights: the same file
    again.predict_action(obs, noise=noise, backend=backend)
    assert sorted((cache_dir() / "onnx").glob("unet-*.onnx")) == files


@pytest.mark.parametrize("backend", EXPORTED)
def test_guided_join_needs_a_differentiable_backend(backend):
    policy = tiny_policy()
    obs, noise = _inputs(policy, 1)
    guided = ActionPrefix(torch.zeros(1, 16, 2), torch.ones(1, 16), mode="guided")
    with pytest.raises(ValueError, match="backend=eager or backend=jit"):
        policy.predict_action(obs, noise=noise, backend=backend, prefix=guided)


def test_bad_backend_is_refused_by_name(tmp_path):
    policy = tiny_policy()
    with pytest.raises(ValueError, match=r"backend='tpu' is unknown"):
        policy.set_backend("tpu")
    with pytest.raises(ValueError, match=r"backend='onnx' is unknown"):
        policy.predict_action(torch.zeros(1, 2, 5), backend="onnx")
    with pytest.raises(ValueError, match=r"backend='tensorrt' is unknown"):
        load_policy(tmp_path, backend="tensorrt")
    assert {"eager", "jit", "compile"} <= set(available_backends())


@pytest.mark.parametrize("backend", EXPORTED)
def test_a_copy_of_a_policy_rebuilds_its_exported_network(backend):
    import copy

    policy = tiny_policy(SamplerConfig(name="sequential"))
    policy.set_backend(backend)
    obs, noise = _inputs(policy, 1)
    out = policy.predict_action(obs, noise=noise)  # the runtime is built
    twin = copy.deepcopy(policy)  # e.g. the trainer's EMA copy; runtimes themselves are not copied
    assert twin.network() is not policy.network()
    assert torch.equal(twin.predict_action(obs, noise=noise).actions, out.actions)


@needs_backend("openvino")
@pytest.mark.slow
def test_bf16_backend_is_the_float32_network_rounded():
    """``openvino-bf16``: refused by name on a CPU without bfloat16 instructions; elsewhere its
    sequential sample is float32's to bfloat16's precision (not bit for bit: it does compute in
    bf16). Picard's fixed point is that sample only up to the same rounding: an input that differs
    from the sequential one in its last float32 bits can round to another bf16 value."""
    from paradiffpolicy.backends import openvino_capabilities

    policy = tiny_policy(SamplerConfig(name="sequential"))
    if "BF16" not in openvino_capabilities():
        with pytest.raises(ValueError, match=r"backend='openvino-bf16' needs a CPU with bfloat16 instructions"):
            policy.set_backend("openvino-bf16")
        pytest.skip("this CPU has no bfloat16 instructions (the backend is refused, as checked)")
    assert "openvino-bf16" in available_backends()
    obs, noise = _inputs(policy)
    f32 = policy.predict_action(obs, noise=noise, backend="openvino").action_pred_normalized
    policy.set_backend("openvino-bf16")
    bf16 = policy.predict_action(obs, noise=noise).action_pred_normalized
    dev = (bf16 - f32).abs().max()
    assert 1e-5 < dev < 5e-2, dev
    for exact in (dict(window=1, tol=0.1), dict(window=8, tol=0.0)):
        picard = policy.make_sampler(SamplerConfig(name="picard", **exact))
        out = policy.predict_action(obs, noise=noise, sampler=picard).action_pred_normalized
        assert (out - bf16).abs().max() < dev  # nearer its backend's sequential sample than float32's is
