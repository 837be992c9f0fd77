"""The CUDA path: the same samples and the same training loop on a GPU.

Skipped (reported as skipped, not passed) on machines without CUDA, CI included; run with
``python -m pytest tests/test_cuda.py`` on a GPU machine.
"""

import numpy as np
import pytest
import torch

from paradiffpolicy import SamplerConfig, load_policy
from paradiffpolicy.sampling import WarmStart
from conftest import tiny_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VARIANTS = [  # (sampler, network backend)
    (SamplerConfig(name="picard", window=8, tol=0.0), "eager"),
    (SamplerConfig(name="picard", window=8, tol=0.0, init="copy"), "eager"),
    (SamplerConfig(name="picard", window=8, tol=0.0, anderson=1), "eager"),
    (SamplerConfig(name="picard", window=8, tol=0.0), "jit"),
    (SamplerConfig(name="sequential"), "jit"),
    (SamplerConfig(name="picard", window=8, tol=0.0), "compile"),  # CUDA graphs, fixed-shape windows
    (SamplerConfig(name="sequential"), "compile"),
]


def _inputs(policy, bsz=3):
    obs = torch.randn(bsz, 2, 5, generator=torch.Generator().manual_seed(0))
    return obs, policy.draw_noise(bsz, torch.Generator().manual_seed(1))


def test_every_sampler_gives_the_sequential_sample_on_cuda():
    policy = tiny_policy(SamplerConfig(name="sequential"))
    obs, noise = _inputs(policy)
    cpu = policy.predict_action(obs, noise=noise).actions
    policy.to("cuda")
    noise = policy.draw_noise(3, torch.Generator().manual_seed(1))  # drawn on the CPU: the same noise
    assert noise.initial.is_cuda
    ref = policy.predict_action(obs, noise=noise).actions
    assert ref.is_cuda
    assert (ref.cpu() - cpu).abs().max() < 1e-3  # other kernels, same sample
    for sampler, backend in VARIANTS:
        policy.set_backend(backend)
        policy.set_sampler(sampler)
        info = policy.predict_action(obs, noise=noise)
        x = info.actions
        assert (x - ref).abs().max() < 1e-4, (sampler, backend)
        assert bool(info.stats.converged.all())


def test_warm_started_tick_stays_exact_on_cuda():
    policy = tiny_policy(SamplerConfig(name="picard", window=8, tol=0.0)).to("cuda")
    obs, _ = _inputs(policy)
    noise = policy.draw_noise(3, torch.Generator().manual_seed(1))
    info = policy.predict_action(obs, noise=noise, return_trajectory=True)
    shift = policy.config.n_action_steps
    nxt = noise.shifted(shift, policy.draw_noise(3, torch.Generator().manual_seed(2)))
    warm = WarmStart.from_previous(info.trajectory, shift)
    obs2 = obs + 0.1
    x = policy.predict_action(obs2, noise=nxt, warm_start=warm).actions
    policy.set_sampler(SamplerConfig(name="sequential"))
    ref = policy.predict_action(obs2, noise=nxt).actions
    assert (x - ref).abs().max() < 1e-4


def test_training_on_cuda_exports_a_cpu_loadable_checkpoint(tmp_path):
    from paradiffpolicy.config import PolicyConfig
    from paradiffpolicy.data.replay_buffer import ReplayBuffer
    from paradiffpolicy.envs import TaskConfig
    from paradiffpolicy.train import TrainConfig, Trainer

    buf = ReplayBuffer.create(tmp_path / "d.zarr")
    for i in range(3):
        rng = np.random.default_rng(i)
        buf.add_episode({"obs": rng.normal(size=(20, 19)).astype(np.float32),
                         "action": rng.uniform(-1, 1, size=(20, 7)).astype(np.float32)})
    cfg = TrainConfig(task=TaskConfig(), policy=PolicyConfig(down_dims=[16, 32], diffusion_step_embed_dim=16),
                      dataset=str(tmp_path / "d.zarr"), output_dir=str(tmp_path / "run"), steps=4, batch_size=8,
                      warmup_steps=1, device="cuda", export=str(tmp_path / "ck"), progress=False)
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda"
    trainer.train()
    policy = load_policy(tmp_path / "ck")
    assert policy.metadata["train"]["device"].startswith("cuda")
    actions = policy.predict_action(torch.from_numpy(np.asarray(buf["obs"][:2]))[None]).actions
    assert actions.shape == (1, 8, 7) and torch.isfinite(actions).all()
    # resume on the GPU continues from the saved step
    cfg.steps = 6
    trainer = Trainer(cfg)
    assert trainer.step == 4
    trainer.train()
