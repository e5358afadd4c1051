"""Sparse mean pooling by an integer factor (paper Sec. 3.1: the VAE encoder downsamples by 2 per level).

Every active voxel contributes to its parent ``c // factor``; the output holds the unique parents, each with the mean
of its *active* children. Parents (and their neighbour maps) are shared with strided convolutions of the same tensor.

``divisor``: ``"count"`` divides the sum by the number n of active children; ``"count_plus_one"`` by n + 1, which is
what the authors' release computes (``torch.scatter_reduce(zeros, ..., reduce="mean")`` with the default
``include_self=True`` counts the zero it starts from) and what its weights were trained with.
"""

from __future__ import annotations

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.sparse.conv import downsample
from d3s2.sparse.scatter import add_rows
from d3s2.sparse.tensor import SparseTensor

__all__ = ["sparse_mean_pool", "SparseMeanPool", "POOL_DIVISORS", "check_pool_divisor"]

POOL_DIVISORS = ("count", "count_plus_one")


def check_pool_divisor(divisor: str) -> str:
    if divisor not in POOL_DIVISORS:
        raise D3S2Error(f"pool divisor must be one of {', '.join(POOL_DIVISORS)}, got {divisor!r}")
    return divisor


def sparse_mean_pool(x: SparseTensor, factor: int = 2, divisor: str = "count") -> SparseTensor:
    out, parent = downsample(x, factor)
    extra = 1 if check_pool_divisor(divisor) == "count_plus_one" else 0
    counts = x._memo(("down_counts", factor, extra),
                     lambda: torch.bincount(parent, minlength=out.num_voxels).clamp_(min=1 - extra) + extra)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    sums = add_rows(torch.zeros(out.num_voxels, x.num_channels, dtype=acc, device=x.device), parent, x.feats.to(acc))
    return out.replace((sums / counts.unsqueeze(1).to(acc)).to(x.dtype))


class SparseMeanPool(nn.Module):
    def __init__(self, factor: int = 2, divisor: str = "count"):
        super().__init__()
        self.factor, self.divisor = factor, check_pool_divisor(divisor)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_mean_pool(x, self.factor, self.divisor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, divisor={self.divisor}"
