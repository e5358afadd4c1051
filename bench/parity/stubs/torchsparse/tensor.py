"""torchsparse.SparseTensor stand-in: features [N, C] on integer coordinates [N, 4] = (batch, x, y, z)."""

from __future__ import annotations

import torch

from torchsparse.utils import make_ntuple


class SparseTensor:
    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, stride=1, spatial_range=None) -> None:
        self.feats = feats
        self.coords = coords
        self.stride = make_ntuple(stride, 3)
        self.spatial_range = None if spatial_range is None else tuple(spatial_range)
        self._caches = {}  # torchsparse keeps kernel maps here; the stand-in recomputes them

    @property
    def F(self) -> torch.Tensor:
        return self.feats

    @F.setter
    def F(self, value: torch.Tensor) -> None:
        self.feats = value

    @property
    def C(self) -> torch.Tensor:
        return self.coords

    @C.setter
    def C(self, value: torch.Tensor) -> None:
        self.coords = value

    def dense(self) -> torch.Tensor:
        c = self.coords.long()
        size = [int(c[:, 0].max()) + 1] + [int(v) + 1 for v in c[:, 1:].max(0).values]
        out = self.feats.new_zeros(*size, self.feats.shape[1])
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return out
