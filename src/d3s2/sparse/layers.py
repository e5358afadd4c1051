"""Per-voxel layers on sparse tensors: linear maps and activations (applied to the feature rows)."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from d3s2.sparse.tensor import SparseTensor

__all__ = ["SparseLinear", "SparseSiLU", "SparseGELU"]


class SparseLinear(nn.Linear):
    """``torch.nn.Linear`` on the features (same parameter names and shapes: ``weight [out, in]``, ``bias``)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.silu(x.feats))


class SparseGELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.gelu(x.feats, approximate=self.approximate))
