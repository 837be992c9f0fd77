"""The policy service: one policy behind gRPC, requests of many robots batched into one sampler call.

:class:`PolicyServer` answers ``Predict`` / ``Info`` / ``Stats`` (``policy_service.proto``) and the
standard gRPC health service. Concurrent ``Predict`` requests that arrive within ``max_wait_ms`` of
each other (up to ``max_batch`` rows) share one network call per sampler: each row keeps its own
observation, noise and prefix, and Picard's rows converge independently, so a row's chunk is the
one the request would get alone (to float rounding across batch sizes).

What the server trusts of a client (nothing, by default):

* a bearer token (``authorization: Bearer <token>`` metadata) is compared in constant time before
  any request byte is decoded; the health service answers without one;
* every tensor is decoded by :mod:`~paradiffpolicy.remote.wire` and checked against the policy's
  features, shapes, dtypes, row limit and for NaN / inf; a bad field is INVALID_ARGUMENT naming it;
* message size (``max_message_bytes``) and concurrent calls (``max_concurrent``) are capped
  (RESOURCE_EXHAUSTED), and a call whose deadline passes while queued is dropped before it costs
  compute (DEADLINE_EXCEEDED), as is one whose client went away.

A refused or failed request never stops the server; ``Stats`` counts every call answered,
refused, expired and failed.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from paradiffpolicy.config import SamplerConfig, to_dict
from paradiffpolicy.policy import DiffusionPolicy
from paradiffpolicy.remote import policy_service_pb2 as pb
from paradiffpolicy.remote import policy_service_pb2_grpc as pb_grpc
from paradiffpolicy.remote.wire import WireError, decode, encode
from paradiffpolicy.runtime import versions
from paradiffpolicy.sampling import SamplerNoise
from paradiffpolicy.sampling.prefix import ActionPrefix

log = logging.getLogger(__name__)

SERVICE = "paradiffpolicy.v1.PolicyService"
DEFAULT_SAMPLER = "default"


@dataclass
class ServerLimits:
    """What one client may ask: ``max_rows`` per request, ``max_message_bytes`` per message,
    ``max_concurrent`` calls in flight (beyond: RESOURCE_EXHAUSTED); batching: ``max_batch`` rows
    per network call, waiting at most ``max_wait_ms`` for more after the first."""

    max_rows: int = 16
    max_message_bytes: int = 16 << 20
    max_concurrent: int = 32
    max_batch: int = 16
    max_wait_ms: float = 2.0

    def __post_init__(self) -> None:
        for key in ("max_rows", "max_message_bytes", "max_concurrent", "max_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms} must be >= 0")


class BadRequest(Exception):
    """A request refused before it is queued: its status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    """One validated Predict request: what its rows of a network call need (no connection state,
    so an engine may hand it to another process)."""

    obs: dict[str, torch.Tensor]
    noise: SamplerNoise
    prefix: ActionPrefix | None
    sampler: str

    @property
    def rows(self) -> int:
        return int(self.noise.initial.shape[0])

    @property
    def key(self) -> tuple[str, str | None]:
        """Requests batched into one call share the sampler and the prefix mode."""
        return self.sampler, None if self.prefix is None else self.prefix.mode


@dataclass
class Job:
    """A request waiting for its batch, with the call it answers."""

    request: Request
    enqueued: float
    context: grpc.ServicerContext | None = None
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # the caller stopped waiting (deadline, disconnect)

    @property
    def rows(self) -> int:
        return self.request.rows

    def wanted(self) -> bool:
        return not self.abandoned and (self.context is None or self.context.is_active())


@dataclass
class BatchResult:
    """One request's rows of a network call, and what the call cost."""

    action_pred: torch.Tensor
    normalized: torch.Tensor
    iterations: list
    nfe: list
    converged: list
    encoder_ms: float
    compute_ms: float
    batch_rows: int
    batch_id: str
    queue_ms: float = 0.0


def run_requests(policy: DiffusionPolicy, samplers: dict, requests: list[Request]) -> list[BatchResult]:
    """One sampler call for ``requests`` of one key (sampler, prefix mode): their rows stacked, each
    with its own observation, noise and prefix; the results split back per request."""
    t0 = time.perf_counter()
    with torch.no_grad():
        obs = {k: torch.cat([r.obs[k] for r in requests]) for k in requests[0].obs}
        noise = SamplerNoise(torch.cat([r.noise.initial for r in requests]), torch.cat([r.noise.steps for r in requests], dim=1))
        prefix = None
        if requests[0].prefix is not None:
            p0 = requests[0].prefix
            prefix = ActionPrefix(torch.cat([r.prefix.target for r in requests]), torch.cat([r.prefix.weights for r in requests]),
                                  p0.mode, p0.max_guidance)
        cond = policy.encode_observation(obs)
        t_enc = time.perf_counter()
        out = policy.sample_from_condition(cond, noise=noise, sampler=samplers[requests[0].sampler], prefix=prefix)
    t_done = time.perf_counter()
    rows, batch_id, start, results = sum(r.rows for r in requests), uuid.uuid4().hex, 0, []
    st = out.stats
    for r in requests:
        sl = slice(start, start + r.rows)
        start += r.rows
        results.append(BatchResult(out.action_pred[sl], out.action_pred_normalized[sl], [int(v) for v in st.iterations[sl]],
                                   [float(v) for v in st.nfe[sl]], [bool(v) for v in st.converged[sl]],
                                   (t_enc - t0) * 1e3, (t_done - t0) * 1e3, rows, batch_id))
    return results


