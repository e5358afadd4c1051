"""Euler sampler for rectified flow with classifier-free guidance and timestep shift (inference recipe of the release).

Integrates ``dx/dt = v(x_t, c, t)`` from t = 1 (noise) to t = 0 (data) on the grid ``t_i = shift(1 - i / steps)``,
``shift(t) = s t / (1 + (s - 1) t)`` (s = 6.0 for the structure and 512 stages, 8.0 at 1024):
``x_{i+1} = x_i + (t_{i+1} - t_i) v_i``. The model sees timesteps ``t * 1000``.

Guidance: ``v = v_uncond + scale * (v_cond - v_uncond)`` with the unconditional input ``zeros_like(cond)`` (scale 1 or
no guidance: one model call per step). Trellis writes the same rule as ``(1 + w) v_cond - w v_uncond``, i.e. ``scale = 1 + w``.

The grid 1 -> 0 in equal steps before the shift is our reading of the release (unverified: a diffusers
``FlowMatchEulerDiscreteScheduler`` grid, for one, stops at t = 1/1000 before the final jump to 0); pass
``timesteps=`` to use any other decreasing grid.

Works on dense latents (tensors) and on sparse latents (objects with ``.feats`` and ``.replace(feats)``): the update acts
on the features; the model must accept and return the same kind of object (or a feature tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from d3s2.flow.latents import batch_size_of, feats_of, is_sparse, replace_feats
from d3s2.flow.rectified import shift_timesteps

__all__ = ["SamplerConfig", "euler_timesteps", "cfg_combine", "sample_euler", "EulerSampler"]


@dataclass
class SamplerConfig:
    """Inference settings of one stage (release: structure 50 steps / shift 6, 512: 30 / 6, 1024: 15 / 8; CFG 7)."""

    steps: int = 50
    cfg_scale: float = 7.0
    shift: float = 1.0
    t_scale: float = 1000.0


def euler_timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``steps + 1`` decreasing times from 1 to 0 (shifted)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift_timesteps(t, shift)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_euler(
    model: Callable[..., Any],
    noise: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    t_scale: float = 1000.0,
    timesteps: torch.Tensor | None = None,
    batch_cfg: bool = True,
    progress: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Sample from ``noise`` (dense tensor or sparse latent) with ``model(x_t, t * t_scale [B], cond, **model_kwargs)``.

    ``timesteps``: an explicit decreasing grid (overrides ``steps``/``shift``). ``batch_cfg``: evaluate the conditional
    and unconditional branches in one batch (dense tensors only; sparse latents always use two calls).
    """
    kwargs = model_kwargs or {}
    guided = cfg_scale != 1.0
    if guided and uncond is None:
        uncond = torch.zeros_like(cond)
    feats = feats_of(noise)
    grid = (timesteps if timesteps is not None else euler_timesteps(steps, shift)).to(torch.float64).cpu()
    b = batch_size_of(noise)
    x = noise
    bar = range(grid.numel() - 1)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="sampling", leave=False)
    for i in bar:
        t, t_next = float(grid[i]), float(grid[i + 1])
        tt = torch.full((b,), t * t_scale, device=feats.device, dtype=torch.float32)
        if not guided:
            v = feats_of(model(x, tt, cond, **kwargs))
        elif batch_cfg and not is_sparse(x):
            out = feats_of(model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond]), **kwargs))
            v_c, v_u = out.chunk(2)
            v = cfg_combine(v_c, v_u, cfg_scale)
        else:
            v_c = feats_of(model(x, tt, cond, **kwargs))
            v_u = feats_of(model(x, tt, uncond, **kwargs))
            v = cfg_combine(v_c, v_u, cfg_scale)
        f = feats_of(x)
        x = replace_feats(x, (f.float() + (t_next - t) * v.float()).to(f.dtype))
    return x


class EulerSampler:
    """Configured :func:`sample_euler` (e.g. ``EulerSampler(steps=50, cfg_scale=7.0, shift=6.0)`` for the structure stage)."""

    def __init__(self, steps: int = 50, cfg_scale: float = 7.0, shift: float = 1.0, t_scale: float = 1000.0,
                 progress: bool = False) -> None:
        self.steps, self.cfg_scale, self.shift, self.t_scale, self.progress = steps, cfg_scale, shift, t_scale, progress

    @classmethod
    def from_config(cls, cfg: SamplerConfig, progress: bool = False) -> "EulerSampler":
        return cls(cfg.steps, cfg.cfg_scale, cfg.shift, cfg.t_scale, progress)

    def __call__(self, model: Callable[..., Any], noise: Any, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 **model_kwargs: Any) -> Any:
        return sample_euler(model, noise, cond, uncond, steps=self.steps, cfg_scale=self.cfg_scale, shift=self.shift,
                            t_scale=self.t_scale, progress=self.progress, model_kwargs=model_kwargs)
