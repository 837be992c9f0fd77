"""paradiffpolicy: exact parallel (Picard) sampling for diffusion robot policies."""

__version__ = "0.1.0"

from paradiffpolicy.checkpoint import CheckpointError, load_policy, save_policy  # noqa: E402
from paradiffpolicy.config import PolicyConfig, SamplerConfig  # noqa: E402
from paradiffpolicy.control.join import JoinConfig  # noqa: E402
from paradiffpolicy.control.runner import PolicyRunner  # noqa: E402
from paradiffpolicy.policy import DiffusionPolicy, PolicyOutput  # noqa: E402
from paradiffpolicy.sampling import (  # noqa: E402
    PicardSampler, SampleStats, SamplerNoise, SamplerOutput, SequentialSampler, Trajectory, draw_noise, make_sampler,
)
from paradiffpolicy.sampling.prefix import ActionPrefix  # noqa: E402
from paradiffpolicy.schedulers import SchedulerConfig, make_step_table  # noqa: E402

__all__ = [
    "ActionPrefix", "CheckpointError", "DiffusionPolicy", "JoinConfig", "PicardSampler", "PolicyConfig", "PolicyOutput", "PolicyRunner", "SampleStats",
    "SamplerConfig", "SamplerNoise", "SamplerOutput", "SchedulerConfig", "SequentialSampler", "Trajectory", "draw_noise",
    "load_policy", "make_sampler", "make_step_table", "save_policy",
]
