"""Euler sampler for rectified flow with classifier-free guidance and timestep shift (inference recipe of the release).

Integrates ``dx/dt = v(x_t, c, t)`` from t = 1 (noise) to t = 0 (data): ``x_{i+1} = x_i + (t_{i+1} - t_i) v_i``; the
model sees timesteps ``t * t_scale`` (1000). Two grids (:func:`euler_timesteps`, ``SamplerConfig.schedule``):

* ``"linear"`` (d3s2's models): ``t_i = shift(1 - i / steps)``, ``shift(t) = s t / (1 + (s - 1) t)``;
* ``"flow_match_euler"`` (the authors' release, diffusers' ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=N,
  shift=s)`` and its ``set_timesteps``): sigmas linear from ``shift(1)`` to ``shift(1/N)`` (the training grid's ends),
  shifted once more, in float32, then a final 0. Its last sigma before 0 is 0.035 / 0.035 / 0.060 for the release's
  50 steps shift 6 / 30 steps shift 6 / 15 steps shift 8 (the linear grid's: 0.109 / 0.171 / 0.364).

Precision (``SamplerConfig.state_dtype``): ``"float32"`` integrates an fp32 latent and feeds fp32 timesteps (a bf16
latent would lose the small increments of the last steps); ``"model"`` is the release's: the latent and the timestep
live in the model dtype (fp16), the velocity comes back in it, the guidance combination and ``dt * v`` are computed in
it and the sum in float32 before the cast back (diffusers' step).

Guidance: ``v = v_uncond + guidance_scale * (v_cond - v_uncond)`` with the unconditional input ``zeros_like(cond)``. A
scale of 0 or 1 runs the conditional branch alone (one model call per step), as the release does for 0. Trellis writes
the same rule as ``(1 + w) v_cond - w v_uncond``, i.e. ``guidance_scale = 1 + w``. The call path names it
``guidance_scale`` throughout; only the config field :attr:`SamplerConfig.cfg_scale` keeps its name, because it is a
key of the configs and of saved ``pipeline.yaml`` files.

Works on dense latents (tensors) and on sparse latents (objects with ``.feats`` and ``.replace(feats)``): the update acts
on the features; the model must accept and return the same kind of object (or a feature tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from d3s2.errors import D3S2Error
from d3s2.flow.latents import batch_size_of, feats_of, is_sparse, replace_feats
from d3s2.flow.rectified import shift_timesteps

__all__ = ["SamplerConfig", "SCHEDULES", "euler_timesteps", "cfg_combine", "is_guided", "sample_euler", "EulerSampler"]


@dataclass
class SamplerConfig:
    """Inference settings of one stage (release: structure 50 steps / shift 6, 512: 30 / 6, 1024: 15 / 8; CFG 7).

    ``cfg_scale`` is the guidance scale (passed as ``guidance_scale`` to :func:`sample_euler`); the field keeps the
    name of its key in the configs and in saved pipeline folders."""

    steps: int = 50
    cfg_scale: float = 7.0
    shift: float = 1.0
    t_scale: float = 1000.0
    schedule: str = "linear"  # "linear" | "flow_match_euler" (the release's diffusers grid, N = t_scale)
    state_dtype: str = "float32"  # "float32" | "model" (the release: latent and timestep in the model dtype)

    def __post_init__(self) -> None:
        from d3s2.flow.checks import check_cfg, check_shift, check_steps

        check_steps(self.steps, "sampler steps")
        check_cfg(self.cfg_scale, "sampler cfg_scale")
        check_shift(self.shift, "sampler shift")
        if not (isinstance(self.t_scale, (int, float)) and 0 < self.t_scale < float("inf")):
            raise D3S2Error(f"sampler t_scale must be a positive number, got {self.t_scale!r}")
        if self.schedule not in SCHEDULES:
            raise D3S2Error(f"sampler schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.state_dtype not in ("float32", "model"):
            raise D3S2Error(f"sampler state_dtype must be 'float32' or 'model', got {self.state_dtype!r}")


SCHEDULES = ("linear", "flow_match_euler")


def euler_timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None,
                    schedule: str = "linear", t_scale: float = 1000.0) -> torch.Tensor:
    """``steps + 1`` decreasing times (sigmas) from 1 to 0 on the ``schedule``'s grid (see the module docstring);
    float64 for ``"linear"``, the float32 values (as float64) for ``"flow_match_euler"``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "linear":
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
        return shift_timesteps(t, shift)
    if schedule != "flow_match_euler":
        raise D3S2Error(f"sampler schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    n = int(round(t_scale))
    # the training grid in float32 (diffusers' __init__): sigmas N/N .. 1/N, shifted
    train = torch.arange(n, 0, -1, dtype=torch.float32) / n
    train = shift * train / (1 + (shift - 1) * train)
    hi, lo = float(train[0]) * n, float(train[-1]) * n
    # set_timesteps: linear in float64 between the ends, shifted again, stored in float32
    s = torch.linspace(hi, lo, steps, dtype=torch.float64) / n if steps > 1 else torch.tensor([hi / n],
                                                                                                dtype=torch.float64)
    s = (shift * s / (1 + (shift - 1) * s)).to(torch.float32)
    return torch.cat([s, torch.zeros(1)]).to(torch.float64).to(device)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_uncond + guidance_scale * (v_cond - v_uncond)``."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def is_guided(guidance_scale: float) -> bool:
    """Guidance needs the unconditional branch unless the scale is 0 or 1 (the conditional branch alone)."""
    return guidance_scale not in (0.0, 1.0)


@torch.no_grad()
def sample_euler(
    model: Callable[..., Any],
    noise: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    steps: int = 50,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    t_scale: float = 1000.0,
    timesteps: torch.Tensor | None = None,
    batch_cfg: bool | None = None,
    progress: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    schedule: str = "linear",
    state_dtype: str = "float32",
    model_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    step_callback: Callable[[int], None] | None = None,
) -> Any:
    """Sample from ``noise`` (dense tensor or sparse latent) with ``model(x_t, t * t_scale [B], cond, **model_kwargs)``.

    ``timesteps``: an explicit decreasing grid (overrides ``steps``/``shift``/``schedule``). ``batch_cfg``: evaluate the
    conditional and unconditional branches in one model call (sparse latents through
    :class:`~d3s2.flow.guidance.BatchedSparseGuidance`, replayed from a CUDA graph with ``cuda_graphs``); None (the
    default) batches dense latents only.
    ``state_dtype="model"``: the latent (``noise`` is cast) and the timesteps in ``model_dtype`` (see the module
    docstring). ``step_callback(i)`` runs after each step (progress bars)."""
    kwargs = model_kwargs or {}
    guided = is_guided(guidance_scale)
    if guided and uncond is None:
        uncond = torch.zeros_like(cond)
    feats = feats_of(noise)
    if state_dtype not in ("float32", "model"):
        raise D3S2Error(f"sampler state_dtype must be 'float32' or 'model', got {state_dtype!r}")
    in_model = state_dtype == "model" and model_dtype is not None and model_dtype != torch.float32
    if timesteps is None:
        timesteps = euler_timesteps(steps, shift, schedule=schedule, t_scale=t_scale)
    grid = timesteps.to(torch.float64).cpu()
    b = batch_size_of(noise)
    x = replace_feats(noise, feats.to(model_dtype)) if in_model else noise
    cdt = model_dtype if in_model else torch.float32  # dtype of the guidance combination
    if batch_cfg is None:
        batch_cfg = not is_sparse(x)
    stacked = None
    if guided and batch_cfg and is_sparse(x) and hasattr(x, "coords"):  # stackable sparse tensors
        from d3s2.flow.guidance import BatchedSparseGuidance

        stacked = BatchedSparseGuidance(model, x, cond, uncond, guidance_scale, kwargs, cuda_graphs=cuda_graphs,
                                        combine_dtype=cdt)
    bar = range(grid.numel() - 1)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="sampling", leave=False)
    for i in bar:
        t, t_next = float(grid[i]), float(grid[i + 1])
        tt = torch.full((b,), t * t_scale, device=feats.device, dtype=torch.float32)
        if in_model:  # the release feeds torch.tensor([t], dtype=latents.dtype)
            tt = tt.to(model_dtype).to(torch.float32)
        if not guided:
            v = feats_of(model(x, tt, cond, **kwargs))
        elif stacked is not None:
            v = feats_of(stacked(x, tt))
        elif batch_cfg and not is_sparse(x):
            out = feats_of(model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond]), **kwargs))
            v_c, v_u = out.to(cdt).chunk(2)
            v = cfg_combine(v_c, v_u, guidance_scale)
        else:
            v_c = feats_of(model(x, tt, cond, **kwargs)).to(cdt)
            v_u = feats_of(model(x, tt, uncond, **kwargs)).to(cdt)
            v = cfg_combine(v_c, v_u, guidance_scale)
        f = feats_of(x)
        if in_model:
            # diffusers' step: dt (a 0-dim float32 tensor) times a model-dtype velocity is computed in that dtype,
            # the sum in float32, the result cast back
            dt = torch.tensor(t_next - t, dtype=torch.float32).to(model_dtype)
            step = v.to(model_dtype) * dt.to(v.device)
            x = replace_feats(x, (f.float() + step.float()).to(model_dtype))
        else:
            x = replace_feats(x, (f.float() + (t_next - t) * v.float()).to(f.dtype))
        if step_callback is not None:
            step_callback(i)
    return x


class EulerSampler:
    """Configured :func:`sample_euler` (e.g. ``EulerSampler(SamplerConfig(steps=50, cfg_scale=7.0, shift=6.0))`` for
    the structure stage)."""

    def __init__(self, config: SamplerConfig | None = None, progress: bool = False, **fields: Any) -> None:
        self.config = config if config is not None else SamplerConfig(**fields)
        self.progress = progress

    @classmethod
    def from_config(cls, cfg: SamplerConfig, progress: bool = False) -> "EulerSampler":
        return cls(cfg, progress)

    def __call__(self, model: Callable[..., Any], noise: Any, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 model_dtype: torch.dtype | None = None, **model_kwargs: Any) -> Any:
        c = self.config
        return sample_euler(model, noise, cond, uncond, steps=c.steps, guidance_scale=c.cfg_scale, shift=c.shift,
                            t_scale=c.t_scale, progress=self.progress, model_kwargs=model_kwargs, schedule=c.schedule,
                            state_dtype=c.state_dtype, model_dtype=model_dtype)
