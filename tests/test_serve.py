"""The policy service over real gRPC on localhost: remote chunks equal local ones, concurrent
requests share a batch without changing any row, and a client can neither get in without the
token nor hurt the server with bad input (each refusal names the field, and the server keeps
serving). TLS and mutual TLS with certificates made here."""

import ast
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_policy
from paradiffpolicy import SamplerConfig
from paradiffpolicy.remote import policy_service_pb2 as pb
from paradiffpolicy.remote.client import RemotePolicy, read_token
from paradiffpolicy.remote.server import PolicyServer, ServerLimits, TlsFiles
from paradiffpolicy.remote.wire import WireError, decode, encode
from paradiffpolicy.sampling.prefix import ActionPrefix

TOKEN = "s3cret-token"
SAMPLERS = {"default": SamplerConfig(name="picard", window=4, tol=0.01), "sequential": SamplerConfig(name="sequential")}


def obs_rows(bsz, seed=0):
    return {"observation.state": torch.rand(bsz, 2, 5, generator=torch.Generator().manual_seed(seed)).numpy()}


@pytest.fixture
def served():
    """A tiny policy served on a free localhost port with a token; (policy, server, client)."""
    policy = tiny_policy()
    server = PolicyServer(policy, SAMPLERS, ServerLimits(max_rows=4, max_batch=8, max_wait_ms=50, max_message_bytes=1 << 20),
                          token=TOKEN)
    port = server.start()
    client = RemotePolicy(f"127.0.0.1:{port}", token=TOKEN)
    yield policy, server, client
    client.close()
    server.stop(1)


def test_a_remote_chunk_is_the_local_chunk(served):
    policy, _, client = served
    obs = obs_rows(2)
    local_obs = {k: torch.from_numpy(v) for k, v in obs.items()}
    for sampler in ("", "sequential"):
        local_sampler = policy.make_sampler(SAMPLERS[sampler or "default"])
        noise = policy.draw_noise(2, torch.Generator().manual_seed(7), local_sampler)
        remote = client.predict(obs, noise=noise, sampler=sampler)
        local = policy.predict_action(local_obs, noise=noise, sampler=local_sampler)
        assert torch.equal(remote.action_pred, local.action_pred)
        assert remote.iterations == [int(i) for i in local.stats.iterations]
        # a seed: the server draws the noise as draw_noise does from that seed
        seeded = client.predict(obs, seed=11, sampler=sampler)
        again = policy.predict_action(local_obs, noise=policy.draw_noise(2, torch.Generator().manual_seed(11), local_sampler),
                                      sampler=local_sampler)
        assert torch.equal(seeded.action_pred, again.action_pred)
    # the committed prefix travels too
    prefix = ActionPrefix(torch.full((2, 16, 2), 0.3), torch.cat([torch.ones(2, 4), torch.zeros(2, 12)], 1), "x0")
    noise = policy.draw_noise(2, torch.Generator().manual_seed(3))
    remote = client.predict(obs, noise=noise, prefix=prefix)
    local = policy.predict_action(local_obs, noise=noise, prefix=prefix, sampler=policy.make_sampler(SAMPLERS["default"]))
    assert torch.equal(remote.action_pred_normalized, local.action_pred_normalized)
    assert remote.compute_ms > 0 and remote.round_trip_ms >= remote.compute_ms and remote.network_ms >= 0
    info = client.info()
    assert [f.name for f in info.features] == ["observation.state"] and info.horizon == 16 and not info.prefix_input
    assert {s.name for s in info.samplers} == {"default", "sequential"} and client.config == policy.config


def test_concurrent_requests_share_a_batch_and_each_row_is_its_own(served):
    policy, server, client = served
    noises = [policy.draw_noise(1, torch.Generator().manual_seed(i)) for i in range(6)]
    alone = [client.predict(obs_rows(1, i), noise=noises[i]) for i in range(6)]
    assert all(a.batch_rows == 1 for a in alone)
    barrier = threading.Barrier(6)

    def call(i):
        barrier.wait()
        return client.predict(obs_rows(1, i), noise=noises[i])

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(call, range(6)))
    assert max(t.batch_rows for t in together) > 1  # they shared network calls
    for a, t in zip(alone, together):
        # Picard rows converge independently; only float rounding differs between batch sizes
        assert (a.action_pred_normalized - t.action_pred_normalized).abs().max() < 1e-5
    stats = client.stats()
    assert stats.answered == 12 and stats.batches < 12 and stats.batch_rows_max > 1 and stats.refused == 0


