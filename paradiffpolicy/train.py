"""Train a Diffusion Policy on a zarr ReplayBuffer.

    python -m paradiffpolicy.train task=lift export=checkpoints/lift

AdamW + linear warm-up and cosine decay, EMA weights (Diffusion Policy's schedule), periodic
checkpoints in ``output_dir/last`` (safetensors + JSON, swapped in atomically), automatic resume
from them, seeded batches and noise. The EMA policy is what gets exported and evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from paradiffpolicy.checkpoint import load_policy, save_policy
from paradiffpolicy.config import PolicyConfig, from_dict, to_dict
from paradiffpolicy.data.replay_buffer import ReplayBuffer
from paradiffpolicy.data.sequence import SequenceSampler
from paradiffpolicy.envs import TaskConfig
from paradiffpolicy.features import STATE, FeatureSpec
from paradiffpolicy.normalizer import Normalizer
from paradiffpolicy.policy import DiffusionPolicy
from paradiffpolicy.runtime import cpu_model, exit_on_bad_input, resolve_device, seed_everything, sigterm_as_keyboard_interrupt, versions

log = logging.getLogger(__name__)


PREFIX_DISTRIBUTIONS = ("uniform", "exp")


@dataclass
class PrefixTrainingConfig:
    """Training-time action conditioning (Black, Ren, Equi & Levine 2025, arXiv 2512.05964): per
    training window a delay ``d`` in 0..``max_delay`` is drawn (``uniform``, or ``exp``: P(d) ∝
    exp(-d / ``exp_scale``)), and the positions a real call with that delay would have committed
    (those before the executed chunk's start, plus ``d``) are given to the network clean and left
    out of the loss; with probability ``p_none`` nothing is committed, so the policy still works
    unconditioned (``join.method=naive``). ``max_delay=0`` turns it off.

    ``offset`` > 0 moves each window's committed actions by a constant random offset (per action
    dimension, ``σ·z`` with ``σ ~ U(0, offset)`` in normalised units; the loss's target is
    unchanged). At inference the committed actions come from an older chunk, planned from an older
    observation, not from the expert that produced the rest of the window; the offset stands in for
    that disagreement, so the network learns to follow the observation where the two differ."""

    max_delay: int = 0
    distribution: str = "uniform"
    exp_scale: float = 3.0
    p_none: float = 0.2
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.max_delay < 0:
            raise ValueError(f"prefix.max_delay={self.max_delay} must be >= 0 (0: off)")
        if self.distribution not in PREFIX_DISTRIBUTIONS:
            raise ValueError(f"prefix.distribution={self.distribution!r} is unknown; expected one of {PREFIX_DISTRIBUTIONS}")
        if not self.exp_scale > 0:
            raise ValueError(f"prefix.exp_scale={self.exp_scale} must be > 0")
        if not 0 <= self.p_none <= 1:
            raise ValueError(f"prefix.p_none={self.p_none} must lie in [0, 1]")
        if not 0 <= self.offset <= 1:
            raise ValueError(f"prefix.offset={self.offset} must lie in [0, 1] (normalised action units)")

    @property
    def enabled(self) -> bool:
        return self.max_delay > 0

    def delay_probabilities(self) -> np.ndarray:
        """P(d) for d = 0..max_delay."""
        d = np.arange(self.max_delay + 1, dtype=np.float64)
        p = np.ones_like(d) if self.distribution == "uniform" else np.exp(-d / self.exp_scale)
        return p / p.sum()

    def draw_committed(self, rng: np.random.Generator, n: int, start: int) -> np.ndarray:
        """How many leading positions of each of ``n`` windows are committed: ``start + d``, or 0
        (nothing) with probability ``p_none``."""
        d = rng.choice(self.max_delay + 1, size=n, p=self.delay_probabilities())
        none = rng.random(n) < self.p_none
        return np.where(none, 0, start + d).astype(np.int64)


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    dataset: str = "data/${task.name}.zarr"
    output_dir: str = "outputs/train/${task.name}"
    export: Optional[str] = None
    export_dtype: str = "float16"  # weights in the exported checkpoint (training state stays float32)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 200
    ema_power: float = 0.75
    ema_max: float = 0.9999
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    resume: bool = True
    # fine-tune: start from these weights (an exported checkpoint, or a run's ``output_dir/last``)
    # with a fresh optimiser and schedule; ignored when output_dir holds a run to resume
    init_from: Optional[str] = None
    # auxiliary target for a camera policy: a dataset array of simulator state that the encoded
    # observation must also predict through a linear head (training only; the exported policy never
    # sees it), e.g. ``privileged.state`` from python -m paradiffpolicy.data.add_privileged_state
    aux_state: Optional[str] = None
    aux_weight: float = 1.0
    prefix: PrefixTrainingConfig = field(default_factory=PrefixTrainingConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "lr", "checkpoint_every"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        for key in ("weight_decay", "warmup_steps", "threads", "aux_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.export_dtype not in ("float16", "float32"):
            raise ValueError(f"export_dtype={self.export_dtype!r} must be 'float16' or 'float32'")


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def dataset_observations(buf: ReplayBuffer, policy: PolicyConfig):
    """The store's observations and the policy config that reads them: ``data/obs`` (one flat
    feature of ``obs_dim``), or one array per named feature (``data/observation.*``, or arrays named
    as the declared ``policy.input_features``, e.g. a diffusion_policy source's ``image`` and
    ``agent_pos``; (N, H, W, 3) uint8 arrays are cameras: identity-normalised [0, 1] images through
    the RGB encoder; the rest low-dim, affine-normalised). Declared features must match the store."""
    if "obs" in buf.keys:
        obs = torch.from_numpy(np.asarray(buf["obs"], dtype=np.float32))
        flat = FeatureSpec(STATE, "state", [obs.shape[1]], "affine")
        if policy.input_features and [(f.name, f.kind, list(f.shape)) for f in policy.input_features] != [(flat.name, flat.kind, flat.shape)]:
            raise ValueError(f"policy.input_features {[(f.name, list(f.shape)) for f in policy.input_features]} do not match dataset "
                             f"{buf.path}: its data/obs is one flat feature {flat.name!r} of {obs.shape[1]}")
        return obs, dataclasses.replace(policy, obs_dim=obs.shape[1])
    wanted = [f.name for f in policy.input_features]
    names = wanted if wanted and all(n in buf.keys for n in wanted) else [k for k in buf.keys if k.startswith("observation.")]
    if not names:
        raise ValueError(f"dataset {buf.path} has neither data/obs nor data/observation.* arrays"
                         f"{f' nor the policy inputs {wanted}' if wanted else ''} (keys {buf.keys})")
    obs, found = {}, []
    for name in names:
        arr = np.asarray(buf[name])
        if arr.ndim == 4 and arr.dtype == np.uint8:
            obs[name] = torch.from_numpy(arr)
            found.append(FeatureSpec(name, "image", [3, arr.shape[1], arr.shape[2]], "identity"))
        else:
            obs[name] = torch.from_numpy(arr.astype(np.float32).reshape(len(arr), -1))
            found.append(FeatureSpec(name, "state", [obs[name].shape[1]], "affine"))
    if policy.input_features:
        declared = {f.name: list(f.shape) for f in policy.input_features}
        if declared != {f.name: list(f.shape) for f in found}:
            raise ValueError(f"policy.input_features {declared} do not match dataset {buf.path} ({ {f.name: f.shape for f in found} })")
        return obs, dataclasses.replace(policy, obs_dim=0)
    return obs, dataclasses.replace(policy, obs_dim=0, input_features=found)


class AuxiliaryStateHead(nn.Module):
    """Predicts privileged simulator state from each observation step's encoding: ``Linear(D, S)``
    on (B, To, D) against the state at the same steps, affine-normalised to [-1, 1] (MSE). Its
    gradient teaches the image encoder where things are faster than the denoising loss alone
    (the auxiliary-task idea of Jaderberg et al. 2017, with the simulator as the labeller)."""

    def __init__(self, step_dim: int, state: Tensor):
        super().__init__()
        self.normalizer = Normalizer("affine", state.shape[1]).fit(state)
        self.linear = nn.Linear(step_dim, state.shape[1])

    def loss(self, cond: Tensor, state: Tensor) -> Tensor:
        """``cond`` (B, To·D) from ``encode_observation``; ``state`` (B, To, S) raw."""
        pred = self.linear(cond.reshape(state.shape[0], state.shape[1], -1))
        return torch.nn.functional.mse_loss(pred, self.normalizer.normalize(state))


def ema_decay(step: int, power: float, max_value: float) -> float:
    """Diffusion Policy's EMAModel: ``1 - (1 + step) ** -power``, clipped to [0, max_value]."""
    return float(min(max(1.0 - (1.0 + step) ** -power, 0.0), max_value))


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def saved_policy_config(state_dir: Path) -> PolicyConfig:
    """A run state's policy config, with the fields added to ``PolicyConfig`` since it was written at
    their defaults (a default reproduces the network the state was trained as), so an older run
    still resumes and initialises fine-tunes."""
    saved = json.loads((state_dir / "state.json").read_text())["config"].get("policy", {})
    return from_dict(PolicyConfig, saved, name=f"{state_dir} policy config")


