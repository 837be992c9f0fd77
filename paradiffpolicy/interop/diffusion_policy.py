"""real-stanford/diffusion_policy workspace checkpoints (``.ckpt``) → our config and state dict.

Supported, with ``obs_as_global_cond=True``, DDPM or DDIM, EMA weights when the run's config says
``training.use_ema``:

* ``DiffusionUnetLowdimPolicy``: one flat ``obs`` vector (the paper's state-based results);
* ``DiffusionUnetHybridImagePolicy``: robomimic's encoder per camera (ResNet-18 trunk, GroupNorm or
  BatchNorm, SpatialSoftmax, Linear, ReLU), low-dim keys as they are, features in ``shape_meta``
  order; the centre crop of ``eval_fixed_crop``;
* ``DiffusionUnetImagePolicy``: its ``MultiImageObsEncoder`` (torchvision ResNet-18/34 per camera,
  global average pool, optional ImageNet normalisation), camera keys sorted, then low-dim keys sorted.

Features keep the checkpoint's ``shape_meta`` keys as names (``image``, ``agent_pos``): an
environment's features are renamed to them (``eval +rename_map=...``). The file is read by
:mod:`~paradiffpolicy.interop.safe_pickle` (nothing in it is executed); its resolved OmegaConf
config becomes plain data; leftover ``${...}`` interpolations are resolved by lookup and arithmetic
only. Anything else (another backbone, a transformer policy, a resize, a shared camera model) is
refused by name.

Mapping (strict: every tensor consumed, every parameter filled)::

    model.*                                          → model.*          (same ConditionalUnet1D names)
    normalizer.params_dict.<key>.{scale,offset}      → obs_encoder.normalizers.<i>.{scale,offset}
    normalizer.params_dict.<key>.input_stats.{min,max} → obs_encoder.normalizers.<i>.{input_min,input_max}
        (lowdim: the key ``obs``; image keys' (1,) statistics broadcast per channel)
    normalizer.params_dict.action.*                  → action_normalizer.*   (same rule)
    hybrid: obs_encoder.obs_nets.<cam>.backbone.nets.* → obs_encoder.rgb_encoders.<j>.backbone.*
            obs_encoder.obs_nets.<cam>.pool.nets.*     → ...rgb_encoders.<j>.pool.nets.*
            obs_encoder.obs_nets.<cam>.pool.pos_{x,y}  → ...rgb_encoders.<j>.pool.pos_grid
            obs_encoder.obs_nets.<cam>.nets.3.*        → ...rgb_encoders.<j>.out.*
            obs_encoder.obs_nets.<cam>.nets.{0,1}.*: robomimic's aliases of backbone / pool, checked equal
            obs_encoder.obs_nets.<cam>.pool.temperature: checked to be 1
    image:  obs_encoder.key_model_map.<cam>.{conv1,bn1,layer1..4}.* → ...rgb_encoders.<j>.backbone.{0,1,4..7}.*
    normalizer.params_dict.*.input_stats.{mean,std}, *_dummy_variable: consumed, unused
"""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

from paradiffpolicy.config import PolicyConfig
from paradiffpolicy.features import STATE, FeatureSpec
from paradiffpolicy.interop.safe_pickle import read_torch_zip, to_plain
from paradiffpolicy.models.vision import BACKBONES, VisionConfig
from paradiffpolicy.schedulers import SchedulerConfig

LOWDIM_POLICY = "DiffusionUnetLowdimPolicy"
HYBRID_POLICY = "DiffusionUnetHybridImagePolicy"
IMAGE_POLICY = "DiffusionUnetImagePolicy"
POLICIES = (LOWDIM_POLICY, HYBRID_POLICY, IMAGE_POLICY)
UNUSED_SUFFIXES = ("input_stats.mean", "input_stats.std")
_INTERP = re.compile(r"\$\{([^${}]+)\}")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint in a known format whose model this runtime does not implement."""


def _arith(expr: str, where: str):
    """Evaluate numbers, + - * / // % and parentheses; anything else is refused."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"config value {where}: {expr!r} is not plain arithmetic; refusing to evaluate it")
    return ev(ast.parse(expr, mode="eval"))


