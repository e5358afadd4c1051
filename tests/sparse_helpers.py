"""Random sparse patterns for the d3s2.sparse tests (not a test module)."""

from __future__ import annotations

import torch

from d3s2.sparse import SparseTensor


def random_sparse(batch_sizes_density, res, channels, dtype=torch.float64, generator=None, boundary=True):
    """A batch whose sample b has density ``batch_sizes_density[b]`` (0 -> empty sample) on a ``res^3`` grid.

    With ``boundary`` the 8 grid corners of every non-empty sample are active, so maps must handle the edges.
    Returns the SparseTensor and the dense [B, res, res, res] bool mask.
    """
    g = generator or torch.Generator().manual_seed(0)
    b = len(batch_sizes_density)
    mask = torch.zeros(b, res, res, res, dtype=torch.bool)
    for i, d in enumerate(batch_sizes_density):
        if d > 0:
            mask[i] = torch.rand(res, res, res, generator=g) < d
            if boundary:
                e = res - 1
                for x in (0, e):
                    for y in (0, e):
                        for z in (0, e):
                            mask[i, x, y, z] = True
    coords = mask.nonzero().to(torch.int32)
    # shuffle inside each sample so nothing relies on raster order
    perm = torch.randperm(coords.shape[0], generator=g)
    coords = coords[perm]
    coords = coords[torch.sort(coords[:, 0].long(), stable=True).indices]
    feats = torch.randn(coords.shape[0], channels, generator=g, dtype=torch.float64).to(dtype)
    return SparseTensor(feats, coords, batch_size=b, resolution=res), mask
