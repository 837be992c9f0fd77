"""The denoiser as a traced TorchScript graph: same numbers, less Python per network call.

A batch-1 call of the small Diffusion Policy U-Net on a CPU spends much of its time in Python
(module calls, FiLM reshapes); a traced graph removes most of that, with bitwise-equal outputs. It
helps the sequential sampler (many batch-1 calls) more than Picard (few batched calls), so a
speed-up is only honest against a sequential sampler on the same backend
(``python -m paradiffpolicy.bench.sampler backends=[eager,jit]``; measurements in ``benchmarks/README.md``).

The traced graph shares the module's parameters (in-place updates and ``load_state_dict`` are
seen); it is rebuilt per device because tracing records the device of tensors created inside
``forward``. TorchScript is deprecated upstream in favour of ``torch.compile`` (``models/compiled.py``),
which on CPUs costs tens of seconds of compilation per input shape; this backend is opt-in
(``sampler.backend=jit``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from paradiffpolicy.models.unet1d import zero_prefix


def prefix_inputs(takes_prefix: bool, sample: Tensor, prefix: Tensor | None) -> tuple[Tensor, ...]:
    """The prefix argument of a graph of a network with ``takes_prefix`` (zeros: nothing committed;
    one graph serves both), or none for a network without; ``ValueError`` for a prefix it cannot take."""
    if not takes_prefix:
        if prefix is not None:
            raise ValueError("this network has no prefix input (prefix_input=False); it cannot take committed actions")
        return ()
    return (zero_prefix(sample) if prefix is None else prefix,)


class TracedDenoiser:
    """``Denoiser`` (see ``sampling.base``) backed by a trace of ``model`` (a ConditionalUnet1D or
    any module with its call signature and a global condition); traced on the first call."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix_input = bool(getattr(model, "prefix_input", False))
        self._graph: torch.jit.ScriptModule | None = None
        self._device: torch.device | None = None

    @property
    def ready(self) -> bool:
        """Whether the graph is traced (the first call traces it; ``policy.warm_up`` makes that call)."""
        return self._graph is not None

    def __call__(self, sample: Tensor, timestep: Tensor, global_cond: Tensor | None = None,
                 prefix: Tensor | None = None) -> Tensor:
        if global_cond is None:
            raise ValueError("the jit backend needs a global condition (observations); use backend=eager without one")
        inputs = (sample, timestep.expand(sample.shape[0]), global_cond, *prefix_inputs(self.prefix_input, sample, prefix))
        if self._graph is None or self._device != sample.device:
            self._graph = self._trace(inputs)
            self._device = sample.device
        return self._graph(*inputs)

    def _trace(self, inputs: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
        example = tuple(x[:1] for x in inputs)
        with warnings.catch_warnings(), torch.no_grad():
            # the U-Net has no data-dependent control flow; the tracer's warnings concern shape
            # checks inside torch.nn.functional that hold for every batch size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.trace(self.model, example, check_trace=False)