def _status(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_every_call_needs_the_token_checked_before_decoding(served):
    _, server, client = served
    port = server.port
    for token in (None, "wrong", TOKEN + "x"):
        with RemotePolicy(f"127.0.0.1:{port}", token=token or "") as other:
            code, details = _status(lambda: other.predict(obs_rows(1), seed=0))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
            assert _status(other.info)[0] == grpc.StatusCode.UNAUTHENTICATED
    # bytes that are no protobuf at all: refused for the token, never parsed
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    raw = channel.unary_unary("/paradiffpolicy.v1.PolicyService/Predict")
    assert _status(lambda: raw(b"\x80\x04\x95 not a protobuf", timeout=5))[0] == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    # the health service answers without a token
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="paradiffpolicy.v1.PolicyService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert client.stats().refused == 7
    assert client.predict(obs_rows(1), seed=0).action_pred.shape == (1, 16, 2)  # still serving


def _request(client, **changes):
    req = client.request(obs_rows(1), seed=0)
    for key, value in changes.items():
        if key == "obs":
            req.ClearField("observation")
            for k, v in value.items():
                req.observation[k].CopyFrom(v)
        else:
            getattr(req, key).CopyFrom(value)
    return req


@pytest.mark.parametrize("case,code,named", [
    ("feature name", grpc.StatusCode.INVALID_ARGUMENT, "unknown ['observation.wrong']"),
    ("shape", grpc.StatusCode.INVALID_ARGUMENT, "(1, 2, 4)"),
    ("dtype", grpc.StatusCode.INVALID_ARGUMENT, "dtype 'complex64'"),
    ("bytes", grpc.StatusCode.INVALID_ARGUMENT, "observation['observation.state']: 7 bytes"),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("rows", grpc.StatusCode.RESOURCE_EXHAUSTED, "max_rows=4"),
    ("noise shape", grpc.StatusCode.INVALID_ARGUMENT, "noise.initial"),
    ("noise inf", grpc.StatusCode.INVALID_ARGUMENT, "noise.steps: contains NaN or inf"),
    ("prefix weights", grpc.StatusCode.INVALID_ARGUMENT, "prefix: prefix weights must lie in [0, 1]"),
    ("prefix trained", grpc.StatusCode.INVALID_ARGUMENT, "prefix.mode: trained needs"),
    ("sampler", grpc.StatusCode.INVALID_ARGUMENT, "sampler 'ddim99' is not served"),
    ("oversized", grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_input_gets_its_status_naming_the_field_and_the_server_goes_on(served, case, code, named):
    policy, _, client = served
    state = obs_rows(1)["observation.state"]
    good_noise = policy.draw_noise(1, torch.Generator().manual_seed(0))
    requests = {
        "feature name": lambda: _request(client, obs={"observation.wrong": encode(state)}),
        "shape": lambda: _request(client, obs={"observation.state": encode(state[..., :4])}),
        "dtype": lambda: _request(client, obs={"observation.state": pb.Tensor(dtype="complex64", shape=[1, 2, 5], data=b"\0" * 80)}),
        "bytes": lambda: _request(client, obs={"observation.state": pb.Tensor(dtype="float32", shape=[1, 2, 5], data=b"\0" * 7)}),
        "nan": lambda: _request(client, obs={"observation.state": encode(np.where(np.arange(10).reshape(1, 2, 5) == 3, np.nan, state))}),
        "rows": lambda: client.request(obs_rows(5), seed=0),
        "noise shape": lambda: client.request(obs_rows(1), noise=policy.draw_noise(2)),
        "noise inf": lambda: client.request(obs_rows(1), noise=type(good_noise)(good_noise.initial, good_noise.steps.index_fill(0, torch.tensor([2]), float("inf")))),
        "prefix weights": lambda: _request(client, prefix=pb.ActionPrefix(target=encode(np.zeros((1, 16, 2), np.float32)),
                                                                           weights=encode(np.full((1, 16), 2.0, np.float32)), mode="x0")),
        "prefix trained": lambda: _request(client, prefix=pb.ActionPrefix(target=encode(np.zeros((1, 16, 2), np.float32)),
                                                                           weights=encode(np.ones((1, 16), np.float32)), mode="trained")),
        "sampler": lambda: client.request(obs_rows(1), seed=0, sampler="ddim99"),
        "oversized": lambda: _request(client, obs={"observation.state": pb.Tensor(dtype="uint8", shape=[2 << 20], data=b"\0" * (2 << 20))}),
    }
    req = requests[case]()
    got, details = _status(lambda: client._stub.Predict(req, timeout=10, metadata=client._metadata))
    assert got == code and named in details
    assert client.predict(obs_rows(1), seed=0).action_pred.shape == (1, 16, 2)  # everyone else is still served
    stats = client.stats()
    assert stats.answered == 1 and (stats.refused == 1 or case == "oversized")  # gRPC itself refuses an oversized message


def test_a_call_past_its_deadline_or_abandoned_costs_nothing_and_is_counted():
    """Calls queued behind full batches: one whose deadline passes and one its client cancels are
    dropped before they cost compute, and counted as expired."""
    policy = tiny_policy(steps=100)
    server = PolicyServer(policy, {"default": SamplerConfig(name="sequential")}, ServerLimits(max_rows=16, max_batch=16, max_wait_ms=0))
    port = server.start()
    try:
        with RemotePolicy(f"127.0.0.1:{port}") as client:
            full = [client._stub.Predict.future(client.request(obs_rows(16), seed=i), timeout=60) for i in range(4)]
            time.sleep(0.3)  # the first full batch is running, the others queued
            expired = client._stub.Predict.future(client.request(obs_rows(1), seed=9), timeout=0.05)
            gone = client._stub.Predict.future(client.request(obs_rows(1), seed=10), timeout=60)
            gone.cancel()  # the client went away mid-call
            assert _status(expired.result)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
            assert all(f.result().action_pred.shape[0] == 16 for f in full)
            after = client.predict(obs_rows(1), seed=11)  # the server goes on
            assert after.action_pred.shape == (1, 16, 2)
            stats = client.stats()
            # four full batches and the last call: the expired and the cancelled rows were never computed
            assert stats.answered == 5 and stats.rows == 4 * 16 + 1 and stats.expired >= 1
    finally:
        server.stop(1)


def test_a_public_address_needs_tls_and_a_token():
    with pytest.raises(ValueError, match="needs TLS .* and a token"):
        PolicyServer(tiny_policy(), host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="allow_insecure"):
        PolicyServer(tiny_policy(), host="0.0.0.0", port=0, token=TOKEN)


def test_tls_and_mutual_tls(tmp_path):
    from paradiffpolicy.remote.certificates import make_certificates

    files = make_certificates(tmp_path)
    ca, cert, key, ccert, ckey = files.ca, files.server_cert, files.server_key, files.client_cert, files.client_key
    for mutual in (False, True):
        tls = TlsFiles(str(cert), str(key), str(ca) if mutual else "")
        server = PolicyServer(tiny_policy(), tls=tls, token=TOKEN, host="localhost")
        port = server.start()
        try:
            with RemotePolicy(f"localhost:{port}", token=TOKEN, tls_ca=str(ca), tls_cert=str(ccert), tls_key=str(ckey)) as client:
                assert client.predict(obs_rows(1), seed=0).action_pred.shape == (1, 16, 2)
            with RemotePolicy(f"localhost:{port}", token=TOKEN) as plain:  # no TLS: no connection
                assert _status(lambda: plain.predict(obs_rows(1), seed=0, timeout_s=3))[0] == grpc.StatusCode.UNAVAILABLE
            if mutual:  # TLS without a client certificate: refused by the handshake
                with RemotePolicy(f"localhost:{port}", token=TOKEN, tls_ca=str(ca)) as anonymous:
                    assert _status(lambda: anonymous.predict(obs_rows(1), seed=0, timeout_s=3))[0] == grpc.StatusCode.UNAVAILABLE
        finally:
            server.stop(1)


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PARADIFFPOLICY_TOKEN", raising=False)
    assert read_token() is None
    monkeypatch.setenv("PARADIFFPOLICY_TOKEN", "from-env")
    assert read_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(str(tmp_path / "token")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(str(tmp_path / "empty"))
    from paradiffpolicy.serve import ServeConfig
    assert "token" not in ServeConfig.__dataclass_fields__  # never a command-line value


def test_wire_tensors_are_checked():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(decode(encode(a), "x"), a)
    assert encode(a).data == a.astype("<f4").tobytes()  # little-endian raw bytes
    for msg, problem in ((pb.Tensor(dtype="object", shape=[1], data=b"x"), "dtype"),
                         (pb.Tensor(dtype="float32", shape=[-1], data=b""), "non-negative"),
                         (pb.Tensor(dtype="float32", shape=[1] * 7, data=b"\0" * 4), "at most 6"),
                         (pb.Tensor(dtype="float32", shape=[1 << 20, 1 << 20], data=b""), "elements")):
        with pytest.raises(WireError, match=problem):
            decode(msg, "field")


def test_no_pickle_in_the_server_or_on_the_wire():
    """The service's modules import no pickle-based serialiser and call no unpickling loader."""
    banned_modules = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    banned_calls = {"load", "loads"}
    files = sorted((ROOT / "paradiffpolicy" / "remote").glob("*.py")) + [ROOT / "paradiffpolicy" / "serve.py"]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name.split(".")[0] for a in node.names] + ([node.module.split(".")[0]] if getattr(node, "module", None) else [])
                assert not banned_modules & set(names), f"{path.name} imports {names}"
            if isinstance(node, ast.Attribute) and node.attr in banned_calls and isinstance(node.value, ast.Name):
                assert node.value.id not in {"torch", "pickle", "np", "numpy"}, f"{path.name} calls {node.value.id}.{node.attr}"


def test_the_generated_modules_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    proto = "paradiffpolicy/remote/policy_service.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto],
                   cwd=ROOT, check=True)
    for name in ("policy_service_pb2.py", "policy_service_pb2_grpc.py"):
        fresh = (tmp_path / "paradiffpolicy" / "remote" / name).read_text()
        assert fresh == (ROOT / "paradiffpolicy" / "remote" / name).read_text(), f"{name} is stale: run scripts/gen_proto.sh"
