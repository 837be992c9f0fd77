"""Diffusion schedulers as coefficient tables.

Every sampler in this package (sequential or Picard) sees a scheduler as one affine update per
inference step ``k = 0 .. N-1`` that maps state ``x_k`` to ``x_{k+1}``::

    x̂0_k, ε̂_k  = convert(model_output_k, x_k)                         (prediction_type, clip_sample)
    x_{k+1}    = A_k x_k + B_k x̂0_k + C_k x̂0_{k-1} + E_k ε̂_k + σ_k z_k

with ``z_k ~ N(0, I)`` drawn once before sampling. The tables ``A, B, C, E, σ`` are built once per
configuration, so one vectorised call evaluates the update for a batch of rows that each sit at a
*different* step (what Picard iteration needs). The numbers mirror ``diffusers`` (tested against it):

* **DDPM** (Ho et al. 2020, eq. 7; diffusers ``DDPMScheduler``, ``variance_type="fixed_small"``)::

      A = sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t),   B = sqrt(ᾱ_prev) β_t / (1 - ᾱ_t),   C = E = 0,
      σ² = (1 - ᾱ_prev) / (1 - ᾱ_t) β_t   (no noise at t = 0)

  where ``α_t = ᾱ_t / ᾱ_prev`` and ``β_t = 1 - α_t``; ``prev`` is the next timestep of the
  inference schedule (``-1`` after the last, with ``ᾱ_{-1} = 1``).
* **DDIM**, eta 0 (Song et al. 2021, eq. 12; diffusers ``DDIMScheduler``)::

      A = 0,  B = sqrt(ᾱ_prev),  E = sqrt(1 - ᾱ_prev),  σ = 0

  with ``prev = t - num_train_timesteps // N`` (diffusers' stride, whatever the spacing) and
  ``ᾱ_prev = 1`` past the end if ``set_alpha_to_one`` else ``ᾱ_0``. ``ε̂`` is the *unclipped*
  prediction (diffusers' ``use_clipped_model_output=False``).
* **DPM-Solver++(2M)** (Lu et al. 2022, Alg. 2, midpoint; diffusers ``DPMSolverMultistepScheduler``
  defaults: ``lower_order_final``, ``final_sigmas_type="zero"``)::

      h = λ_{k+1} - λ_k,  φ = α_{k+1} (e^{-h} - 1),  r = (λ_k - λ_{k-1}) / h
      first order:  A = s_{k+1}/s_k,  B = -φ,              C = 0
      second order: A = s_{k+1}/s_k,  B = -φ (1 + 1/(2r)), C = φ / (2r)

  with ``s`` the noise level and ``λ = log(α/s)``; first order at the first and the last step.

``x̂0`` conversion (Ho et al. eq. 15): ``x̂0 = (x - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)`` for ``epsilon``
prediction; ``ε̂ = (x - sqrt(ᾱ) x̂0) / sqrt(1-ᾱ)`` for ``sample`` prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

SCHEDULERS = ("ddpm", "ddim", "dpmsolver++")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample")
SPACINGS = ("leading", "trailing", "linspace")
# diffusers' default spacing per scheduler
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmsolver++": "linspace"}


@dataclass
class SchedulerConfig:
    """Noise scheduler settings; names and defaults follow diffusers and Diffusion Policy."""

    name: str = "ddpm"
    num_train_timesteps: int = 100
    num_inference_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    # None: diffusers' default for the scheduler (leading for DDPM/DDIM, linspace for DPM-Solver)
    timestep_spacing: Optional[str] = None
    steps_offset: int = 0

    def __post_init__(self) -> None:
        """Validate once, at construction; ``ValueError`` names the offending key."""
        if self.name not in SCHEDULERS:
            raise ValueError(f"scheduler.name={self.name!r} is unknown; expected one of {SCHEDULERS}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"scheduler.beta_schedule={self.beta_schedule!r} is unknown; expected one of {BETA_SCHEDULES}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler.prediction_type={self.prediction_type!r} is unknown; expected one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(
                f"scheduler.timestep_spacing={self.timestep_spacing!r} is unknown; expected one of {SPACINGS} or null"
            )
        if self.num_train_timesteps < 1:
            raise ValueError(f"scheduler.num_train_timesteps={self.num_train_timesteps} must be >= 1")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"scheduler.num_inference_steps={self.num_inference_steps} must be in "
                f"[1, num_train_timesteps={self.num_train_timesteps}]"
            )
        if self.clip_sample_range <= 0:
            raise ValueError(f"scheduler.clip_sample_range={self.clip_sample_range} must be > 0")

    @property
    def stochastic(self) -> bool:
        """True for samplers that inject noise at each step (DDPM); ODE samplers are deterministic."""
        return self.name == "ddpm"


def make_betas(cfg: SchedulerConfig) -> Tensor:
    """β_t for t = 0..T-1, float32 exactly as diffusers builds them (shape ``(T,)``)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    # Nichol & Dhariwal 2021, eq. 17, with β capped at 0.999
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def inference_timesteps(cfg: SchedulerConfig) -> np.ndarray:
    """The N model timesteps, descending, as diffusers' ``set_timesteps`` computes them."""
    n_train, n = cfg.num_train_timesteps, cfg.num_inference_steps
    spacing = cfg.timestep_spacing or DEFAULT_SPACING[cfg.name]
    dpm = cfg.name == "dpmsolver++"  # DPM-Solver spaces N+1 points and drops the last
    if spacing == "linspace":
        if dpm:
            ts = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1]
        else:
            ts = np.linspace(0, n_train - 1, n).round()[::-1]
    elif spacing == "leading":
        if dpm:
            ts = (np.arange(0, n + 1) * (n_train // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
        else:
            ts = (np.arange(0, n) * (n_train // n)).round()[::-1] + cfg.steps_offset
    else:  # trailing
        ts = np.round(np.arange(n_train, 0, -n_train / n)) - 1
    return ts.copy().astype(np.int64)


@dataclass
class StepTable:
    """Per-step coefficients of ``x_{k+1} = A x_k + B x̂0_k + C x̂0_{k-1} + E ε̂_k + σ z_k``.

    All tensors have shape ``(N,)``; ``timesteps`` is int64, the rest float32.
    ``sqrt_alpha_prod``/``sqrt_one_minus_alpha_prod`` convert a model output at step k to (x̂0, ε̂).
    """

    timesteps: Tensor
    sqrt_alpha_prod: Tensor
    sqrt_one_minus_alpha_prod: Tensor
    coef_sample: Tensor  # A
    coef_x0: Tensor  # B
    coef_x0_prev: Tensor  # C
    coef_eps: Tensor  # E
    noise_std: Tensor  # σ
    prediction_type: Literal["epsilon", "sample"]
    clip_sample: bool
    clip_sample_range: float
    stochastic: bool

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device | str) -> "StepTable":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return StepTable(**moved)

    # -- pure functions over a batch of rows at different steps -------------------------------

    def predict_x0_eps(self, model_output: Tensor, sample: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) for rows ``sample`` (M, ...) at steps ``k`` (M,). x̂0 is clipped if configured;
        ε̂ is the unclipped prediction (diffusers' DDIM convention)."""
        a = _rows(self.sqrt_alpha_prod[k], sample)
        s = _rows(self.sqrt_one_minus_alpha_prod[k], sample)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - s * eps) / a
        else:
            x0 = model_output
            eps = (sample - a * x0) / s
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def noise_free_step(self, sample: Tensor, x0: Tensor, eps: Tensor, x0_prev: Tensor, k: Tensor) -> Tensor:
        """``A x + B x̂0 + C x̂0_prev + E ε̂`` for rows at steps ``k`` (M,); shapes (M, ...)."""
        return (
            _rows(self.coef_sample[k], sample) * sample
            + _rows(self.coef_x0[k], sample) * x0
            + _rows(self.coef_x0_prev[k], sample) * x0_prev
            + _rows(self.coef_eps[k], sample) * eps
        )

    def frozen_x0_coefficients(self) -> tuple[Tensor, Tensor]:
        """(α, β), shape (N,): the step as ``x_{k+1} = α_k x_k + β_k x̂0 + σ_k z_k`` when the data
        prediction x̂0 is held fixed (ε̂ re-derived from it). Used to roll guesses forward without
        network calls."""
        inv = 1.0 / self.sqrt_one_minus_alpha_prod
        alpha = self.coef_sample + self.coef_eps * inv
        beta = self.coef_x0 + self.coef_x0_prev - self.coef_eps * self.sqrt_alpha_prod * inv
        return alpha, beta

    def frozen_eps_coefficient(self) -> Tensor:
        """(N,): ``∂x_{k+1}/∂x_k`` when the noise prediction ε̂ is held fixed (x̂0 = (x - √(1-ᾱ) ε̂)/√ᾱ
        moves with the state): ``A + B/√ᾱ``. The data-prediction counterpart is the α of
        :meth:`frozen_x0_coefficients`."""
        return self.coef_sample + self.coef_x0 / self.sqrt_alpha_prod


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-row vector (M,) to broadcast over ``like`` (M, ...)."""
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


def make_step_table(cfg: SchedulerConfig) -> StepTable:
    """Build the coefficient table for ``cfg`` (float64 math on diffusers' float32 ᾱ, stored fp32)."""
    ts = inference_timesteps(cfg)
    n = len(ts)
    if cfg.name == "dpmsolver++" and len(np.unique(ts)) != n:
        raise ValueError(
            f"scheduler.num_inference_steps={cfg.num_inference_steps} gives duplicate DPM-Solver timesteps "
            f"with num_train_timesteps={cfg.num_train_timesteps}; use fewer inference steps"
        )
    if ts.min() < 0 or ts.max() >= cfg.num_train_timesteps:
        raise ValueError(
            f"scheduler.steps_offset={cfg.steps_offset} puts timesteps outside [0, {cfg.num_train_timesteps})"
        )
    abar32 = torch.cumprod(1.0 - make_betas(cfg), dim=0)
    abar = abar32.double().numpy()
    a_t = abar[ts]
    A = np.zeros(n)
    B = np.zeros(n)
    C = np.zeros(n)
    E = np.zeros(n)
    sig = np.zeros(n)
    sqrt_a, sqrt_1ma = np.sqrt(a_t), np.sqrt(1.0 - a_t)

    if cfg.name == "ddpm":
        prev = np.append(ts[1:], -1)
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)
        alpha = a_t / a_prev
        beta = 1.0 - alpha
        A = np.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
        B = np.sqrt(a_prev) * beta / (1.0 - a_t)
        var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
        sig = np.where(ts > 0, np.sqrt(var), 0.0)
    elif cfg.name == "ddim":
        prev = ts - cfg.num_train_timesteps // cfg.num_inference_steps
        final = 1.0 if cfg.set_alpha_to_one else abar[0]
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        B = np.sqrt(a_prev)
        E = np.sqrt(1.0 - a_prev)
    else:  # dpmsolver++ (2M, midpoint)
        sigmas_train = np.sqrt((1.0 - abar32) / abar32).numpy().astype(np.float64)
        sigmas = np.interp(ts, np.arange(len(sigmas_train)), sigmas_train)
        sigmas = np.append(sigmas, 0.0)  # final_sigmas_type="zero"
        alpha_s = 1.0 / np.sqrt(sigmas**2 + 1.0)
        sigma_s = sigmas * alpha_s
        with np.errstate(divide="ignore"):
            lam = np.log(alpha_s) - np.log(sigma_s)  # +inf at the final sigma 0
        sqrt_a, sqrt_1ma = alpha_s[:-1], sigma_s[:-1]
        for k in range(n):
            h = lam[k + 1] - lam[k]
            phi = alpha_s[k + 1] * (np.exp(-h) - 1.0)
            A[k] = sigma_s[k + 1] / sigma_s[k]
            if k == 0 or k == n - 1:
                B[k] = -phi
            else:
                r = (lam[k] - lam[k - 1]) / h
                B[k] = -phi * (1.0 + 0.5 / r)
                C[k] = 0.5 * phi / r

    f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)  # noqa: E731
    return StepTable(
        timesteps=torch.from_numpy(ts),
        sqrt_alpha_prod=f32(sqrt_a),
        sqrt_one_minus_alpha_prod=f32(sqrt_1ma),
        coef_sample=f32(A),
        coef_x0=f32(B),
        coef_x0_prev=f32(C),
        coef_eps=f32(E),
        noise_std=f32(sig),
        prediction_type=cfg.prediction_type,  # type: ignore[arg-type]
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        stochastic=cfg.stochastic,
    )
