import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Small, deterministic CPU work in tests.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Back to 1 torch thread after each test: an Evaluator sets the process's count (eval's
    ``threads``, 2 by default), and idle OpenMP workers of a 2-thread team spinning beside a later
    test's background inference thread made that test 15x slower on 2 cores."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory):
    """Exported networks (backend=onnxruntime/openvino) go to a temporary cache, not the user's."""
    os.environ["PARADIFFPOLICY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def needs_backend(name: str):
    """Skip (with the reason) where an optional exported runtime is not installed; CI installs them."""
    return pytest.mark.skipif(importlib.util.find_spec(name) is None or importlib.util.find_spec("onnx") is None,
                              reason=f"backend {name} needs pip install -e '.[{name}]'")


class ToyDenoiser(torch.nn.Module):
    """A cheap, smooth, nonlinear epsilon-predictor with the Denoiser signature.

    The near-optimal denoiser for data ``N(μ(cond), 0.3²)`` (μ = 0.5 tanh(cond C)) under the
    100-step squaredcos schedule, plus a nonlinear term scaled by ``strength`` so the fixed point is
    not trivial. Trajectories stay bounded, like a trained policy's.
    """

    def __init__(self, horizon: int = 8, action_dim: int = 3, cond_dim: int = 4, strength: float = 1.0, seed: int = 0):
        super().__init__()
        from paradiffpolicy.schedulers import SchedulerConfig, make_betas

        g = torch.Generator().manual_seed(seed)
        d = horizon * action_dim
        self.w = torch.randn(d, d, generator=g) / d**0.5
        self.c = torch.randn(cond_dim, d, generator=g) / cond_dim**0.5
        self.tw = torch.randn(d, generator=g)
        self.strength = strength
        self.abar = torch.cumprod(1 - make_betas(SchedulerConfig()), 0)
        self.shape = (horizon, action_dim)

    def forward(self, sample, timestep, global_cond=None):
        m = sample.shape[0]
        x = sample.reshape(m, -1)
        mu = torch.zeros_like(x) if global_cond is None else 0.5 * torch.tanh(global_cond @ self.c)
        a = self.abar[timestep.long()][:, None]
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * 0.09 + 1 - a)
        eps = eps + 0.2 * self.strength * torch.tanh(x @ self.w + torch.sin(timestep.float()[:, None] * 0.05 + self.tw))
        return eps.reshape(m, *self.shape)


@pytest.fixture
def toy():
    return ToyDenoiser()


def tiny_policy(sampler=None, *, steps: int = 20, obs_range=(0.0, 1.0), action_range=(-1.0, 1.0), **config):
    """The suite's one small policy: an untrained low-dim U-Net (obs 5, action 2, horizon 16 unless
    ``config`` says otherwise; weights from seed 0), ``steps`` DDPM steps, normalisers fitted to
    ``obs_range`` / ``action_range``; ``sampler``: its SamplerConfig (None: the default)."""
    from paradiffpolicy import DiffusionPolicy, PolicyConfig, SchedulerConfig

    cfg = PolicyConfig(**{"obs_dim": 5, "action_dim": 2, "down_dims": [16, 32], "diffusion_step_embed_dim": 16,
                          "scheduler": SchedulerConfig(num_train_timesteps=steps, num_inference_steps=steps), **config})
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg, sampler)
    policy.obs_normalizer.fit(torch.tensor([[obs_range[0]] * cfg.obs_dim, [obs_range[1]] * cfg.obs_dim]))
    policy.action_normalizer.fit(torch.tensor([[action_range[0]] * cfg.action_dim, [action_range[1]] * cfg.action_dim]))
    return policy.eval()

