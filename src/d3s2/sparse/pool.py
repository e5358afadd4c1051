"""Sparse mean pooling by an integer factor (paper Sec. 3.1: the VAE encoder downsamples by 2 per level).

Every active voxel contributes to its parent ``c // factor``; the output holds the unique parents, each with the mean
of its *active* children. Parents (and their neighbour maps) are shared with strided convolutions of the same tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from d3s2.sparse.conv import downsample
from d3s2.sparse.scatter import add_rows
from d3s2.sparse.tensor import SparseTensor

__all__ = ["sparse_mean_pool", "SparseMeanPool"]


def sparse_mean_pool(x: SparseTensor, factor: int = 2) -> SparseTensor:
    out, parent = downsample(x, factor)
    counts = x._memo(("down_counts", factor),
                     lambda: torch.bincount(parent, minlength=out.num_voxels).clamp_(min=1))
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    sums = add_rows(torch.zeros(out.num_voxels, x.num_channels, dtype=acc, device=x.device), parent, x.feats.to(acc))
    return out.replace((sums / counts.unsqueeze(1).to(acc)).to(x.dtype))


class SparseMeanPool(nn.Module):
    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_mean_pool(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
