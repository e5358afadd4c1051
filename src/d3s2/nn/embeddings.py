"""Timestep and 3D absolute positional embeddings (shared by the dense DiT, the SS-DiT and the SS-VAE).

Both follow the authors' release (shared/reference/official-release.md, "Architectures"):

- timestep: sinusoidal features of dimension 256, max period 10000, ordered ``[cos, sin]``, then
  ``mlp.0`` Linear(256, C) -> SiLU -> ``mlp.2`` Linear(C, C). Timesteps arrive in 0..1000 (the flow time times 1000).
- APE: ``freq_dim = C // 3 // 2`` frequencies ``1 / 10000^(i / freq_dim)``; each axis gives ``[sin, cos]`` of
  ``coord * factor * freq``; the three axes are concatenated and zero-padded to C. ``factor`` rescales coordinates so a
  1024^3 model (128^3 latent grid, factor 0.5) sees the same positional range as a 512^3 one (64^3 grid, factor 1.0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["timestep_embedding", "TimestepEmbedder", "AbsolutePositionEmbedder", "grid_coords"]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i / (dim // 2))``; ``t`` is ``[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps ``[B]`` -> ``[B, C]`` (parameters ``mlp.0`` and ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal APE of integer or real coordinates ``[N, in_channels]`` -> ``[N, channels]`` (no parameters)."""

    def __init__(self, channels: int, in_channels: int = 3, factor: float = 1.0) -> None:
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.factor = float(factor)
        self.freq_dim = channels // in_channels // 2
        if self.freq_dim < 1:
            raise ValueError(f"APE needs channels >= {2 * in_channels}, got {channels}")
        freqs = 1.0 / (10000.0 ** (torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim))
        # Not persistent: derived from the config, so it never appears in (or is required from) a state dict.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        if coords.ndim != 2 or coords.shape[1] != self.in_channels:
            raise ValueError(f"APE expects coords [N, {self.in_channels}], got {tuple(coords.shape)}")
        x = coords.float() * self.factor
        args = x[:, :, None] * self.freqs.float()[None, None, :]  # [N, axes, freq_dim]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1).reshape(coords.shape[0], -1)
        if emb.shape[1] < self.channels:
            emb = torch.cat([emb, emb.new_zeros(coords.shape[0], self.channels - emb.shape[1])], dim=1)
        return emb


def grid_coords(resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer coordinates ``[R^3, 3]`` of a dense grid in raster order (x slowest, z fastest), as tokens are flattened."""
    r = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
