"""Plain PyTorch references of the dense-volume ops of the release's refiners (issue 20): the per-(sample, channel)
statistics of a GroupNorm, the normalisation + SiLU as the release computes it, and one pass of the adaptive 27-tap
filter. The Triton kernels in ``kernels/`` compute the same functions; tests compare them on random inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_stats_reference", "norm_apply_reference", "adaptive_pass_reference", "TAPS"]

# tap t = 9 i + 3 j + k reads the neighbour at offset (i - 1, j - 1, k - 1) in (D, H, W), as the authors' loop does
TAPS = [(i, j, k) for i in range(3) for j in range(3) for k in range(3)]


def channel_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (sample, channel) mean and sum of squared deviations (float64 ``[B, C]`` each) and the voxel count of
    ``x`` ``[B, C, ...]`` (computed in float64)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1).double()
    n = flat.shape[-1]
    mean = flat.mean(-1)
    return mean, (flat - mean[..., None]).square().sum(-1), n


def norm_apply_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: bool,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * scale + shift`` per (sample, channel) computed in float32 (``scale`` / ``shift`` ``[B, C]``), written in
    ``x.dtype``, then SiLU in that dtype when ``act`` (the release casts the normalised value before its SiLU).
    ``out`` (may be ``x``): where to write; no full-size float32 temporary either way."""
    shape = tuple(scale.shape) + (1,) * (x.dim() - 2)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty_like(x)
    torch.addcmul(shift.to(acc).reshape(shape), x, scale.to(acc).reshape(shape), out=out)
    return F.silu(out, inplace=True) if act else out


def adaptive_pass_reference(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One pass of the adaptive filter: ``out[b, c, v] = sum_t x[b, c, v + offset_t] * weights[b, t, v]`` with zero
    padding; ``x`` ``[B, C, D, H, W]``, ``weights`` ``[B, 27, D, H, W]`` (already normalised). Accumulated in
    float32 (float64 for float64 input), written in ``x.dtype``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d, h, w = x.shape[2:]
    padded = F.pad(x.to(acc), (1, 1, 1, 1, 1, 1))
    wt = weights.to(acc)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for t, (i, j, k) in enumerate(TAPS):
        out += padded[:, :, i:i + d, j:j + h, k:k + w] * wt[:, t:t + 1]
    return out.to(x.dtype)
