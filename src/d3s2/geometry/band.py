"""Unsigned distance bands of a mesh on a grid, found by an octree without a dense grid (paper Sec. 3.3 / 4.3: the
1024 stage's token set is the band of the 512 mesh, integer-divided by 8).

A grid of ``R^3`` sample points ``p(i) = origin + i * spacing`` (per axis; ``i`` in ``[0, R)``) and a distance function
``distance(points float64 [M, 3], upper_bound) -> float64 [M]`` (inf at or beyond the bound; e.g. a BVH query). The
octree descends from cells of ``2^L`` points: a cell whose centre lies at ``d >= tau + r_L`` (``r_L`` its
circumradius) holds no band point. Latent cells (``factor`` points per side) are decided early: a latent cell whose
centre has ``d < tau - sqrt(3)/2 * spacing`` has a sample point within ``sqrt(3)/2 * spacing`` of its centre, so it
is in; only the other candidates descend to single points.

Two conventions use it (``d3s2.pipelines``): d3s2's voxel centres of the [-1, 1] cube (``origin = -1 + h / 2``,
``spacing = h = 2 / R``) and the authors' release (the mesh renormalised and halved into [-0.5, 0.5], points
``i / (R - 1) - 0.5``, ``tau = 4 / 1024``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from d3s2.errors import D3S2Error

__all__ = ["CHILD_OFFSETS", "octree_top_level", "latent_band_cells", "normalize_release_mesh"]

CHILD_OFFSETS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.int64)


def octree_top_level(resolution: int) -> int:
    """Coarsest octree level: cells of up to 32 points, but at least ~4 cells per axis."""
    level = 0
    while (1 << (level + 1)) <= 32 and (resolution >> (level + 1)) >= 4:
        level += 1
    return level


def latent_band_cells(distance: Callable[[torch.Tensor, float], torch.Tensor], resolution: int, tau: float,
                      factor: int = 8, *, origin: float, spacing: float, device: torch.device | str = "cpu"
                      ) -> torch.Tensor:
    """Unique ``i // factor`` ``[M, 3]`` int64 (on ``device``) of the grid points with ``distance < tau`` (see the
    module docstring). ``distance`` runs on ``device``."""
    dev = torch.device(device)
    latent_level = int(round(math.log2(factor)))
    if 1 << latent_level != factor:
        raise D3S2Error(f"latent factor must be a power of two, got {factor}")
    top = max(latent_level, octree_top_level(resolution))
    n_top = -(-resolution // (1 << top))
    g = torch.arange(n_top, dtype=torch.int64, device=dev)
    cells = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    child = torch.from_numpy(CHILD_OFFSETS).to(dev)
    done: list[torch.Tensor] = []
    for level in range(top, -1, -1):
        size = 1 << level
        radius = math.sqrt(3.0) * (size - 1) / 2.0 * spacing
        centres = origin + (cells.to(torch.float64) * size + (size - 1) / 2.0) * spacing
        bound = tau + radius
        d = distance(centres, bound * (1 + 1e-9) + 1e-12).to(dev)
        if level == 0:
            done.append(torch.div(cells[d < tau], factor, rounding_mode="floor"))
            break
        keep = d < bound * (1 + 1e-9) + 1e-12
        if level == latent_level:
            sure = d < tau - math.sqrt(3.0) / 2.0 * spacing - 1e-12
            done.append(cells[sure])
            keep &= ~sure
        cells = cells[keep]
        children = (cells[:, None, :] * 2 + child[None]).reshape(-1, 3)
        cells = children[(children * (size // 2) < resolution).all(dim=1)]
    if not done:
        return torch.zeros(0, 3, dtype=torch.int64, device=dev)
    return torch.unique(torch.cat(done), dim=0)


def normalize_release_mesh(vertices: np.ndarray, scale: float = 0.95) -> np.ndarray:
    """The release's ``normalize_mesh``: centre the bounding box and scale its longest side to ``2 * scale``."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(0), v.max(0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise D3S2Error("the 512 mesh is degenerate (zero extent): no 1024 token band")
    return (v - (lo + hi) / 2) * (2.0 * scale / extent)
