"""The denoiser as a traced TorchScript graph: same numbers, less Python per network call.

On a CPU the small Diffusion Policy U-Net spends much of a batch-1 call in Python (module calls,
FiLM reshapes); a traced graph removes most of it. Lift checkpoint, 2-core CPU, 2 threads: batch 1
10.9 → 5.9 ms, batch 8 24.7 → 20.3 ms; outputs bitwise equal. It helps the sequential sampler (many
batch-1 calls) more than Picard (few batched calls), so benchmarks report Picard against both
(``scripts/bench_sampler.py backends=[eager,jit]``).

The traced graph shares the module's parameters (in-place updates and ``load_state_dict`` are
seen); it is rebuilt per device because tracing records the device of tensors created inside
``forward``. TorchScript is deprecated upstream in favour of ``torch.compile``, which on this CPU
costs 30-40 s of compilation per input shape and gains nothing over the trace (inductor, default
mode, Lift U-Net, 2 threads: batch 1 6.6 vs 5.7 ms, batch 8 17.3 vs 17.3 ms, batch 16 25.0 vs
25.7 ms); this backend is opt-in (``sampler.backend=jit``).

Tried and not offered: splitting a batched call into slices run on inter-op threads
(``torch.jit.fork``): batch 8 as two forked slices of 4 takes 16.8 ms at 1 intra-op thread, but
inside the full sampler it was no faster than 2 intra-op threads (330 vs 318 ms per Lift chunk).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


class TracedDenoiser:
    """``Denoiser`` (see ``sampling.base``) backed by a trace of ``model`` (a ConditionalUnet1D or
    any module with its call signature and a global condition); traced on the first call."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._graph: torch.jit.ScriptModule | None = None
        self._device: torch.device | None = None

    def __call__(self, sample: Tensor, timestep: Tensor, global_cond: Tensor | None = None) -> Tensor:
        if global_cond is None:
            raise ValueError("the jit backend needs a global condition (observations); use backend=eager without one")
        if self._graph is None or self._device != sample.device:
            self._graph = self._trace(sample, timestep, global_cond)
            self._device = sample.device
        return self._graph(sample, timestep.expand(sample.shape[0]), global_cond)

    def _trace(self, sample: Tensor, timestep: Tensor, global_cond: Tensor) -> torch.jit.ScriptModule:
        example = (sample[:1], timestep.expand(sample.shape[0])[:1], global_cond[:1])
        with warnings.catch_warnings(), torch.no_grad():
            # the U-Net has no data-dependent control flow; the tracer's warnings concern shape
            # checks inside torch.nn.functional that hold for every batch size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.trace(self.model, example, check_trace=False)
