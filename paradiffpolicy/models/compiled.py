"""The denoiser through ``torch.compile``: CUDA graphs on a GPU, inductor kernels on a CPU.

On a GPU a call of the small Diffusion Policy U-Net is bound by kernel launches (dozens of small
kernels per call), which replaying a captured CUDA graph (``mode="reduce-overhead"``) removes.
Graphs need fixed input shapes: the Picard sampler runs every call at (batch x window) rows with
this backend (``PicardSampler(fixed_shape=True)``), so one graph per sampler is captured, on the
first call (compilation takes tens of seconds; warm up before a control loop starts).

On a CPU it compiles with inductor's default mode, which has not beaten the traced graph
(``backend=jit``) on the CPUs measured (``benchmarks/README.md``). Outputs match eager to ~1e-6
(kernels reorder float sums), not bitwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paradiffpolicy.models.jit import prefix_inputs


class CompiledDenoiser:
    """``Denoiser`` (see ``sampling.base``) backed by ``torch.compile(model)``, compiled lazily per
    device and input shape (``dynamic=False``: shapes are fixed by the samplers)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix_input = bool(getattr(model, "prefix_input", False))
        self._compiled = None
        self._cuda = False

    def __call__(self, sample: Tensor, timestep: Tensor, global_cond: Tensor | None = None,
                 prefix: Tensor | None = None) -> Tensor:
        if self._compiled is None or self._cuda != sample.is_cuda:  # CUDA graphs only where they exist
            self._cuda = sample.is_cuda
            mode = "reduce-overhead" if self._cuda else "default"
            self._compiled = torch.compile(self.model, mode=mode, dynamic=False)
        timestep = timestep.expand(sample.shape[0])  # one shape whether a step is shared or per row
        extra = prefix_inputs(self.prefix_input, sample, prefix)  # one graph with and without a prefix
        if not self._cuda:
            return self._compiled(sample, timestep, global_cond, *extra)
        # a replayed graph writes into the same output buffer every time: mark the step and copy
        # the result out so a caller may keep it across calls
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(sample, timestep, global_cond, *extra).clone()