@dataclass
class FineTuneSource:
    """The weights a fine-tune starts from (``init_from``) and the policy config they fix."""

    config: PolicyConfig
    model: dict
    ema: dict


def read_source(path: Path) -> FineTuneSource:
    """``init_from``: a run's state directory (its float32 weights and EMA), one of our checkpoints,
    or anything :func:`load_policy` reads (a LeRobot folder, a diffusion_policy ``.ckpt``, read as
    data); a checkpoint's weights (EMA where it has them) start both the model and the EMA."""
    if (path / "state.json").exists():
        return FineTuneSource(saved_policy_config(path), load_file(str(path / "model.safetensors")), load_file(str(path / "ema.safetensors")))
    policy = load_policy(path)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in policy.state_dict().items()}
    return FineTuneSource(policy.config, weights, weights)


def fine_tune_policy(given: PolicyConfig, source: PolicyConfig, init_from: str, explicit: tuple[str, ...] = ()) -> PolicyConfig:
    """The policy config of a fine-tune: its source's (the weights fix the architecture, inputs and
    scheduler). ``explicit``: ``policy.*`` keys the user set on the command line; one whose value
    differs from the source's is an error naming both. Other differences from ``given`` (a task
    preset's values) are logged and the source's kept."""
    mine, theirs = OmegaConf.create(to_dict(given)), OmegaConf.create(to_dict(source))
    for key in explicit:
        sub = key.split(".", 1)[1]
        if sub != "prefix_input" and OmegaConf.select(mine, sub) != OmegaConf.select(theirs, sub):  # prefix_input: set by prefix.*
            raise ValueError(f"{key}={OmegaConf.select(mine, sub)} conflicts with init_from={init_from}, whose policy has "
                             f"{OmegaConf.select(theirs, sub)}; a fine-tune keeps its source's policy config (drop the override)")
    differ = sorted(k for k in mine if k != "prefix_input" and mine[k] != theirs[k])
    if differ:
        log.info("init_from=%s fixes the policy config; the source's %s kept over this run's %s", init_from,
                 {k: theirs[k] for k in differ}, {k: mine[k] for k in differ})
    return source


