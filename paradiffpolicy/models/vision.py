"""RGB encoder of Diffusion Policy as LeRobot builds it, under LeRobot's parameter names.

``image (N, 3, H, W), normalised → [centre crop] → ResNet trunk (up to layer4, or fewer stages) →
SpatialSoftmax keypoints (K, 2) → Linear(2K, 2K) → ReLU → (N, 2K)`` (LeRobot, and robomimic's
``VisualCore`` that diffusion_policy's hybrid image policy uses). ``pool="avgpool"`` is
diffusion_policy's ``MultiImageObsEncoder`` instead: ``[centre crop] → [ImageNet mean / std] →
ResNet trunk → global average pool → (N, 8·width)``, no projection.

The trunk is torchvision's ResNet-18/34 (He et al. 2016) without avgpool and fc, written here so
nothing imports torchvision (its wheel here is a CUDA build that does not import with CPU torch).
Module indices follow ``nn.Sequential(*list(resnet.children())[:-2])``: ``backbone.0`` conv1,
``backbone.1`` bn1, ``backbone.4..7`` layer1..4, so LeRobot state dicts load name for name. With
``use_group_norm`` every BatchNorm becomes ``GroupNorm(C // 16, C)`` under the BatchNorm's name,
as LeRobot does. No weights are ever downloaded: a checkpoint carries them.

SpatialSoftmax (Finn et al. 2016, "Deep Spatial Autoencoders"): a 1x1 conv to K maps, a softmax
over each map's H·W positions, the expected (x, y) on a [-1, 1] grid (built with numpy's linspace,
as upstream, and stored as the ``pos_grid`` buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKBONES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
POOLS = ("spatial_softmax", "avgpool")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's


@dataclass
class VisionConfig:
    """The image encoder; names and defaults follow LeRobot's ``DiffusionConfig``."""

    vision_backbone: str = "resnet18"
    # channels of the trunk's first stage (stages: w, 2w, 4w, 8w); 64 is torchvision's ResNet (and
    # loads LeRobot weights); a narrower trunk (16: 1/16 of the compute) trains on a CPU
    backbone_width: int = 64
    # residual stages kept (1-4); 4 is torchvision's trunk (stride 32: a 3x3 map for an 84x84 crop).
    # Fewer stages give SpatialSoftmax a finer map (2: stride 8, 11x11) at less compute
    backbone_stages: int = 4
    use_group_norm: bool = True
    spatial_softmax_num_keypoints: int = 32
    crop_shape: Optional[List[int]] = field(default_factory=lambda: [84, 84])
    # training-time augmentation only; inference always takes the centre crop
    crop_is_random: bool = True
    use_separate_rgb_encoder_per_camera: bool = False
    # how the trunk's map becomes features: ``spatial_softmax`` (keypoints, Linear, ReLU: LeRobot,
    # robomimic) or ``avgpool`` (diffusion_policy's MultiImageObsEncoder: the 8·width channels as they are)
    pool: str = "spatial_softmax"
    # diffusion_policy's MultiImageObsEncoder ``imagenet_norm``: ImageNet mean / std applied to the
    # crop after the feature's own normaliser (it normalises twice; that is what it runs)
    imagenet_norm: bool = False

    def __post_init__(self) -> None:
        if self.vision_backbone not in BACKBONES:
            raise ValueError(f"policy.vision.vision_backbone={self.vision_backbone!r} is unsupported; expected one of {tuple(BACKBONES)}")
        if self.backbone_width < 16 or self.backbone_width % 16:
            raise ValueError(f"policy.vision.backbone_width={self.backbone_width} must be a multiple of 16 (GroupNorm(C/16))")
        if not 1 <= self.backbone_stages <= 4:
            raise ValueError(f"policy.vision.backbone_stages={self.backbone_stages} must be 1, 2, 3 or 4")
        if self.spatial_softmax_num_keypoints < 1:
            raise ValueError(f"policy.vision.spatial_softmax_num_keypoints={self.spatial_softmax_num_keypoints} must be >= 1")
        if self.crop_shape is not None and (len(self.crop_shape) != 2 or min(self.crop_shape) < 1):
            raise ValueError(f"policy.vision.crop_shape={self.crop_shape} must be [H, W] or null")
        if self.pool not in POOLS:
            raise ValueError(f"policy.vision.pool={self.pool!r} is unknown; expected one of {POOLS}")

    @property
    def feature_dim(self) -> int:
        if self.pool == "avgpool":
            return self.backbone_width * 2 ** (self.backbone_stages - 1)
        return 2 * self.spatial_softmax_num_keypoints


