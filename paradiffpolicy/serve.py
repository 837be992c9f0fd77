"""Serve a policy to robots over gRPC (``remote/policy_service.proto``).

    python -m paradiffpolicy.serve checkpoint=checkpoints/lift backend=openvino           # localhost:50051
    PARADIFFPOLICY_TOKEN=... python -m paradiffpolicy.serve host=0.0.0.0 tls.cert=server.pem tls.key=server.key
    python -m paradiffpolicy.serve samplers=[ddim8]      # requests may also name ddim8 (presets.SETTINGS)

Requests arriving together are batched into one sampler call (``limits.max_batch`` rows, waiting
at most ``limits.max_wait_ms``). The token comes from ``PARADIFFPOLICY_TOKEN`` or ``token_file``,
never from the command line. A host other than localhost needs TLS and a token unless
``allow_insecure=true``. Ctrl-C or SIGTERM drain the calls in flight (``grace_s``) and exit.
See :mod:`paradiffpolicy.remote.server` for what the server checks.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from paradiffpolicy.checkpoint import load_policy
from paradiffpolicy.config import SamplerConfig
from paradiffpolicy.presets import named_sampler
from paradiffpolicy.remote.client import read_token
from paradiffpolicy.remote.ray_engine import RayOptions
from paradiffpolicy.remote.server import DEFAULT_SAMPLER, PolicyServer, ServerLimits, TlsFiles
from paradiffpolicy.runtime import exit_on_bad_input

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    checkpoint: str = "checkpoints/lift"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the default sampler ("default")
    samplers: List[str] = field(default_factory=list)  # others a request may name: settings of presets.SETTINGS
    backend: Optional[str] = None
    device: str = "cpu"
    threads: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    limits: ServerLimits = field(default_factory=ServerLimits)
    token_file: str = ""  # else PARADIFFPOLICY_TOKEN; neither: no token asked
    tls: TlsFiles = field(default_factory=TlsFiles)
    allow_insecure: bool = False
    grace_s: float = 10.0
    # what runs the requests: "local" (batched in this process) or "ray" (Ray Serve replicas)
    engine: str = "local"
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        for name in self.samplers:
            named_sampler(name, key="samplers")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine={self.engine!r} is unknown; expected local or ray")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must lie in [0, 65535] (0: any free port)")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")


ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for tests and benchmarks that start servers)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_server(cfg: ServeConfig) -> PolicyServer:
    """The server ``cfg`` describes (not started)."""
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, sampler=cfg.sampler, device=cfg.device, backend=cfg.backend)
    samplers = {DEFAULT_SAMPLER: policy.sampler_config, **{n: named_sampler(n) for n in cfg.samplers}}
    engine = None
    if cfg.engine == "ray":
        from paradiffpolicy.remote.ray_engine import RayEngine

        engine = RayEngine.factory(cfg.checkpoint, policy.backend, cfg.ray)
    server = PolicyServer(policy, samplers, cfg.limits, token=read_token(cfg.token_file), tls=cfg.tls, host=cfg.host,
                          port=cfg.port, allow_insecure=cfg.allow_insecure, engine=engine)
    if engine is None:
        for name, sampler in server.servicer.samplers.items():  # trace / export each sampler's shapes now
            policy.warm_up(1, sampler)
    return server


def serve(cfg: ServeConfig) -> None:
    server = build_server(cfg)
    port = server.start()
    print(f"serving {cfg.checkpoint} on {cfg.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("draining (up to %.0f s)", cfg.grace_s)
    server.stop(cfg.grace_s)
    print("stopped", flush=True)


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg) -> None:
    with exit_on_bad_input():
        serve(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
