"""Sliding-window Picard sampling (ParaDiGMS, Shih et al. 2023, Alg. 1), made exact per batch row.

With all noise pre-drawn, the sampler is the fixed point of ``x_{k+1} = x_k + d_k(x_k) + σ_k z_k``
(``d_k`` the scheduler's noise-free update minus ``x_k``). One Picard iteration evaluates the
network once, batched, on the window states ``x_b .. x_{e-1}`` (each row at its own timestep) and
rewrites ``x_{b+i+1} ← x_b + Σ_{j≤i} (d_{b+j} + σ_{b+j} z_{b+j})`` (ParaDiGMS eq. 5). A state whose
change is below tolerance is treated as exact, so the window start advances past the leading
converged states; ``x_{b+1}`` is exact after every iteration, which bounds the number of
iterations by N. With ``window=1`` or ``tol=0`` the result is the sequential sample.

Convergence test, per state ``k+1`` and batch row (ParaDiGMS' noise-relative form)::

    sqrt(mean((x_new - x_old)²)) ≤ tol · s_k,   s_k = σ_k (DDPM)  or  1 (DDIM, DPM-Solver)

For the ODE samplers there is no injected noise to compare against, so ``tol`` is an absolute RMS
change in normalised action units ([-1, 1]); use a much smaller ``tol`` there (1e-3 .. 1e-2).

States beyond the window need a guess. ``init="copy"`` repeats the window's last state
(ParaDiGMS). ``init="rollout"`` (default) rolls the newest data prediction x̂0 forward through the
scheduler with the pre-drawn noise and no network call (ParaSolver, Lu et al. 2025): with x̂0
frozen, each step is affine, ``x_{k+1} = α_k x_k + β_k x̂0 + σ_k z_k``, so the whole tail is one
closed-form expression, ``x_j = Φ_ej x_e + Ψ_ej x̂0 + R_j - Φ_ej R_e``.

``update`` chooses how a correction of one window state reaches the later ones: ``"picard"`` the
running sum above; ``"frozen_x0"`` / ``"frozen_eps"`` a Newton-type step with ``∂G_k/∂x ≈ c_k I``,
``x'_{k+1} = G_k(x_k) + c_k (x'_k - x_k)``, c_k the step's coefficient on x_k with x̂0 or ε̂ held
(ParaSolver's diagonal linearisation; ``docs/sampler.md``). Same fixed point, same exact x_{b+1}.

``anderson=m`` > 0 replaces the plain update of the window's unconverged states by a triangular
Anderson step over the last m iterations (ParaTAA, Tang et al. 2024): with residuals
``F = G(X) - X`` and their differences ΔF, ΔX across iterations, state i takes
``x_i + F_i - (ΔX_i + ΔF_i) γ_i``, ``γ_i = argmin ‖F_{≤i} - ΔF_{≤i} γ‖²`` over the window states up
to i (G is lower-triangular: state i depends only on earlier states). Safeguard: the states
accepted in an iteration (the leading converged ones and the exact one after them, at least the
window's first state) keep the plain Picard value, so x_{b+1} is still exact after every
iteration, the iteration count stays ≤ N and the fixed point is unchanged.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from paradiffpolicy.config import SamplerConfig
from paradiffpolicy.sampling.base import Denoiser, SampleStats, SamplerNoise, SamplerOutput, Trajectory, WarmStart
from paradiffpolicy.sampling.prefix import ActionPrefix, predict
from paradiffpolicy.schedulers import StepTable


class PicardSampler:
    """Batched sliding-window Picard sampler.

    Args:
        table: scheduler coefficients.
        config: a :class:`~paradiffpolicy.config.SamplerConfig` (validated when it was built), or
            None with the settings as keywords: ``window`` (``p``, states refined per iteration),
            ``tol`` (``τ``, see the module docstring for its scale), ``max_iters`` (cap on batched
            network calls, default N, which always suffices; a sample that hits it is returned as
            its current estimate with ``converged=False``), ``init`` (``"rollout"`` or ``"copy"``:
            the guess for states beyond the window), ``anderson`` (memory m; 0: plain Picard),
            ``update`` (``"picard"``, ``"frozen_x0"`` or ``"frozen_eps"``: the window update).
        fixed_shape: run every network call at (batch x window) rows, finished rows and steps past
            N included and discarded, so a compiled graph sees one input shape (CUDA graphs).
            Set by the policy for its ``compile`` backend (see :mod:`paradiffpolicy.backends`).
    """

    name = "picard"

    def __init__(self, table: StepTable, config: SamplerConfig | None = None, fixed_shape: bool = False, **settings):
        if config is None:
            config = SamplerConfig(name="picard", **settings)
        elif settings:
            raise TypeError(f"pass either a SamplerConfig or keyword settings, not both ({sorted(settings)})")
        self.table = table
        self.num_steps = n = table.num_steps
        self.window = int(min(config.window, n))
        self.tol = float(config.tol)
        self.max_iters = n if config.max_iters is None else int(config.max_iters)
        self.init = config.init
        self.anderson = int(config.anderson)
        self.fixed_shape = bool(fixed_shape)
        # convergence scale of state k+1; 1 where no noise is injected (ODE steps, DDPM's last step)
        sig = table.noise_std
        self.scale = torch.where(sig > 0, sig, torch.ones_like(sig)) if table.stochastic else torch.ones_like(sig)
        self.phi, self.psi = _frozen_rollout_tables(table)
        self.update = config.update
        # carry_ij = Π_{i<=l<j} c_l: how a change of state i reaches state j under the window update
        if self.update == "frozen_x0":
            self.carry = self.phi
        elif self.update == "frozen_eps":
            self.carry = _product_table(table.frozen_eps_coefficient())
        else:
            self.carry = None  # picard: c = 1, a running sum
        # K (N+1, N), K_jl = Φ_{l+1,j}: the noise part of a rollout from x_0 is R = K @ (σ z)
        self.noise_kernel = self.phi[1:, :].T.contiguous()

    def to(self, device: torch.device | str) -> "PicardSampler":
        self.table = self.table.to(device)
        for name in ("scale", "phi", "psi", "noise_kernel"):
            setattr(self, name, getattr(self, name).to(device))
        if self.carry is not None:
            self.carry = self.carry.to(device)
        return self

    def settings(self) -> dict:
        return {"name": self.name, "window": self.window, "tol": self.tol, "max_iters": self.max_iters, "init": self.init,
                "anderson": self.anderson, "update": self.update}

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        noise: SamplerNoise,
        global_cond: Tensor | None = None,
        warm_start: WarmStart | None = None,
        return_trajectory: bool = False,
        deadline: float | None = None,
        prefix: ActionPrefix | None = None,
    ) -> SamplerOutput:
        """Sample x_N (B, T, Da); the same result as SequentialSampler within ``tol``.

        ``warm_start``: a guess for the whole trajectory (e.g. the previous control tick's, shifted
        in time); where ``warm_start.valid``, it replaces the rollout guess (corrected as the
        window moves, see ``_fill_tail``). Only the iteration count changes, not the fixed point.
        ``return_trajectory``: also return the final trajectory and its x̂0 (a warm start's source).
        ``deadline``: a ``time.perf_counter()`` instant; past it, stop after the current iteration
        and return the current estimate with ``converged=False`` and ``stats.deadline_hit``.
        ``prefix``: actions the sample must agree with, part of every step's map (so the fixed
        point is the sequential sampler's with the same prefix; see ``sampling/prefix.py``).
        """
        table, n, p = self.table, self.num_steps, self.window
        if noise.num_steps != n:
            raise ValueError(f"noise has {noise.num_steps} steps, the scheduler has {n}")
        dev = noise.initial.device
        bsz, shape = noise.initial.shape[0], noise.initial.shape[1:]
        ndim = len(shape)
        rows_all = torch.arange(bsz, device=dev)
        steps = torch.arange(n + 1, device=dev)
        offsets = torch.arange(p, device=dev)

        # σ_k z_k, per row: (B, N, ...)
        sz = (table.noise_std.view(n, *[1] * (ndim + 1)) * noise.steps).transpose(0, 1)
        # states x_0..x_N plus one scratch slot (index N+1) that absorbs writes of padding positions
        xs = torch.empty((bsz, n + 2, *shape), device=dev, dtype=torch.float32)
        xs[:, 0] = noise.initial
        if prefix is not None:
            prefix.check((bsz, *shape))
            xs[:, 0] = prefix.state(noise.initial, torch.zeros_like(rows_all), rows_all, noise.initial, table)
        # newest x̂0 per step (DPM-Solver's multistep term and the rollout); slot N is scratch
        x0buf = torch.zeros((bsz, n + 1, *shape), device=dev, dtype=torch.float32)
        # noise part of the frozen-x̂0 rollout from x_0: R_j = Σ_{l<j} Φ_{l+1,j} σ_l z_l, (B, N+1, ...)
        r_noise = torch.einsum("jl,bl...->bj...", self.noise_kernel, sz)
        warm = None  # (states (B, N+1, ...), mask (1, 1, ...), x̂0 (B, N+1, ...) | None) of the warm start
        if warm_start is not None:
            wx0 = None if warm_start.x0 is None else warm_start.x0.to(dev, torch.float32)
            warm = (warm_start.states.to(dev, torch.float32), warm_start.mask(shape, dev), wx0)
            xs[:, 1 : n + 1] = warm[0][:, 1:]
        pin = None if prefix is None or not prefix.changes_state else (prefix, noise.initial)
        self._fill_tail(xs, x0buf[:, 0], r_noise, rows_all, torch.zeros(bsz, dtype=torch.long, device=dev), steps, warm, pin)

        acc = _AndersonHistory(bsz, n, int(np.prod(shape)), self.anderson, dev) if self.anderson else None
        b = torch.zeros(bsz, dtype=torch.long, device=dev)
        iterations = torch.zeros(bsz, dtype=torch.long)
        nfe = torch.zeros(bsz, dtype=torch.long)
        residual = torch.zeros(bsz, device=dev)
        rounds = 0
        deadline_hit = False
        while rounds < self.max_iters:
            if deadline is not None and time.perf_counter() > deadline:
                deadline_hit = bool((b < n).any())
                break
            # One small host read per iteration decides which rows still run and the window size;
            # it lets finished rows drop out (a batch does not wait for its slowest member).
            b_host = b.cpu()
            active = (b_host < n).nonzero().flatten()
            if active.numel() == 0:
                break
            if self.fixed_shape:
                w, rows = p, rows_all
            else:
                w = int(min(p, int((n - b_host[active]).max())))
                rows = active.to(dev)
            r = rows.numel()
            bb = b[rows]
            pos = bb[:, None] + offsets[:w]  # (R, w) step indices of the window
            valid = pos < n
            k = pos.clamp(max=n - 1)
            rr = rows[:, None].expand(r, w)

            x_in = xs[rr, k]  # (R, w, ...)
            cond = None if global_cond is None else global_cond[rows].repeat_interleave(w, dim=0)
            flat_k = k.reshape(-1)
            flat_x = x_in.reshape(r * w, *shape)
            x0, eps = predict(model, table, flat_x, flat_k, cond, rr.reshape(-1), prefix)
            x0 = x0.view(r, w, *shape)
            x0_prev = torch.cat([x0buf[rows, (bb - 1).clamp(min=0)].unsqueeze(1), x0[:, :-1]], dim=1)
            f = table.noise_free_step(flat_x, x0.reshape(r * w, *shape), eps, x0_prev.reshape(r * w, *shape), flat_k)
            vmask = valid.view(r, w, *[1] * ndim)
            incr = f.view(r, w, *shape) - x_in + sz[rr, k]
            if prefix is not None and prefix.changes_state:  # the state itself is pulled after the step
                stepped = (f.view(r, w, *shape) + sz[rr, k]).reshape(r * w, *shape)
                incr = incr + prefix.pull(stepped, flat_k + 1, rr.reshape(-1), noise.initial, table).view(r, w, *shape)
            incr = incr * vmask
            new = self._window_update(xs[rows, bb], x_in, incr, vmask, bb, k)  # states pos+1
            if prefix is not None and prefix.changes_state:
                new = prefix.pin(new.reshape(r * w, *shape), flat_k + 1, rr.reshape(-1), noise.initial, table).view(new.shape)

            old = xs[rr, k + 1]
            err = (new - old).pow(2).flatten(2).mean(-1).sqrt() / self.scale[k]  # (R, w)
            conv = (err <= self.tol) | ~valid
            lead = conv.long().cumprod(dim=1).sum(dim=1)  # leading converged states
            length = (n - bb).clamp(max=w)  # valid window length per row
            b_new = bb + 1 + torch.minimum(lead, length - 1)

            write = torch.where(valid, k + 1, torch.full_like(k, n + 1))
            if acc is not None:
                # plain updates for the states accepted this iteration (the leading converged ones
                # and the exact one after them; always the window's first state: the safeguard)
                new = acc.step(new, old, valid, offsets[:w][None, :] <= lead[:, None], rr, write, rounds)
            xs[rr, write] = new
            x0buf[rr, torch.where(valid, k, torch.full_like(k, n))] = x0
            # guesses for everything past the window end e = b + length, from the newest x̂0
            end = bb + length
            x0_last = x0[torch.arange(r, device=dev), length - 1]
            self._fill_tail(xs, x0_last, r_noise, rows, end, steps, warm, pin)
            b[rows] = b_new

            iterations[active] += 1
            nfe[active] += w
            residual[rows] = torch.where(bb < n, (err * valid).amax(dim=1), residual[rows])  # finished rows keep theirs
            rounds += 1

        converged = (b >= n).cpu()
        stats = SampleStats(iterations=iterations, nfe=nfe, residual=residual.cpu(), converged=converged, rounds=rounds,
                            deadline_hit=deadline_hit)
        trajectory = Trajectory(xs[:, : n + 1].clone(), x0buf.clone()) if return_trajectory else None
        return SamplerOutput(xs[:, n].clone(), stats, trajectory)

    def _window_update(self, x_b: Tensor, x_in: Tensor, incr: Tensor, vmask: Tensor, bb: Tensor, k: Tensor) -> Tensor:
        """New window states x_{k+1} (R, w, ...) from the step increments ``incr = G_k(x_k) - x_k``
        at the old states ``x_in``, the window starting at the exact state ``x_b`` (R, ...).

        A Newton-type step on the triangular system ``x_{k+1} = G_k(x_k)`` with ``∂G_k/∂x ≈ c_k I``:
        ``x'_{k+1} = G_k(x_k) + c_k (x'_k - x_k)``. ``c = 1`` is ParaDiGMS' running sum; ``c_k`` the
        step's coefficient on x_k with x̂0 (``frozen_x0``) or ε̂ (``frozen_eps``) held fixed carries a
        correction as the scheduler itself would, less the network's response (ParaSolver's
        linearisation, Lu et al. 2025). Any c has the same fixed point, and x'_{b+1} = G_b(x_b) is
        exact, so the window still advances by at least one state per iteration."""
        if self.carry is None:
            return x_b.unsqueeze(1) + incr.cumsum(dim=1)
        c = self.carry[k, k + 1].view(*k.shape, *[1] * (x_in.dim() - 2))  # c_k
        g = incr + (1 - c) * x_in * vmask  # G_k(x_k) - c_k x_k on valid positions, 0 on padding
        kk = k + 1
        lower = self.carry[kk[:, None, :], kk[:, :, None]]  # (R, w, w): Π_{k_j < l <= k_i} c_l, 0 for j > i
        start = self.carry[bb[:, None], kk]  # (R, w): Π_{b <= l <= k_i} c_l
        flat = g.flatten(2)
        out = torch.bmm(lower, flat) + start.unsqueeze(-1) * x_b.flatten(1).unsqueeze(1)
        return out.view(x_in.shape)

    def _fill_tail(self, xs: Tensor, x0: Tensor, r_noise: Tensor, rows: Tensor, end: Tensor, steps: Tensor,
                   warm: tuple[Tensor, Tensor, Tensor | None] | None, pin: tuple[ActionPrefix, Tensor] | None = None) -> None:
        """Overwrite states j > end[r] (j <= N) of ``rows`` with a guess from x_end and x̂0 (R, ...),
        the data prediction made at state end-1.

        Warm-started entries instead get the warm trajectory w moved by how far the window end and
        the data prediction have moved from it, propagated through the frozen-x̂0 dynamics:
        ``w_j + Φ_ej (x_e - w_e) + Ψ_ej (x̂0 - ŵ0_{e-1})`` (same noise, so the noise terms cancel).
        The x̂0 term needs the warm trajectory's own predictions ŵ0 and is skipped before the
        first network call (end = 0).

        ``pin`` (a state-pulling prefix and x_T): the guesses are pulled like the states, and pinned
        where the weight is 1 (see ``ActionPrefix.pin``)."""
        n = self.num_steps
        x_end = xs[rows, end]  # (R, ...)
        extra = [1] * (x_end.dim() - 1)
        phi = self.phi[end].view(-1, n + 1, *extra)  # Φ_{e,j}, (R, N+1, 1...)
        psi = self.psi[end].view(-1, n + 1, *extra)  # Ψ_{e,j}
        if self.init == "copy":
            guess = x_end.unsqueeze(1).expand(-1, n + 1, *x_end.shape[1:])
        else:
            r_sel = r_noise[rows]
            r_end = r_sel[torch.arange(rows.numel(), device=rows.device), end].unsqueeze(1)
            guess = phi * (x_end.unsqueeze(1) - r_end) + psi * x0.unsqueeze(1) + r_sel
        if warm is not None:
            idx = torch.arange(rows.numel(), device=rows.device)
            w = warm[0][rows]
            moved = w + phi * (x_end.unsqueeze(1) - w[idx, end].unsqueeze(1))
            if warm[2] is not None:
                dx0 = (x0 - warm[2][rows][idx, (end - 1).clamp(min=0)]) * (end >= 1).view(-1, *extra)
                moved = moved + psi * dx0.unsqueeze(1)
            guess = torch.where(warm[1], moved, guess)
        if pin is not None:
            prefix, x_t = pin
            levels = steps.repeat(rows.numel())
            flat = guess.reshape(-1, *guess.shape[2:])
            guess = prefix.state(flat, levels, rows.repeat_interleave(n + 1), x_t, self.table).view(guess.shape)
        tail = (steps[None, :] > end[:, None]).view(-1, n + 1, *extra)
        xs[rows, : n + 1] = torch.where(tail, guess, xs[rows, : n + 1])


class _AndersonHistory:
    """Per-state (absolute step index) memory of the last m Picard iterates and residuals."""

    def __init__(self, bsz: int, n: int, dim: int, m: int, device):
        self.m = m
        # slot N+1 absorbs the window's padding positions, as in the state buffer
        self.x_prev = torch.zeros((bsz, n + 2, dim), device=device)
        self.f_prev = torch.zeros_like(self.x_prev)
        self.seen = torch.zeros((bsz, n + 2), dtype=torch.bool, device=device)
        self.dx = torch.zeros((bsz, n + 2, m, dim), device=device)
        self.df = torch.zeros_like(self.dx)

    def step(self, new: Tensor, old: Tensor, valid: Tensor, plain: Tensor, rr: Tensor, write: Tensor, rounds: int) -> Tensor:
        """Anderson-extrapolated window states (R, w, ...); ``plain`` (R, w) positions keep ``new``."""
        r, w = new.shape[:2]
        x = old.reshape(r, w, -1)
        f = (new - old).reshape(r, w, -1)
        had = (self.seen[rr, write] & valid).unsqueeze(-1)  # a state's first visit has no difference yet
        slot = rounds % self.m
        self.dx[rr, write, slot] = (x - self.x_prev[rr, write]) * had
        self.df[rr, write, slot] = (f - self.f_prev[rr, write]) * had
        self.x_prev[rr, write], self.f_prev[rr, write], self.seen[rr, write] = x, f, valid
        dx, df = self.dx[rr, write], self.df[rr, write]  # (R, w, m, D)
        # triangular least squares: normal equations summed over the window states up to i
        gram = torch.einsum("rwmd,rwnd->rwmn", df, df).cumsum(dim=1)
        rhs = torch.einsum("rwmd,rwd->rwm", df, f).cumsum(dim=1)
        ridge = 1e-4 * gram.diagonal(dim1=-2, dim2=-1).sum(-1) + 1e-12  # keeps empty histories solvable
        gamma = torch.linalg.solve(gram + ridge[..., None, None] * torch.eye(self.m, device=new.device), rhs.unsqueeze(-1))
        step = x + f - torch.einsum("rwmd,rwm->rwd", dx + df, gamma.squeeze(-1))
        keep = plain | ~torch.isfinite(step).all(-1)
        return torch.where(keep.view(r, w, *[1] * (new.dim() - 2)), new, step.view_as(new))


def _product_table(c: Tensor) -> Tensor:
    """(N+1, N+1) table of ``Π_{i<=l<j} c_l`` for j >= i (1 on the diagonal), zero below it."""
    return torch.tensor(_products(c.double().cpu().numpy()), dtype=torch.float32, device=c.device)


def _products(c: np.ndarray) -> np.ndarray:
    n = len(c)
    prod = np.zeros((n + 1, n + 1))
    prod[np.arange(n + 1), np.arange(n + 1)] = 1.0
    for j in range(n):  # column j+1 from column j, for every start i <= j at once
        prod[: j + 1, j + 1] = c[j] * prod[: j + 1, j]
    return prod


def _frozen_rollout_tables(table: StepTable) -> tuple[Tensor, Tensor]:
    """Φ, Ψ of shape (N+1, N+1): with x̂0 frozen, ``x_j = Φ_ij x_i + Ψ_ij x̂0`` (+ noise) for j >= i.

    ``Φ_ij = Π_{i<=l<j} α_l``, ``Ψ_ij = Σ_{i<=l<j} Φ_{l+1,j} β_l``; zero below the diagonal.
    """
    alpha, beta = (v.double().cpu().numpy() for v in table.frozen_x0_coefficients())
    n = len(alpha)
    phi = _products(alpha)
    psi = np.zeros((n + 1, n + 1))
    for j in range(n):
        psi[: j + 1, j + 1] = alpha[j] * psi[: j + 1, j] + beta[j]
    dev = table.timesteps.device
    return torch.tensor(phi, dtype=torch.float32, device=dev), torch.tensor(psi, dtype=torch.float32, device=dev)
