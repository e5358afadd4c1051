"""Surface extraction of a decoded sparse SDF under the pipeline's settings (paper Sec. 4.3; release parity).

``settings.surface``:

* ``"d3s2"``: d3s2's sparse marching cubes: a cell exists only where its 8 corner voxels exist; vertices at voxel
  centres (``-1 + (g + 0.5) * 2 / R``);
* ``"closed"`` (d3s2's default): the same marching cubes after :func:`d3s2.geometry.closed.closed_band` gave the
  absent corners of every cell that changes sign an inside / outside value (coarse flood fill + propagation), so the
  surface is closed by construction, without a dense grid (issue 24);
* ``"release"``: the release's semantics: absent voxels take the value 1.0 (its dense grid's fill), every cell that
  touches a decoded voxel exists, vertices at ``g / R * 2 - 1``.

``settings.marching_cubes``: ``"lorensen"`` (the vectorised tables of :mod:`d3s2.geometry.marching_cubes`, on the
compute device) or ``"lewiner"`` (skimage's Lewiner triangles, as the release, on bricks on the CPU:
:mod:`d3s2.geometry.lewiner`).

A refined field (:mod:`d3s2.pipelines.refining`) is the release's dense field, defined everywhere (explicit voxels
plus a side map), so ``settings.surface`` does not apply to it: :func:`extract_refined_surface` meshes it with the
release's semantics (vertices at ``g / R * 2 - 1``); it is closed wherever the dense field is.
"""

from __future__ import annotations

import torch

from d3s2.errors import D3S2Error

__all__ = ["extract_surface", "extract_refined_surface", "RELEASE_FILL", "SURFACES"]

RELEASE_FILL = 1.0
SURFACES = ("closed", "d3s2", "release")


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
    if settings.surface == "closed":
        if fill_fn is not None:
            raise D3S2Error("fill values for absent voxels need settings.surface 'release'")
        from d3s2.geometry.closed import PAD, closed_band

        c2, v2 = closed_band(coords, values, resolution, level, factor=getattr(settings, "closed_factor", None),
                             close=getattr(settings, "closed_dilation", 1))
        verts, faces = sparse_marching_cubes(c2, v2, resolution + 2 * PAD, level)
        world = (verts.to(torch.float64) - PAD + 0.5) * (2.0 / resolution) - 1.0
        return world.to(verts.dtype), faces
    if settings.surface == "d3s2":
        if fill_fn is not None:
            raise D3S2Error("fill values for absent voxels need settings.surface 'release'")
        return sparse_marching_cubes(coords, values, resolution, level, world=True)
    raise D3S2Error(f"unknown settings.surface {settings.surface!r}")


def extract_refined_surface(field, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`~d3s2.geometry.refine.RefinedField` -> ``(vertices [V, 3] world units, faces [F, 3])``, by
    ``settings.marching_cubes`` (Lewiner's triangles as the release, or the vectorised tables on the field's
    device)."""
    kw = field.mc_kwargs()
    if settings.marching_cubes == "lewiner":
        from d3s2.geometry.lewiner import lewiner_marching_cubes

        return lewiner_marching_cubes(**kw, world=True)
    from d3s2.geometry.marching_cubes import sparse_marching_cubes

    return sparse_marching_cubes(**kw, world=True)
