"""DiffusionPolicy: encode the observation → sample → unnormalise → slice the executed chunk.

The split follows LeRobot: :class:`~paradiffpolicy.config.PolicyConfig` (what to build),
pure-tensor modules (:class:`~paradiffpolicy.models.obs_encoder.ObservationEncoder`,
:class:`~paradiffpolicy.models.unet1d.ConditionalUnet1D`), and this wrapper, which validates
inputs, runs the encoder once per call and delegates sampling of the U-Net to a pluggable sampler.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from paradiffpolicy.backends import EXPORTED, ExportedDenoiser, ExportedEncoder, check_backend
from paradiffpolicy.config import PolicyConfig, SamplerConfig
from paradiffpolicy.features import check_step, coerce_observation
from paradiffpolicy.models.compiled import CompiledDenoiser
from paradiffpolicy.models.jit import TracedDenoiser
from paradiffpolicy.models.obs_encoder import ObservationEncoder
from paradiffpolicy.models.unet1d import ConditionalUnet1D, UnetConfig, prefix_channels
from paradiffpolicy.normalizer import Normalizer
from paradiffpolicy.sampling import PicardSampler, SampleStats, SamplerNoise, SequentialSampler, Trajectory, WarmStart
from paradiffpolicy.sampling import draw_noise, make_sampler
from paradiffpolicy.sampling.prefix import ActionPrefix
from paradiffpolicy.schedulers import make_betas


Sampler = Union[PicardSampler, SequentialSampler]


@dataclass
class PolicyOutput:
    """One policy call: ``action_pred`` (B, T, Da) the whole predicted trajectory in environment
    units, ``action_pred_normalized`` the same in the network's units, the sampler's ``stats`` and,
    when asked for, its ``trajectory``. The executed chunk starts ``start`` steps in (To-1 by
    default: the trajectory's first steps lie in the observed past)."""

    action_pred: Tensor
    action_pred_normalized: Tensor
    start: int
    n_action_steps: int
    stats: SampleStats
    trajectory: Trajectory | None = None

    @property
    def actions(self) -> Tensor:
        """The executed chunk (B, Ta, Da) in environment units."""
        return self.action_pred[:, self.start : self.start + self.n_action_steps]

    @property
    def actions_normalized(self) -> Tensor:
        """The executed chunk (B, Ta, Da) in the network's units (for deviation measurements)."""
        return self.action_pred_normalized[:, self.start : self.start + self.n_action_steps]

    @property
    def upcoming(self) -> Tensor:
        """Every predicted action from the observation's tick to the horizon's end (B, T-start, Da):
        ``upcoming[:, j]`` is for ``j`` ticks after the observation (a controller whose next chunk
        is late keeps using these)."""
        return self.action_pred[:, self.start :]


@dataclass(frozen=True)
class Network:
    """The policy's networks on one backend: ``denoiser`` (what the samplers call) and ``encoder``
    (``{feature: (B, To, ...)}`` normalised observations → (B, To·D) conditioning)."""

    backend: str
    denoiser: Callable
    encoder: Callable


LEGACY_KEYS = {"obs_normalizer.": "obs_encoder.normalizers.0."}


def upgrade_legacy_keys(state: dict) -> dict:
    """State dicts written before observations became named features (``obs_normalizer.*``) →
    today's names; other keys unchanged."""
    out = {}
    for k, v in state.items():
        for old, new in LEGACY_KEYS.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def with_prefix_input(policy: "DiffusionPolicy") -> "DiffusionPolicy":
    """A new policy whose U-Net also reads the committed action prefix, with ``policy``'s weights and
    a zero-initialised prefix convolution: it computes exactly ``policy``'s function until it is
    fine-tuned (``train prefix.max_delay=...``). ``policy`` itself is unchanged."""
    if policy.config.prefix_input:
        raise ValueError("this policy already reads the committed prefix (prefix_input=true)")
    config = dataclasses.replace(policy.config, prefix_input=True)
    out = DiffusionPolicy(config, policy.sampler_config, policy.backend).to(policy.device)
    missing, unexpected = out.load_state_dict(policy.state_dict(), strict=False)
    if unexpected or any(not k.startswith("model.prefix_conv.") for k in missing):
        raise ValueError(f"with_prefix_input: unexpected state keys {unexpected}, missing {missing}")
    out.metadata = dict(policy.metadata)
    return out


class DiffusionPolicy(nn.Module):
    """Diffusion Policy with observations as global conditioning.

    ``predict_action(obs).actions`` is the executed chunk (B, Ta, Da) in the environment's action
    units, ``obs`` a dict ``{feature name: (B, To, ...)}`` or, for one low-dim feature, a
    (B, To, Do) array. ``sampler`` is the sampling algorithm, ``backend`` how the networks run
    (:mod:`paradiffpolicy.backends`); both can also be named per call.
    """

    def __init__(self, config: PolicyConfig, sampler: SamplerConfig | None = None, backend: str = "eager"):
        super().__init__()
        config.require_dims()
        self.config = config
        self.features = config.features()
        self.obs_encoder = ObservationEncoder(self.features, config.vision)
        self.model = ConditionalUnet1D(UnetConfig(
            input_dim=config.action_dim,
            global_cond_dim=self.obs_encoder.step_dim * config.n_obs_steps,
            down_dims=list(config.down_dims),
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            cond_predict_scale=config.cond_predict_scale,
            prefix_input=config.prefix_input,
        ))
        self.action_normalizer = Normalizer(config.action_normalization, config.action_dim)
        # where the weights came from (training run, dataset, foreign source); filled by load_policy
        self.metadata: dict[str, Any] = {}
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - make_betas(config.scheduler), 0), persistent=False)
        self._register_load_state_dict_pre_hook(self._upgrade_keys)
        # built networks are caches (exported ones copy the weights): new weights rebuild them
        self.register_load_state_dict_post_hook(DiffusionPolicy._forget_networks)
        self._networks: dict[tuple[str, int], Network] = {}
        self.set_backend(backend)
        self.set_sampler(sampler or SamplerConfig())

    @staticmethod
    def _forget_networks(module: "DiffusionPolicy", incompatible_keys) -> None:
        module._networks.clear()

    def __getstate__(self):  # copies and pickles rebuild their networks (runtimes do not copy)
        state = super().__getstate__()
        return {**state, "_networks": {}}

    @staticmethod
    def _upgrade_keys(state_dict, prefix, *args) -> None:
        for k in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + next(iter(upgrade_legacy_keys({k[len(prefix):]: None})))
            if new != k:
                state_dict[new] = state_dict.pop(k)

    @property
    def obs_normalizer(self) -> Normalizer:
        """The normaliser of a single-feature low-dim policy (what ``train`` fits)."""
        if len(self.features) != 1 or self.features[0].is_image:
            raise AttributeError("obs_normalizer exists only for a policy with one low-dim feature; see obs_encoder.normalizers")
        return self.obs_encoder.normalizers[0]

    # -- sampling ----------------------------------------------------------------------------

    def set_sampler(self, sampler: SamplerConfig) -> None:
        """Choose the policy's own inference sampler (used when a call names no other)."""
        self.sampler_config = sampler
        self.sampler = self.make_sampler(sampler)

    def set_backend(self, backend: str) -> None:
        """Choose how the policy's networks run when a call names no other backend: eager, jit,
        compile, onnxruntime, openvino or openvino-bf16 (:mod:`paradiffpolicy.backends`). The
        network is built on first use (:meth:`warm_up` builds it ahead)."""
        self.backend = check_backend(backend)
        if hasattr(self, "sampler"):
            self.sampler = self.make_sampler(self.sampler_config)

    def network(self, backend: str | None = None) -> Network:
        """The policy's networks on ``backend`` (default the policy's own), built once per backend
        and torch thread count (an exported runtime takes its thread count when it is built) and
        kept: several backends share the weights of one policy, e.g. to time them side by side."""
        key = (check_backend(backend or self.backend), torch.get_num_threads())
        if key not in self._networks:
            self._networks[key] = self._build_network(key[0])
        return self._networks[key]

    def _build_network(self, backend: str) -> Network:
        if backend in EXPORTED:
            if self.device.type != "cpu":
                raise ValueError(f"backend={backend} runs on the CPU; this policy is on {self.device}")
            threads = torch.get_num_threads()  # the exported runtimes' intra-op threads: torch's setting
            cfg = self.config
            denoiser = ExportedDenoiser(self.model, backend, cfg.horizon, cfg.action_dim,
                                        self.obs_encoder.step_dim * cfg.n_obs_steps, threads)
            return Network(backend, denoiser, ExportedEncoder(self.obs_encoder, backend, cfg.n_obs_steps, threads))
        wrapper = {"eager": None, "jit": TracedDenoiser, "compile": CompiledDenoiser}[backend]
        return Network(backend, self.model if wrapper is None else wrapper(self.model), self.obs_encoder)

    def make_sampler(self, sampler: SamplerConfig, backend: str | None = None) -> Sampler:
        """A sampler for this policy's scheduler on its device, e.g. a sequential reference to pass
        as ``predict_action(..., sampler=...)`` (built once, reused every call). ``backend`` (default
        the policy's) only matters for ``compile``, whose graphs need Picard's fixed shapes."""
        fixed = (backend or self.backend) == "compile"
        return make_sampler(self.config.scheduler, sampler, fixed_shape=fixed).to(self.device)

    def _apply(self, fn, recurse=True):  # keep the sampler's tables on the module's device
        out = super()._apply(fn, recurse)
        if hasattr(self, "sampler"):
            self.sampler.to(self.alphas_cumprod.device)
        return out

    @property
    def denoiser(self):
        """What the policy's sampler calls on its own backend: the U-Net, or its traced, compiled
        or exported form."""
        return self.network().denoiser

    def warm_up(self, batch_size: int = 1, sampler: Sampler | None = None, backend: str | None = None) -> float:
        """Run one call at ``batch_size`` so a lazily built backend (the jit trace, the compiled
        graph, the exported runtime) is ready before latency matters; returns the seconds it took.
        The compile backend builds one graph per input shape, so warm each sampler that will share
        the network (``sampler``: e.g. a sequential reference passed per call later)."""
        t0 = time.perf_counter()
        self.predict_action(self.dummy_observation(batch_size), generator=torch.Generator().manual_seed(0),
                            sampler=sampler, backend=backend)
        return time.perf_counter() - t0

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def num_inference_steps(self) -> int:
        """Denoising steps of the policy's own sampler."""
        return self.sampler.table.num_steps

    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None,
                   sampler: Sampler | None = None) -> SamplerNoise:
        """All noise for one call of ``sampler`` (default the policy's): x_T (B, T, Da) and
        z (N, B, T, Da).

        Drawn on the CPU (``generator`` must be a CPU generator) and moved, so a seed gives the
        same noise on every device."""
        cfg = self.config
        shape = (batch_size, cfg.horizon, cfg.action_dim)
        return draw_noise(shape, (sampler or self.sampler).table.num_steps, generator).to(self.device)

    def dummy_observation(self, batch_size: int = 1) -> dict[str, Tensor]:
        """A valid observation of zeros (images mid-grey), e.g. to warm up a backend."""
        steps = self.config.n_obs_steps
        return {f.name: torch.full((batch_size, steps, *f.shape), 0.5 if f.is_image else 0.0) for f in self.features}

    def validate_obs(self, obs: Any) -> dict[str, Tensor]:
        """Check ``obs`` against the policy's features (shape, dtype, NaN/inf, image layout and
        range); return ``{name: float32 tensor (B, To, ...)}`` on the policy's device."""
        feats = coerce_observation(self.features, obs, self.config.n_obs_steps)
        return {k: v.to(self.device, torch.float32) for k, v in feats.items()}

    def check_step(self, obs: Any) -> Any:
        """Check one time step of an observation (no batch or time axis), as a control loop
        receives it; return it as numpy (a dict stays a dict). Raises like :meth:`validate_obs`."""
        return check_step(self.features, self.config.n_obs_steps, obs)

    def encode_observation(self, obs: Any, backend: str | None = None) -> Tensor:
        """Validate, normalise and encode ``obs`` → global conditioning (B, To·D), on ``backend``
        (default the policy's). Runs the image encoder; done once per call, the samplers only
        iterate the U-Net."""
        obs = self.validate_obs(obs)
        if self.training:  # random crops and batch statistics live in the PyTorch modules only
            return self.obs_encoder(obs)
        return self.network(backend).encoder(obs)

    @torch.no_grad()
    def predict_action(self, obs: Any, noise: SamplerNoise | None = None, generator: torch.Generator | None = None,
                       backend: str | None = None, **sampling) -> PolicyOutput:
        """Sample an action chunk: :meth:`encode_observation`, then :meth:`sample_from_condition`.

        Args:
            obs: ``{feature: (B, To, ...)}`` in environment units (images uint8 HWC or float CHW
                in [0, 1]), or a (B, To, Do) array for a single low-dim feature.
            noise, generator, backend, **sampling: as for :meth:`sample_from_condition`
                (``sampler``, ``warm_start``, ``return_trajectory``, ``deadline``, ``prefix``).
        """
        return self.sample_from_condition(self.encode_observation(obs, backend), noise, generator, backend=backend, **sampling)

    @torch.no_grad()
    def sample_from_condition(
        self,
        cond: Tensor,
        noise: SamplerNoise | None = None,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
        warm_start: WarmStart | None = None,
        return_trajectory: bool = False,
        deadline: float | None = None,
        prefix: ActionPrefix | None = None,
        backend: str | None = None,
    ) -> PolicyOutput:
        """Sample, unnormalise and slice, given the global conditioning of :meth:`encode_observation`.

        Args:
            cond: (B, To·D) conditioning.
            noise: the call's pre-drawn noise (see :meth:`draw_noise`); drawn from ``generator``
                if None. Same ``noise`` → same chunk, whatever the sampler.
            sampler: the sampler for this call only (from :meth:`make_sampler`); default the
                policy's own. Nothing about the policy changes.
            warm_start: initial guess for the Picard trajectory (normalised units); changes the
                iteration count, never the result.
            return_trajectory: also return the sampler's trajectory (for the next warm start).
            deadline: ``time.perf_counter()`` instant after which Picard returns its current
                estimate, flagged ``converged=False`` (the sequential sampler ignores it).
            prefix: actions the chunk must agree with (normalised units, the whole horizon; see
                :class:`~paradiffpolicy.sampling.prefix.ActionPrefix`), applied inside every
                denoising step of every sampler.
            backend: how the network runs for this call (default the policy's own).
        """
        cfg = self.config
        sampler = sampler or self.sampler
        bsz = cond.shape[0]
        if noise is None:
            noise = self.draw_noise(bsz, generator, sampler)
        expected = (bsz, cfg.horizon, cfg.action_dim)
        if tuple(noise.initial.shape) != expected or noise.num_steps != sampler.table.num_steps:
            raise ValueError(
                f"noise has shape {tuple(noise.initial.shape)} x {noise.num_steps} steps; expected "
                f"{expected} x {sampler.table.num_steps} steps"
            )
        out = sampler.sample(self.network(backend).denoiser, noise.to(self.device), cond, warm_start=warm_start,
                             return_trajectory=return_trajectory, deadline=deadline,
                             prefix=None if prefix is None else prefix.to(self.device))
        if not torch.isfinite(out.sample).all():
            raise FloatingPointError("the sampled action contains NaN or inf; the network output is not finite")
        return PolicyOutput(self.action_normalizer.unnormalize(out.sample), out.sample, cfg.executed_start,
                            cfg.n_action_steps, out.stats, out.trajectory)

    # -- training ----------------------------------------------------------------------------

    def compute_loss(self, obs: Any, action: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Denoising loss (Ho et al. 2020, eq. 14) on raw ``obs`` (as for :meth:`predict_action`)
        and ``action`` (B, T, Da). The image encoder trains with it (random crops in train mode)."""
        return self.denoising_loss(self.encode_observation(obs), action, generator)

    def denoising_loss(self, cond: Tensor, action: Tensor, generator: torch.Generator | None = None,
                       committed: Tensor | None = None, prefix_offset: float = 0.0) -> Tensor:
        """:meth:`compute_loss` from the encoded observation ``cond`` (B, To·D), for a trainer that
        also uses the encoding (an auxiliary target).

        ``committed`` (B,) int, only for a ``prefix_input`` policy: row ``i``'s first
        ``committed[i]`` actions are given to the network clean, as committed actions are at
        inference (:func:`~paradiffpolicy.models.unet1d.prefix_channels`), and the loss is the mean
        over the other positions only (training-time action conditioning; 0: nothing committed).
        ``prefix_offset`` > 0 moves each row's committed actions by ``σ·z`` (one offset per action
        dimension, ``σ ~ U(0, prefix_offset)``) before the network sees them; the target is unchanged
        (``PrefixTrainingConfig.offset``)."""
        sch = self.config.scheduler
        bsz = cond.shape[0]
        x0 = self.action_normalizer.normalize(action)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, sch.num_train_timesteps, (bsz,), generator=generator, device=x0.device)
        a = self.alphas_cumprod[t].view(bsz, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if sch.prediction_type == "epsilon" else x0
        if committed is None:
            return torch.nn.functional.mse_loss(self.model(noisy, t, global_cond=cond), target)
        if not self.config.prefix_input:
            raise ValueError("committed= trains the prefix input; this policy has none (policy.prefix_input=false)")
        mask = (torch.arange(x0.shape[1], device=x0.device)[None] < committed.to(x0.device)[:, None]).float()
        given = x0
        if prefix_offset > 0:
            sigma = prefix_offset * torch.rand((bsz, 1, 1), generator=generator, device=x0.device)
            given = x0 + sigma * torch.randn((bsz, 1, x0.shape[2]), generator=generator, device=x0.device)
        pred = self.model(noisy, t, global_cond=cond, prefix=prefix_channels(given, mask))
        free = (1.0 - mask).unsqueeze(-1).expand_as(x0)
        return (((pred - target) ** 2) * free).sum() / free.sum().clamp(min=1.0)
