"""Normalisation layers shared by the DiTs and the dense structure VAE.

- :class:`LayerNorm32`: LayerNorm computed in fp32 whatever the input dtype (bf16 training keeps the statistics exact).
- :class:`ChannelLayerNorm3d`: LayerNorm over the channel axis of a dense ``[B, C, D, H, W]`` volume (dense VAE).
- :class:`MultiHeadRMSNorm`: per-head RMS norm of queries/keys (qk norm of the DiT self-attention), parameter ``gamma``
  of shape ``[heads, head_dim]`` as in the authors' release.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm32", "ChannelLayerNorm3d", "MultiHeadRMSNorm"]


class LayerNorm32(nn.LayerNorm):
    """``nn.LayerNorm`` evaluated in fp32 and cast back (parameter names ``weight``/``bias`` unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class ChannelLayerNorm3d(LayerNorm32):
    """LayerNorm over channels of a ``[B, C, *spatial]`` tensor (channels moved last, normalised, moved back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(1, -1)
        return super().forward(h).movedim(-1, 1)


class MultiHeadRMSNorm(nn.Module):
    """RMS norm of the last axis of ``[..., heads, head_dim]`` with a learned per-head scale ``gamma``.

    ``normalize(x) * sqrt(head_dim) * gamma`` equals ``x / rms(x) * gamma`` (up to the epsilon of ``F.normalize``).
    """

    def __init__(self, head_dim: int, heads: int) -> None:
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)
