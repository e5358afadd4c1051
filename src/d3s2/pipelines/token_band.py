"""The 1024 stage's token set: the unsigned band of the 512 mesh at the 1024 grid, ``// 8`` (paper Sec. 4.3).

Two rules (``PipelineSettings.band``):

* ``"d3s2"``: the mesh stays in the 512 stage's frame; the voxel centres of the [-1, 1] cube closer than
  ``band_voxels / R`` (in [-1, 1] units) to it;
* ``"release"``: the authors' ``normalize_mesh`` + ``mesh2index``: the mesh is re-centred with its longest side 1.9,
  halved into [-0.5, 0.5], and the grid points ``i / (R - 1) - 0.5`` with unsigned distance ``< 4 / R`` are kept
  (about 4 voxels each side: 1.3-1.8x the tokens of the d3s2 rule on a sphere). The final mesh lives in that frame,
  as the release's does.

Distances come from warp's BVH on CUDA when warp-lang is installed (points never leave the GPU), libigl otherwise; the
octree (:func:`d3s2.geometry.band.latent_band_cells`) never builds a dense grid.
"""

from __future__ import annotations

import numpy as np
import torch

from d3s2.errors import D3S2Error
from d3s2.geometry.band import latent_band_cells, normalize_release_mesh

__all__ = ["band_queries", "latent_band_coords", "release_band_mesh", "RELEASE_BAND_VOXELS"]

RELEASE_BAND_VOXELS = 4.0  # the release's mesh2index threshold: udf < 4 / R in the halved frame


def band_queries(vertices: np.ndarray, faces: np.ndarray, device: torch.device):
    """``distance(points float64 [N, 3] tensor, upper_bound) -> float64 [N]`` (inf at or beyond the bound) on
    ``device``: warp's BVH on CUDA when warp-lang is installed, libigl otherwise."""
    if device.type == "cuda":
        try:
            import warp  # noqa: F401
        except ImportError:
            warp = None
        if warp is not None:
            from d3s2.geometry.queries import WarpQueries

            try:
                # distances only: neither the pseudo-normal nor the (lazy) winding-number tables are built
                q = WarpQueries(vertices, faces, device=str(device))
                q.closest_torch(torch.zeros(1, 3, dtype=torch.float64, device=device), upper_bound=1.0)  # probe
                return lambda p, ub: q.closest_torch(p, upper_bound=ub)[0], device
            except Exception as exc:  # noqa: BLE001 - a broken warp install must not stop the pipeline
                import warnings

                warnings.warn(f"warp queries failed on {device} ({type(exc).__name__}: {exc}); the 1024 band "
                              "falls back to libigl on the CPU", stacklevel=2)
    from d3s2.geometry.queries import CpuQueries

    q = CpuQueries(vertices, faces)
    return lambda p, ub: torch.from_numpy(q.unsigned_distance(p.cpu().numpy(), upper_bound=ub)), torch.device("cpu")


def release_band_mesh(vertices) -> np.ndarray:
    """The release's frame for the band: ``normalize_mesh`` (longest side 1.9), then halved (in float32, as the
    release feeds its CUDA extension)."""
    return (normalize_release_mesh(vertices).astype(np.float32) * np.float32(0.5)).astype(np.float64)


def latent_band_coords(vertices, faces, resolution: int, tau: float, factor: int = 8,
                       device: str | torch.device = "cpu", batch: int = 0, queries=None, rule: str = "d3s2"
                       ) -> torch.Tensor:
    """Latent cells ``[M, 4]`` int32 (batch, x, y, z): ``rule="d3s2"``: the voxel centres of a ``resolution^3`` grid
    over [-1, 1]^3 at unsigned distance ``< tau`` from the mesh, ``// factor``; ``rule="release"``: ``vertices`` must
    already be in the release's halved frame (:func:`release_band_mesh`), grid points ``i / (R - 1) - 0.5``, ``tau`` in
    those units (the release: ``4 / R``). ``queries``: the ``band_queries(vertices, faces, device)`` pair, when the
    caller built (and timed) it already."""
    dev = torch.device(device)
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(f) == 0:
        return torch.zeros(0, 4, dtype=torch.int32, device=dev)
    distance, qdev = queries if queries is not None else band_queries(v, f, dev)
    if rule == "d3s2":
        h = 2.0 / resolution
        origin, spacing = -1.0 + h / 2, h
    elif rule == "release":
        origin, spacing = -0.5, 1.0 / (resolution - 1)
    else:
        raise D3S2Error(f"band rule must be 'd3s2' or 'release', got {rule!r}")
    lat = latent_band_cells(distance, resolution, tau, factor, origin=origin, spacing=spacing, device=qdev)
    out = torch.cat([torch.full((len(lat), 1), batch, dtype=torch.int64, device=qdev), lat], 1).to(torch.int32)
    return out.to(dev)
