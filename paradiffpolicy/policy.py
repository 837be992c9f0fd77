"""DiffusionPolicy: normalise → condition → sample → unnormalise → slice the executed chunk.

The split follows LeRobot: :class:`~paradiffpolicy.config.PolicyConfig` (what to build),
:class:`~paradiffpolicy.models.unet1d.ConditionalUnet1D` (pure tensors), and this wrapper, which
owns the normalisers, validates inputs and delegates sampling to a pluggable sampler.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from paradiffpolicy.config import PolicyConfig, SamplerConfig
from paradiffpolicy.models.compiled import CompiledDenoiser
from paradiffpolicy.models.jit import TracedDenoiser
from paradiffpolicy.models.unet1d import ConditionalUnet1D, UnetConfig
from paradiffpolicy.normalizer import MinMaxNormalizer
from paradiffpolicy.sampling import SamplerNoise, WarmStart, draw_noise, make_sampler
from paradiffpolicy.schedulers import make_betas


class DiffusionPolicy(nn.Module):
    """Low-dimensional Diffusion Policy with observations as global conditioning.

    ``predict_action(obs (B, To, Do)) -> (B, Ta, Da)`` in the environment's action units.
    """

    def __init__(self, config: PolicyConfig, sampler: SamplerConfig | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.model = ConditionalUnet1D(UnetConfig(
            input_dim=config.action_dim,
            global_cond_dim=config.obs_dim * config.n_obs_steps,
            down_dims=list(config.down_dims),
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            cond_predict_scale=config.cond_predict_scale,
        ))
        self.obs_normalizer = MinMaxNormalizer(config.obs_dim)
        self.action_normalizer = MinMaxNormalizer(config.action_dim)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - make_betas(config.scheduler), 0), persistent=False)
        self.set_sampler(sampler or SamplerConfig())

    # -- sampling ----------------------------------------------------------------------------

    def set_sampler(self, sampler: SamplerConfig) -> None:
        """Switch the inference sampler (sequential, Picard, other scheduler or step count)."""
        self.sampler_config = sampler
        self.sampler = make_sampler(self.config.scheduler, sampler)
        # a plain attribute, not a submodule: the checkpoint's keys stay the model's
        wrapper = {"eager": None, "jit": TracedDenoiser, "compile": CompiledDenoiser}[sampler.backend]
        self._backend = None if wrapper is None else wrapper(self.model)
        self._move_sampler()

    def _move_sampler(self) -> None:
        self.sampler.to(self.alphas_cumprod.device)

    def _apply(self, fn, recurse=True):  # keep the sampler's tables on the module's device
        out = super()._apply(fn, recurse)
        if hasattr(self, "sampler"):
            self._move_sampler()
        return out

    @property
    def denoiser(self):
        """What the sampler calls: the U-Net, or its traced / compiled form (``sampler.backend``)."""
        return self.model if self._backend is None else self._backend

    def warm_up(self, batch_size: int = 1, sampler=None) -> float:
        """Run one call at ``batch_size`` so a lazily built backend (the jit trace, the compiled
        graph) is ready before latency matters; returns the seconds it took. The compile backend
        builds one graph per input shape, so warm each sampler that will share the network
        (``sampler``: e.g. a sequential reference swapped in later; default the policy's own)."""
        own = self.sampler
        self.sampler = sampler or own
        t0 = time.perf_counter()
        try:
            obs = torch.zeros(batch_size, self.config.n_obs_steps, self.config.obs_dim)
            self.predict_action(obs, generator=torch.Generator().manual_seed(0))
        finally:
            self.sampler = own
        return time.perf_counter() - t0

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def num_inference_steps(self) -> int:
        return self.sampler.table.num_steps

    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None) -> SamplerNoise:
        """All noise for one call: x_T (B, T, Da) and z (N, B, T, Da).

        Drawn on the CPU (``generator`` must be a CPU generator) and moved, so a seed gives the
        same noise on every device."""
        cfg = self.config
        shape = (batch_size, cfg.horizon, cfg.action_dim)
        return draw_noise(shape, self.num_inference_steps, generator).to(self.device)

    def validate_obs(self, obs: Any) -> Tensor:
        """Check ``obs`` is a finite float array of shape (B, To, Do); return it as a float32 tensor."""
        cfg = self.config
        if isinstance(obs, np.ndarray):
            if not np.issubdtype(obs.dtype, np.floating):
                raise TypeError(f"observation dtype {obs.dtype} is not floating point; expected float32 or float64")
            obs = torch.from_numpy(obs)
        elif not torch.is_tensor(obs):
            raise TypeError(f"observation must be a numpy array or torch tensor of shape (B, {cfg.n_obs_steps}, {cfg.obs_dim}), got {type(obs).__name__}")
        if not obs.dtype.is_floating_point:
            raise TypeError(f"observation dtype {obs.dtype} is not floating point; expected float32 or float64")
        if obs.dim() != 3 or obs.shape[1] != cfg.n_obs_steps or obs.shape[2] != cfg.obs_dim or obs.shape[0] < 1:
            raise ValueError(
                f"observation shape {tuple(obs.shape)} is wrong; expected (B, n_obs_steps={cfg.n_obs_steps}, obs_dim={cfg.obs_dim})"
            )
        finite = torch.isfinite(obs)
        if not finite.all():
            bad = (~finite).nonzero()[0].tolist()
            raise ValueError(
                f"observation contains NaN or inf (first at batch {bad[0]}, step {bad[1]}, feature {bad[2]}); "
                "refusing to act on it"
            )
        return obs.to(self.device, torch.float32)

    @torch.no_grad()
    def predict_action(
        self,
        obs: Any,
        noise: SamplerNoise | None = None,
        generator: torch.Generator | None = None,
        warm_start: WarmStart | None = None,
        return_states: bool = False,
        deadline: float | None = None,
    ) -> tuple[Tensor, dict]:
        """Sample an action chunk.

        Args:
            obs: (B, To, Do) float observations in environment units.
            noise: the call's pre-drawn noise (see :meth:`draw_noise`); drawn from ``generator``
                if None. Same ``noise`` → same chunk, whatever the sampler.
            warm_start: initial guess for the Picard trajectory (normalised units); changes the
                iteration count, never the result.
            return_states: keep the final trajectory in ``info["stats"].extra["states"]``.
            deadline: ``time.perf_counter()`` instant after which Picard returns its current
                estimate, flagged ``converged=False`` (the sequential sampler ignores it).
        Returns:
            ``(actions (B, Ta, Da), info)`` with ``info["action_pred"]`` (B, T, Da), the full
            trajectory, ``info["action_pred_normalized"]`` and ``info["stats"]`` (SampleStats).
        """
        cfg = self.config
        obs = self.validate_obs(obs)
        bsz = obs.shape[0]
        if noise is None:
            noise = self.draw_noise(bsz, generator)
        expected = (bsz, cfg.horizon, cfg.action_dim)
        if tuple(noise.initial.shape) != expected or noise.num_steps != self.num_inference_steps:
            raise ValueError(
                f"noise has shape {tuple(noise.initial.shape)} x {noise.num_steps} steps; expected "
                f"{expected} x {self.num_inference_steps} steps"
            )
        cond = self.obs_normalizer.normalize(obs).reshape(bsz, -1)
        naction, stats = self.sampler.sample(self.denoiser, noise.to(self.device), cond, warm_start=warm_start,
                                             return_states=return_states, deadline=deadline)
        if not torch.isfinite(naction).all():
            raise FloatingPointError("the sampled action contains NaN or inf; the network output is not finite")
        action_pred = self.action_normalizer.unnormalize(naction)
        start = cfg.n_obs_steps - 1
        actions = action_pred[:, start : start + cfg.n_action_steps]
        info = {"action_pred": action_pred, "action_pred_normalized": naction, "stats": stats}
        return actions, info

    # -- training ----------------------------------------------------------------------------

    def compute_loss(self, obs: Tensor, action: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Denoising loss (Ho et al. 2020, eq. 14) on raw ``obs`` (B, To, Do) and ``action`` (B, T, Da)."""
        sch = self.config.scheduler
        bsz = obs.shape[0]
        cond = self.obs_normalizer.normalize(obs).reshape(bsz, -1)
        x0 = self.action_normalizer.normalize(action)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, sch.num_train_timesteps, (bsz,), generator=generator, device=x0.device)
        a = self.alphas_cumprod[t].view(bsz, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = self.model(noisy, t, global_cond=cond)
        target = eps if sch.prediction_type == "epsilon" else x0
        return torch.nn.functional.mse_loss(pred, target)
