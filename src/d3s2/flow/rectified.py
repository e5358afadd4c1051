"""Rectified flow training objective (paper Sec. 4.3, Eq. 10-11).

Forward process ``x_t = (1 - t) x_0 + t eps`` (Eq. 10), t in [0, 1] (t = 1 is pure noise); the network predicts the
velocity ``v = eps - x_0`` and is trained with the conditional flow-matching loss ``|| v_theta(x_t, c, t) - (eps - x_0) ||^2``
(Eq. 11). The network sees ``t * 1000`` (the authors' release feeds timesteps in 0..1000).

Timestep sampling (the paper does not state it; documented choice):
- ``"logit_normal"`` (default): ``t = sigmoid(n)``, ``n ~ N(mean, std)`` (SD3, Esser et al. 2024 -- the paper's ref. [10];
  mean 0, std 1 puts most samples at mid noise levels, where the velocity is hardest to predict);
- ``"uniform"``: ``t ~ U(0, 1)``.
Either is optionally followed by the timestep shift ``t' = s t / (1 + (s - 1) t)`` (``shift`` > 1 moves mass to high noise,
as the inference schedule does).

Classifier-free guidance training: with probability ``cond_drop_prob`` a sample's condition is replaced by zeros, the
unconditional input of the released models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from d3s2.errors import D3S2Error
from d3s2.flow.latents import batch_size_of, feats_of, per_element_t, replace_feats

__all__ = [
    "FlowConfig",
    "shift_timesteps",
    "sample_timesteps",
    "add_noise",
    "velocity_target",
    "drop_condition",
    "flow_matching_loss",
]


@dataclass
class FlowConfig:
    timestep_sampling: str = "logit_normal"  # "logit_normal" | "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # timestep shift applied to training timesteps (1.0 = none)
    cond_drop_prob: float = 0.1
    t_scale: float = 1000.0  # the model sees t * t_scale

    def __post_init__(self) -> None:
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise D3S2Error(f"timestep_sampling must be 'logit_normal' or 'uniform', got {self.timestep_sampling!r}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise D3S2Error(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.shift <= 0 or self.logit_std <= 0:
            raise D3S2Error("shift and logit_std must be positive")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t' = shift * t / (1 + (shift - 1) * t)``: monotonic, fixes 0 and 1, spends more steps near t = 1 for shift > 1."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    mode: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` training timesteps in (0, 1) (see module docstring)."""
    if mode == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    elif mode == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    else:
        raise D3S2Error(f"unknown timestep sampling {mode!r}; use 'logit_normal' or 'uniform'")
    return shift_timesteps(t, shift)


def add_noise(x0: Any, eps: torch.Tensor, t: torch.Tensor) -> Any:
    """Eq. 10 on a dense tensor or a sparse latent; ``eps`` matches the features of ``x0``, ``t`` is ``[B]``."""
    te = per_element_t(t, x0)
    return replace_feats(x0, (1 - te) * feats_of(x0) + te * eps)


def velocity_target(x0: Any, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 11's regression target ``eps - x0`` (features)."""
    return eps - feats_of(x0)


def drop_condition(
    cond: torch.Tensor, prob: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the condition of each sample with probability ``prob``; returns ``(cond, kept [B] bool)``."""
    b = cond.shape[0]
    if prob <= 0:
        return cond, torch.ones(b, dtype=torch.bool, device=cond.device)
    gdev = generator.device if generator is not None else cond.device
    kept = (torch.rand(b, generator=generator, device=gdev) >= prob).to(cond.device)
    return cond * kept.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype), kept


def flow_matching_loss(
    model: Callable[..., Any],
    x0: Any,
    cond: torch.Tensor,
    config: FlowConfig | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """One CFM loss evaluation: draws ``t``, ``eps``, drops conditions, calls ``model(x_t, t * t_scale, cond)``.

    Returns ``{"loss": mean squared error, "t": t}``. ``t`` and ``eps`` may be given (tests, deterministic evaluation).
    """
    cfg = config or FlowConfig()
    f = feats_of(x0)
    b = batch_size_of(x0)
    gdev = generator.device if generator is not None else f.device  # draw where the generator lives
    if t is None:
        t = sample_timesteps(b, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.shift, generator, gdev)
    t = t.to(f.device, torch.float32)
    if eps is None:
        eps = torch.randn(f.shape, generator=generator, device=gdev).to(f.device, f.dtype)
    x_t = add_noise(x0, eps, t)
    cond, _ = drop_condition(cond, cfg.cond_drop_prob, generator)
    pred = feats_of(model(x_t, t * cfg.t_scale, cond, **model_kwargs))
    loss = (pred.float() - velocity_target(x0, eps).float()).pow(2).mean()
    return {"loss": loss, "t": t}