def resolve_interpolations(cfg: dict) -> dict:
    """Resolve ``${a.b}`` references and ``${eval:'<arithmetic>'}`` in a plain config tree."""
    def lookup(path: str, where: str):
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"config value {where}: interpolation ${{{path}}} does not resolve")
            node = node[part]
        return resolve(node, where)

    def resolve(value, where: str, depth: int = 0):
        if depth > 20:
            raise ValueError(f"config value {where}: interpolation cycle")
        if isinstance(value, dict):
            return {k: resolve(v, f"{where}.{k}", depth) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        m = re.fullmatch(r"\$\{eval:'(.*)'\}", value)
        if m:
            inner = _INTERP.sub(lambda g: repr(lookup(g.group(1).strip(), where)), m.group(1))
            return _arith(inner, where)
        full = _INTERP.fullmatch(value)
        if full:
            key = full.group(1).strip()
            if ":" in key:
                raise ValueError(f"config value {where}: resolver {key!r} is not supported (only references and eval arithmetic)")
            return resolve(lookup(key, where), where, depth + 1)
        return _INTERP.sub(lambda g: str(lookup(g.group(1).strip(), where)), value)

    return resolve(cfg, "cfg")


def _scheduler(ns: dict, num_inference_steps: int | None, where: str) -> SchedulerConfig:
    target = str(ns.get("_target_", ""))
    name = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}.get(target.rsplit(".", 1)[-1])
    if name is None:
        raise UnsupportedCheckpoint(f"{where}: noise scheduler {target!r} is not supported (DDPMScheduler or DDIMScheduler)")
    if name == "ddpm" and ns.get("variance_type", "fixed_small") != "fixed_small":
        raise UnsupportedCheckpoint(f"{where}: DDPM variance_type={ns.get('variance_type')!r} is not supported (fixed_small)")
    n_train = int(ns.get("num_train_timesteps", 1000))
    return SchedulerConfig(
        name=name, num_train_timesteps=n_train, num_inference_steps=int(num_inference_steps or n_train),
        beta_schedule=ns.get("beta_schedule", "linear"), beta_start=float(ns.get("beta_start", 1e-4)),
        beta_end=float(ns.get("beta_end", 0.02)), prediction_type=ns.get("prediction_type", "epsilon"),
        clip_sample=bool(ns.get("clip_sample", True)), clip_sample_range=float(ns.get("clip_sample_range", 1.0)),
        set_alpha_to_one=bool(ns.get("set_alpha_to_one", True)), timestep_spacing="leading",
        steps_offset=int(ns.get("steps_offset", 0)),
    )


def policy_kind(cfg: dict, where: str) -> str:
    """Which of :data:`POLICIES` the config's policy is; anything else refused by name."""
    pol = cfg.get("policy")
    if not isinstance(pol, dict):
        raise UnsupportedCheckpoint(f"{where}: the config has no 'policy' section")
    target = str(pol.get("_target_", ""))
    kind = target.rsplit(".", 1)[-1]
    if kind not in POLICIES:
        raise UnsupportedCheckpoint(f"{where}: policy {target!r} is not supported; this runtime reads diffusion_policy's "
                                    f"{', '.join(POLICIES)} (transformer and BET policies are not implemented)")
    # the lowdim policy's default is inpainting (obs_as_global_cond=False); the image policies' is True
    if not pol.get("obs_as_global_cond", kind != LOWDIM_POLICY) or pol.get("obs_as_local_cond", False):
        raise UnsupportedCheckpoint(f"{where}: only obs_as_global_cond=true is supported (inpainting and local conditioning are not)")
    if pol.get("pred_action_steps_only", False):
        raise UnsupportedCheckpoint(f"{where}: pred_action_steps_only=true is not supported")
    return kind


