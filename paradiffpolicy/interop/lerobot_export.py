"""Our policies → a LeRobot 0.6 ``save_pretrained`` folder of a ``DiffusionPolicy`` (``type: diffusion``).

The inverse of :mod:`paradiffpolicy.interop.lerobot`, field by field (``docs/lerobot-export.md``):

* ``config.json``: LeRobot's ``DiffusionConfig`` with our architecture, scheduler and features, and
  LeRobot's own defaults for what only its trainer reads (optimiser, LR schedule, loss masking);
* ``model.safetensors``: the U-Net under ``diffusion.unet.*`` (LeRobot's block names) and each
  camera encoder under ``diffusion.rgb_encoder[.j].*``, float32;
* ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and their normaliser statistics
  (``<feature>.<stat>``), the pipelines LeRobot's ``make_pre_post_processors`` builds.

Two rewrites give LeRobot's layout the same function. Features are written in LeRobot's conditioning
order (``observation.state``, the cameras, ``observation.environment_state``), and the columns of
every FiLM ``cond_encoder`` Linear that read the global conditioning are permuted to match. A trunk
narrower than torchvision's (``backbone_width`` 16, 32 or 48) is written inside the width-64 ResNet,
ours the leading channels of every layer and zeros elsewhere: no weight leads from an added channel
into one of ours, GroupNorm's groups hold 16 channels at every width (so ours fill whole groups and
their statistics are unchanged), and the SpatialSoftmax's 1x1 conv weights the added channels by 0
(which, with zero weights and biases, stay zero anyway).

What LeRobot cannot express is refused, naming it: our committed-prefix input, a shorter or wider
ResNet trunk, diffusion_policy's average-pool encoder and ImageNet normalisation, feature names that
are not LeRobot's, a chunk that does not start at ``n_obs_steps - 1``, a scheduler setting diffusers'
defaults do not give.

Normalisation: LeRobot normalises per feature *type*. Our ``affine`` statistics (diffusion_policy's
``limits`` fit, ``y = x·scale + offset``) are written as the MIN_MAX range that gives the same map,
``min = -(1 + offset)/scale``, ``max = min + 2/scale``: the same function up to float rounding (LeRobot
computes ``2(x - min)/(max - min) - 1``). Statistics a mode does not use are not invented.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from paradiffpolicy.interop.diffusion_policy import UnsupportedCheckpoint
from paradiffpolicy.interop.lerobot import KINDS, MODES as READ_MODES, ORDER, POSTPROCESSOR, PREPROCESSOR, STATS
from paradiffpolicy.models.vision import RgbEncoder
from paradiffpolicy.normalizer import LEROBOT_EPS

LEROBOT_VERSION = "0.6"
TYPES = {ours: theirs for theirs, ours in KINDS.items()}  # our feature kind → LeRobot's feature type
TORCHVISION_WIDTH = 64
# our normalisation → LeRobot's mode (the reader's, inverted), our affine statistics written as MIN_MAX
MODES = {**{ours: theirs for theirs, ours in READ_MODES.items()}, "affine": "MIN_MAX"}
PRE_STATS = "policy_preprocessor_step_3_normalizer_processor.safetensors"
POST_STATS = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
# what LeRobot's trainer reads and inference never does: its DiffusionConfig defaults
TRAINING_DEFAULTS = {
    "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None, "private": None, "tags": None,
    "license": None, "pretrained_path": None, "pretrained_revision": None, "gradient_checkpointing": False,
    "compile_model": False, "compile_mode": "reduce-overhead", "do_mask_loss_for_padding": False, "optimizer_lr": 1e-4,
    "optimizer_betas": [0.95, 0.999], "optimizer_eps": 1e-8, "optimizer_weight_decay": 1e-6, "scheduler_name": "cosine",
    "scheduler_warmup_steps": 500,
}
_BLOCK = re.compile(r"^(.*_modules\.\d+(?:\.\d+)?)\.blocks\.([01])\.")
_SAMPLE = re.compile(r"^((?:down|up)_modules\.\d+\.2)\.conv\.(weight|bias)$")


def lerobot_unet_key(k: str) -> str:
    """One of our U-Net parameter names (after ``model.``) → LeRobot's (the inverse of ``lerobot.unet_key``)."""
    k = _BLOCK.sub(lambda m: f"{m.group(1)}.conv{int(m.group(2)) + 1}.", k)
    return _SAMPLE.sub(r"\1.\2", k)


