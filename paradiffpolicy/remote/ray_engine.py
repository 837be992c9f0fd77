"""Scale-out on Ray Serve: the policy service's requests run on ``replicas`` Ray Serve replicas,
batched by Ray Serve itself (``@serve.batch``), behind the same gRPC front end.

    python -m paradiffpolicy.serve engine=ray ray.replicas=2        # a local Ray cluster
    python -m paradiffpolicy.serve engine=ray ray.address=auto     # an existing one

The front end (:class:`~paradiffpolicy.remote.server.PolicyServer`) keeps everything a client
meets: the token checked before decoding, TLS, validation against the policy's features, limits,
status codes, ``Info`` and ``Stats``. Only validated requests (tensors, sampler name, prefix) go to
the replicas, through Ray's object store between our own processes; each replica loads the
checkpoint itself and runs :func:`~paradiffpolicy.remote.server.run_requests`, so a row's chunk is
the one the embedded server computes.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from paradiffpolicy.config import SamplerConfig
from paradiffpolicy.remote.server import BatchResult, Counters, Job, Request, ServerLimits, grouped, run_requests

APP = "paradiffpolicy"


@dataclass
class RayOptions:
    """``replicas`` Ray Serve replicas of ``threads`` torch threads each; ``address`` of a running
    Ray cluster ("" starts a local one, its files in ``temp_dir`` if given)."""

    replicas: int = 1
    threads: int = 1
    address: str = ""
    temp_dir: str = ""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.threads < 1:
            raise ValueError(f"ray.replicas={self.replicas} and ray.threads={self.threads} must be >= 1")


class PolicyReplica:
    """One Ray Serve replica: the policy and its samplers; ``predict`` is batched by Ray Serve
    (batch size counted in rows)."""

    def __init__(self, checkpoint: str, samplers: dict, backend: str, threads: int):
        import torch

        from paradiffpolicy.checkpoint import load_policy

        torch.set_num_threads(threads)
        self.policy = load_policy(checkpoint, backend=backend).eval()
        self.samplers = {name: self.policy.make_sampler(SamplerConfig(**cfg)) for name, cfg in samplers.items()}

    async def predict(self, requests: list[Request]) -> list[BatchResult]:
        out: list = [None] * len(requests)
        for group in grouped(requests):
            for i, result in zip(group, run_requests(self.policy, self.samplers, [requests[i] for i in group])):
                out[i] = result
        return out


class RayEngine:
    """Runs the servicer's jobs on Ray Serve replicas (build it with :meth:`factory`)."""

    def __init__(self, checkpoint: str, backend: str, options: RayOptions, samplers: dict, limits: ServerLimits, counters: Counters):
        import ray
        from ray import serve

        if not ray.is_initialized():
            kwargs = {"address": options.address} if options.address else {
                "num_cpus": options.replicas * options.threads, "include_dashboard": False,
                **({"_temp_dir": options.temp_dir} if options.temp_dir else {})}
            ray.init(**kwargs, log_to_driver=False)
        serve.start(http_options={"location": "NoServer"})
        deployment = serve.deployment(_batched_replica(limits), name="PolicyReplica", num_replicas=options.replicas,
                                      ray_actor_options={"num_cpus": options.threads})
        configs = {name: dataclasses.asdict(cfg) for name, cfg in samplers.items()}
        app = deployment.bind(checkpoint, configs, backend, options.threads)
        self.handle = serve.run(app, name=APP, route_prefix=None)
        self.counters = counters
        self._seen: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=limits.max_concurrent, thread_name_prefix="ray-calls")

    @staticmethod
    def factory(checkpoint: str, backend: str, options: RayOptions):
        """The ``engine`` argument of :class:`~paradiffpolicy.remote.server.PolicyServer`."""
        return lambda servicer: RayEngine(checkpoint, backend, options, servicer.sampler_configs, servicer.limits, servicer.counters)

    def submit(self, job: Job) -> Future:
        def work() -> None:
            if not job.wanted():
                job.future.cancel()
                return
            t0 = time.perf_counter()
            try:
                result: BatchResult = self.handle.predict.remote(job.request).result()
            except Exception as e:  # noqa: BLE001 - the caller gets it as INTERNAL; the server goes on
                job.future.set_exception(e)
                return
            if result.batch_id not in self._seen:  # one batch per id, whatever the number of its requests
                self._seen.add(result.batch_id)
                self.counters.batch(result.batch_rows)
            queue = (t0 - job.enqueued) * 1e3 + max(0.0, (time.perf_counter() - t0) * 1e3 - result.compute_ms)
            job.future.set_result(dataclasses.replace(result, queue_ms=queue))

        self._pool.submit(work)
        return job.future

    def stop(self) -> None:
        from ray import serve

        self._pool.shutdown(wait=True)
        serve.delete(APP)


def _batched_replica(limits: ServerLimits):
    """PolicyReplica with ``predict`` batched by Ray Serve, batch sizes counted in rows."""
    from ray import serve

    class BatchedPolicyReplica(PolicyReplica):
        predict = serve.batch(max_batch_size=limits.max_batch, batch_wait_timeout_s=limits.max_wait_ms / 1e3,
                              batch_size_fn=lambda requests: sum(r.rows for r in requests))(PolicyReplica.predict)

    return BatchedPolicyReplica