def image_features(pol: dict, kind: str, where: str) -> list[FeatureSpec]:
    """The image policy's inputs from ``shape_meta``, in the order its encoder concatenates them:
    robomimic (hybrid) keeps ``shape_meta`` order; ``MultiImageObsEncoder`` sorts camera keys, then
    low-dim keys."""
    meta = pol.get("shape_meta", {}).get("obs")
    if not isinstance(meta, dict) or not meta:
        raise UnsupportedCheckpoint(f"{where}: policy.shape_meta.obs is missing")
    features = []
    for key, attr in meta.items():
        kind_of = attr.get("type", "low_dim")
        shape = [int(d) for d in attr.get("shape", [])]
        if kind_of == "rgb":
            features.append(FeatureSpec(key, "image", shape, "affine"))
        elif kind_of == "low_dim":
            if len(shape) != 1:
                raise UnsupportedCheckpoint(f"{where}: low_dim key {key!r} has shape {shape}; only flat (D,) keys are supported")
            features.append(FeatureSpec(key, "state", shape, "affine"))
        else:
            raise UnsupportedCheckpoint(f"{where}: shape_meta.obs.{key}.type={kind_of!r} is not supported (rgb or low_dim)")
    if not any(f.is_image for f in features):
        raise UnsupportedCheckpoint(f"{where}: {kind} without an rgb key in shape_meta.obs")
    if kind == IMAGE_POLICY:
        features = sorted((f for f in features if f.is_image), key=lambda f: f.name) + \
            sorted((f for f in features if not f.is_image), key=lambda f: f.name)
    return features


def vision_config(pol: dict, kind: str, n_cameras: int, state: dict, where: str) -> VisionConfig:
    """The camera encoder's settings; unsupported variants refused by the config key."""
    separate = n_cameras > 1
    if kind == HYBRID_POLICY:
        if not pol.get("eval_fixed_crop", False) and pol.get("crop_shape") is not None:
            raise UnsupportedCheckpoint(f"{where}: policy.eval_fixed_crop=false: robomimic crops at random at evaluation too, "
                                        "so upstream's actions are not a function of the observation; refusing it")
        pools = [v for k, v in state.items() if k.startswith("obs_encoder.obs_nets.") and k.endswith(".pool.nets.weight")]
        outs = [v for k, v in state.items() if k.startswith("obs_encoder.obs_nets.") and k.endswith(".nets.3.weight")]
        if not pools or not outs:
            raise UnsupportedCheckpoint(f"{where}: no robomimic SpatialSoftmax / output Linear under obs_encoder.obs_nets "
                                        "(another pool or backbone?)")
        kp = int(pools[0].shape[0])
        if tuple(outs[0].shape) != (2 * kp, 2 * kp):
            raise UnsupportedCheckpoint(f"{where}: robomimic feature_dimension {tuple(outs[0].shape)[0]} != 2 x {kp} keypoints "
                                        "is not supported")
        crop = pol.get("crop_shape", [76, 76])
        return VisionConfig(vision_backbone="resnet18", use_group_norm=bool(pol.get("obs_encoder_group_norm", False)),
                            spatial_softmax_num_keypoints=kp, crop_shape=None if crop is None else [int(c) for c in crop],
                            use_separate_rgb_encoder_per_camera=separate)
    enc = pol.get("obs_encoder", {})
    if not str(enc.get("_target_", "")).endswith("MultiImageObsEncoder"):
        raise UnsupportedCheckpoint(f"{where}: policy.obs_encoder {enc.get('_target_')!r} is not supported (MultiImageObsEncoder)")
    rgb = enc.get("rgb_model", {})
    name = rgb.get("name")
    if not str(rgb.get("_target_", "")).endswith("get_resnet") or name not in BACKBONES:
        raise UnsupportedCheckpoint(f"{where}: policy.obs_encoder.rgb_model {rgb.get('_target_')!r} name={name!r} is not supported "
                                    f"(get_resnet with {tuple(BACKBONES)})")
    for key in ("resize_shape",):
        if enc.get(key) is not None:
            raise UnsupportedCheckpoint(f"{where}: policy.obs_encoder.{key}={enc[key]} is not supported (no resize is implemented)")
    if enc.get("share_rgb_model", False):
        raise UnsupportedCheckpoint(f"{where}: policy.obs_encoder.share_rgb_model=true is not supported")
    crop = enc.get("crop_shape")
    return VisionConfig(vision_backbone=name, use_group_norm=bool(enc.get("use_group_norm", False)),
                        crop_shape=None if crop is None else [int(c) for c in crop], pool="avgpool",
                        imagenet_norm=bool(enc.get("imagenet_norm", False)), use_separate_rgb_encoder_per_camera=separate)


