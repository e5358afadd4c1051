"""Surface extraction of a decoded sparse SDF under the pipeline's settings (paper Sec. 4.3; release parity).

``settings.surface``:

* ``"d3s2"``: d3s2's sparse marching cubes: a cell exists only where its 8 corner voxels exist; vertices at voxel
  centres (``-1 + (g + 0.5) * 2 / R``);
* ``"release"``: the release's semantics: absent voxels take the value 1.0 (its dense grid's fill), every cell that
  touches a decoded voxel exists, vertices at ``g / R * 2 - 1``.

``settings.marching_cubes``: ``"lorensen"`` (the vectorised tables of :mod:`d3s2.geometry.marching_cubes`, on the
compute device) or ``"lewiner"`` (skimage's Lewiner triangles, as the release, on bricks on the CPU:
:mod:`d3s2.geometry.lewiner`).
"""

from __future__ import annotations

import torch

from d3s2.errors import D3S2Error

__all__ = ["extract_surface", "RELEASE_FILL"]

RELEASE_FILL = 1.0


def extract_surface(coords: torch.Tensor, values: torch.Tensor, resolution: int, level: float, settings,
                    fill_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``coords [N, 3]`` voxel coordinates, ``values [N]`` SDF -> ``(vertices [V, 3] world units, faces [F, 3])`` on
    ``coords``' device. ``fill_fn``: absent-voxel values by position (the sign refiner's interior), instead of the
    release's constant fill."""
    from d3s2.geometry.marching_cubes import sparse_marching_cubes

    if settings.surface == "release":
        fill = None if fill_fn is not None else RELEASE_FILL
        if settings.marching_cubes == "lewiner":
            from d3s2.geometry.lewiner import lewiner_marching_cubes

            return lewiner_marching_cubes(coords, values, resolution, level, fill=fill, fill_fn=fill_fn, world=True,
                                          world_offset=0.0)
        return sparse_marching_cubes(coords, values, resolution, level, fill=fill, fill_fn=fill_fn, world=True,
                                     world_offset=0.0)
    if settings.surface == "d3s2":
        if fill_fn is not None:
            raise D3S2Error("fill values for absent voxels need settings.surface 'release'")
        return sparse_marching_cubes(coords, values, resolution, level, world=True)
    raise D3S2Error(f"unknown settings.surface {settings.surface!r}")
