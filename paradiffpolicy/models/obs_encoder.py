"""Observation encoder: named features (B, To, ...) → the U-Net's global conditioning (B, To·D).

Each feature is normalised by its own rule; low-dim features are used as they are, image features
go through an :class:`~paradiffpolicy.models.vision.RgbEncoder` (one per camera, or one shared).
Per time step the features are concatenated in the order the policy declares them (LeRobot:
state, cameras, environment state; diffusion_policy: its one ``obs`` vector), then the steps are
flattened oldest first — Diffusion Policy's ``obs_as_global_cond`` layout. It runs once per policy
call; samplers only ever see its output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paradiffpolicy.features import FeatureSpec
from paradiffpolicy.models.vision import RgbEncoder, VisionConfig
from paradiffpolicy.normalizer import Normalizer


def stat_shape(spec: FeatureSpec) -> tuple[int, ...]:
    """Shape of a feature's normaliser statistics: (D,), or per channel (3, 1, 1) for images."""
    return (spec.shape[0], 1, 1) if spec.is_image else (spec.dim,)


class ObservationEncoder(nn.Module):
    def __init__(self, features: list[FeatureSpec], vision: VisionConfig):
        super().__init__()
        self.features = list(features)
        self.normalizers = nn.ModuleList([Normalizer(f.normalization, stat_shape(f)) for f in self.features])
        images = [f for f in self.features if f.is_image]
        shapes = {tuple(f.shape) for f in images}
        if len(shapes) > 1 and not vision.use_separate_rgb_encoder_per_camera:
            raise ValueError(f"image features of different shapes {sorted(shapes)} need use_separate_rgb_encoder_per_camera=true")
        n_enc = len(images) if vision.use_separate_rgb_encoder_per_camera else min(1, len(images))
        self.rgb_encoders = nn.ModuleList([RgbEncoder(vision, tuple(images[i].shape)) for i in range(n_enc)])
        self._camera_index = {f.name: (i if vision.use_separate_rgb_encoder_per_camera else 0) for i, f in enumerate(images)}
        # each feature's columns in one step of the conditioning: low-dim as they are, a camera its encoder's output
        self.widths = [vision.feature_dim if f.is_image else f.dim for f in self.features]
        self.step_dim = sum(self.widths)

    @property
    def has_images(self) -> bool:
        return len(self.rgb_encoders) > 0

    def normalize(self, obs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f.name: norm.normalize(obs[f.name]) for f, norm in zip(self.features, self.normalizers)}

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        """``obs``: {name: (B, To, ...)} float32 (images CHW in [0, 1]) → (B, To·step_dim)."""
        parts = []
        for f, x in zip(self.features, self.normalize(obs).values()):
            if f.is_image:
                bsz, steps = x.shape[:2]
                enc = self.rgb_encoders[self._camera_index[f.name]]
                x = enc(x.reshape(bsz * steps, *x.shape[2:])).reshape(bsz, steps, -1)
            parts.append(x)
        feats = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return feats.flatten(start_dim=1)
