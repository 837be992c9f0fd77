"""ConditionalUnet1D (Chi et al. 2023), with Diffusion Policy's module and parameter names.

A temporal 1-D U-Net over the action horizon: residual blocks of Conv1d → GroupNorm → Mish, FiLM
conditioning on (diffusion-step embedding ⊕ observation features), ``len(down_dims) - 1``
down/up-samplings. Parameter names match ``diffusion_policy.model.diffusion.conditional_unet1d`` so
state dicts of the same size load into either (``cond_encoder.1.weight``, ``down_modules.0.0...``).
Each batch row carries its own timestep, which Picard sampling needs.

With ``prefix_input`` the network also reads the committed action prefix (training-time action
conditioning, Black, Ren, Equi & Levine 2025, arXiv 2512.05964): per position the clean action and a
0/1 mask, ``(M, T, Da + 1)`` (:func:`prefix_channels`). Where the mask is 1 the noisy input is
replaced by the clean action, and the channels enter the first convolution as extra input channels
(``prefix_conv``, zero-initialised: a network converted from one without them computes the same
function until it is fine-tuned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class UnetConfig:
    input_dim: int
    global_cond_dim: int
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    cond_predict_scale: bool = True
    prefix_input: bool = False


def zero_prefix(sample: Tensor) -> Tensor:
    """The prefix input that commits nothing, for a sample (M, T, Da) → (M, T, Da + 1) zeros."""
    return sample.new_zeros(*sample.shape[:-1], sample.shape[-1] + 1)


def prefix_channels(actions: Tensor, mask: Tensor) -> Tensor:
    """The prefix input of a ``prefix_input`` network: ``actions`` (M, T, Da) where ``mask`` (M, T)
    is 1, zeros elsewhere, with the mask as a last channel → (M, T, Da + 1)."""
    mask = mask.to(actions.dtype).unsqueeze(-1)
    return torch.cat([actions * mask, mask], dim=-1)


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of a (M,) timestep vector → (M, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        emb = x.float()[:, None] * freq[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Downsample1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Conv1dBlock(nn.Module):
    """Conv1d → GroupNorm → Mish."""

    def __init__(self, inp_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(inp_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """``extra`` (M, C_out, T), if given, is added after the convolution (the contribution of
        extra input channels to it)."""
        if extra is None:
            return self.block(x)
        conv, norm, act = self.block
        return act(norm(conv(x) + extra))


class _ToChannels(nn.Module):
    """(M, C) → (M, C, 1); parameter-free, keeps Diffusion Policy's ``cond_encoder.1`` index."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-1)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM (scale and bias, or bias only) from ``cond`` between them."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int = 3,
                 n_groups: int = 8, cond_predict_scale: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([
            Conv1dBlock(in_channels, out_channels, kernel_size, n_groups=n_groups),
            Conv1dBlock(out_channels, out_channels, kernel_size, n_groups=n_groups),
        ])
        self.cond_predict_scale = cond_predict_scale
        self.out_channels = out_channels
        cond_channels = out_channels * 2 if cond_predict_scale else out_channels
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, cond_channels), _ToChannels())
        self.residual_conv = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, extra: Tensor | None = None) -> Tensor:
        """x (M, C_in, T), cond (M, cond_dim) → (M, C_out, T); ``extra`` as for Conv1dBlock."""
        out = self.blocks[0](x, extra)
        embed = self.cond_encoder(cond)
        if self.cond_predict_scale:
            embed = embed.reshape(embed.shape[0], 2, self.out_channels, 1)
            out = embed[:, 0] * out + embed[:, 1]
        else:
            out = out + embed
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """``forward(sample (M, T, Da), timestep (M,) or scalar, global_cond (M, Dg), prefix) -> (M, T, Da)``.

    ``T`` must be divisible by ``2 ** (len(down_dims) - 1)``. ``prefix`` (M, T, Da + 1), only with
    ``prefix_input`` (see the module docstring; None: nothing committed, all zeros).
    """

    def __init__(self, cfg: UnetConfig):
        super().__init__()
        self.config = cfg
        all_dims = [cfg.input_dim] + list(cfg.down_dims)
        start_dim = cfg.down_dims[0]
        dsed = cfg.diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        cond_dim = dsed + cfg.global_cond_dim
        block = lambda i, o: ConditionalResidualBlock1D(  # noqa: E731
            i, o, cond_dim=cond_dim, kernel_size=cfg.kernel_size, n_groups=cfg.n_groups,
            cond_predict_scale=cfg.cond_predict_scale,
        )
        in_out = list(zip(all_dims[:-1], all_dims[1:]))
        mid_dim = all_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid_dim, mid_dim), block(mid_dim, mid_dim)])
        self.down_modules = nn.ModuleList([
            nn.ModuleList([
                block(dim_in, dim_out),
                block(dim_out, dim_out),
                Downsample1d(dim_out) if i < len(in_out) - 1 else nn.Identity(),
            ])
            for i, (dim_in, dim_out) in enumerate(in_out)
        ])
        # as upstream: every up level upsamples (there is one fewer up level than down levels)
        self.up_modules = nn.ModuleList([
            nn.ModuleList([block(dim_out * 2, dim_in), block(dim_in, dim_in), Upsample1d(dim_in)])
            for dim_in, dim_out in reversed(in_out[1:])
        ])
        # upstream (diffusion_policy and LeRobot) builds the final block with the default 8 groups,
        # whatever n_groups the residual blocks use
        self.final_conv = nn.Sequential(
            Conv1dBlock(start_dim, start_dim, kernel_size=cfg.kernel_size, n_groups=8),
            nn.Conv1d(start_dim, cfg.input_dim, 1),
        )
        if cfg.prefix_input:
            self.prefix_conv = nn.Conv1d(cfg.input_dim + 1, start_dim, cfg.kernel_size, padding=cfg.kernel_size // 2)
            nn.init.zeros_(self.prefix_conv.weight)
            nn.init.zeros_(self.prefix_conv.bias)

    @property
    def prefix_input(self) -> bool:
        """Whether the network reads the committed action prefix (``prefix=``)."""
        return self.config.prefix_input

    def forward(self, sample: Tensor, timestep: Tensor | int, global_cond: Tensor | None = None,
                prefix: Tensor | None = None) -> Tensor:
        extra = None
        if self.config.prefix_input:
            if prefix is None:
                prefix = zero_prefix(sample)
            committed = prefix[..., -1:] > 0
            sample = torch.where(committed, prefix[..., :-1], sample)  # the clean committed actions
            extra = self.prefix_conv(prefix.transpose(1, 2))
        elif prefix is not None:
            raise ValueError("this network has no prefix input (prefix_input=False); it cannot take committed actions")
        x = sample.transpose(1, 2)  # (M, Da, T)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.reshape(-1).expand(sample.shape[0])
        feature = self.diffusion_step_encoder(timestep)
        if global_cond is not None:
            feature = torch.cat([feature, global_cond], dim=-1)
        skips = []
        for resnet, resnet2, downsample in self.down_modules:
            x = resnet2(resnet(x, feature, extra), feature)
            extra = None  # the first convolution only
            skips.append(x)
            x = downsample(x)
        for mid in self.mid_modules:
            x = mid(x, feature)
        for resnet, resnet2, upsample in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = upsample(resnet2(resnet(x, feature), feature))
        return self.final_conv(x).transpose(1, 2)
