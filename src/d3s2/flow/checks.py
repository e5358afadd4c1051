"""Range checks of the sampler settings (issue 22, case 4), shared by :class:`~d3s2.flow.sampler.SamplerConfig` and
the pipeline's per-call overrides (:mod:`d3s2.pipelines.validation`).

The bounds are sanity limits, far outside anything useful: the release samples 50 / 30 / 15 steps at CFG 7 and shift
6 / 6 / 8; 1000 steps is the training grid's resolution (``t_scale``), more cannot add information and only cost hours.
A NaN or infinite scale would be sampled silently into a NaN latent (and reported as an empty shape much later).
"""

from __future__ import annotations

import math
from typing import Any

from d3s2.errors import D3S2Error

__all__ = ["MAX_STEPS", "MAX_CFG", "MAX_SHIFT", "check_steps", "check_cfg", "check_shift"]

MAX_STEPS = 1000
MAX_CFG = 100.0
MAX_SHIFT = 100.0


def check_steps(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS:
        raise D3S2Error(f"{name} must be a whole number of sampling steps in [1, {MAX_STEPS}], got {value!r}")
    return value


def _number(value: Any, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise D3S2Error(f"{name} must be a finite number ({what}), got {value!r}")
    return float(value)


def check_cfg(value: Any, name: str) -> float:
    v = _number(value, name, f"guidance scale in [0, {MAX_CFG:g}]; the release uses 7")
    if not 0.0 <= v <= MAX_CFG:
        raise D3S2Error(f"{name} must be a guidance scale in [0, {MAX_CFG:g}] (the release uses 7), got {value!r}")
    return v


def check_shift(value: Any, name: str) -> float:
    v = _number(value, name, f"timestep shift in (0, {MAX_SHIFT:g}]; the release uses 6 or 8")
    if not 0.0 < v <= MAX_SHIFT:
        raise D3S2Error(f"{name} must be a timestep shift in (0, {MAX_SHIFT:g}] (the release uses 6 or 8), "
                        f"got {value!r}")
    return v
