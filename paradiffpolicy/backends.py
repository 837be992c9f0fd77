"""How a policy's networks run: a load-time choice, separate from the sampling algorithm.

``eager``        PyTorch modules as they are.
``jit``          a traced TorchScript graph of the U-Net (same numbers, less Python per call;
                 ``models/jit.py``).
``compile``      ``torch.compile`` of the U-Net (CUDA graphs on a GPU; ``models/compiled.py``).
``onnxruntime``  the U-Net and the observation encoder exported once to ONNX and run by ONNX
                 Runtime's CPU provider (``pip install -e ".[onnxruntime]"``).
``openvino``     the same ONNX graphs compiled by OpenVINO for the CPU, float32
                 (``pip install -e ".[openvino]"``).
``openvino-bf16`` OpenVINO computing in bfloat16 (inputs and outputs stay float32), only on
                 CPUs with bfloat16 instructions (AVX512-BF16 or AMX). A measured option, not a
                 default: cheaper calls, but each output moves by ~1e-2 (3 significant digits),
                 so samples are no longer float32's (``benchmarks/results/cpu-2core-xeon/``).

On a small CPU a batch-1 U-Net call in PyTorch spends most of its time outside the arithmetic; the
exported runtimes do not (``benchmarks/results/backend-cost-*.md``). ONNX Runtime's CPU kernels
scale poorly with batch, so it suits sequential samplers; OpenVINO also keeps batched Picard
windows cheap. Exported graphs take the batch size as a dynamic axis (Picard's shrinking windows,
vectorised eval), hold a copy of the weights taken at export, and are cached on disk keyed by the
weights, the input shapes, the runtime and its version (``PARADIFFPOLICY_CACHE``, default
``~/.cache/paradiffpolicy``). Outputs agree with eager to a few 1e-6 per call (float sums in
another order), so a sampler's fixed point is that backend's own sequential sample. On
``openvino-bf16`` only to bf16's rounding: an input that differs in its last float32 bits can
round to another bf16 value (a few 1e-3 on a sample, ``tests/test_backends.py``).

Exported networks are not differentiable: a join that needs gradients through the network
(``join.method=guided``) needs ``eager`` or ``jit``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from paradiffpolicy.models.jit import prefix_inputs

BACKENDS = ("eager", "jit", "compile", "onnxruntime", "openvino", "openvino-bf16")
EXPORTED = ("onnxruntime", "openvino", "openvino-bf16")
FLOAT32 = tuple(b for b in BACKENDS if b != "openvino-bf16")  # the backends that keep float32's numbers
ONNX_OPSET = 17
# the package that runs each exported backend (and names its extra)
RUNTIME = {"onnxruntime": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}


def check_backend(backend: str, key: str = "backend") -> str:
    """``backend`` if known and importable here; ``ValueError`` naming ``key`` and, for an
    exported runtime that is not installed, the extra that installs it."""
    if backend not in BACKENDS:
        raise ValueError(f"{key}={backend!r} is unknown; expected one of {BACKENDS}")
    if backend in EXPORTED:
        for module in ("onnx", RUNTIME[backend]):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(f"{key}={backend!r} needs the {module!r} package: pip install -e \".[{RUNTIME[backend]}]\"") from None
    if backend == "openvino-bf16" and "BF16" not in openvino_capabilities():
        raise ValueError(f"{key}={backend!r} needs a CPU with bfloat16 instructions (AVX512-BF16 or AMX); OpenVINO finds "
                         f"{list(openvino_capabilities())} on this one: use {key}='openvino'")
    return backend


@lru_cache(maxsize=None)
def openvino_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can compute on this processor (e.g. ``FP32``, ``BF16``)."""
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def available_backends() -> list[str]:
    """The backends this installation can run (the exported ones only with their runtime)."""
    out = []
    for b in BACKENDS:
        try:
            out.append(check_backend(b))
        except ValueError:
            pass
    return out


def fastest_float32(device: str = "cpu") -> tuple[str, str]:
    """The fastest float32 backend installed here for a closed loop, and why, from
    ``benchmarks/results/backend-cost-*.md`` (both 2-core CPUs measured): ``openvino`` where it is
    installed (the cheapest batch-1 and batched U-Net calls); else ``jit`` (ONNX Runtime's CPU kernels
    scale poorly with Picard's batched windows). On a GPU ``jit``: the exported runtimes here are CPU ones."""
    if str(device).startswith("cuda"):
        return "jit", "on a GPU: the exported runtimes here run on the CPU"
    if "openvino" in available_backends():
        return "openvino", "installed, the fastest float32 backend measured on CPU (backend-cost-*.md)"
    return "jit", "openvino is not installed (pip install -e \".[openvino]\"); jit is the fastest without it"


def runtime_version(backend: str) -> str:
    """The version of the package that runs ``backend`` (torch for the PyTorch backends)."""
    return importlib.metadata.version(RUNTIME.get(backend, "torch"))


