"""Marching cubes with the authors' release semantics, on sparse voxels: the triangles of skimage's Lewiner method on the
densified grid (release parity: their ``sparse2mesh`` / refiners densify with fill 1.0 and call
``skimage.measure.marching_cubes(sdf, level, method="lewiner")``), without the dense ``R^3`` grid.

Lewiner's tables decide each cell's triangulation from its 8 corner values alone (the face and interior tests read
only those), so the dense result is the union of the results on bricks of cells: bricks of ``brick^3`` cells
(``(brick + 1)^3`` samples, neighbouring bricks share their boundary samples, every cell belongs to one brick) are
densified one at a time around the active voxels, absent samples taking ``fill`` (or ``fill_fn(coords)``), and run
through skimage's public ``marching_cubes``. Bricks where no existing voxel touches a cell are skipped: there all
corners are fill values (callers add explicit voxels wherever ``fill_fn`` changes sign, see
``d3s2.geometry.marching_cubes``). Vertices shared by neighbouring bricks are welded by the grid edge they lie on.

Positions follow skimage (float32 grid units along the array axes = ``coords`` columns); ``world=True`` maps grid
``g`` to ``-1 + (g + world_offset) * 2 / R`` (``world_offset=0.0``: the release's ``g / R * 2 - 1``). Faces keep
skimage's orientation for ``gradient_direction`` and its degenerate triangles (``allow_degenerate=True``, its default,
as the release calls it). This runs on the CPU (skimage); inputs may live on any device, outputs come back on it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from d3s2.errors import D3S2Error

__all__ = ["lewiner_marching_cubes"]

_NEAR = 1e-5  # grid units: float32 positions of a brick-local vertex are exact to ~4e-6 at brick 32


def _edge_keys(g: np.ndarray) -> np.ndarray:
    """A key per vertex naming the grid edge it lies on (or the corner / the cell centre), for welding."""
    r = np.rint(g)
    near = np.abs(g - r) < _NEAR
    fl = np.floor(g)
    base = np.where(near, r, fl).astype(np.int64)
    n_off = (~near).sum(1)
    axis = np.where(n_off == 0, 3, np.where(n_off == 1, np.argmax(~near, axis=1), 4))
    return np.concatenate([base, axis[:, None].astype(np.int64)], 1)


def lewiner_marching_cubes(coords, values, resolution: int, level: float = 0.0, *, fill: float | None = None,
                           fill_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, world: bool = False,
                           world_offset: float = 0.5, gradient_direction: str = "descent", brick: int = 32,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``coords`` int ``[N, 3]`` unique voxel coordinates in ``[0, resolution)``, ``values`` ``[N]``; ``fill`` or
    ``fill_fn`` gives the absent samples (one is required: the dense grid is defined everywhere). Returns
    ``(vertices [V, 3] dtype, faces [F, 3] int64)`` on ``coords``' device (see the module docstring)."""
    from skimage import measure

    if (fill is None) == (fill_fn is None):
        raise D3S2Error("lewiner marching cubes needs exactly one of fill= (a value) or fill_fn= for absent voxels")
    if gradient_direction not in ("ascent", "descent"):
        raise D3S2Error(f"gradient_direction must be 'ascent' or 'descent', not {gradient_direction!r}")
    if brick < 1:
        raise D3S2Error("brick must be a positive number of cells")
    device = coords.device if isinstance(coords, torch.Tensor) else torch.device("cpu")
    c = (coords.cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)).astype(np.int64)
    c = c.reshape(-1, 3)
    v = (values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor)
         else np.asarray(values, dtype=np.float32)).reshape(-1)
    if len(v) != len(c):
        raise D3S2Error(f"marching cubes got {len(c)} coordinates but {len(v)} values")
    if not np.isfinite(v).all():
        raise D3S2Error("marching cubes got NaN/inf SDF values; fix the decoder output or drop those voxels")
    empty = (torch.zeros(0, 3, dtype=dtype, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device))
    if len(c) == 0:
        return empty
    if c.min() < 0 or c.max() >= resolution:
        raise D3S2Error(f"voxel coordinates must lie in [0, {resolution}) for resolution {resolution}")
    level = float(level)
    # each voxel is a sample of the bricks whose sample range [b*B, (b+1)*B] holds it (up to 8 bricks)
    nb = -(-(resolution - 1) // brick)  # bricks per axis (cells 0 .. R-2)
    member = []
    for d in np.ndindex(2, 2, 2):
        b = c // brick - np.array(d)
        ok = ((b >= 0) & (b < nb) & (c - b * brick <= brick)).all(1)
        member.append((np.nonzero(ok)[0], b[ok]))
    rows = np.concatenate([m[0] for m in member])
    bricks = np.concatenate([m[1] for m in member])
    key = (bricks[:, 0] * nb + bricks[:, 1]) * nb + bricks[:, 2]
    order = np.argsort(key, kind="stable")
    rows, key = rows[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    all_verts, all_faces, n_verts = [], [], 0
    for s, e in zip(starts, ends):
        k = int(key[s])
        b = np.array([k // (nb * nb), (k // nb) % nb, k % nb], dtype=np.int64)
        lo = b * brick
        hi = np.minimum(lo + brick, resolution - 1)  # last sample of the brick
        shape = tuple(int(x) for x in hi - lo + 1)
        if min(shape) < 2:
            continue
        if fill is not None:
            grid = np.full(shape, np.float32(fill), dtype=np.float32)
        else:
            axes = [np.arange(lo[i], hi[i] + 1) for i in range(3)]
            pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            fv = fill_fn(torch.from_numpy(pts).to(device))
            grid = np.asarray(torch.as_tensor(fv).detach().float().cpu().numpy(), dtype=np.float32).reshape(shape)
        r = rows[s:e]
        loc = c[r] - lo
        grid[loc[:, 0], loc[:, 1], loc[:, 2]] = v[r]
        if not grid.min() <= level <= grid.max():
            continue
        verts, faces, _, _ = measure.marching_cubes(grid, level, method="lewiner",
                                                    gradient_direction=gradient_direction)
        if len(faces) == 0:
            continue
        all_verts.append(verts.astype(np.float64) + lo)
        all_faces.append(faces.astype(np.int64) + n_verts)
        n_verts += len(verts)
    if not all_faces:
        return empty
    g = np.concatenate(all_verts)
    faces = np.concatenate(all_faces)
    _, first, inverse = np.unique(_edge_keys(g), axis=0, return_index=True, return_inverse=True)
    g = g[first]
    faces = inverse.reshape(-1)[faces]
    verts = torch.from_numpy(g)
    if world:
        verts = (verts + world_offset) * (2.0 / resolution) - 1.0
    return verts.to(dtype=dtype, device=device), torch.from_numpy(faces).to(device)