def check_expressible(policy) -> None:
    """``UnsupportedCheckpoint`` naming the first thing of ``policy`` a LeRobot diffusion policy cannot hold."""
    cfg = policy.config
    if cfg.prefix_input:
        raise UnsupportedCheckpoint("prefix_input=true (the committed-prefix channels of training-time action conditioning): "
                                    "LeRobot's diffusion U-Net has no such input; export the policy it was fine-tuned from")
    if cfg.executed_start != cfg.n_obs_steps - 1:
        raise UnsupportedCheckpoint(f"action_start={cfg.action_start}: LeRobot executes the chunk from n_obs_steps - 1 = {cfg.n_obs_steps - 1}")
    s = cfg.scheduler
    if s.name not in ("ddpm", "ddim"):
        raise UnsupportedCheckpoint(f"scheduler {s.name!r}: LeRobot's noise_scheduler_type is DDPM or DDIM")
    if s.timestep_spacing not in (None, "leading") or s.steps_offset != 0 or (s.name == "ddim" and not s.set_alpha_to_one):
        raise UnsupportedCheckpoint(f"scheduler timestep_spacing={s.timestep_spacing!r}, steps_offset={s.steps_offset}, "
                                    f"set_alpha_to_one={s.set_alpha_to_one}: LeRobot builds diffusers' defaults ('leading', 0, true)")
    feats = cfg.features()
    kinds = [f.kind for f in feats]
    for f in feats:
        ok = {"state": f.name == "observation.state", "env_state": f.name == "observation.environment_state",
              "image": f.name == "observation.image" or f.name.startswith("observation.images.")}[f.kind]
        if not ok:
            raise UnsupportedCheckpoint(f"feature {f.name!r} ({f.kind}): LeRobot's diffusion policy names it observation.state, "
                                        "observation.image(s.<camera>) or observation.environment_state")
        if f.normalization not in MODES:
            raise UnsupportedCheckpoint(f"feature {f.name!r}: normalization {f.normalization!r} has no LeRobot processor rule")
    if kinds.count("state") != 1:
        raise UnsupportedCheckpoint(f"{kinds.count('state')} state features: LeRobot's diffusion policy reads exactly one observation.state")
    for kind in set(kinds):
        modes = {MODES[f.normalization] for f in feats if f.kind == kind}
        if len(modes) > 1:
            raise UnsupportedCheckpoint(f"{TYPES[kind]} features normalised as {sorted(modes)}: LeRobot has one mode per feature type")
    if "image" in kinds:
        v = cfg.vision
        if v.backbone_width > TORCHVISION_WIDTH or v.backbone_stages != 4:
            raise UnsupportedCheckpoint(f"vision.backbone_width={v.backbone_width}, backbone_stages={v.backbone_stages}: LeRobot builds "
                                        f"torchvision's {v.vision_backbone} trunk (width {TORCHVISION_WIDTH}, 4 stages; a narrower "
                                        "trunk is written inside it)")
        if v.pool != "spatial_softmax" or v.imagenet_norm:
            raise UnsupportedCheckpoint(f"vision.pool={v.pool!r}, imagenet_norm={v.imagenet_norm}: LeRobot's encoder is "
                                        "SpatialSoftmax + Linear + ReLU on the feature's own normalisation")


