"""The client of the policy service: :class:`RemotePolicy` asks a server for chunks.

    policy = RemotePolicy("gpu-box:50051", tls_ca="ca.pem")     # token from PARADIFFPOLICY_TOKEN
    out = policy.predict({"observation.state": obs}, seed=0)      # obs (B, To, D)
    out.action_pred                                              # (B, T, Da), environment units

The server's answer to a request is a pure function of it (observation, noise or seed, prefix,
sampler), so ``predict`` with the noise of a local ``policy.draw_noise`` returns the local chunk.
Each call's time is split into the server's compute, its queue, and the rest (network and
serialisation), from the client's round trip.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from paradiffpolicy.config import PolicyConfig, from_dict
from paradiffpolicy.remote import policy_service_pb2 as pb
from paradiffpolicy.remote import policy_service_pb2_grpc as pb_grpc
from paradiffpolicy.remote.wire import decode, encode
from paradiffpolicy.sampling import SamplerNoise
from paradiffpolicy.sampling.prefix import ActionPrefix

TOKEN_ENV = "PARADIFFPOLICY_TOKEN"


def read_token(token_file: str = "") -> str | None:
    """The bearer token: from ``token_file`` (its first line) if given, else the ``PARADIFFPOLICY_TOKEN``
    environment variable, else None. Never from a command line, where ``ps`` shows it."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"token_file={token_file!r} does not exist")
        token = path.read_text().strip().splitlines()[0].strip() if path.read_text().strip() else ""
        if not token:
            raise ValueError(f"token_file={token_file!r} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


@dataclass
class RemoteOutput:
    """One remote call: the whole predicted trajectory (B, T, Da) in environment and network units,
    where the executed chunk starts, per-row sampler statistics, and where the time went."""

    action_pred: torch.Tensor
    action_pred_normalized: torch.Tensor
    start: int
    n_action_steps: int
    iterations: list[int]
    nfe: list[float]
    converged: list[bool]
    round_trip_ms: float
    compute_ms: float
    encoder_ms: float
    queue_ms: float
    batch_rows: int

    @property
    def network_ms(self) -> float:
        """The round trip less the server's queue and compute: network, serialisation, gRPC."""
        return max(0.0, self.round_trip_ms - self.compute_ms - self.queue_ms)

    @property
    def actions(self) -> torch.Tensor:
        return self.action_pred[:, self.start : self.start + self.n_action_steps]


class RemotePolicy:
    """A connection to a policy server (``python -m paradiffpolicy.serve``).

    Args:
        address: ``host:port``.
        token: the bearer token (default: :func:`read_token`).
        tls_ca: PEM of the CA that signed the server's certificate (TLS); None: plaintext.
        tls_cert, tls_key: this client's certificate and key (mutual TLS).
        server_name: the name the server's certificate is for, if not the host of ``address``.
        timeout_s: deadline of each call that names none.
        max_reconnect_backoff_ms: the longest wait between reconnection attempts to a lost server.
    """

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, server_name: str | None = None, timeout_s: float = 30.0,
                 max_message_bytes: int = 16 << 20, max_reconnect_backoff_ms: int = 1000):
        self.address = address
        self.timeout_s = timeout_s
        token = token if token is not None else read_token()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # a robot wants its server back within a second of its return, not after gRPC's default
        # reconnect backoff (up to two minutes)
        opts = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._info: pb.InfoResponse | None = None

    # -- what the server serves ----------------------------------------------------------------

    def info(self, timeout_s: float | None = None) -> pb.InfoResponse:
        """The server's ``Info`` (asked once, then kept)."""
        if self._info is None:
            self._info = self._stub.Info(pb.InfoRequest(), timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        return self._info

    @property
    def config(self) -> PolicyConfig:
        """The served policy's configuration (features, horizon, action size, scheduler)."""
        return from_dict(PolicyConfig, json.loads(self.info().policy_config_json), name="server's policy config")

    def num_inference_steps(self, sampler: str = "") -> int:
        info = self.info()
        name = sampler or info.default_sampler
        for s in info.samplers:
            if s.name == name:
                return s.num_inference_steps
        raise ValueError(f"sampler {name!r} is not served by {self.address}; served: {[s.name for s in info.samplers]}")

    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None, sampler: str = "") -> SamplerNoise:
        """All noise of one call, drawn here as ``DiffusionPolicy.draw_noise`` draws it."""
        from paradiffpolicy.sampling import draw_noise

        info = self.info()
        return draw_noise((batch_size, info.horizon, info.action_dim), self.num_inference_steps(sampler), generator)

    def stats(self) -> pb.StatsResponse:
        return self._stub.Stats(pb.StatsRequest(), timeout=self.timeout_s, metadata=self._metadata)

    # -- calls ---------------------------------------------------------------------------------

    def request(self, obs: dict, noise: SamplerNoise | None = None, seed: int | None = None,
                prefix: ActionPrefix | None = None, sampler: str = "") -> pb.PredictRequest:
        """The ``PredictRequest`` of :meth:`predict`'s arguments."""
        if (noise is None) == (seed is None):
            raise ValueError("give exactly one of noise= and seed=")
        req = pb.PredictRequest(observation={k: encode(np.asarray(v)) for k, v in obs.items()}, sampler=sampler)
        if noise is not None:
            req.noise.CopyFrom(pb.Noise(initial=encode(noise.initial.float()), steps=encode(noise.steps.float())))
        else:
            req.seed = int(seed)
        if prefix is not None:
            req.prefix.CopyFrom(pb.ActionPrefix(target=encode(prefix.target.float()), weights=encode(prefix.weights.float()),
                                                mode=prefix.mode))
        return req

    def predict(self, obs: dict, noise: SamplerNoise | None = None, seed: int | None = None,
                prefix: ActionPrefix | None = None, sampler: str = "", timeout_s: float | None = None) -> RemoteOutput:
        """One remote call for ``obs`` ``{feature: (B, To, ...)}`` (environment units; images uint8
        HWC or float CHW) with pre-drawn ``noise`` or a ``seed``; ``grpc.RpcError`` on failure (its
        ``code()`` says why: INVALID_ARGUMENT names the field, DEADLINE_EXCEEDED, UNAVAILABLE...)."""
        req = self.request(obs, noise, seed, prefix, sampler)
        t0 = time.perf_counter()
        res: pb.PredictResponse = self._stub.Predict(req, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        rtt = (time.perf_counter() - t0) * 1e3
        return RemoteOutput(
            torch.from_numpy(decode(res.action_pred, "action_pred")), torch.from_numpy(decode(res.action_pred_normalized, "action_pred_normalized")),
            res.start, res.n_action_steps, list(res.iterations), list(res.nfe), list(res.converged), rtt,
            res.timing.compute_ms, res.timing.encoder_ms, res.timing.queue_ms, res.timing.batch_rows)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