def grouped(requests: list) -> list[list[int]]:
    """Indices of ``requests`` (objects with a ``key``) grouped by key, in order of first appearance."""
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.key, []).append(i)
    return list(groups.values())


@dataclass
class Counters:
    answered: int = 0
    refused: int = 0
    expired: int = 0
    failed: int = 0
    batches: int = 0
    rows: int = 0
    batch_rows_max: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def batch(self, rows: int) -> None:
        with self.lock:
            self.batches += 1
            self.rows += rows
            self.batch_rows_max = max(self.batch_rows_max, rows)


class Batcher:
    """One thread that runs the policy: it takes queued jobs, waits up to ``max_wait_ms`` for more
    (up to ``max_batch`` rows), and makes one sampler call per (sampler, prefix mode) group."""

    def __init__(self, policy: DiffusionPolicy, samplers: dict, limits: ServerLimits, counters: Counters):
        self.policy, self.samplers, self.limits, self.counters = policy, samplers, limits, counters
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="policy-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._stopping:
                raise BadRequest(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def stop(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if not self._queue:
                return []
            first = self._queue[0]
            until = first.enqueued + self.limits.max_wait_ms / 1e3
            while sum(j.rows for j in self._queue) < self.limits.max_batch and not self._stopping:
                left = until - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs, rows = [], 0
            while self._queue and (not jobs or rows + self._queue[0].rows <= self.limits.max_batch):
                job = self._queue.popleft()
                jobs.append(job)
                rows += job.rows
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            live = []
            for job in jobs:
                if job.wanted():
                    live.append(job)
                else:  # its caller is gone: it costs nothing
                    job.future.cancel()
            for group in grouped([j.request for j in live]):
                self._run([live[i] for i in group])

    def _run(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            results = run_requests(self.policy, self.samplers, [j.request for j in jobs])
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets it; the server goes on
            log.exception("batch of %d requests failed", len(jobs))
            for j in jobs:
                j.future.set_exception(e)
            return
        self.counters.batch(results[0].batch_rows)
        for j, r in zip(jobs, results):
            j.future.set_result(dataclasses.replace(r, queue_ms=(t0 - j.enqueued) * 1e3))


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """``Predict``, ``Info`` and ``Stats`` of one policy (see the module docstring)."""

    def __init__(self, policy: DiffusionPolicy, samplers: dict[str, SamplerConfig], limits: ServerLimits, engine=None):
        """``engine(servicer)`` builds what runs the requests (an object with ``submit(job) -> Future``
        and ``stop()``) from this servicer's policy, samplers, limits and counters; default the
        in-process :class:`Batcher`."""
        if DEFAULT_SAMPLER not in samplers:
            raise ValueError(f"samplers must include {DEFAULT_SAMPLER!r} (the policy's own); got {list(samplers)}")
        self.policy = policy.eval()
        self.sampler_configs = samplers
        self.samplers = {name: policy.make_sampler(cfg) for name, cfg in samplers.items()}
        self.limits = limits
        self.counters = Counters()
        self.batcher = engine(self) if engine else Batcher(self.policy, self.samplers, limits, self.counters)

    # -- Predict -----------------------------------------------------------------------------

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        t0 = time.perf_counter()
        try:
            job = Job(self.parse(request), t0, context)
            # the call ends (cancelled, deadline, client gone, or answered): a queued job is dropped
            context.add_callback(lambda: setattr(job, "abandoned", True))
            future = self.batcher.submit(job)
        except BadRequest as e:
            self.counters.add(refused=1)
            context.abort(e.code, str(e))
        remaining = context.time_remaining()
        try:
            result: BatchResult = future.result(timeout=remaining)
        except TimeoutError:
            job.abandoned = True
            self.counters.add(expired=1)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"not answered within the call's deadline ({remaining:.3f} s)")
        except Exception as e:  # noqa: BLE001 - cancelled (client gone) or a failed batch
            if future.cancelled() or not context.is_active():
                self.counters.add(expired=1)
                context.abort(grpc.StatusCode.CANCELLED, "the client went away")
            self.counters.add(failed=1)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        self.counters.add(answered=1)
        cfg = self.policy.config
        return pb.PredictResponse(
            action_pred=encode(result.action_pred), action_pred_normalized=encode(result.normalized),
            start=cfg.executed_start, n_action_steps=cfg.n_action_steps, iterations=result.iterations, nfe=result.nfe,
            converged=result.converged, sampler=job.request.sampler,
            timing=pb.CallTiming(queue_ms=result.queue_ms, encoder_ms=result.encoder_ms, compute_ms=result.compute_ms,
                                 batch_rows=result.batch_rows))

    def parse(self, request: pb.PredictRequest) -> Request:
        """The request validated, or :class:`BadRequest` naming the field."""
        invalid = lambda msg: BadRequest(grpc.StatusCode.INVALID_ARGUMENT, msg)  # noqa: E731
        name = request.sampler or DEFAULT_SAMPLER
        if name not in self.samplers:
            raise invalid(f"sampler {name!r} is not served here; served: {sorted(self.samplers)}")
        sampler = self.samplers[name]
        want = {f.name for f in self.policy.features}
        got = set(request.observation.keys())
        if got != want:
            raise invalid(f"observation features {sorted(got)} do not match the policy's {sorted(want)} "
                          f"(missing {sorted(want - got)}, unknown {sorted(got - want)})")
        limit = self.limits.max_message_bytes
        try:
            arrays = {k: decode(request.observation[k], f"observation[{k!r}]", limit) for k in sorted(want)}
            rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
            if len(rows) != 1:
                raise invalid(f"observation features disagree on the number of rows: { {k: a.shape for k, a in arrays.items()} }")
            bsz = rows.pop()
            if not 1 <= bsz <= self.limits.max_rows:
                raise BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED if bsz > self.limits.max_rows else grpc.StatusCode.INVALID_ARGUMENT,
                                 f"observation has {bsz} rows; 1 to max_rows={self.limits.max_rows} are accepted")
            try:
                obs = self.policy.validate_obs({k: torch.from_numpy(a) for k, a in arrays.items()})
            except (ValueError, TypeError, KeyError) as e:
                raise invalid(f"observation: {e}") from None
            noise = self._noise(request, bsz, sampler, limit)
            prefix = self._prefix(request, bsz, limit) if request.HasField("prefix") else None
        except WireError as e:
            raise invalid(str(e)) from None
        return Request(obs, noise, prefix, name)

    def _noise(self, request: pb.PredictRequest, bsz: int, sampler, limit: int) -> SamplerNoise:
        cfg = self.policy.config
        row = (bsz, cfg.horizon, cfg.action_dim)
        n = sampler.table.num_steps
        which = request.WhichOneof("randomness")
        if which == "seed":
            return self.policy.draw_noise(bsz, torch.Generator().manual_seed(int(request.seed)), sampler)
        if which != "noise":
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "the request carries neither noise nor seed")
        initial = decode(request.noise.initial, "noise.initial", limit)
        steps = decode(request.noise.steps, "noise.steps", limit)
        for field_name, a, shape in (("noise.initial", initial, row), ("noise.steps", steps, (n, *row))):
            if a.dtype != np.float32 or tuple(a.shape) != shape:
                raise WireError(field_name, f"{a.dtype} {tuple(a.shape)} given; expected float32 {shape} "
                                            f"(sampler of {n} steps, {bsz} rows)")
            if not np.isfinite(a).all():
                raise WireError(field_name, "contains NaN or inf")
        return SamplerNoise(torch.from_numpy(initial), torch.from_numpy(steps))

    def _prefix(self, request: pb.PredictRequest, bsz: int, limit: int) -> ActionPrefix:
        cfg = self.policy.config
        msg = request.prefix
        target = decode(msg.target, "prefix.target", limit)
        weights = decode(msg.weights, "prefix.weights", limit)
        for field_name, a, shape in (("prefix.target", target, (bsz, cfg.horizon, cfg.action_dim)),
                                     ("prefix.weights", weights, (bsz, cfg.horizon))):
            if a.dtype != np.float32 or tuple(a.shape) != shape:
                raise WireError(field_name, f"{a.dtype} {tuple(a.shape)} given; expected float32 {shape}")
        if msg.mode == "guided":
            raise WireError("prefix.mode", "guided needs gradients through the network; the server does not offer it")
        if msg.mode == "trained" and not cfg.prefix_input:
            raise WireError("prefix.mode", "trained needs a policy trained with the committed prefix; this one was not")
        try:
            return ActionPrefix(torch.from_numpy(target), torch.from_numpy(weights), msg.mode)
        except ValueError as e:
            raise WireError("prefix", str(e)) from None

    # -- Info, Stats ---------------------------------------------------------------------------

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        cfg = self.policy.config
        return pb.InfoResponse(
            features=[pb.Feature(name=f.name, kind=f.kind, shape=list(f.shape)) for f in self.policy.features],
            n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon, n_action_steps=cfg.n_action_steps,
            action_start=cfg.executed_start, action_dim=cfg.action_dim,
            samplers=[pb.SamplerInfo(name=n, num_inference_steps=s.table.num_steps,
                                     settings_json=json.dumps({**to_dict(self.sampler_configs[n]), **s.settings()}))
                      for n, s in self.samplers.items()],
            default_sampler=DEFAULT_SAMPLER, backend=self.policy.backend, prefix_input=cfg.prefix_input,
            policy_config_json=json.dumps(to_dict(cfg)), versions={k: str(v) for k, v in versions().items()},
            max_rows=self.limits.max_rows)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        c = self.counters
        with c.lock:
            return pb.StatsResponse(answered=c.answered, refused=c.refused, expired=c.expired, failed=c.failed,
                                    batches=c.batches, rows=c.rows, batch_rows_max=c.batch_rows_max,
                                    batch_rows_mean=c.rows / c.batches if c.batches else 0.0)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call of the policy service without ``authorization: Bearer <token>`` before the
    request is decoded (its bytes are never parsed); constant-time comparison. The health service
    is open (it tells nothing but whether the server is up)."""

    def __init__(self, token: str, counters: Counters):
        if not token:
            raise ValueError("the token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._counters = counters

        def refuse(request_bytes, context):
            self._counters.add(refused=1)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

        # no deserializer: the request stays raw bytes, never decoded
        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(f"/{SERVICE}/"):
            return continuation(handler_call_details)
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        return self._refuse


@dataclass
class TlsFiles:
    """PEM files: the server's certificate chain and key; ``client_ca`` asks every client for a
    certificate signed by it (mutual TLS)."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def credentials(self) -> grpc.ServerCredentials:
        from pathlib import Path

        if not (self.cert and self.key):
            raise ValueError("tls.cert and tls.key must both be given")
        pair = [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())]
        if self.client_ca:
            return grpc.ssl_server_credentials(pair, root_certificates=Path(self.client_ca).read_bytes(), require_client_auth=True)
        return grpc.ssl_server_credentials(pair)


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class PolicyServer:
    """A running policy service. ``start()`` binds ``host:port`` (port 0: any free one; the bound
    port is returned) and serves until :meth:`stop`, which refuses new calls and lets those in flight
    finish within ``grace_s``.

    A non-local ``host`` needs TLS and a token unless ``allow_insecure`` (the refusal says so).
    ``engine``: see :class:`PolicyServicer` (e.g. :class:`~paradiffpolicy.remote.ray_engine.RayEngine`)."""

    def __init__(self, policy: DiffusionPolicy, samplers: dict[str, SamplerConfig] | None = None,
                 limits: ServerLimits | None = None, token: str | None = None, tls: TlsFiles | None = None,
                 host: str = "127.0.0.1", port: int = 0, allow_insecure: bool = False, engine=None):
        self.limits = limits or ServerLimits()
        self.tls = tls or TlsFiles()
        if host not in LOCAL_HOSTS and not allow_insecure and not (self.tls.enabled and token):
            raise ValueError(f"host={host!r} is reachable from other machines: serving it needs TLS (tls.cert, tls.key) and a "
                             "token (PARADIFFPOLICY_TOKEN or token_file), or allow_insecure=true to accept the risk")
        self.servicer = PolicyServicer(policy, samplers or {DEFAULT_SAMPLER: policy.sampler_config}, self.limits, engine)
        interceptors = [TokenInterceptor(token, self.servicer.counters)] if token else []
        opts = [("grpc.max_receive_message_length", self.limits.max_message_bytes),
                ("grpc.max_send_message_length", self.limits.max_message_bytes)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=self.limits.max_concurrent, thread_name_prefix="grpc"),
                                   interceptors=interceptors, options=opts, maximum_concurrent_rpcs=self.limits.max_concurrent)
        pb_grpc.add_PolicyServiceServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        address = f"{host}:{port}"
        self.port = (self._server.add_secure_port(address, self.tls.credentials()) if self.tls.enabled
                     else self._server.add_insecure_port(address))
        if not self.port:
            raise OSError(f"cannot bind {address}")
        self.host = host

    def start(self) -> int:
        self._server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (%s)", SERVICE, self.host, self.port, "TLS" if self.tls.enabled else "plaintext")
        return self.port

    def stop(self, grace_s: float = 10.0) -> None:
        """Drain: new calls are refused, calls in flight finish (within ``grace_s``), then the batcher stops."""
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace_s).wait()
        self.servicer.batcher.stop()

    def wait(self) -> None:
        self._server.wait_for_termination()