def source_training(init_from: Optional[str]) -> Optional[dict]:
    """Steps and training time of the weights a fine-tune started from (a run state or an export),
    so a checkpoint's metadata accounts for all the training behind it."""
    if not init_from:
        return None
    path = Path(init_from)
    if (path / "state.json").exists():
        state = json.loads((path / "state.json").read_text())
        return {"steps": state["step"], "train_time_s": round(state["elapsed_s"], 1), "dataset": state["config"].get("dataset")}
    train = json.loads((path / "config.json").read_text()).get("metadata", {}).get("train") if (path / "config.json").exists() else None
    if train:  # ours, trained here (a foreign checkpoint's history is not in it)
        return {"steps": train.get("steps"), "train_time_s": train.get("train_time_s"), "init_from_train": train.get("init_from_train")}
    return None


def _logged_step(line: str) -> float:
    """Step of one ``train_log.jsonl`` line; a blank or half-written line (killed mid-write) counts as
    after every step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Trainer:
    def __init__(self, cfg: TrainConfig, explicit_policy_keys: tuple[str, ...] = ()):
        """``explicit_policy_keys``: the ``policy.*`` keys set on the command line (a fine-tune
        refuses those that contradict its source)."""
        out = Path(cfg.output_dir)
        resuming = cfg.resume and (out / "last" / "state.json").exists()
        source = None
        if cfg.init_from and resuming:  # the run already holds its source's policy config
            cfg = dataclasses.replace(cfg, policy=saved_policy_config(out / "last"))
        elif cfg.init_from:
            source = read_source(Path(cfg.init_from))
            cfg = dataclasses.replace(cfg, policy=fine_tune_policy(cfg.policy, source.config, cfg.init_from, explicit_policy_keys))
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        buf = ReplayBuffer.open(cfg.dataset)
        if buf.n_episodes == 0:
            raise ValueError(f"dataset {cfg.dataset} has no episodes")
        self.n_episodes, self.n_steps = buf.n_episodes, buf.n_steps
        self.action = torch.from_numpy(np.asarray(buf["action"], dtype=np.float32))
        if source is not None and source.config.action_dim not in (0, self.action.shape[1]):  # 0: a run's, sized by its data
            raise ValueError(f"init_from={cfg.init_from} predicts {source.config.action_dim}-dimensional actions; "
                             f"dataset {cfg.dataset} holds {self.action.shape[1]}-dimensional ones")
        self.obs, pcfg = dataset_observations(buf, dataclasses.replace(
            cfg.policy, action_dim=self.action.shape[1], prefix_input=cfg.policy.prefix_input or cfg.prefix.enabled))
        if cfg.prefix.enabled and pcfg.executed_start + cfg.prefix.max_delay >= pcfg.horizon:
            raise ValueError(f"prefix.max_delay={cfg.prefix.max_delay} must leave a position to predict: "
                             f"executed start {pcfg.executed_start} + max_delay < horizon {pcfg.horizon}")
        self.policy = DiffusionPolicy(pcfg)
        if source is None:  # a fine-tune keeps its source's normalisers (loaded below)
            for spec, norm in zip(self.policy.features, self.policy.obs_encoder.normalizers):
                if norm.mode == "affine":
                    norm.fit(self.obs[spec.name] if isinstance(self.obs, dict) else self.obs)
            self.policy.action_normalizer.fit(self.action)
        self.policy.to(self.device)
        self.ema = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.sampler = SequenceSampler(buf.episode_ends, pcfg.horizon, pcfg.n_obs_steps - 1, pcfg.n_action_steps - 1)
        # the U-Net and, for camera policies, the image encoder (normalisers are fitted buffers)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.ema_params = [pe for pe, p in zip(self.ema.parameters(), self.policy.parameters()) if p.requires_grad]
        self.aux_state, self.aux_head = self._auxiliary_target(buf)
        if self.aux_head is not None:
            self.params += list(self.aux_head.parameters())  # after the policy's: optimiser state keeps its indices
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.95, 0.999))
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.elapsed = 0.0
        self.out = out
        if resuming:
            self._load_state(self.out / "last")
        elif source is not None:
            self._init_weights(source)

    def _auxiliary_target(self, buf: ReplayBuffer):
        """(state (N, S), head) for ``aux_state``, or (None, None)."""
        name = self.cfg.aux_state
        if name is None:
            return None, None
        if name not in buf.keys:
            raise ValueError(f"aux_state={name!r} is not an array of dataset {buf.path} (keys {buf.keys}); "
                             "python -m paradiffpolicy.data.add_privileged_state adds privileged.state to an expert's store")
        if not self.policy.obs_encoder.has_images:
            raise ValueError(f"aux_state={name!r} trains an image encoder, but this policy has no camera feature")
        state = torch.from_numpy(np.asarray(buf[name], dtype=np.float32).reshape(self.n_steps, -1))
        if not torch.isfinite(state).all():
            raise ValueError(f"aux_state={name!r}: dataset {buf.path} holds NaN or inf in data/{name}")
        return state, AuxiliaryStateHead(self.policy.obs_encoder.step_dim, state).to(self.device)

    # -- state --------------------------------------------------------------------------------

    def _save_state(self) -> None:
        tmp, last, old = self.out / "last.tmp", self.out / "last", self.out / "last.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.cpu().contiguous() for k, v in self.policy.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in self.ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        if self.aux_head is not None:
            save_file({k: v.cpu().contiguous() for k, v in self.aux_head.state_dict().items()}, str(tmp / "aux_head.safetensors"))
        opt_tensors = {}
        for i, p in enumerate(self.params):
            for k, v in self.opt.state.get(p, {}).items():
                opt_tensors[f"{i}.{k}"] = torch.as_tensor(v).cpu().contiguous()
        opt_tensors["torch_generator"] = self.gen.get_state()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": self.step, "elapsed_s": self.elapsed, "numpy_rng": self.rng.bit_generator.state,
                 "dataset_episodes": self.n_episodes, "config": OmegaConf.to_container(OmegaConf.structured(self.cfg))}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(old, ignore_errors=True)
        if last.exists():
            os.replace(last, old)
        os.replace(tmp, last)
        shutil.rmtree(old, ignore_errors=True)

    def _load_state(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        saved = {**state["config"], "policy": to_dict(saved_policy_config(path)),
                 "prefix": {**to_dict(PrefixTrainingConfig()), **state["config"].get("prefix", {})}}  # keys added since
        for key in ("dataset", "batch_size", "seed", "policy", "init_from", "aux_state", "prefix"):
            now = OmegaConf.to_container(OmegaConf.structured(self.cfg))[key]
            if saved.get(key) != now:
                raise ValueError(f"cannot resume {path}: {key} was {saved.get(key)!r}, now {now!r}; use another output_dir or resume=false")
        if state.get("dataset_episodes", self.n_episodes) != self.n_episodes:
            # the sampled windows (and the seeded batch stream) would silently change
            raise ValueError(f"cannot resume {path}: dataset {self.cfg.dataset} had {state['dataset_episodes']} episodes, "
                             f"now {self.n_episodes}; fine-tune into another output_dir with init_from={path}")
        self.policy.load_state_dict(load_file(str(path / "model.safetensors")))
        self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        if self.aux_head is not None:
            self.aux_head.load_state_dict(load_file(str(path / "aux_head.safetensors")))
        opt = load_file(str(path / "optimizer.safetensors"))
        self.gen.set_state(opt.pop("torch_generator"))
        for key, v in opt.items():
            i, name = key.split(".", 1)
            self.opt.state[self.params[int(i)]][name] = v.to(self.device) if name != "step" else v
        self.rng.bit_generator.state = state["numpy_rng"]
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self._truncate_log()
        log.info("resumed from %s at step %d", path, self.step)

    def _init_weights(self, source: FineTuneSource) -> None:
        """Model and EMA weights, normalisers included, from the fine-tune's source. The source's
        normalisers replace the ones fit on this dataset, so the weights see inputs scaled as in
        their training. A source without the prefix input this run trains gets it zero-initialised:
        the run starts from exactly the source's function."""
        model, ema = source.model, source.ema
        adds_prefix = self.policy.config.prefix_input and not source.config.prefix_input
        if adds_prefix:
            zero = {k: torch.zeros_like(v) for k, v in self.policy.state_dict().items() if k.startswith("model.prefix_conv.")}
            model, ema = {**model, **zero}, {**ema, **zero}
        try:
            self.policy.load_state_dict(model)
            self.ema.load_state_dict(ema)
        except RuntimeError as e:  # a run state's sizes come from its dataset, which may differ from this one
            raise ValueError(f"init_from={self.cfg.init_from}: its weights do not fit a policy for dataset {self.cfg.dataset}: {e}") from None
        log.info("initialised from %s%s", self.cfg.init_from, " (prefix input added, zero-initialised)" if adds_prefix else "")

    def _truncate_log(self) -> None:
        """Drop log lines written after the saved step (the run died before its next checkpoint); those
        steps are trained again, and a log with repeated steps would misstate the loss curve and time."""
        path = self.out / "train_log.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        keep = [line for line in lines if _logged_step(line) <= self.step]
        if len(keep) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    # -- loop ---------------------------------------------------------------------------------

    def batch(self):
        """(observations (B, To, ...) — a tensor, or a dict of them with images as uint8 frames —,
        actions (B, T, Da), auxiliary state (B, To, S) or None) of ``batch_size`` random training windows."""
        ids = self.rng.integers(0, len(self.sampler), self.cfg.batch_size)
        pos = torch.from_numpy(self.sampler.positions(ids))
        obs_pos = pos[:, : self.policy.config.n_obs_steps]
        if isinstance(self.obs, dict):
            obs = {k: v[obs_pos].to(self.device) for k, v in self.obs.items()}
        else:
            obs = self.obs[obs_pos].to(self.device)
        aux = None if self.aux_state is None else self.aux_state[obs_pos].to(self.device)
        return obs, self.action[pos].to(self.device), aux

    def committed(self) -> Tensor | None:
        """Committed positions per window of the next batch (training-time action conditioning), or
        None when it is off."""
        if not self.cfg.prefix.enabled:
            return None
        n = self.cfg.prefix.draw_committed(self.rng, self.cfg.batch_size, self.policy.config.executed_start)
        return torch.from_numpy(n).to(self.device)

    def train(self) -> DiffusionPolicy:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        logf = open(self.out / "train_log.jsonl", "a")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=f"train {cfg.task.name}")
        try:
            with sigterm_as_keyboard_interrupt():
                while self.step < cfg.steps:
                    t0 = time.perf_counter()
                    for g in self.opt.param_groups:
                        g["lr"] = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.steps)
                    obs, action, aux = self.batch()
                    cond = self.policy.encode_observation(obs)
                    loss = self.policy.denoising_loss(cond, action, generator=self.gen if self.device.type == "cpu" else None,
                                                      committed=self.committed(), prefix_offset=cfg.prefix.offset)
                    aux_loss = None if aux is None else self.aux_head.loss(cond, aux)
                    self.opt.zero_grad(set_to_none=True)
                    (loss if aux_loss is None else loss + cfg.aux_weight * aux_loss).backward()
                    self.opt.step()
                    decay = ema_decay(self.step, cfg.ema_power, cfg.ema_max)
                    with torch.no_grad():
                        for pe, p in zip(self.ema_params, self.params):
                            pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
                    self.step += 1
                    self.elapsed += time.perf_counter() - t0
                    bar.update(1)
                    if self.step % 50 == 0 or self.step == cfg.steps:
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                        row = {"step": self.step, "loss": loss.item(), "lr": self.opt.param_groups[0]["lr"], "elapsed_s": round(self.elapsed, 2)}
                        if aux_loss is not None:
                            row["aux_loss"] = aux_loss.item()
                        logf.write(json.dumps(row) + "\n")
                        logf.flush()
                        if not cfg.progress:  # a line per logged step where no bar is drawn
                            log.info("step %d/%d, loss %.4f", self.step, cfg.steps, row["loss"])
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self._save_state()
        except KeyboardInterrupt:
            log.warning("interrupted at step %d; saving state to %s", self.step, self.out / "last")
            self._save_state()
            raise
        finally:
            bar.close()
            logf.close()
        if cfg.export:
            self.export(cfg.export)
        return self.ema

    def export(self, path: str) -> None:
        meta = {
            "task": self.cfg.task.name,
            "dataset": {"path": self.cfg.dataset, "episodes": self.n_episodes, "steps": self.n_steps},
            "train": {"steps": self.step, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed, "lr": self.cfg.lr,
                      "init_from": self.cfg.init_from, "init_from_train": source_training(self.cfg.init_from), "aux_state": self.cfg.aux_state, "aux_weight": self.cfg.aux_weight,
                      "prefix": to_dict(self.cfg.prefix) if self.cfg.prefix.enabled else None,
                      "train_time_s": round(self.elapsed, 1), "device": str(self.device), "threads": torch.get_num_threads(),
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus", "cpu": cpu_model()},
            "command": "python -m paradiffpolicy.train " + " ".join(sys.argv[1:]),
            "versions": versions(),
        }
        save_policy(self.ema, path, metadata=meta, weights_dtype=self.cfg.export_dtype)
        log.info("exported EMA policy to %s", path)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg) -> None:
    explicit = tuple(o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("policy."))
    with exit_on_bad_input():
        Trainer(OmegaConf.to_object(cfg), explicit_policy_keys=explicit).train()


if __name__ == "__main__":
    main()