def policy_config(cfg: dict, where: str, state: dict | None = None) -> PolicyConfig:
    """Our PolicyConfig from a resolved workspace config (and, for the hybrid policy, its state dict:
    the keypoint count); unsupported variants named."""
    kind = policy_kind(cfg, where)
    pol = cfg["policy"]
    to = int(pol["n_obs_steps"])
    common = dict(n_obs_steps=to, horizon=int(pol["horizon"]), n_action_steps=int(pol["n_action_steps"]),
                  scheduler=_scheduler(pol.get("noise_scheduler", {}), pol.get("num_inference_steps"), where),
                  action_normalization="affine", action_start=to - 1)  # the image policies execute from To - 1
    if kind == LOWDIM_POLICY:
        model = pol.get("model", {})
        if not str(model.get("_target_", "")).endswith("ConditionalUnet1D") or model.get("local_cond_dim"):
            raise UnsupportedCheckpoint(f"{where}: model {model.get('_target_')!r} with local_cond_dim={model.get('local_cond_dim')} "
                                        "is not supported (ConditionalUnet1D with global conditioning)")
        obs_dim = int(pol["obs_dim"])
        if int(model.get("global_cond_dim", obs_dim * to)) != obs_dim * to:
            raise UnsupportedCheckpoint(f"{where}: global_cond_dim={model.get('global_cond_dim')} != obs_dim*n_obs_steps={obs_dim * to}")
        common["action_start"] = to - 1 if pol.get("oa_step_convention", False) else to
        return PolicyConfig(
            action_dim=int(pol["action_dim"]), down_dims=[int(d) for d in model.get("down_dims", [256, 512, 1024])],
            kernel_size=int(model.get("kernel_size", 3)), n_groups=int(model.get("n_groups", 8)),
            diffusion_step_embed_dim=int(model.get("diffusion_step_embed_dim", 256)),
            cond_predict_scale=bool(model.get("cond_predict_scale", False)),
            input_features=[FeatureSpec(STATE, "state", [obs_dim], "affine")], **common)
    features = image_features(pol, kind, where)
    action_shape = pol.get("shape_meta", {}).get("action", {}).get("shape", [])
    if len(action_shape) != 1:
        raise UnsupportedCheckpoint(f"{where}: policy.shape_meta.action.shape={action_shape} must be (Da,)")
    vision = vision_config(pol, kind, sum(f.is_image for f in features), state or {}, where)
    return PolicyConfig(
        action_dim=int(action_shape[0]), down_dims=[int(d) for d in pol.get("down_dims", [256, 512, 1024])],
        kernel_size=int(pol.get("kernel_size", 5)), n_groups=int(pol.get("n_groups", 8)),
        diffusion_step_embed_dim=int(pol.get("diffusion_step_embed_dim", 256)),
        cond_predict_scale=bool(pol.get("cond_predict_scale", True)), input_features=features, vision=vision, **common)


def _normalizer_target(group: str, rest: str, features: dict[str, int]) -> str | None:
    """Our name of ``normalizer.params_dict.<group>.<rest>``; None if it has no place."""
    name = {"scale": "scale", "offset": "offset", "input_stats.min": "input_min", "input_stats.max": "input_max"}.get(rest)
    if name is None:
        return None
    if group == "action":
        return f"action_normalizer.{name}"
    if group in features:
        return f"obs_encoder.normalizers.{features[group]}.{name}"
    return None


