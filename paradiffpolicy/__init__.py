"""paradiffpolicy: exact parallel (Picard) sampling for diffusion robot policies."""

__version__ = "0.1.0"

from paradiffpolicy.checkpoint import CheckpointError, load_policy, save_policy  # noqa: E402
from paradiffpolicy.config import PolicyConfig, SamplerConfig  # noqa: E402
from paradiffpolicy.policy import DiffusionPolicy  # noqa: E402
from paradiffpolicy.sampling import PicardSampler, SampleStats, SamplerNoise, SequentialSampler, draw_noise, make_sampler  # noqa: E402
from paradiffpolicy.schedulers import SchedulerConfig, make_step_table  # noqa: E402

__all__ = [
    "CheckpointError", "DiffusionPolicy", "PicardSampler", "PolicyConfig", "SampleStats", "SamplerConfig",
    "SamplerNoise", "SchedulerConfig", "SequentialSampler", "draw_noise", "load_policy", "make_sampler",
    "make_step_table", "save_policy",
]