def lerobot_config(policy) -> dict:
    """LeRobot's ``DiffusionConfig`` as ``save_pretrained`` writes it, for ``policy``."""
    cfg, s, v = policy.config, policy.config.scheduler, policy.config.vision
    feats = [cfg.features()[i] for i in lerobot_feature_order(cfg.features())]
    mapping = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": MODES[cfg.action_normalization]}  # LeRobot's default, then ours
    mapping.update({TYPES[f.kind]: MODES[f.normalization] for f in feats})
    return {
        "type": "diffusion", "n_obs_steps": cfg.n_obs_steps,
        "input_features": {f.name: {"type": TYPES[f.kind], "shape": list(f.shape)} for f in feats},
        "output_features": {"action": {"type": "ACTION", "shape": [cfg.action_dim]}},
        **{k: TRAINING_DEFAULTS[k] for k in ("device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private", "tags",
                                             "license", "pretrained_path", "pretrained_revision")},
        "horizon": cfg.horizon, "n_action_steps": cfg.n_action_steps, "normalization_mapping": mapping,
        "drop_n_last_frames": cfg.horizon - cfg.n_action_steps - cfg.n_obs_steps + 1,
        "vision_backbone": v.vision_backbone, "resize_shape": None, "crop_ratio": 1.0,
        "crop_shape": None if v.crop_shape is None else list(v.crop_shape), "crop_is_random": v.crop_is_random,
        "pretrained_backbone_weights": None, "use_group_norm": v.use_group_norm,
        "spatial_softmax_num_keypoints": v.spatial_softmax_num_keypoints,
        "use_separate_rgb_encoder_per_camera": v.use_separate_rgb_encoder_per_camera,
        "down_dims": list(cfg.down_dims), "kernel_size": cfg.kernel_size, "n_groups": cfg.n_groups,
        "diffusion_step_embed_dim": cfg.diffusion_step_embed_dim, "use_film_scale_modulation": cfg.cond_predict_scale,
        "gradient_checkpointing": False, "noise_scheduler_type": s.name.upper(), "num_train_timesteps": s.num_train_timesteps,
        "beta_schedule": s.beta_schedule, "beta_start": s.beta_start, "beta_end": s.beta_end,
        "prediction_type": s.prediction_type, "clip_sample": s.clip_sample, "clip_sample_range": s.clip_sample_range,
        "num_inference_steps": None if s.num_inference_steps == s.num_train_timesteps else s.num_inference_steps,
        **{k: TRAINING_DEFAULTS[k] for k in ("compile_model", "compile_mode", "do_mask_loss_for_padding", "optimizer_lr",
                                             "optimizer_betas", "optimizer_eps", "optimizer_weight_decay", "scheduler_name",
                                             "scheduler_warmup_steps")},
    }


def lerobot_feature_order(features) -> list[int]:
    """Indices of ``features`` in LeRobot's conditioning order (state, cameras, environment state; stable)."""
    return sorted(range(len(features)), key=lambda i: ORDER[features[i].kind])


def conditioning_permutation(policy) -> torch.Tensor:
    """``perm`` with LeRobot's global conditioning ``= ours[perm]``: per observation step the features'
    columns in LeRobot's order, the steps flattened oldest first (as ``ObservationEncoder`` lays ours out)."""
    widths, step_dim = policy.obs_encoder.widths, policy.obs_encoder.step_dim
    starts = [sum(widths[:i]) for i in range(len(widths))]
    step = [starts[i] + j for i in lerobot_feature_order(policy.features) for j in range(widths[i])]
    return torch.tensor([s * step_dim + j for s in range(policy.config.n_obs_steps) for j in step])