def cache_dir() -> Path:
    return Path(os.environ.get("PARADIFFPOLICY_CACHE", Path.home() / ".cache" / "paradiffpolicy"))


def export_onnx(module: nn.Module, example: tuple[Tensor, ...], names: list[str], tag: str) -> Path:
    """``module`` exported to ONNX with a dynamic batch axis (dim 0 of every input and the output),
    or the cached file of an earlier export of the same weights and input shapes."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr([(n, tuple(x.shape[1:]), str(x.dtype)) for n, x in zip(names, example)]).encode())
    h.update(f"{torch.__version__} opset{ONNX_OPSET}".encode())
    path = cache_dir() / "onnx" / f"{tag}-{h.hexdigest()[:20]}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    axes = {n: {0: "batch"} for n in [*names, "out"]}
    training = module.training
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks that hold for every batch size
            torch.onnx.export(module.eval(), example, str(tmp), input_names=names, output_names=["out"],
                              dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    finally:
        module.train(training)
    tmp.replace(path)  # atomic: a concurrent export of the same key writes the same bytes
    return path


def load_runtime(path: Path, backend: str, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A function ``feeds -> output`` running the ONNX graph at ``path`` on ``backend``'s CPU
    runtime with ``threads`` intra-op threads; float32 in and out, computed in float32 except on
    ``openvino-bf16``."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)[0]
    if RUNTIME.get(backend) == "openvino":
        import openvino as ov

        core = ov.Core()
        # f32 explicitly for `openvino`: on CPUs with bf16 units OpenVINO would otherwise lower the precision
        precision = "bf16" if backend == "openvino-bf16" else "f32"
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return lambda feeds: request.infer(feeds)[0].copy()  # the request reuses its output buffer
    raise ValueError(f"backend={backend!r} is not an exported runtime; expected one of {EXPORTED}")


class ExportedDenoiser:
    """``Denoiser`` (see ``sampling.base``) backed by the U-Net exported to ONNX and run by
    ``backend``; float32 in and out, on the CPU."""

    differentiable = False

    def __init__(self, model: nn.Module, backend: str, horizon: int, action_dim: int, cond_dim: int, threads: int):
        self.prefix_input = bool(getattr(model, "prefix_input", False))
        sample = torch.zeros(1, horizon, action_dim)
        example = (sample, torch.zeros(1, dtype=torch.int64), torch.zeros(1, cond_dim), *prefix_inputs(self.prefix_input, sample, None))
        self.names = ["sample", "timestep", "global_cond", "prefix"][: len(example)]
        self.backend = backend
        self.threads = threads
        self._run = load_runtime(export_onnx(model, example, self.names, "unet"), backend, threads)

    def __call__(self, sample: Tensor, timestep: Tensor, global_cond: Tensor | None = None,
                 prefix: Tensor | None = None) -> Tensor:
        if global_cond is None:
            raise ValueError(f"the {self.backend} backend needs a global condition (observations); use backend=eager without one")
        if sample.device.type != "cpu":
            raise ValueError(f"backend={self.backend} runs on the CPU; the policy is on {sample.device}")
        m = sample.shape[0]
        feeds = {"sample": _array(sample), "timestep": _array(timestep.expand(m), np.int64), "global_cond": _array(global_cond)}
        for name, x in zip(self.names[3:], prefix_inputs(self.prefix_input, sample, prefix)):
            feeds[name] = _array(x)
        return torch.from_numpy(self._run(feeds))


class ExportedEncoder:
    """The observation encoder (normalisers and image trunk) exported to ONNX and run by
    ``backend``: ``{feature: (B, To, ...)} -> (B, To·D)``, as ``ObservationEncoder.forward``."""

    def __init__(self, encoder: nn.Module, backend: str, n_obs_steps: int, threads: int):
        self.names = [f.name for f in encoder.features]
        example = tuple(torch.full((1, n_obs_steps, *f.shape), 0.5) for f in encoder.features)
        module = _PositionalEncoder(encoder, self.names)
        self._run = load_runtime(export_onnx(module, example, [f"obs{i}" for i in range(len(self.names))], "encoder"),
                                 backend, threads)

    def __call__(self, obs: dict[str, Tensor]) -> Tensor:
        return torch.from_numpy(self._run({f"obs{i}": _array(obs[n]) for i, n in enumerate(self.names)}))


class _PositionalEncoder(nn.Module):
    """The encoder with its dict input as positional tensors (what an ONNX graph takes)."""

    def __init__(self, encoder: nn.Module, names: list[str]):
        super().__init__()
        self.encoder = encoder
        self.names = names

    def forward(self, *xs: Tensor) -> Tensor:
        return self.encoder(dict(zip(self.names, xs)))


def _array(x: Tensor, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(x.detach().numpy(), dtype=dtype)
