"""Subdivision by 2: every voxel into its 8 children (paper Sec. 3.1: the VAE decoder upsamples level by level).

Child ``j`` of voxel ``c`` is ``2c + (j >> 2 & 1, j >> 1 & 1, j & 1)`` (x slowest, the order of torchsparse's even
kernels) and sits in row ``8 * i + j`` of the output, so a ``[N, 8 * C]`` feature tensor reshaped to ``[N * 8, C]``
lines up with the children (3D pixel shuffle). Features are copied to all children; an optional keep-mask
(``[N * 8]`` or ``[N, 8]`` bool, same order) prunes children. Output rows stay sorted by batch and unique.
"""

from __future__ import annotations

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.sparse.tensor import SparseTensor, _Cache

__all__ = ["subdivide", "SparseSubdivide", "child_offsets"]


def child_offsets(device=None) -> torch.Tensor:
    j = torch.arange(8, device=device)
    return torch.stack([(j >> 2) & 1, (j >> 1) & 1, j & 1], dim=1).to(torch.int32)


def subdivide(x: SparseTensor, keep: torch.Tensor | None = None) -> SparseTensor:
    n, c = x.num_voxels, x.num_channels
    res = 2 * x.resolution if x.resolution is not None else None
    stride = max(1, x.stride // 2)

    def children():
        cc = x.coords.unsqueeze(1).repeat(1, 8, 1)
        cc[:, :, 1:] = cc[:, :, 1:] * 2 + child_offsets(x.device)
        return cc.reshape(n * 8, 4), _Cache()

    coords, cache = x._memo("subdivide", children)
    feats = x.feats.unsqueeze(1).expand(n, 8, c).reshape(n * 8, c)
    if keep is None:
        return SparseTensor(feats, coords, x.batch_size, res, stride, _cache=cache)
    keep = keep.reshape(-1)
    if keep.dtype != torch.bool or keep.numel() != n * 8:
        raise D3S2Error(f"subdivide keep-mask must be bool with {n * 8} entries ([N*8] or [N, 8]), "
                        f"got {keep.dtype} with {keep.numel()}")
    keep = keep.to(x.device)
    return SparseTensor(feats[keep], coords[keep], x.batch_size, res, stride, _cache=_Cache())


class SparseSubdivide(nn.Module):
    def forward(self, x: SparseTensor, keep: torch.Tensor | None = None) -> SparseTensor:
        return subdivide(x, keep)
