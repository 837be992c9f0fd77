"""Closed-loop evaluation of a diffusion policy.

    python -m paradiffpolicy.eval                                   # shipped Lift policy, Picard
    python -m paradiffpolicy.eval task=pusht sampler=sequential n_episodes=50
    python -m paradiffpolicy.eval controller=realtime compare=true
    python -m paradiffpolicy.eval -m sampler.window=4,8,16,32 sampler.tol=0.3,0.1,0.03

Writes to the run directory: ``episodes.jsonl`` (one line per finished episode, flushed at once),
``eval_info.json`` (summary; also written on Ctrl-C / SIGTERM with ``interrupted: true``) and,
with ``video=true``, ``videos/<seed>.mp4``. Episode ``i`` uses seed ``seed + i``; the default
``seed`` (10,000,000) is disjoint from the collection seeds (``collect.seed * 1e6 + attempt``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, Optional
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from paradiffpolicy.backends import check_backend, fastest_float32
from paradiffpolicy.checkpoint import load_policy
from paradiffpolicy.config import SamplerConfig, to_dict
from paradiffpolicy.control.agent import InferenceLog, PolicyAgent
from paradiffpolicy.control.controller import ControllerConfig, DelaySchedule, EpisodeResult, jump_summary, run_fast, run_realtime, run_vector
from paradiffpolicy.control.runner import PolicyRunner
from paradiffpolicy.envs import TaskConfig, make_env
from paradiffpolicy.errors import InferenceUnavailable
from paradiffpolicy.measure import provenance
from paradiffpolicy.runtime import REPO_ROOT, cpu_model, exit_on_bad_input, resolve_device, run_dir, sigterm_as_keyboard_interrupt, versions

log = logging.getLogger(__name__)


@dataclass
class RemoteConfig:
    """How eval reaches a policy server (``server=host:port``): TLS files (``tls_ca`` the CA of the
    server's certificate; ``tls_cert`` / ``tls_key`` this client's, for mutual TLS), the token file
    (else ``PARADIFFPOLICY_TOKEN``), the served sampler to ask for ("" its default) and each call's
    deadline."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    server_name: str = ""
    token_file: str = ""
    sampler: str = ""
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"remote.timeout_s={self.timeout_s} must be > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("remote.tls_cert and remote.tls_key go together (mutual TLS)")


