"""The third kind of agent: inference on a policy server (``python -m paradiffpolicy.serve``).

:class:`RemoteAgent` keeps everything a :class:`~paradiffpolicy.control.agent.PolicyAgent` keeps
(observation history, noise stream, previous chunk, statistics) and sends each call's observation,
pre-drawn noise and committed prefix to the server, so a remote chunk is the chunk the same policy
computes locally (pure function of the request). :class:`ServedPolicy` is what the agent, the
runner and eval need to know of the served policy (features, shapes, samplers), read from the
server's ``Info``.

A call that cannot reach the server or is not answered within ``timeout_s`` raises
:class:`~paradiffpolicy.errors.InferenceUnavailable` (the runner holds and retries, gRPC reconnects
with its own backoff); a request the server refuses as invalid raises ``ValueError`` with the
server's message.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np

from paradiffpolicy.config import SamplerConfig, from_dict
from paradiffpolicy.control.agent import CallResult, PolicyAgent
from paradiffpolicy.control.join import JoinConfig
from paradiffpolicy.errors import InferenceUnavailable
from paradiffpolicy.features import check_step
from paradiffpolicy.remote.client import RemotePolicy

UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class ServedPolicy:
    """The served policy as the control loop sees it: ``config``, ``features``, ``check_step``,
    ``draw_noise`` and the sampler ``sampler`` names (the server's default: ``""``)."""

    def __init__(self, client: RemotePolicy, sampler: str = ""):
        self.client = client
        info = client.info()
        self.info = info
        self.config = client.config
        self.features = self.config.features()
        self.sampler = sampler
        self.sampler_name = sampler or info.default_sampler
        settings = {s.name: json.loads(s.settings_json) for s in info.samplers}
        if self.sampler_name not in settings:
            raise ValueError(f"sampler {self.sampler_name!r} is not served by {client.address}; served: {sorted(settings)}")
        known = set(SamplerConfig.__dataclass_fields__)
        self.sampler_config = from_dict(SamplerConfig, {k: v for k, v in settings[self.sampler_name].items() if k in known},
                                        name="served sampler")
        self.sampler_settings = settings[self.sampler_name]
        self.num_inference_steps = client.num_inference_steps(sampler)
        self.backend = f"remote ({info.backend})"

    def check_step(self, obs: Any) -> Any:
        return check_step(self.features, self.config.n_obs_steps, obs)

    def draw_noise(self, batch_size: int, generator=None, sampler=None):
        return self.client.draw_noise(batch_size, generator, self.sampler)


class RemoteAgent(PolicyAgent):
    """A :class:`PolicyAgent` whose calls run on a policy server (see the module docstring).

    Args:
        client: the connection (:class:`~paradiffpolicy.remote.client.RemotePolicy`; several agents
            may share one; its owner closes it).
        sampler: a sampler the server offers (``Info.samplers``); "" its default.
        join: how a delayed call joins the previous chunk (``auto``: ``trained`` when the served
            policy was trained with the committed prefix, else ``naive``).
        timeout_s: each call's deadline (a robot's tick budget); past it the call is a fault.
    """

    def __init__(self, client: RemotePolicy, sampler: str = "", join: JoinConfig | None = None, timeout_s: float = 10.0):
        super().__init__(ServedPolicy(client, sampler), join=join)
        self.client = client
        self.timeout_s = timeout_s

    def call(self, obs, noise, prefix, warm) -> CallResult:
        if warm is not None:
            raise ValueError("a remote agent cannot warm-start (the trajectory stays on the server)")
        if not isinstance(obs, dict):
            obs = {self.policy.features[0].name: obs}
        try:
            out = self.client.predict({k: np.asarray(v) for k, v in obs.items()}, noise=noise, prefix=prefix,
                                      sampler=self.policy.sampler, timeout_s=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() in UNAVAILABLE:
                raise InferenceUnavailable(f"policy server {self.client.address}: {e.code().name}: {e.details()}") from None
            raise ValueError(f"policy server {self.client.address} refused the call: {e.code().name}: {e.details()}") from None
        start = out.start
        return CallResult(out.action_pred[:, start:].numpy().astype(np.float64), out.action_pred_normalized.numpy(),
                          out.iterations, out.nfe, out.converged, False, out.round_trip_ms, out.encoder_ms,
                          network_ms=out.network_ms, queue_ms=out.queue_ms)
