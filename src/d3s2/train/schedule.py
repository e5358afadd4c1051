"""Learning rate: linear warm-up, then constant or cosine decay, scaled by the current phase's LR (Table 1)."""

from __future__ import annotations

import math

from d3s2.train.config import TrainConfig

__all__ = ["lr_at"]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for 0-based ``step``: ``phase_lr * warmup(step) * decay(step)``.

    Warm-up ramps linearly over the first ``warmup_steps`` steps of the run; cosine decay spans the whole run
    (``max_steps``) down to ``min_lr_ratio`` of the phase LR, so a phase change only swaps the base LR (Table 1 lowers
    it at 512^3 and 1024^3).
    """
    _, phase = cfg.phase_at(step)
    base = cfg.optim.lr if phase.lr is None else phase.lr
    s = cfg.schedule
    factor = 1.0
    if s.warmup_steps > 0 and step < s.warmup_steps:
        factor = (step + 1) / s.warmup_steps
    if s.decay == "cosine":
        span = max(1, cfg.total_steps - s.warmup_steps)
        progress = min(1.0, max(0.0, (step - s.warmup_steps) / span))
        factor *= s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * factor
