"""Exponential moving average of the trainable weights (saved separately as ``ema.safetensors``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


def warmup_decay(decay: float, step: int) -> float:
    """``min(decay, (1 + step) / (10 + step))``: the EMA's decay at optimiser step ``step`` with warm-up.

    Without warm-up an EMA of decay 0.999 still holds ``0.999^N`` of the random initial weights after N steps (48 %
    after 727 steps), which ruins the EMA weights of short runs; with it the average forgets the start quickly and
    reaches ``decay`` after ``~10 / (1 - decay)`` steps."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


class EMA:
    """``ema = d * ema + (1 - d) * param`` in fp32 on the parameters' device (sharded params stay sharded), with
    ``d = decay`` or, when ``warmup`` is on, :func:`warmup_decay` of the step (a function of the step alone, so a
    resumed run continues the same schedule)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = float(decay), bool(warmup)
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> None:
        """Blend in the current weights; ``step``: the optimiser step just taken (needed for the warm-up)."""
        d = warmup_decay(self.decay, step) if self.warmup and step is not None else self.decay
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in self.shadow.items():
            if n not in state:
                raise KeyError(f"EMA state misses {n}")
            src = state[n]
            if hasattr(t, "device_mesh"):  # DTensor shard: take our piece of the full tensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(t.device).float(), t.device_mesh, t.placements)
            t.copy_(src)
