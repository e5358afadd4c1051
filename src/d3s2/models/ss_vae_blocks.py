"""Building blocks of the sparse SDF VAE (paper Sec. 3.1, Fig. 2 upper half).

- :class:`SparseDownBlock3d` (encoder): ``GroupNorm(32) + SiLU -> mean-pool x2 -> conv3 - GN - SiLU - conv3`` plus a
  1x1 skip conv on the pooled input ("residual sparse 3D CNN blocks interleaved with 3D mean pooling").
- :class:`SparseSubdivideBlock3d` (decoder): ``conv3 + SiLU -> subdivide every voxel into its 8 children -> conv3 +
  SiLU``, with an optional learned pruning of the children (a keep logit per child, off in the authors' release).
- :class:`SparseWindowTransformerBlock`: pre-norm transformer block on sparse tokens, non-affine LayerNorms, shifted
  3D window self-attention (``attn.to_qkv`` / ``attn.to_out``) and a GELU(tanh) MLP (``mlp.mlp.0`` / ``mlp.mlp.2``).

Sub-module names inside the conv blocks (``act_layers``, ``out_layers``, ``skip_connection``, ``prune``) are
PROVISIONAL: the release fixes the block prefixes (``downsample.{i}``, ``upsample.{i}``) and the torchsparse weight
suffixes (``.conv.kernel`` / ``.conv.bias``) but we have not seen a real checkpoint's inner names. If they differ, fill
``d3s2.models.ss_vae.OFFICIAL_KEY_MAP`` rather than renaming modules.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from d3s2.nn.blocks import FeedForward
from d3s2.nn.norms import LayerNorm32
from d3s2.nn.window_attention import SparseWindowSelfAttention
from d3s2.sparse import SparseConv3d, SparseGroupNorm, SparseSiLU, SparseTensor, sparse_mean_pool, subdivide

__all__ = ["TorchsparseConv", "SparseDownBlock3d", "SparseSubdivideBlock3d", "SparseWindowTransformerBlock"]


class TorchsparseConv(nn.Module):
    """A :class:`SparseConv3d` wrapped as ``.conv``: state-dict keys read ``<module>.conv.kernel`` (torchsparse)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.conv = SparseConv3d(in_channels, out_channels, kernel_size, bias=bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.conv(x)


class SparseDownBlock3d(nn.Module):
    """Residual down-sampling block of the encoder: ``in_channels`` at R -> ``out_channels`` at R/2."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32, pool_divisor: str = "count") -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.pool_divisor = pool_divisor  # "count_plus_one": the release's mean (see d3s2.sparse.pool)
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, in_channels), SparseSiLU())
        self.out_layers = nn.Sequential(
            TorchsparseConv(in_channels, out_channels, 3),
            SparseGroupNorm(num_groups, out_channels),
            SparseSiLU(),
            TorchsparseConv(out_channels, out_channels, 3),
        )
        self.skip_connection = TorchsparseConv(in_channels, out_channels, 1)

    def forward(self, x: SparseTensor) -> SparseTensor:
        # The skip reads the pooled *input* (not the normalised features), as the release describes.
        h = sparse_mean_pool(self.act_layers(x), 2, self.pool_divisor)
        x = sparse_mean_pool(x, 2, self.pool_divisor)
        return self.out_layers(h) + self.skip_connection(x)


class SparseSubdivideBlock3d(nn.Module):
    """Up-sampling block of the decoder: ``in_channels`` at R -> ``out_channels`` at 2R (all 8 children of every voxel,
    or those whose keep logit is positive / that the caller's ``keep`` mask marks when ``prune`` is on)."""

    def __init__(self, in_channels: int, out_channels: int, prune: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.act_layers = nn.Sequential(TorchsparseConv(in_channels, out_channels, 3), SparseSiLU())
        self.out_layers = nn.Sequential(TorchsparseConv(out_channels, out_channels, 3), SparseSiLU())
        # one keep logit per child, predicted from the parent (children are in subdivide's order)
        self.prune = nn.Linear(out_channels, 8) if prune else None

    def forward(self, x: SparseTensor, keep: torch.Tensor | None = None) -> tuple[SparseTensor, torch.Tensor | None]:
        """Returns the subdivided tensor and the ``[N, 8]`` keep logits (None without pruning). With pruning, children
        are kept where ``keep`` ([N, 8] bool, teacher forcing while training) is set, else where the logit is > 0."""
        h = self.act_layers(x)
        logits = None
        if self.prune is not None:
            logits = self.prune(h.feats)
            if keep is None:
                keep = logits.detach() > 0
        h = subdivide(h, keep if self.prune is not None else None)
        return self.out_layers(h), logits


class SparseWindowTransformerBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; norms are non-affine (no parameters, as in the release)."""

    def __init__(self, channels: int, num_heads: int, head_dim: int | None = None, mlp_ratio: float = 4.0,
                 window: int = 8, shift: int = 0, qkv_bias: bool = True, attn_backend: str = "auto",
                 use_checkpoint: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=eps)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=eps)
        self.attn = SparseWindowSelfAttention(channels, num_heads, head_dim, window=window, shift=shift,
                                              qkv_bias=qkv_bias, backend=attn_backend)
        self.mlp = FeedForward(channels, mlp_ratio)

    def _forward(self, feats: torch.Tensor, x: SparseTensor) -> torch.Tensor:
        feats = feats + self.attn(x.replace(self.norm1(feats))).feats
        return feats + self.mlp(self.norm2(feats))

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return x.replace(checkpoint(self._forward, x.feats, x, use_reentrant=False))
        return x.replace(self._forward(x.feats, x))