def _camera_map(pcfg: PolicyConfig) -> dict[str, str]:
    """DP camera key → our encoder prefix (``obs_encoder.rgb_encoders.<j>.``)."""
    cams = [f.name for f in pcfg.features() if f.is_image]
    separate = pcfg.vision.use_separate_rgb_encoder_per_camera
    return {c: f"obs_encoder.rgb_encoders.{j if separate else 0}." for j, c in enumerate(cams)}


def _hybrid_encoder_key(rest: str, prefix: str) -> str | None:
    """robomimic VisualCore name (after ``obs_nets.<cam>.``) → ours; None: an alias or a check."""
    if rest.startswith("backbone.nets."):
        return prefix + "backbone." + rest[len("backbone.nets."):]
    if rest.startswith("pool.nets."):
        return prefix + "pool.nets." + rest[len("pool.nets."):]
    if rest.startswith("nets.3."):
        return prefix + "out." + rest[len("nets.3."):]
    return None


_TORCHVISION_TRUNK = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
_TRUNK_LAYERS = {index: name for name, index in _TORCHVISION_TRUNK.items()}


def upstream_name(key: str, pcfg: PolicyConfig, kind: str) -> str:
    """The diffusion_policy name of one of our parameters (for errors about missing tensors)."""
    inverse = {v: k for k, v in _camera_map(pcfg).items()}
    for prefix, cam in inverse.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if kind == HYBRID_POLICY:
                for ours, theirs in (("backbone.", "backbone.nets."), ("pool.nets.", "pool.nets."), ("out.", "nets.3.")):
                    if rest.startswith(ours):
                        return f"obs_encoder.obs_nets.{cam}.{theirs}{rest[len(ours):]}"
            elif rest.startswith("backbone."):
                index, tail = rest[len("backbone."):].split(".", 1)
                layer = _TRUNK_LAYERS.get(index, index)
                return f"obs_encoder.key_model_map.{cam}.{layer}.{tail}"
    return key