def widened(tensor: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """``tensor`` in the leading corner of a ``shape`` tensor; the added entries 0, or 1 for norm scales
    and BatchNorm running variances (so an added channel normalises to its zero bias)."""
    if tensor.shape == shape:
        return tensor
    fill = 1.0 if name.endswith("running_var") or (name.endswith(".weight") and tensor.dim() == 1) else 0.0
    out = torch.full(shape, fill, dtype=tensor.dtype)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def lerobot_weights(policy) -> dict[str, torch.Tensor]:
    """``model.safetensors``: the U-Net and the camera encoders under LeRobot's names, float32, the
    conditioning columns in LeRobot's feature order and the trunk at torchvision's width."""
    cfg = policy.config
    separate = cfg.vision.use_separate_rgb_encoder_per_camera
    columns = cfg.diffusion_step_embed_dim + conditioning_permutation(policy)
    vision = dataclasses.replace(cfg.vision, backbone_width=TORCHVISION_WIDTH)
    images = [f for f in policy.features if f.is_image]  # encoder j reads camera j (or all, shared)
    wide = [{k: t.shape for k, t in RgbEncoder(vision, tuple(images[j].shape)).state_dict().items()}
            for j in range(len(policy.obs_encoder.rgb_encoders))]
    out = {}
    for k, t in policy.state_dict().items():
        t = t.detach().cpu().float()
        if k.startswith("model."):
            if k.endswith(".cond_encoder.1.weight"):
                t = torch.cat([t[:, : cfg.diffusion_step_embed_dim], t[:, columns]], dim=1)
            out["diffusion.unet." + lerobot_unet_key(k[len("model."):])] = t.contiguous()
        elif k.startswith("obs_encoder.rgb_encoders."):
            index, rest = k[len("obs_encoder.rgb_encoders."):].split(".", 1)
            out["diffusion.rgb_encoder." + (f"{index}.{rest}" if separate else rest)] = widened(t, wide[int(index)][rest], rest).contiguous()
    return out


def lerobot_stats(policy) -> dict[str, torch.Tensor]:
    """``<feature>.<stat>`` for every feature and the action, in LeRobot's shapes (images (3, 1, 1))."""
    out = {}
    norms = [(f.name, n) for f, n in zip(policy.features, policy.obs_encoder.normalizers)] + [("action", policy.action_normalizer)]
    for name, norm in norms:
        if norm.mode == "affine":  # the MIN_MAX range that gives y = x·scale + offset
            lo = -(1.0 + norm.offset) / norm.scale
            stats = {"min": lo, "max": lo + 2.0 / norm.scale}
        else:
            stats = {stat: getattr(norm, stat) for stat in STATS[norm.mode]}
        out.update({f"{name}.{stat}": t.detach().cpu().float().contiguous() for stat, t in stats.items()})
    return out


def processor_docs(config: dict) -> tuple[dict, dict]:
    """``policy_preprocessor.json`` and ``policy_postprocessor.json``: LeRobot's pipelines for a diffusion policy."""
    norm_map = config["normalization_mapping"]
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        device,
        {"registry_name": "normalizer_processor", "config": {
            "eps": LEROBOT_EPS, "features": {**config["input_features"], **config["output_features"]}, "norm_map": norm_map},
         "state_file": PRE_STATS}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {
            "eps": LEROBOT_EPS, "features": config["output_features"], "norm_map": norm_map}, "state_file": POST_STATS},
        device]}
    return pre, post


def export_lerobot(policy, directory: str | os.PathLike) -> Path:
    """Write ``policy`` as a LeRobot diffusion folder (files written to temporaries, then renamed)."""
    check_expressible(policy)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = lerobot_config(policy)
    pre, post = processor_docs(config)
    stats = lerobot_stats(policy)
    files = {"model.safetensors": lerobot_weights(policy), PRE_STATS: stats, POST_STATS: stats,
             "config.json": config, PREPROCESSOR: pre, POSTPROCESSOR: post}
    for name, content in files.items():
        tmp = out / (name + ".tmp")
        if name.endswith(".safetensors"):
            save_file(content, str(tmp))
        else:
            tmp.write_text(json.dumps(content, indent=4))
    for name in files:
        os.replace(out / (name + ".tmp"), out / name)
    return out
