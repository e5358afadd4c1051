"""Rectified flow: training objective (Eq. 10-11) and the Euler sampler with CFG and timestep shift (paper Sec. 4.3)."""

from d3s2.flow.rectified import (
    FlowConfig,
    add_noise,
    drop_condition,
    flow_matching_loss,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)
from d3s2.flow.sampler import EulerSampler, SamplerConfig, cfg_combine, euler_timesteps, sample_euler

__all__ = [
    "FlowConfig",
    "add_noise",
    "drop_condition",
    "flow_matching_loss",
    "sample_timesteps",
    "shift_timesteps",
    "velocity_target",
    "EulerSampler",
    "SamplerConfig",
    "cfg_combine",
    "euler_timesteps",
    "sample_euler",
]
