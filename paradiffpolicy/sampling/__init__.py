"""Samplers: the sequential reference and the Picard sampler, sharing pre-drawn noise."""

from paradiffpolicy.sampling.base import Denoiser, SampleStats, SamplerNoise, SamplerOutput, Trajectory, WarmStart, draw_noise
from paradiffpolicy.sampling.picard import PicardSampler
from paradiffpolicy.sampling.sequential import SequentialSampler

__all__ = ["Denoiser", "make_sampler", "PicardSampler", "SampleStats", "SamplerNoise", "SamplerOutput", "SequentialSampler",
           "Trajectory", "WarmStart", "draw_noise"]


def make_sampler(scheduler, sampler, fixed_shape: bool = False):
    """Build a sampler from the policy's training ``SchedulerConfig`` and a ``SamplerConfig``.

    The sampler may switch the inference scheduler (``sampler.scheduler``) and step count
    (``sampler.num_inference_steps``); the noise schedule, prediction type and clipping stay the
    training ones. ``fixed_shape``: Picard calls the network at one input shape (for a compiled
    graph; see :class:`PicardSampler`).
    """
    import dataclasses

    from paradiffpolicy.schedulers import make_step_table

    if sampler.name == "tuned":
        raise ValueError("sampler.name='tuned' stands for a checkpoint's tuned preset: load it with "
                         "load_policy(path, sampler='tuned') (eval: sampler=tuned)")
    overrides = {}
    if sampler.scheduler is not None:
        overrides["name"] = sampler.scheduler
        if sampler.scheduler != scheduler.name:
            overrides["timestep_spacing"] = None  # that scheduler's diffusers default
    if sampler.num_inference_steps is not None:
        overrides["num_inference_steps"] = sampler.num_inference_steps
    table = make_step_table(dataclasses.replace(scheduler, **overrides))
    if sampler.name == "sequential":
        return SequentialSampler(table)
    return PicardSampler(table, sampler, fixed_shape=fixed_shape)
