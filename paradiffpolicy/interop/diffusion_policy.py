"""real-stanford/diffusion_policy workspace checkpoints (``.ckpt``) → our config and state dict.

Supported: ``DiffusionUnetLowdimPolicy`` with ``obs_as_global_cond=True`` (the low-dim U-Net policy
of the paper's state-based results), DDPM or DDIM scheduler, EMA weights when the run's config says
``training.use_ema``. The file is read by :mod:`~paradiffpolicy.interop.safe_pickle` (nothing in it
is executed); its resolved OmegaConf config becomes plain data; leftover ``${...}`` interpolations
are resolved by lookup and arithmetic only.

Mapping (strict: every tensor consumed, every parameter filled)::

    model.*                                          → model.*          (same ConditionalUnet1D names)
    normalizer.params_dict.obs.{scale,offset}        → obs_encoder.normalizers.0.{scale,offset}
    normalizer.params_dict.obs.input_stats.{min,max} → obs_encoder.normalizers.0.{input_min,input_max}
    normalizer.params_dict.action.*                  → action_normalizer.*   (same rule)
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
from paradiffpolicy.schedulers import SchedulerConfig

LOWDIM_POLICY = "DiffusionUnetLowdimPolicy"
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


def policy_config(cfg: dict, where: str) -> PolicyConfig:
    """Our PolicyConfig from a resolved workspace config; unsupported variants named."""
    pol = cfg.get("policy")
    if not isinstance(pol, dict):
        raise UnsupportedCheckpoint(f"{where}: the config has no 'policy' section")
    target = str(pol.get("_target_", ""))
    if not target.endswith(LOWDIM_POLICY):
        raise UnsupportedCheckpoint(
            f"{where}: policy {target!r} is not supported; this runtime reads diffusion_policy's {LOWDIM_POLICY} "
            "(image and hybrid policies use robomimic encoders it does not implement)")
    if not pol.get("obs_as_global_cond", False) or pol.get("obs_as_local_cond", False):
        raise UnsupportedCheckpoint(f"{where}: only obs_as_global_cond=true is supported (inpainting and local conditioning are not)")
    if pol.get("pred_action_steps_only", False):
        raise UnsupportedCheckpoint(f"{where}: pred_action_steps_only=true is not supported")
    model = pol.get("model", {})
    if not str(model.get("_target_", "")).endswith("ConditionalUnet1D") or model.get("local_cond_dim"):
        raise UnsupportedCheckpoint(f"{where}: model {model.get('_target_')!r} with local_cond_dim={model.get('local_cond_dim')} "
                                    "is not supported (ConditionalUnet1D with global conditioning)")
    to, obs_dim = int(pol["n_obs_steps"]), int(pol["obs_dim"])
    if int(model.get("global_cond_dim", obs_dim * to)) != obs_dim * to:
        raise UnsupportedCheckpoint(f"{where}: global_cond_dim={model.get('global_cond_dim')} != obs_dim*n_obs_steps={obs_dim * to}")
    return PolicyConfig(
        action_dim=int(pol["action_dim"]), n_obs_steps=to, horizon=int(pol["horizon"]),
        n_action_steps=int(pol["n_action_steps"]), down_dims=[int(d) for d in model.get("down_dims", [256, 512, 1024])],
        kernel_size=int(model.get("kernel_size", 3)), n_groups=int(model.get("n_groups", 8)),
        diffusion_step_embed_dim=int(model.get("diffusion_step_embed_dim", 256)),
        cond_predict_scale=bool(model.get("cond_predict_scale", False)),
        scheduler=_scheduler(pol.get("noise_scheduler", {}), pol.get("num_inference_steps"), where),
        input_features=[FeatureSpec(STATE, "state", [obs_dim], "affine")], action_normalization="affine",
        action_start=to - 1 if pol.get("oa_step_convention", False) else to,
    )


def map_state_dict(source: dict, where: str) -> dict:
    """diffusion_policy policy state dict → ours (see the module docstring); unknown keys named."""
    out, unknown = {}, []
    norm = "normalizer.params_dict."
    for k, v in source.items():
        if k.startswith("model."):
            out[k] = v
        elif k.endswith("_dummy_variable") or (k.startswith(norm) and k.endswith(UNUSED_SUFFIXES)):
            continue
        elif k.startswith(norm):
            group, rest = k[len(norm):].split(".", 1)
            prefix = {"obs": "obs_encoder.normalizers.0.", "action": "action_normalizer."}.get(group)
            name = {"scale": "scale", "offset": "offset", "input_stats.min": "input_min", "input_stats.max": "input_max"}.get(rest)
            if prefix is None or name is None:
                unknown.append(k)
            else:
                out[prefix + name] = v
        else:
            unknown.append(k)
    if unknown:
        raise UnsupportedCheckpoint(f"{where}: state dict keys this runtime cannot place: {unknown[:8]}"
                                    f"{' ...' if len(unknown) > 8 else ''} (obs_encoder / local conditioning?)")
    return out


def load(path: Path):
    """(PolicyConfig, state dict, metadata) of a workspace ``.ckpt``."""
    where = str(path)
    payload = read_torch_zip(path)
    if not isinstance(payload, dict) or "cfg" not in payload or "state_dicts" not in payload:
        raise UnsupportedCheckpoint(f"{where}: not a diffusion_policy workspace checkpoint (no 'cfg' / 'state_dicts')")
    cfg = resolve_interpolations(to_plain(payload["cfg"]))
    pcfg = policy_config(cfg, where)
    use_ema = bool(cfg.get("training", {}).get("use_ema", False))
    key = "ema_model" if use_ema else "model"
    states = payload["state_dicts"]
    if key not in states:
        raise UnsupportedCheckpoint(f"{where}: training.use_ema={use_ema} but state_dicts has no {key!r} (has {sorted(states)})")
    metadata = {"source_format": "diffusion_policy", "source": where, "source_workspace": cfg.get("_target_"),
                "source_policy": cfg["policy"]["_target_"], "weights": key, "source_obs_key": "obs",
                "task": cfg.get("task", {}).get("name") if isinstance(cfg.get("task"), dict) else None}
    return pcfg, map_state_dict(states[key], where), metadata
