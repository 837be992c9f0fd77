"""The policy server under load: latency and throughput against concurrent clients.

    python -m paradiffpolicy.bench.serve task=lift                      # run it alone on the machine
    python -m paradiffpolicy.bench.serve task=pusht_image clients=[1,8] calls=100

For each server setting (``max_batches``: batched, and 1 = one request per network call; ``tls``:
plaintext and TLS with a certificate made for the run) a ``python -m paradiffpolicy.serve``
subprocess serves the checkpoint with every sampler of ``samplers`` (all of them started at once),
and ``clients`` threads of this process each make ``calls`` batch-1 calls on the checkpoint's
shipped observations, every call with its own seed. Per (setting, sampler, clients, round): p50 /
p99 latency, throughput, the server's mean batch, and every call's fate (answered, refused with a
status, lost: none may be lost). With ``rounds`` > 1 the settings take turns within each round (the
order rotating from round to round), so a batched point and its unbatched twin share the machine's
state; the report gives each round's throughput ratio, batched against ``max_batch=1``, as a median
with its range. The same calls made locally in this process (same backend and threads, batch 1, one
at a time) are the reference, measured in the same run.
``benchmarks/results/serve-<task>[-<label>].{json,md,png}``.

The clients share the machine with the server: on a 2-core CPU their gRPC work competes with the
network calls, so the numbers are what one machine serving itself gives, a floor for a GPU box.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import grpc
import numpy as np
import torch

from paradiffpolicy.config import from_argv, require_list
from paradiffpolicy.measure import interleaved, percentiles, provenance, wall_seconds
from paradiffpolicy.presets import LABELS, named_sampler
from paradiffpolicy.remote.certificates import CertificateFiles, make_certificates
from paradiffpolicy.success_stats import write_report
from paradiffpolicy.runtime import REPO_ROOT



@dataclass
class ServeBenchConfig:
    task: str = "lift"
    checkpoint: str = ""  # default checkpoints/<task>
    samplers: List[str] = field(default_factory=lambda: ["picard-p16-tol0.1", "ddim8"])  # presets.SETTINGS
    clients: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    calls: int = 50  # per client
    rounds: int = 1  # every point measured this often, the settings interleaved within a round
    max_batches: List[int] = field(default_factory=lambda: [16, 1])  # the server's limits.max_batch
    tls: List[bool] = field(default_factory=lambda: [False, True])
    max_wait_ms: float = 2.0
    backend: str = "openvino"
    threads: int = 1  # the server's torch threads (and the local reference's)
    local_calls: int = 20
    timeout_s: float = 120.0
    seed: int = 0
    out: str = "benchmarks/results"
    label: str = ""  # results in serve-<task>[-<label>].*

    def __post_init__(self) -> None:
        for name in self.samplers:
            named_sampler(name, key="samplers")
        require_list(self, "clients", 1)
        require_list(self, "max_batches", 1)
        for key in ("calls", "rounds", "threads", "local_calls"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint or str(REPO_ROOT / "checkpoints" / self.task)


def start_server(cfg: ServeBenchConfig, max_batch: int, tls: CertificateFiles | None, token: str, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "paradiffpolicy.serve", f"checkpoint={cfg.checkpoint_path}", f"port={port}",
            f"backend={cfg.backend}", f"threads={cfg.threads}", f"samplers=[{','.join(cfg.samplers)}]",
            f"limits.max_batch={max_batch}", f"limits.max_wait_ms={cfg.max_wait_ms}", "limits.max_concurrent=64",
            "limits.max_rows=1", "hydra.run.dir=" + tempfile.mkdtemp(prefix="bench_serve_")]
    if tls is not None:
        args += [f"tls.cert={tls.server_cert}", f"tls.key={tls.server_key}"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PARADIFFPOLICY_TOKEN": token, "OMP_NUM_THREADS": str(cfg.threads)})
    for line in proc.stdout:
        if line.startswith("serving"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
            return proc
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def load_observations(checkpoint: str) -> list[dict]:
    from paradiffpolicy.data.obs_sample import load_observation_sample

    sample = load_observation_sample(checkpoint)
    if sample is None:
        raise ValueError(f"checkpoint {checkpoint} ships no observations.safetensors to serve requests from")
    windows, _ = sample
    k = next(iter(windows.values())).shape[0]
    return [{f: v[i : i + 1].numpy() for f, v in windows.items()} for i in range(k)]


def load_client(client, observations: list[dict], sampler: str, n_clients: int, calls: int, seed: int, timeout_s: float) -> dict:
    """``n_clients`` threads, ``calls`` each: latencies of the answered calls, the status of the others."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients)

    def run(c: int) -> None:
        barrier.wait()
        for j in range(calls):
            i = c * calls + j
            try:
                out = client.predict(observations[i % len(observations)], seed=seed + i, sampler=sampler, timeout_s=timeout_s)
                with lock:
                    latencies.append(out.round_trip_ms)
            except grpc.RpcError as e:
                with lock:
                    statuses[e.code().name] = statuses.get(e.code().name, 0) + 1

    threads = [threading.Thread(target=run, args=(c,)) for c in range(n_clients)]

    def load() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    wall = wall_seconds(load)
    answered = len(latencies)
    return {"clients": n_clients, "calls": n_clients * calls, "answered": answered, "refused": statuses,
            "lost": n_clients * calls - answered - sum(statuses.values()), "wall_s": wall,
            "throughput": answered / wall, "latency_ms": {**percentiles(latencies or [0.0]),
                                                          "p99": float(np.percentile(latencies or [0.0], 99))}}