def _norm(channels: int, group_norm: bool) -> nn.Module:
    return nn.GroupNorm(channels // 16, channels) if group_norm else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a norm each, identity or 1x1 projection shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int, group_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes, group_norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(planes, group_norm)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), _norm(planes, group_norm))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def resnet_trunk(name: str, group_norm: bool, width: int = 64, stages: int = 4) -> nn.Sequential:
    """conv1 → norm → ReLU → maxpool → layer1..``stages`` (all four: 8·width channels at stride 32;
    width 64: ResNet). Kept stages keep their torchvision indices, so weights load name for name."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), _norm(width, group_norm), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    inplanes = width
    for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width)[:stages], BACKBONES[name])):
        stride = 1 if i == 0 else 2
        stage = [BasicBlock(inplanes, planes, stride, group_norm)]
        stage += [BasicBlock(planes, planes, 1, group_norm) for _ in range(blocks - 1)]
        layers.append(nn.Sequential(*stage))
        inplanes = planes
    return nn.Sequential(*layers)


class SpatialSoftmax(nn.Module):
    """(N, C, H, W) → (N, K, 2) expected keypoint coordinates."""

    def __init__(self, in_shape: tuple[int, int, int], num_kp: int):
        super().__init__()
        c, self._h, self._w = in_shape
        self.nets = nn.Conv2d(c, num_kp, kernel_size=1)
        self._k = num_kp
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, self._w), np.linspace(-1.0, 1.0, self._h))
        grid = np.stack([pos_x.reshape(-1), pos_y.reshape(-1)], axis=1)
        self.register_buffer("pos_grid", torch.from_numpy(grid).float())

    def forward(self, features: Tensor) -> Tensor:
        attention = F.softmax(self.nets(features).reshape(-1, self._h * self._w), dim=-1)
        return (attention @ self.pos_grid).view(-1, self._k, 2)


def center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """torchvision's ``CenterCrop`` for a crop no larger than the image (top = round((H - h) / 2))."""
    h, w = (int(n) for n in x.shape[-2:])  # plain ints also while tracing (the image size is fixed)
    ch, cw = size
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


def random_crop(x: Tensor, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """One random crop per image (training augmentation)."""
    n, _, h, w = x.shape
    ch, cw = size
    tops = torch.randint(0, h - ch + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, w - cw + 1, (n,), generator=generator).tolist()
    return torch.stack([x[i, :, t : t + ch, l : l + cw] for i, (t, l) in enumerate(zip(tops, lefts))])


class RgbEncoder(nn.Module):
    """One camera's encoder: ``forward(images (N, 3, H, W) normalised) -> (N, 2K)``."""

    def __init__(self, cfg: VisionConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        self.crop = None if cfg.crop_shape is None else tuple(int(s) for s in cfg.crop_shape)
        if self.crop is not None and (self.crop[0] > image_shape[1] or self.crop[1] > image_shape[2]):
            raise ValueError(f"policy.vision.crop_shape={list(self.crop)} is larger than the image {list(image_shape[1:])}")
        self.crop_is_random = cfg.crop_is_random
        self.avgpool = cfg.pool == "avgpool"
        if cfg.imagenet_norm:  # constants, not weights: left out of the state dict
            self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.imagenet_norm = cfg.imagenet_norm
        self.backbone = resnet_trunk(cfg.vision_backbone, cfg.use_group_norm, cfg.backbone_width, cfg.backbone_stages)
        if not self.avgpool:
            h, w = self.crop or image_shape[1:]
            with torch.no_grad():
                fmap = self.backbone.eval()(torch.zeros(1, 3, h, w)).shape[1:]
            self.pool = SpatialSoftmax(tuple(fmap), cfg.spatial_softmax_num_keypoints)
            self.out = nn.Linear(cfg.feature_dim, cfg.feature_dim)
            self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.crop is not None:
            x = random_crop(x, self.crop) if (self.training and self.crop_is_random) else center_crop(x, self.crop)
        if self.imagenet_norm:
            x = (x - self.imagenet_mean) / self.imagenet_std
        # NHWC: PyTorch's CPU max-pooling and convolutions run it ~1.5x faster (trunk forward and
        # backward at batch 128, 2 threads); same values up to float rounding
        x = x.contiguous(memory_format=torch.channels_last)
        if self.avgpool:
            return self.backbone(x).mean(dim=(2, 3))
        x = torch.flatten(self.pool(self.backbone(x)), start_dim=1)
        return self.relu(self.out(x))