def map_state_dict(source: dict, where: str, pcfg: PolicyConfig | None = None) -> dict:
    """diffusion_policy policy state dict → ours (see the module docstring); unknown keys named."""
    import torch

    features = {"obs": 0} if pcfg is None or not any(f.is_image for f in pcfg.features()) else \
        {f.name: i for i, f in enumerate(pcfg.features())}
    images = {f.name for f in pcfg.features() if f.is_image} if pcfg is not None else set()
    cameras = _camera_map(pcfg) if images else {}
    out, unknown, aliases, pos = {}, [], {}, {}
    norm = "normalizer.params_dict."
    for k, v in source.items():
        if k.startswith("model."):
            out[k] = v
        elif k.endswith("_dummy_variable") or (k.startswith(norm) and k.endswith(UNUSED_SUFFIXES)):
            continue
        elif k.startswith(norm):
            group, rest = k[len(norm):].split(".", 1)
            target = _normalizer_target(group, rest, features)
            if target is None:
                unknown.append(k)
            else:
                if group in images:  # one statistic for all channels, or one per channel → (3, 1, 1)
                    v = v.reshape(-1).expand(3).reshape(3, 1, 1).clone() if v.numel() == 1 else v.reshape(3, 1, 1)
                out[target] = v
        elif k.startswith("obs_encoder.obs_nets."):
            cam, rest = k[len("obs_encoder.obs_nets."):].split(".", 1)
            prefix = cameras.get(cam)
            mapped = None if prefix is None else _hybrid_encoder_key(rest, prefix)
            if mapped is not None:
                out[mapped] = v
            elif prefix is not None and rest.startswith(("nets.0.", "nets.1.")):
                aliases[k] = v
            elif prefix is not None and rest in ("pool.pos_x", "pool.pos_y"):
                pos[(prefix, rest[-1])] = v
            elif prefix is not None and rest == "pool.temperature":
                if not torch.all(v == 1.0):
                    raise UnsupportedCheckpoint(f"{where}: {k}={v.tolist()}: a SpatialSoftmax temperature other than 1 is not supported")
            else:
                unknown.append(k)
        elif k.startswith("obs_encoder.key_model_map."):
            cam, layer, rest = k[len("obs_encoder.key_model_map."):].split(".", 2)
            if cam in cameras and layer in _TORCHVISION_TRUNK:
                out[f"{cameras[cam]}backbone.{_TORCHVISION_TRUNK[layer]}.{rest}"] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    for (prefix, axis), v in pos.items():
        if axis == "x":
            out[prefix + "pool.pos_grid"] = torch.stack([v.reshape(-1), pos[(prefix, "y")].reshape(-1)], dim=1)
    for k, v in aliases.items():  # robomimic's VisualCore holds its trunk and pool twice: the copies must agree
        cam, rest = k[len("obs_encoder.obs_nets."):].split(".", 1)
        if rest.startswith("nets.0.nets."):
            twin = f"obs_encoder.obs_nets.{cam}.backbone.nets.{rest[len('nets.0.nets.'):]}"
        else:
            twin = f"obs_encoder.obs_nets.{cam}.pool.{rest[len('nets.1.'):]}"
        if twin not in source or not torch.equal(source[twin], v):
            raise UnsupportedCheckpoint(f"{where}: {k} is not an alias of {twin} (robomimic VisualCore layout expected)")
    if unknown:
        raise UnsupportedCheckpoint(f"{where}: state dict keys this runtime cannot place: {unknown[:8]}"
                                    f"{' ...' if len(unknown) > 8 else ''} (obs_encoder / local conditioning?)")
    return out


def check_complete(mapped: dict, pcfg: PolicyConfig, kind: str, where: str) -> None:
    """Every parameter the policy needs is in ``mapped``; the missing ones named as upstream names them."""
    from paradiffpolicy.policy import DiffusionPolicy

    missing = sorted(set(DiffusionPolicy(pcfg).state_dict()) - set(mapped))
    if missing:
        names = [upstream_name(k, pcfg, kind) for k in missing]
        raise UnsupportedCheckpoint(f"{where} lacks {names[:8]}{' ...' if len(names) > 8 else ''} (needed by {kind})")


def load(path: Path):
    """(PolicyConfig, state dict, metadata) of a workspace ``.ckpt``."""
    where = str(path)
    payload = read_torch_zip(path)
    if not isinstance(payload, dict) or "cfg" not in payload or "state_dicts" not in payload:
        raise UnsupportedCheckpoint(f"{where}: not a diffusion_policy workspace checkpoint (no 'cfg' / 'state_dicts')")
    cfg = resolve_interpolations(to_plain(payload["cfg"]))
    kind = policy_kind(cfg, where)
    use_ema = bool(cfg.get("training", {}).get("use_ema", False))
    key = "ema_model" if use_ema else "model"
    states = payload["state_dicts"]
    if key not in states:
        raise UnsupportedCheckpoint(f"{where}: training.use_ema={use_ema} but state_dicts has no {key!r} (has {sorted(states)})")
    pcfg = policy_config(cfg, where, states[key])
    mapped = map_state_dict(states[key], where, pcfg)
    check_complete(mapped, pcfg, kind, f"{where}: state_dicts.{key}")
    metadata = {"source_format": "diffusion_policy", "source": where, "source_workspace": cfg.get("_target_"),
                "source_policy": cfg["policy"]["_target_"], "weights": key,
                "source_obs_keys": ["obs"] if kind == LOWDIM_POLICY else [f.name for f in pcfg.features()],
                "task": cfg.get("task", {}).get("name") if isinstance(cfg.get("task"), dict) else None}
    return pcfg, mapped, metadata