def local_reference(cfg: ServeBenchConfig, observations: list[dict]) -> dict[str, dict]:
    """The same batch-1 calls in this process, one at a time, on the server's backend and threads;
    interleaved with them, calls of ``rows`` = the most clients at once (what a full batch costs): the
    throughput a batched server could reach over an unbatched one is at most ``rows · t(1) / t(rows)``."""
    from paradiffpolicy.checkpoint import load_policy

    torch.set_num_threads(cfg.threads)
    rows = min(max(cfg.clients), max(cfg.max_batches))
    policy = load_policy(cfg.checkpoint_path, backend=cfg.backend)
    samplers = {name: policy.make_sampler(named_sampler(name)) for name in cfg.samplers}
    for sampler in samplers.values():
        policy.warm_up(1, sampler)
        policy.warm_up(rows, sampler)
    obs = [{k: torch.from_numpy(v) for k, v in o.items()} for o in observations]
    full = {k: torch.cat([o[k] for o in (obs * rows)[:rows]]) for k in obs[0]}
    calls = {}
    for name, s in samplers.items():
        one = [policy.draw_noise(1, torch.Generator().manual_seed(cfg.seed + i), s) for i in range(cfg.local_calls)]
        many = policy.draw_noise(rows, torch.Generator().manual_seed(cfg.seed), s)
        calls[name] = lambda i, s=s, one=one: policy.predict_action(obs[i % len(obs)], noise=one[i], sampler=s)
        calls[f"{name}@{rows}"] = lambda i, s=s, many=many: policy.predict_action(full, noise=many, sampler=s)
    ms = interleaved(calls, trials=cfg.local_calls, warmup=0)
    out = {}
    for name in samplers:
        t1, tn = float(np.median(ms[name])), float(np.median(ms[f"{name}@{rows}"]))
        out[name] = {**percentiles(ms[name]), "throughput": 1e3 / t1, "rows": rows, "rows_p50": tn,
                     "batching_ceiling": rows * t1 / tn}
    return out


def measure_point(client, observations: list[dict], cfg: ServeBenchConfig, sampler: str, n: int) -> dict:
    """One load point against one server, with the server's mean batch over it."""
    before = client.stats()
    point = load_client(client, observations, sampler, n, cfg.calls, cfg.seed, cfg.timeout_s)
    after = client.stats()
    batches = after.batches - before.batches
    return {**point, "batch_rows_mean": (after.rows - before.rows) / batches if batches else 0.0}


def batching_ratios(points: list[dict]) -> list[dict]:
    """Per (sampler, tls, clients, batched max_batch): throughput against the ``max_batch=1`` point of
    the same round, median and range over the rounds."""
    unbatched = {(p["sampler"], p["tls"], p["clients"], p["round"]): p["throughput"] for p in points if p["max_batch"] == 1}
    groups: dict = {}
    for p in points:
        key = (p["sampler"], p["tls"], p["clients"], p["round"])
        if p["max_batch"] > 1 and key in unbatched:
            groups.setdefault((p["sampler"], p["tls"], p["clients"], p["max_batch"]), []).append(p["throughput"] / unbatched[key])
    return [{"sampler": s, "tls": t, "clients": n, "max_batch": mb, "rounds": len(r), "ratio_median": float(np.median(r)),
             "ratio_min": float(min(r)), "ratio_max": float(max(r)), "ratios": r} for (s, t, n, mb), r in groups.items()]