@dataclass
class EvalConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    checkpoint: str = "${task.checkpoint}"
    n_episodes: int = 5
    # fast mode only: environments stepped in lockstep with one batched policy call (throughput;
    # latencies are then of batched calls: use n_envs=1 to measure latency)
    n_envs: int = 1
    seed: int = 10_000_000
    compare: bool = False
    video: bool = False
    device: str = "cpu"
    # how the networks run (paradiffpolicy.backends): eager, jit, compile, onnxruntime, openvino, openvino-bf16;
    # auto: the fastest float32 backend installed (controller=realtime's default; the tuned preset's
    # own with sampler=tuned); null: eager, or the backend a tuned preset (sampler=tuned) was timed on
    backend: Optional[str] = None
    threads: int = 2
    output_dir: str = ""  # default: the Hydra run directory
    progress: bool = True
    # host:port of a policy server (python -m paradiffpolicy.serve): every call is made there, with
    # the server's policy and samplers (checkpoint, sampler and backend are then the server's)
    server: str = ""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # LeRobot's rename_map: {the task's feature name: the policy's}, for a checkpoint whose inputs
    # have other names, e.g. a diffusion_policy camera policy on task=pusht_image:
    # +rename_map="{observation.image: image, observation.state: agent_pos}" (Hydra adds keys with +)
    rename_map: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate once, at construction (the nested configs validated themselves); ``ValueError``
        names the offending key."""
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes={self.n_episodes} must be >= 1")
        if self.n_envs < 1 or (self.n_envs > 1 and self.controller.mode == "realtime"):
            raise ValueError(f"n_envs={self.n_envs} must be >= 1, and 1 with controller.mode={self.controller.mode!r}")
        if self.compare and self.controller.inference_process is True:
            raise ValueError("compare=true needs controller.inference_process=false (the reference sampler runs in-process)")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")
        resolve_device(self.device)
        if self.backend not in (None, "auto"):
            check_backend(self.backend)
        if self.rename_map:
            unknown = sorted(set(self.rename_map) - set(self.task.features))
            if unknown:
                raise ValueError(f"rename_map names {unknown}, which task {self.task.name} does not give; its features are "
                                 f"{sorted(self.task.features) or ['observation.state (one flat vector: nothing to rename)']}")
            renamed = [self.rename_map.get(k, k) for k in self.task.features]
            if len(set(renamed)) != len(renamed):
                raise ValueError(f"rename_map={dict(self.rename_map)} gives two features one name: {renamed}")
        if self.server:
            if self.compare or self.controller.inference_process is True or self.sampler.warm_start:
                raise ValueError("server= runs every call on the server: compare=true, controller.inference_process=true "
                                 "and sampler.warm_start=true need a local policy")
            if ":" not in self.server:
                raise ValueError(f"server={self.server!r} must be host:port")


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def choose_backend(cfg: EvalConfig) -> tuple[str | None, str]:
    """The backend ``load_policy`` gets, and why (``backend=auto``: the fastest float32 one installed,
    or the tuned preset's own)."""
    if cfg.backend != "auto":
        return cfg.backend, "as given" if cfg.backend else "the default"
    if cfg.sampler.name == "tuned":
        return None, "the backend sampler=tuned was timed on"
    return fastest_float32(cfg.device)


def choose_inference_process(cfg: EvalConfig) -> tuple[bool, str]:
    """Whether the policy runs in a worker process, and why (``controller.inference_process`` null:
    yes on the wall clock, so inference never shares the control loop's interpreter, unless the
    calls go to a server or ``compare=true`` needs the reference sampler in-process)."""
    given = cfg.controller.inference_process
    if given is not None:
        return given, "as given"
    if cfg.controller.mode != "realtime":
        return False, f"controller.mode={cfg.controller.mode} steps without a clock"
    if cfg.server or cfg.compare:
        return False, "server= infers remotely" if cfg.server else "compare=true runs the reference sampler in-process"
    return True, "the control loop never waits on the policy's interpreter"


def renamed_task(task: TaskConfig, rename_map: dict[str, str]) -> TaskConfig:
    """``task`` with its features renamed to the policy's names (LeRobot's ``rename_map``)."""
    if not rename_map:
        return task
    return dataclasses.replace(task, features={rename_map.get(k, k): v for k, v in task.features.items()})


def check_env_matches_policy(env, policy, task: str, checkpoint: str) -> None:
    """The task's observations must be the policy's features (names and shapes; images as
    (H, W, 3) frames for (3, H, W) features) and its actions the policy's size."""
    got = env.observation_shapes()
    want = {f.name: (tuple(f.shape[1:]) + (3,) if f.is_image else tuple(f.shape)) for f in policy.features}
    if len(want) == 1 and len(got) == 1 and not policy.features[0].is_image:
        got = {next(iter(want)): next(iter(got.values()))}  # one flat vector: its name does not matter
    if got != want or env.action_dim != policy.config.action_dim:
        hint = ""
        pairs = {g: next((w for w, ws in want.items() if ws == gs), None) for g, gs in got.items()}
        if set(got) != set(want) and sorted(got.values()) == sorted(want.values()) and len(set(pairs.values())) == len(pairs):
            hint = ("; the shapes agree, so these may be the same inputs under other names: "
                    f"+rename_map='{{{', '.join(f'{g}: {w}' for g, w in pairs.items() if g != w)}}}'")
        raise ValueError(
            f"checkpoint {checkpoint} expects observations {want} and action_dim={policy.config.action_dim}; "
            f"task {task} gives {got} and action_dim={env.action_dim}{hint}"
        )



def aggregate(results: list[EpisodeResult], wall_s: float) -> tuple[dict, InferenceLog]:
    """The summary of ``results`` (LeRobot's ``overall`` fields, inference, control) and their
    inference calls pooled into one log. Episodes a machinery fault hit (a worker died, a server
    was unreachable) are counted apart: success and rewards are over the others."""
    inf = InferenceLog()
    for r in results:
        inf.extend(r.inference)
    scored = [r for r in results if not r.faulted]
    n = len(scored)
    return ({
        "overall": {
            "n_episodes": n,
            "pc_success": 100.0 * sum(r.success for r in scored) / n if n else 0.0,
            "avg_sum_reward": float(np.mean([r.sum_reward for r in scored])) if n else 0.0,
            "avg_max_reward": float(np.mean([r.max_reward for r in scored])) if n else 0.0,
            "eval_s": round(wall_s, 2),
            **({"avg_max_coverage": float(np.mean([r.max_coverage for r in scored]))}
               if n and all(r.max_coverage is not None for r in scored) else {}),
            **({"n_faulted": len(results) - n, "faulted_seeds": [r.seed for r in results if r.faulted]} if len(results) > n else {}),
        },
        "inference": inf.summary(),
        "control": {
            "deadline_misses": int(sum(r.deadline_misses for r in results)),
            "late_ticks": int(sum(r.late_ticks for r in results)),
            "steps": int(sum(r.length for r in results)),
            "achieved_hz": float(np.mean([r.achieved_hz for r in results])) if results else 0.0,
            "jumps": jump_summary([j for r in results for j in r.seam_jumps], [j for r in results for j in r.inner_jumps]),
        },
    }, inf)


class Evaluator:
    def __init__(self, cfg: EvalConfig, out_dir: Path):
        self.cfg = cfg
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        self.client = None
        if cfg.server:
            from paradiffpolicy.control.remote import ServedPolicy
            from paradiffpolicy.remote.client import RemotePolicy, read_token

            r = cfg.remote
            self.client = RemotePolicy(cfg.server, token=read_token(r.token_file), tls_ca=r.tls_ca or None, tls_cert=r.tls_cert or None,
                                       tls_key=r.tls_key or None, server_name=r.server_name or None, timeout_s=r.timeout_s)
            self.policy = ServedPolicy(self.client, r.sampler)
            log.info("policy served by %s (%s)", cfg.server, self.policy.backend)
        else:
            backend, why_backend = choose_backend(cfg)
            self.policy = load_policy(cfg.checkpoint, sampler=cfg.sampler, device=cfg.device, backend=backend)
            if cfg.backend == "auto":
                log.info("backend %s: %s", self.policy.backend, why_backend)
        task = renamed_task(cfg.task, cfg.rename_map)
        self.env = make_env(task, render=cfg.video)
        self.extra_envs = [make_env(task) for _ in range(cfg.n_envs - 1)]
        check_env_matches_policy(self.env, self.policy, cfg.task.name, cfg.checkpoint)
        pc = self.policy.config
        # the controller with its join (auto: trained or naive) and inference process resolved
        in_process, why_process = choose_inference_process(cfg)
        self.controller = dataclasses.replace(cfg.controller, join=cfg.controller.join.for_policy(pc), inference_process=in_process)
        if cfg.controller.mode != "fast" and cfg.controller.join.method == "auto":
            log.info("join %s: %s", self.controller.join.method, "the policy was trained with the committed prefix"
                     if pc.prefix_input else "not trained with the committed prefix, and no inference-time join beats naive "
                     "measurably (delay-summary.md)")
        if cfg.controller.mode == "realtime" and cfg.controller.inference_process is None:
            log.info("inference %s: %s", "in a worker process" if in_process else "in this process", why_process)
        self.schedule = None if cfg.controller.mode != "delay" else DelaySchedule(
            self.controller, pc.n_action_steps, pc.horizon - pc.executed_start, cfg.controller.hz or cfg.task.control_hz,
            cfg.task.hold)

    def run_all(self) -> dict:
        cfg = self.cfg
        sampler = self.policy.sampler_config  # cfg.sampler, or the tuned preset it names
        settings = self.policy.sampler_settings if cfg.server else self.policy.sampler.settings()
        info: dict = {"task": cfg.task.name, "checkpoint": cfg.server or cfg.checkpoint, "n_envs": cfg.n_envs,
                      **({"server": cfg.server} if cfg.server else {}),
                      "sampler": {**to_dict(sampler), **settings, "num_inference_steps": self.policy.num_inference_steps,
                                  **({"preset": "tuned"} if cfg.sampler.name == "tuned" else {})},
                      "controller": to_dict(self.controller), "seeds": [cfg.seed + i for i in range(cfg.n_episodes)],
                      "versions": versions(), "device": cfg.device, "backend": self.policy.backend,
                      "cpu": cpu_model(), "threads": cfg.threads, "interrupted": False,
                      "provenance": provenance(cfg.threads, cfg.device, [self.policy.backend])}
        reference = None
        backend = self.policy.backend
        if cfg.compare:  # the sequential sampler of the same scheduler and steps, on the same backend
            reference = self.policy.make_sampler(SamplerConfig(name="sequential", scheduler=sampler.scheduler,
                                                               num_inference_steps=sampler.num_inference_steps))
        in_worker = self.controller.mode == "realtime" and self.controller.inference_process  # the worker warms its own
        if backend != "eager" and not in_worker and not cfg.server:  # trace / compile / export (each sampler's shape) before the first timed call
            ready = sum(self.policy.warm_up(cfg.n_envs, s) for s in (self.policy.sampler, reference) if s is not None)
            log.info("%s backend ready after %.1f s", backend, ready)
        t0 = time.perf_counter()
        results: list[EpisodeResult] = []  # filled as episodes finish, so an interrupt keeps them
        seq_results: list[EpisodeResult] = []
        try:
            with sigterm_as_keyboard_interrupt():
                self._episodes(None, reference, sampler.warm_start, "episodes.jsonl", "eval", results)
                if cfg.compare:
                    self._episodes(reference, None, False, "episodes_sequential.jsonl", "sequential", seq_results)
        except KeyboardInterrupt:
            info["interrupted"] = True
            log.warning("interrupted; summarising the finished episodes")
        except InferenceUnavailable as e:  # the machinery stayed down: keep what finished, then say so
            info["interrupted"] = True
            info["fault"] = str(e)
            log.error("stopped: %s; summarising the finished episodes", e)
        finally:
            for env in [self.env, *self.extra_envs]:
                env.close()
            if self.client is not None:
                self.client.close()
        main, inf_log = aggregate(results, time.perf_counter() - t0)
        info.update(main)
        info["control"].update({"mode": cfg.controller.mode, "target_hz": cfg.controller.hz or cfg.task.control_hz})
        info["per_episode"] = [r.to_json() for r in sorted(results, key=lambda r: r.seed)]
        if cfg.compare:
            seq, _ = aggregate(seq_results, 0.0)
            if not seq_results:  # interrupted before any sequential episode finished
                seq["overall"]["pc_success"] = None
            ratios, devs = inf_log.reference_ratio, inf_log.reference_dev
            info["compare"] = {
                "reference": f"sequential, backend={backend} (the same backend)",
                "speedup": float(np.median(ratios)) if ratios else None,
                "speedup_p5_p95": [float(np.percentile(ratios, q)) for q in (5, 95)] if ratios else None,
                "max_abs_dev": inf_log.max_abs_dev,
                # a few calls can land in another mode of the action distribution (e.g. the gripper
                # closing one chunk earlier) while most stay within tolerance: show the spread
                "abs_dev_p50_p95": [float(np.percentile(devs, q)) for q in (50, 95)] if devs else None,
                "calls_over_1e-2": int(sum(d > 1e-2 for d in devs)),
                "pc_success": info["overall"]["pc_success"],
                "pc_success_sequential": seq["overall"]["pc_success"],  # None: no sequential episode finished
                "sequential": seq,
            }
        (self.out / "eval_info.json").write_text(json.dumps(info, indent=2))
        print(summary_table(info))
        if "fault" in info:
            raise SystemExit(f"error: {info['fault']} (finished episodes kept in {self.out})")
        return info

    def _run(self, sampler, reference, warm_start: bool, seeds: list[int], stack: contextlib.ExitStack):
        """The episodes of one sampler setting, as each finishes."""
        cfg = self.cfg
        ctl = self.controller
        hz = ctl.hz or cfg.task.control_hz
        if ctl.mode == "realtime":
            runner = stack.enter_context(PolicyRunner(
                self.policy, hz, cfg.task.hold, sampler=sampler, reference=reference, warm_start=warm_start,
                inference_process=ctl.inference_process, threads=cfg.threads, join=ctl.join, execute=ctl.execute or None)
                if not cfg.server else PolicyRunner(None, hz, cfg.task.hold, agent=self._remote_agent(), execute=ctl.execute or None))
            return (run_realtime(self.env, runner, s, hz, ctl.late_tolerance, cfg.video) for s in seeds)
        if cfg.server:
            agents = [self._remote_agent() for _ in range(cfg.n_envs)]
        else:
            agents = [PolicyAgent(self.policy, sampler=sampler, reference=reference, warm_start=warm_start, join=ctl.join)
                      for _ in range(cfg.n_envs)]
        if self.schedule is not None:
            return run_vector([self.env, *self.extra_envs], agents, seeds, self.schedule)
        if cfg.n_envs > 1:
            return run_vector([self.env, *self.extra_envs], agents, seeds)
        return (run_fast(self.env, agents[0], s, cfg.video) for s in seeds)

    def _remote_agent(self):
        from paradiffpolicy.control.remote import RemoteAgent

        return RemoteAgent(self.client, self.cfg.remote.sampler, join=self.controller.join, timeout_s=self.cfg.remote.timeout_s)

    def _episodes(self, sampler, reference, warm_start: bool, filename: str, desc: str, results: list[EpisodeResult]) -> None:
        cfg = self.cfg
        seeds = [cfg.seed + i for i in range(cfg.n_episodes)]
        bar = tqdm(total=cfg.n_episodes, desc=f"{desc} {cfg.task.name}", disable=not cfg.progress)
        with contextlib.ExitStack() as stack, open(self.out / filename, "a") as f:
            for res in self._run(sampler, reference, warm_start, seeds, stack):
                results.append(res)
                bar.update(1)
                f.write(json.dumps(res.to_json()) + "\n")
                f.flush()
                if not cfg.progress:  # a line per episode where no bar is drawn (batch jobs, logs)
                    log.info("%s %s: episode %d/%d, seed %d, %s", desc, cfg.task.name, len(results), cfg.n_episodes, res.seed,
                             "success" if res.success else "failure")
                if res.frames:
                    self._save_video(res)
                bar.set_postfix(success=f"{sum(r.success for r in results)}/{len(results)}")

    def _save_video(self, res: EpisodeResult) -> None:
        import imageio

        path = self.out / "videos" / f"{res.seed}.mp4"
        path.parent.mkdir(exist_ok=True)
        imageio.mimsave(path, res.frames, fps=int(self.env.control_hz))
        res.frames = []


def summary_table(info: dict) -> str:
    o, i, c = info["overall"], info["inference"], info["control"]
    rows = [
        "| task | sampler | episodes | success % | avg max reward | latency p50 / p95 ms | iterations | NFE | mode | Hz | misses |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {info['task']} | {info['sampler']['name']} | {o['n_episodes']} | {o['pc_success']:.1f} | {o['avg_max_reward']:.3f} | "
        f"{i['latency_ms']['p50']:.1f} / {i['latency_ms']['p95']:.1f} | {i['iterations_mean']:.1f} | {i['nfe_mean']:.0f} | "
        f"{c['mode']} | {c['achieved_hz']:.1f} | {c['deadline_misses']} |",
    ]
    if i.get("encoder_ms", {}).get("p50", 0.0) >= 0.5:  # camera policies: where a call's time goes
        rows.append(f"\nper call: observation encoder p50 {i['encoder_ms']['p50']:.1f} ms (p95 {i['encoder_ms']['p95']:.1f}), "
                    f"sampling p50 {i['sampling_ms']['p50']:.1f} ms (p95 {i['sampling_ms']['p95']:.1f})")
    jumps = c.get("jumps")
    if jumps and jumps["seam"]["n"]:
        delay, arrival = i.get("delay_ticks", {}), i.get("arrival_ticks", {})
        rows.append(f"\nchunk seams: action jump mean {jumps['seam']['mean']:.3g} (p95 {jumps['seam']['p95']:.3g}) vs within "
                    f"chunks {jumps['inner']['mean']:.3g} (p95 {jumps['inner']['p95']:.3g}); join "
                    f"{info['controller']['join']['method']}, delay given per call {delay.get('mean', 0.0):.2f} ticks "
                    f"(max {delay.get('max', 0)}), chunks used after {arrival.get('mean', 0.0):.2f} ticks (max {arrival.get('max', 0)})")
    if "network_ms" in i:
        rows.append(f"\nremote calls: network p50 {i['network_ms']['p50']:.1f} ms (p95 {i['network_ms']['p95']:.1f}), server queue p50 "
                    f"{i['queue_ms']['p50']:.1f} ms, of a round trip of {i['latency_ms']['p50']:.1f} ms p50")
    if o.get("n_faulted") or "faults" in i:
        rows.append(f"\nfaults of the machinery: {i.get('faults', {}).get('calls', 0)} calls failed; {o.get('n_faulted', 0)} episodes "
                    f"hit, counted apart (seeds {o.get('faulted_seeds', [])}); first: {i.get('faults', {}).get('first')}")
    if "compare" in info:
        cmp = info["compare"]
        seq = "n/a" if cmp["pc_success_sequential"] is None else f"{cmp['pc_success_sequential']:.1f}%"
        speedup = "n/a" if cmp["speedup"] is None else f"{cmp['speedup']:.2f}x"
        rows.append(f"\ncompare: speedup {speedup} (median per call, vs {cmp['reference']}), success {cmp['pc_success']:.1f}% vs "
                    f"sequential {seq}, max abs dev {cmp['max_abs_dev']:.2e} ({cmp['calls_over_1e-2']} of "
                    f"{info['inference']['calls']} calls over 1e-2)")
    return "\n".join(rows)


def compose_eval_config(overrides: list[str]) -> EvalConfig:
    """The :class:`EvalConfig` that ``python -m paradiffpolicy.eval <overrides>`` would run (Hydra
    composition of ``conf/``), for commands that run evaluations themselves."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="eval", overrides=overrides))


def run_complete(run: Path, n_episodes: int) -> bool:
    """Whether ``run`` holds a finished, uninterrupted evaluation of ``n_episodes`` episodes."""
    try:
        info = json.loads((Path(run) / "eval_info.json").read_text())
    except (OSError, ValueError):
        return False
    return not info.get("interrupted") and info["overall"]["n_episodes"] == n_episodes


def run_point(run: Path, overrides: list[str], n_episodes: int, name: str) -> dict | None:
    """One evaluation of a benchmark into ``run`` (``n_episodes`` must be among ``overrides``),
    skipped (None) when already complete, so a benchmark resumes after an interruption. A partial
    run restarts from scratch (its episodes file would repeat seeds); an interrupted one stops the
    benchmark with the point's ``name``."""
    if run_complete(run, n_episodes):
        print(f"{name}: done, skipped", flush=True)
        return None
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    info = Evaluator(compose_eval_config([*overrides, f"output_dir='{run}'", "progress=false"]), Path(run)).run_all()
    if info["interrupted"]:  # Ctrl-C / SIGTERM: this point reruns next time
        raise SystemExit(f"{name}: interrupted after {info['overall']['n_episodes']} episodes")
    print(f"{name}: {info['overall']['pc_success']:.0f}% in {time.time() - t0:.0f} s", flush=True)
    return info


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg) -> None:
    with exit_on_bad_input():
        obj: EvalConfig = OmegaConf.to_object(cfg)
        Evaluator(obj, run_dir(obj.output_dir)).run_all()


if __name__ == "__main__":
    main()
