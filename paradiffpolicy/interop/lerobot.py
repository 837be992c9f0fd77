"""LeRobot diffusion policy folders (``save_pretrained``) → our config and state dict.

Two layouts are read:

* current (LeRobot ≥ 0.4): ``config.json`` + ``model.safetensors`` + ``policy_preprocessor.json`` /
  ``policy_postprocessor.json`` whose normaliser steps name a safetensors file of statistics
  (``<feature>.<min|max|mean|std>``); MIN_MAX uses the processor rule (``min_max``);
* older: no processor files, statistics as buffers inside ``model.safetensors``
  (``normalize_inputs.buffer_<feature with _>.<stat>``, ``normalize_targets`` / ``unnormalize_outputs``
  for the action), with the older MIN_MAX rule (``min_max_legacy``).

Features: STATE → ``state``, VISUAL → ``image``, ENV → ``env_state``, in LeRobot's conditioning order
(``observation.state``, the cameras in declared order, ``observation.environment_state``). A feature
type without a ``normalization_mapping`` entry is IDENTITY, as in LeRobot.

Weight names (strict)::

    diffusion.unet.<...>.conv1. / .conv2.            → model.<...>.blocks.0. / .blocks.1.
    diffusion.unet.{down,up}_modules.i.2.{weight,bias} → model.{down,up}_modules.i.2.conv.*
    diffusion.unet.*                                 → model.*
    diffusion.rgb_encoder.j.* (one per camera)       → obs_encoder.rgb_encoders.j.*
    diffusion.rgb_encoder.* (shared)                 → obs_encoder.rgb_encoders.0.*
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from paradiffpolicy.config import PolicyConfig
from paradiffpolicy.features import FeatureSpec
from paradiffpolicy.interop.diffusion_policy import UnsupportedCheckpoint
from paradiffpolicy.models.vision import BACKBONES, VisionConfig
from paradiffpolicy.normalizer import LEROBOT_EPS
from paradiffpolicy.schedulers import SchedulerConfig

KINDS = {"STATE": "state", "VISUAL": "image", "ENV": "env_state"}
MODES = {"MIN_MAX": "min_max", "MEAN_STD": "mean_std", "IDENTITY": "identity"}
LEGACY_MODES = {"MIN_MAX": "min_max_legacy", "MEAN_STD": "mean_std", "IDENTITY": "identity"}
ORDER = {"state": 0, "image": 1, "env_state": 2}
STATS = {"min_max": ("min", "max"), "min_max_legacy": ("min", "max"), "mean_std": ("mean", "std"), "identity": ()}
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
# Every DiffusionConfig option LeRobot 0.6 writes, by what we do with it; an option outside these is
# refused by name (a newer LeRobot's option may change what the policy computes).
USED = {"type", "n_obs_steps", "input_features", "output_features", "horizon", "n_action_steps", "normalization_mapping",
        "vision_backbone", "crop_shape", "crop_is_random", "use_group_norm", "spatial_softmax_num_keypoints",
        "use_separate_rgb_encoder_per_camera", "down_dims", "kernel_size", "n_groups", "diffusion_step_embed_dim",
        "use_film_scale_modulation", "noise_scheduler_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
        "prediction_type", "clip_sample", "clip_sample_range", "num_inference_steps"}
# options that change the computation, supported only at the value that leaves it as implemented here
MUST_EQUAL = {"resize_shape": None, "crop_ratio": 1.0, "use_peft": False}
# read by LeRobot's trainer, hub upload or device placement only: what the policy computes does not
# depend on them (pretrained_backbone_weights only initialises the trunk: the file holds its weights)
NOT_INFERENCE = {"device", "use_amp", "push_to_hub", "repo_id", "private", "tags", "license", "pretrained_path",
                 "pretrained_revision", "drop_n_last_frames", "pretrained_backbone_weights", "gradient_checkpointing",
                 "compile_model", "compile_mode", "do_mask_loss_for_padding", "optimizer_lr", "optimizer_betas", "optimizer_eps",
                 "optimizer_weight_decay", "scheduler_name", "scheduler_warmup_steps"}


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedCheckpoint(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UnsupportedCheckpoint(f"{path}: expected a JSON object")
    return doc


def _safetensors(path: Path) -> dict:
    if not path.is_file():
        raise UnsupportedCheckpoint(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnsupportedCheckpoint(f"{path} is truncated or corrupted: {e}") from None


def _normalizer_step(doc: dict, registry: str, path: Path) -> dict:
    steps = [s for s in doc.get("steps", []) if s.get("registry_name") == registry]
    if len(steps) != 1:
        raise UnsupportedCheckpoint(f"{path}: expected one {registry!r} step, found {len(steps)}")
    return steps[0]


def policy_config(cfg: dict, norm_map: dict, legacy: bool, where: str) -> PolicyConfig:
    if cfg.get("type") != "diffusion":
        raise UnsupportedCheckpoint(f"{where}: LeRobot policy type {cfg.get('type')!r} is not supported (only 'diffusion')")
    for key, ok in MUST_EQUAL.items():
        if key in cfg and cfg[key] != ok:
            raise UnsupportedCheckpoint(f"{where}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    unknown = sorted(set(cfg) - USED - set(MUST_EQUAL) - NOT_INFERENCE)
    if unknown:
        raise UnsupportedCheckpoint(f"{where}: LeRobot option(s) {', '.join(f'{k}={cfg[k]!r}' for k in unknown)} unknown to this "
                                    "reader (LeRobot 0.6's DiffusionConfig); refusing rather than ignoring what may change the policy")
    if cfg.get("vision_backbone", "resnet18") not in BACKBONES:
        raise UnsupportedCheckpoint(f"{where}: vision_backbone={cfg.get('vision_backbone')!r} is not supported ({tuple(BACKBONES)})")
    modes = LEGACY_MODES if legacy else MODES
    feats = []
    for name, f in cfg.get("input_features", {}).items():
        kind = KINDS.get(f.get("type"))
        if kind is None:
            raise UnsupportedCheckpoint(f"{where}: input feature {name!r} of type {f.get('type')!r} is not supported ({tuple(KINDS)})")
        mode = modes.get(norm_map.get(f["type"], "IDENTITY"))
        if mode is None:
            raise UnsupportedCheckpoint(f"{where}: normalisation {norm_map.get(f['type'])!r} of {name!r} is not supported")
        feats.append(FeatureSpec(name, kind, [int(d) for d in f["shape"]], mode))
    states = [f for f in feats if f.kind == "state"]
    if [f.name for f in states] != ["observation.state"]:
        raise UnsupportedCheckpoint(f"{where}: LeRobot's diffusion policy reads exactly one STATE feature 'observation.state'; got {[f.name for f in states]}")
    envs = [f for f in feats if f.kind == "env_state"]
    if len(envs) > 1 or any(f.name != "observation.environment_state" for f in envs):
        raise UnsupportedCheckpoint(f"{where}: ENV features {[f.name for f in envs]}: LeRobot reads one, 'observation.environment_state'")
    feats.sort(key=lambda f: ORDER[f.kind])  # stable: cameras keep their declared order
    actions = [(n, f) for n, f in cfg.get("output_features", {}).items() if f.get("type") == "ACTION"]
    if len(actions) != 1:
        raise UnsupportedCheckpoint(f"{where}: expected one ACTION output feature, got {len(actions)}")
    sched_type = cfg.get("noise_scheduler_type", "DDPM")
    if sched_type not in ("DDPM", "DDIM"):
        raise UnsupportedCheckpoint(f"{where}: noise_scheduler_type={sched_type!r} is not supported")
    n_train = int(cfg.get("num_train_timesteps", 100))
    scheduler = SchedulerConfig(
        name=sched_type.lower(), num_train_timesteps=n_train, num_inference_steps=int(cfg.get("num_inference_steps") or n_train),
        beta_schedule=cfg.get("beta_schedule", "squaredcos_cap_v2"), beta_start=float(cfg.get("beta_start", 1e-4)),
        beta_end=float(cfg.get("beta_end", 0.02)), prediction_type=cfg.get("prediction_type", "epsilon"),
        clip_sample=bool(cfg.get("clip_sample", True)), clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        timestep_spacing="leading", steps_offset=0,
    )
    crop = cfg.get("crop_shape")
    vision = VisionConfig(
        vision_backbone=cfg.get("vision_backbone", "resnet18"), use_group_norm=bool(cfg.get("use_group_norm", True)),
        spatial_softmax_num_keypoints=int(cfg.get("spatial_softmax_num_keypoints", 32)),
        crop_shape=None if crop is None else [int(c) for c in crop], crop_is_random=bool(cfg.get("crop_is_random", True)),
        use_separate_rgb_encoder_per_camera=bool(cfg.get("use_separate_rgb_encoder_per_camera", False)),
    )
    action_mode = modes.get(norm_map.get("ACTION", "IDENTITY"))
    return PolicyConfig(
        action_dim=int(actions[0][1]["shape"][0]), n_obs_steps=int(cfg.get("n_obs_steps", 2)), horizon=int(cfg.get("horizon", 16)),
        n_action_steps=int(cfg.get("n_action_steps", 8)), down_dims=[int(d) for d in cfg.get("down_dims", [512, 1024, 2048])],
        kernel_size=int(cfg.get("kernel_size", 5)), n_groups=int(cfg.get("n_groups", 8)),
        diffusion_step_embed_dim=int(cfg.get("diffusion_step_embed_dim", 128)),
        cond_predict_scale=bool(cfg.get("use_film_scale_modulation", True)), scheduler=scheduler,
        input_features=feats, action_normalization=action_mode, vision=vision,
    )


_BLOCK_CONV = re.compile(r"^(.*_modules\.\d+(?:\.\d+)?)\.conv([12])\.")
_SAMPLE_CONV = re.compile(r"^((?:down|up)_modules\.\d+\.2)\.(weight|bias)$")


def unet_key(k: str) -> str:
    """A LeRobot U-Net parameter name (after ``diffusion.unet.``) → ours."""
    k = _BLOCK_CONV.sub(lambda m: f"{m.group(1)}.blocks.{int(m.group(2)) - 1}.", k)
    return _SAMPLE_CONV.sub(r"\1.conv.\2", k)


def map_weights(weights: dict, separate: bool, where: str) -> tuple[dict, dict]:
    """(our network tensors, legacy normaliser buffers) from a LeRobot ``model.safetensors``."""
    out, legacy, unknown = {}, {}, []
    for k, v in weights.items():
        if k.startswith("diffusion.unet."):
            out["model." + unet_key(k[len("diffusion.unet."):])] = v
        elif k.startswith("diffusion.rgb_encoder."):
            rest = k[len("diffusion.rgb_encoder."):]
            out["obs_encoder.rgb_encoders." + (rest if separate else "0." + rest)] = v
        elif k.startswith(("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")):
            legacy[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise UnsupportedCheckpoint(f"{where}: weights this runtime cannot place: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out, legacy


def _stats_for(pcfg: PolicyConfig, get, where: str) -> dict:
    """Normaliser buffers of every feature and the action, from ``get(feature, stat) -> tensor | None``."""
    out = {}
    targets = [(f"obs_encoder.normalizers.{i}.", f.name, f.normalization, f.shape) for i, f in enumerate(pcfg.input_features)]
    targets.append(("action_normalizer.", "action", pcfg.action_normalization, [pcfg.action_dim]))
    for prefix, name, mode, shape in targets:
        for stat in STATS[mode]:
            t = get(name, stat)
            if t is None:
                raise UnsupportedCheckpoint(f"{where}: normalisation {mode} of {name!r} needs statistic {stat!r}, which is missing")
            out[prefix + stat] = t.float().reshape(shape[0], *([1, 1] if len(shape) == 3 else []))
    return out


def load(path: Path):
    """(PolicyConfig, state dict, metadata) of a LeRobot diffusion policy folder."""
    where = str(path)
    cfg = _read_json(path / "config.json")
    weights = _safetensors(path / "model.safetensors")
    pre, post = path / PREPROCESSOR, path / POSTPROCESSOR
    legacy = not pre.is_file()
    separate = bool(cfg.get("use_separate_rgb_encoder_per_camera", False))
    net, buffers = map_weights(weights, separate, where)
    if legacy:
        if not buffers:
            raise UnsupportedCheckpoint(f"{where}: no {PREPROCESSOR} and no normaliser buffers in model.safetensors; "
                                        "the normalisation statistics are missing")
        pcfg = policy_config(cfg, cfg.get("normalization_mapping", {}), True, where)

        def get(name, stat):
            group = ("normalize_targets", "unnormalize_outputs") if name == "action" else ("normalize_inputs",)
            vals = [buffers.get(f"{g}.buffer_{name.replace('.', '_')}.{stat}") for g in group]
            vals = [v for v in vals if v is not None]
            if len(vals) == 2 and not bool((vals[0] == vals[1]).all()):
                raise UnsupportedCheckpoint(f"{where}: normalize_targets and unnormalize_outputs disagree on action {stat}")
            return vals[0] if vals else None
        layout, eps = "lerobot-legacy", LEROBOT_EPS
    else:
        if not post.is_file():
            raise UnsupportedCheckpoint(f"{where}: {PREPROCESSOR} exists but {POSTPROCESSOR} is missing")
        if buffers:
            raise UnsupportedCheckpoint(f"{where}: normaliser buffers in model.safetensors and processor files both present")
        pre_doc, post_doc = _read_json(pre), _read_json(post)
        norm = _normalizer_step(pre_doc, "normalizer_processor", pre)
        unnorm = _normalizer_step(post_doc, "unnormalizer_processor", post)
        norm_map = norm.get("config", {}).get("norm_map", cfg.get("normalization_mapping", {}))
        if unnorm.get("config", {}).get("norm_map", norm_map).get("ACTION") != norm_map.get("ACTION"):
            raise UnsupportedCheckpoint(f"{where}: the pre- and postprocessor normalise the action differently")
        eps = float(norm.get("config", {}).get("eps", 1e-8))
        pcfg = policy_config(cfg, norm_map, False, where)
        in_stats = _safetensors(path / norm["state_file"]) if norm.get("state_file") else {}
        out_stats = _safetensors(path / unnorm["state_file"]) if unnorm.get("state_file") else {}

        def get(name, stat):
            src = out_stats if name == "action" else in_stats
            return src.get(f"{name}.{stat}")
        layout = "lerobot"
        rename = next((s.get("config", {}).get("rename_map") for s in pre_doc.get("steps", [])
                       if s.get("registry_name") == "rename_observations_processor"), None)
        if rename:
            raise UnsupportedCheckpoint(f"{where}: the preprocessor renames observations {rename}; rename your "
                                        "environment's keys to the policy's feature names instead")
    if eps != LEROBOT_EPS:
        raise UnsupportedCheckpoint(f"{where}: normaliser eps={eps} is not supported ({LEROBOT_EPS})")
    state = {**net, **_stats_for(pcfg, get, where)}
    metadata = {"source_format": layout, "source": where, "source_policy": cfg.get("type"),
                "source_config": {k: cfg.get(k) for k in ("normalization_mapping", "input_features", "output_features")},
                "source_training_options": {k: cfg[k] for k in sorted(NOT_INFERENCE & set(cfg))}}
    return pcfg, state, metadata