def run(cfg: ServeBenchConfig) -> dict:
    from paradiffpolicy.remote.client import RemotePolicy
    from paradiffpolicy.serve import free_port

    observations = load_observations(cfg.checkpoint_path)
    result = {"task": cfg.task, "checkpoint": cfg.checkpoint or f"checkpoints/{cfg.task}", "backend": cfg.backend, "server_threads": cfg.threads,
              "calls_per_client": cfg.calls, "rounds": cfg.rounds, "max_wait_ms": cfg.max_wait_ms,
              "local": local_reference(cfg, observations), "points": [], "provenance": provenance(cfg.threads, "cpu", [cfg.backend])}
    token = secrets.token_hex(16)
    settings = [(tls, max_batch) for tls in cfg.tls for max_batch in cfg.max_batches]
    servers, clients = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certificates(tmp) if any(cfg.tls) else None
        try:
            for tls, max_batch in settings:
                port = free_port()
                servers.append(start_server(cfg, max_batch, certs if tls else None, token, port))
                clients[tls, max_batch] = RemotePolicy(f"localhost:{port}", token=token, tls_ca=str(certs.ca) if tls else None)
                for sampler in cfg.samplers:
                    load_client(clients[tls, max_batch], observations, sampler, 1, 2, cfg.seed, cfg.timeout_s)  # warm the path
            for r in range(cfg.rounds):
                for sampler in cfg.samplers:
                    for n in cfg.clients:
                        for tls, max_batch in settings[r % len(settings):] + settings[: r % len(settings)]:
                            point = measure_point(clients[tls, max_batch], observations, cfg, sampler, n)
                            point.update(sampler=sampler, label=LABELS[sampler], max_batch=max_batch, tls=tls, round=r,
                                         vs_local=point["throughput"] / result["local"][sampler]["throughput"])
                            result["points"].append(point)
                            print(f"{cfg.task} {sampler} max_batch={max_batch} tls={tls} clients={n} round {r}: "
                                  f"{point['throughput']:.1f} calls/s, p50 {point['latency_ms']['p50']:.1f} ms, "
                                  f"p99 {point['latency_ms']['p99']:.1f} ms, batch {point['batch_rows_mean']:.2f}, "
                                  f"refused {point['refused']}, lost {point['lost']}", flush=True)
        finally:
            for client in clients.values():
                client.close()
            for proc in servers:
                proc.terminate()
                proc.wait(timeout=30)
    result["batching"] = batching_ratios(result["points"])
    return write_report(Path(cfg.out) / f"serve-{cfg.task}{'-' + cfg.label if cfg.label else ''}", result, markdown, plot)


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [f"# Policy server under load: {result['task']}\n",
             f"`{result['checkpoint']}` served on {result['backend']} with {result['server_threads']} thread(s), clients in another "
             f"process of the same machine ({prov['cpu']}); {result['calls_per_client']} batch-1 calls per client, each with its "
             f"own seed, on the checkpoint's shipped observations. Batching: requests within {result['max_wait_ms']} ms share "
             "a network call, up to `max_batch` rows (1: unbatched). Local: the same calls in-process, one at a time.\n",
             "| sampler | local p50 ms | local calls/s | rows in a full batch | its p50 ms | batching ceiling |",
             "|---|---|---|---|---|---|"]
    for name, ref in result["local"].items():
        lines.append(f"| {name} | {ref['p50']:.1f} | {ref['throughput']:.1f} | {ref['rows']} | {ref['rows_p50']:.1f} | "
                     f"{ref['batching_ceiling']:.2f}x |")
    lines += ["", "Batching ceiling: rows · t(1 row) / t(rows), the most a batched server can gain over an unbatched "
              "one with the network call as the only cost."]
    if result.get("batching"):
        lines += ["", f"Batched against unbatched (`max_batch=1`), answered calls per second, each round's ratio "
                  f"({result['rounds']} rounds, the settings interleaved):", "",
                  "| sampler | TLS | clients | max_batch | ratio median | min | max | rounds |", "|---|---|---|---|---|---|---|---|"]
        for b in result["batching"]:
            lines.append(f"| {b['sampler']} | {'yes' if b['tls'] else 'no'} | {b['clients']} | {b['max_batch']} | "
                         f"{b['ratio_median']:.2f}x | {b['ratio_min']:.2f}x | {b['ratio_max']:.2f}x | {b['rounds']} |")
    lines += ["", "| sampler | TLS | max_batch | clients | round | calls/s | vs local | p50 ms | p99 ms | mean batch | refused | lost |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['sampler']} | {'yes' if p['tls'] else 'no'} | {p['max_batch']} | {p['clients']} | {p['round']} | "
                     f"{p['throughput']:.1f} | {p['vs_local']:.2f}x | {p['latency_ms']['p50']:.1f} | {p['latency_ms']['p99']:.1f} | "
                     f"{p['batch_rows_mean']:.2f} | {sum(p['refused'].values())} | {p['lost']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves: dict = {}
    for p in result["points"]:
        curves.setdefault((p["sampler"], p["max_batch"], p["tls"]), {}).setdefault(p["clients"], []).append(p["throughput"])
    for (sampler, mb, tls), by_clients in curves.items():
        n = sorted(by_clients)
        ax.plot(n, [np.median(by_clients[k]) for k in n], marker="o", label=f"{sampler}, max_batch={mb}{', TLS' if tls else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("answered calls per second")
    ax.set_title(f"{result['task']}: policy server throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    cfg = from_argv(ServeBenchConfig, argv)
    return run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
