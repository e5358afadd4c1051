"""The narrow band of ``d3s2.data.sdf``: every voxel of a grid whose (un)signed distance to a mesh is below ``tau``
(paper Eq. 1, ``|s(x)| < tau``), found without a dense R^3 grid; ``d3s2.data.shell`` uses it for its unsigned band.

Exact and hierarchical: the voxel grid is visited as an octree of cells of ``2^L`` voxels (levels and child offsets of
``d3s2.geometry.band``). A cell whose centre has unsigned distance ``d >= tau + r_L`` (``r_L`` = distance from the cell
centre to its farthest voxel centre) cannot hold a voxel with ``|s| < tau`` (the distance is 1-Lipschitz), so only the 8
children of the remaining cells are queried at the next level. At the voxel level exactly the voxels with ``d < tau``
remain. Queries (``d3s2.geometry.queries``) use a distance upper bound, which prunes the BVH / AABB search. Voxel
centres follow ``d3s2.data.sparse_sdf`` (``x_i = -1 + (i + 0.5) * 2 / R``). The sign rules (``"winding"``,
``"pseudonormal"``, ``"parts"``) are described in ``d3s2.data.sdf``.

GPU (``WarpQueries`` with a pseudo-normal sign): the octree, the float64 distance refinement and the sign stay on the
query device as torch tensors (``_narrow_band_torch``); only the winding-number fallback / check points and the result
cross to the host.

Memory: the octree keeps int64 coordinates and float64 centres of one level's candidates (about 1.5x the band: ~26 M
at 1024 for a 100k-face bunny, a few GB peak, on the GPU for the GPU path); no R^3 array is ever allocated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from d3s2.data.part_signs import part_tables, suspect_points
from d3s2.data.sign_repair import repair_signs
from d3s2.data.sparse_sdf import voxel_size
from d3s2.errors import D3S2Error
from d3s2.geometry.band import CHILD_OFFSETS, octree_top_level
from d3s2.geometry.pseudo_normal import pseudo_normal_sign
from d3s2.geometry.queries import winding_fallback

__all__ = ["BandResult", "HOST_WINDING_MAX", "NARROW_BAND_SIGNS", "narrow_band"]

# above this many voxels to decide by the winding number, the GPU back end uses its own winding number instead of
# libigl's on the host (which keeps few ambiguous points identical across back ends)
HOST_WINDING_MAX = 1 << 18
NARROW_BAND_SIGNS = ("winding", "pseudonormal", "parts")


@dataclass
class BandResult:
    coords: np.ndarray  # int64 [N, 3], sorted lexicographically
    distance: np.ndarray  # float64 [N]: signed (negative inside) if sign was computed, else unsigned
    stats: dict


def _sort_coords(coords: np.ndarray, resolution: int, *values):
    """Lexicographic (x, y, z) order through one packed int64 key (several times faster than np.lexsort); the octree
    already emits nearly sorted runs, which the stable (radix/timsort) argsort exploits."""
    if len(coords) == 0:
        return (coords, *values)
    c = coords.astype(np.int64)
    order = np.argsort((c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2], kind="stable")
    return (coords[order], *(v[order] for v in values))


def narrow_band(
    queries,
    resolution: int,
    tau: float,
    *,
    signed: bool = True,
    sign_propagation: bool = True,
    sign_method: str = "winding",
    buried_test: bool = False,
) -> BandResult:
    """All voxels at ``resolution`` with (un)signed distance below ``tau`` (module docstring), via ``queries``
    (a ``CpuQueries``/``WarpQueries``). ``sign_method``: ``"winding"``, ``"pseudonormal"`` or ``"parts"``
    (pseudo-normal, winding number at the voxels ``d3s2.data.part_signs`` marks suspect). With a
    ``WarpQueries`` and a pseudo-normal sign the whole octree runs on the query device (``_narrow_band_torch``)."""
    if resolution < 2 or resolution > 32767:
        raise D3S2Error(f"resolution must be in [2, 32767], got {resolution}")
    if not tau > 0:
        raise D3S2Error(f"tau must be positive, got {tau}")
    if sign_method not in NARROW_BAND_SIGNS:
        raise D3S2Error(f"narrow_band sign_method must be one of {', '.join(NARROW_BAND_SIGNS)}, got {sign_method!r}")
    pseudo = signed and sign_method in ("pseudonormal", "parts")
    parts = signed and sign_method == "parts"
    if pseudo and hasattr(queries, "closest_torch"):
        return _narrow_band_torch(queries, resolution, tau, parts=parts, buried_test=buried_test)
    h = voxel_size(resolution)
    top = octree_top_level(resolution)
    n_top = -(-resolution // (1 << top))
    g = np.arange(n_top, dtype=np.int64)
    cells = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    sign = np.zeros(len(cells), dtype=np.int8)  # 0 unknown, +1 outside, -1 inside
    stats = {"distance_queries": 0, "sign_queries": 0, "levels": top + 1, "distance_seconds": 0.0, "sign_seconds": 0.0}
    t_start = time.perf_counter()
    for level in range(top, -1, -1):
        size = 1 << level
        radius = math.sqrt(3.0) * (size - 1) / 2.0 * h
        centres = -1.0 + (cells.astype(np.float64) + 0.5) * (size * h)
        bound = tau + radius
        t0 = time.perf_counter()
        if pseudo and level == 0:
            d, face = queries.closest(centres, upper_bound=bound * (1 + 1e-9) + 1e-12)
        else:
            d = queries.unsigned_distance(centres, upper_bound=bound * (1 + 1e-9) + 1e-12)
        stats["distance_seconds"] += time.perf_counter() - t0
        stats["distance_queries"] += len(cells)
        keep = d < tau if level == 0 else d < bound * (1 + 1e-9) + 1e-12
        cells, d, sign, centres = cells[keep], d[keep], sign[keep], centres[keep]
        if pseudo:
            if level == 0:
                t0 = time.perf_counter()
                ct, ft = torch.from_numpy(centres), torch.from_numpy(face[keep])
                s, _ = pseudo_normal_sign(queries.pseudo_normal_tables(), ct, ft)
                sign = s.numpy()
                amb = sign == 0
                if parts:
                    t1 = time.perf_counter()
                    suspect = suspect_points(part_tables(queries, buried_test), ct, ft).numpy()
                    stats["part_seconds"] = time.perf_counter() - t1
                    stats["suspect_voxels"] = int(suspect.sum())
                    amb |= suspect
                if amb.any():
                    sign[amb] = np.where(winding_fallback(queries)(centres[amb]), -1, 1).astype(np.int8)
                stats["sign_queries"] += int(amb.sum())
                stats["winding_voxels"] = int(amb.sum())
                decided = amb
                stats["sign_seconds"] += time.perf_counter() - t0
        elif signed:
            # a cell whose distance ball holds all its voxel centres has one sign: evaluate it once, children inherit
            ask = sign == 0
            if level > 0:
                ask &= (d > radius * (1 + 1e-6) + 1e-12) if sign_propagation else False
            if ask.any():
                t0 = time.perf_counter()
                inside = queries.inside(centres[ask], max_dist=bound * (1 + 1e-6) + 1e-9)
                stats["sign_seconds"] += time.perf_counter() - t0
                sign[ask] = np.where(inside, -1, 1).astype(np.int8)
                stats["sign_queries"] += int(ask.sum())
        if level == 0:
            break
        children = (cells[:, None, :] * 2 + CHILD_OFFSETS[None]).reshape(-1, 3)
        child_sign = np.repeat(sign, 8)
        valid = (children * (size // 2) < resolution).all(axis=1)
        cells, sign = children[valid], child_sign[valid]
    if signed and not pseudo:
        stats["winding_voxels"] = len(cells)  # every voxel's sign is its (or its cell's) winding number
    dist = d * sign if signed else d
    if parts:
        coords, dist, decided = _sort_coords(cells, resolution, dist, decided)
        t0 = time.perf_counter()
        rep, rs = repair_signs(
            torch.from_numpy(coords), torch.from_numpy(dist), torch.from_numpy(decided), resolution,
            winding_fallback(queries),
        )
        dist = rep.numpy()
        stats.update(rs)
        stats["winding_voxels"] += rs["repair_voxels"]
        stats["repair_seconds"] = time.perf_counter() - t0
        stats["sign_seconds"] += stats["repair_seconds"]
    else:
        coords, dist = _sort_coords(cells, resolution, dist)
    stats["voxels"] = len(coords)
    stats["band_seconds"] = time.perf_counter() - t_start
    return BandResult(coords=coords, distance=dist, stats=stats)


def _narrow_band_torch(
    queries, resolution: int, tau: float, *, parts: bool = False, buried_test: bool = False
) -> BandResult:
    """``narrow_band`` with ``sign_method="pseudonormal"`` (``parts``: ``"parts"``) on the query device (torch
    tensors; one host transfer of the result). Same cells as the numpy loop: the float32 search only prunes (with slack), band membership and the
    sign are decided in float64 at the voxel level."""
    dev = queries.torch_device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    h = voxel_size(resolution)
    top = octree_top_level(resolution)
    n_top = -(-resolution // (1 << top))
    g = torch.arange(n_top, dtype=torch.int64, device=dev)
    cells = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    child = torch.from_numpy(CHILD_OFFSETS).to(dev)
    stats = {"distance_queries": 0, "sign_queries": 0, "levels": top + 1, "distance_seconds": 0.0, "sign_seconds": 0.0}
    t_start = time.perf_counter()
    tables = queries.pseudo_normal_tables()
    for level in range(top, -1, -1):
        size = 1 << level
        radius = math.sqrt(3.0) * (size - 1) / 2.0 * h
        centres = -1.0 + (cells.to(torch.float64) + 0.5) * (size * h)
        bound = tau + radius
        sync()
        t0 = time.perf_counter()
        d, face = queries.closest_torch(centres, upper_bound=bound * (1 + 1e-9) + 1e-12)
        sync()
        stats["distance_seconds"] += time.perf_counter() - t0
        stats["distance_queries"] += len(cells)
        keep = torch.nonzero(d < (tau if level == 0 else bound * (1 + 1e-9) + 1e-12)).squeeze(1)
        cells = cells[keep]
        if level == 0:
            centres, d, face = centres[keep], d[keep], face[keep]
            break
        children = (cells[:, None, :] * 2 + child[None]).reshape(-1, 3)
        cells = children[(children * (size // 2) < resolution).all(dim=1)]
    t0 = time.perf_counter()
    sign, _ = pseudo_normal_sign(tables, centres, face)
    amb = sign == 0
    device_winding = None
    if parts:
        sync()
        t1 = time.perf_counter()
        suspect = suspect_points(part_tables(queries, buried_test), centres, face)
        sync()
        stats["part_seconds"] = time.perf_counter() - t1
        stats["suspect_voxels"] = int(suspect.sum())
        if stats["suspect_voxels"] > HOST_WINDING_MAX:
            # the part rule can mark millions of voxels (8.8M on a union of primitives at 1024): libigl's winding
            # number on the host, which keeps the few pseudo-normal-ambiguous points identical across back ends,
            # took 17 s there; the back end's own (warp, on the GPU; band voxels lie within tau, which bounds its
            # closest-point search) 2.4 s in all
            device_winding = torch.nonzero(suspect & ~amb).squeeze(1)
            stats["winding_backend"] = "query device for the part rule's voxels"
        else:
            amb |= suspect
    amb_host = torch.nonzero(amb).squeeze(1)
    if len(amb_host):
        ins = winding_fallback(queries)(centres[amb_host].cpu().numpy())
        sign[amb_host] = torch.from_numpy(np.where(ins, -1, 1).astype(np.int8)).to(dev)
    if device_winding is not None and len(device_winding):
        ins = queries.inside(centres[device_winding].cpu().numpy(), max_dist=tau * (1 + 1e-6) + 1e-9)
        sign[device_winding] = torch.from_numpy(np.where(ins, -1, 1).astype(np.int8)).to(dev)
        amb = torch.cat([amb_host, device_winding])
    else:
        amb = amb_host
    sync()
    stats["sign_seconds"] += time.perf_counter() - t0
    stats["sign_queries"] += len(amb)
    stats["winding_voxels"] = len(amb)
    dist = d * sign.to(torch.float64)
    key = (cells[:, 0] * resolution + cells[:, 1]) * resolution + cells[:, 2]
    key, order = torch.sort(key)
    cells, dist = cells[order], dist[order]
    if parts:
        decided = torch.zeros(len(sign), dtype=torch.bool, device=dev)
        decided[amb] = True
        t0 = time.perf_counter()
        dist, rs = repair_signs(cells, dist, decided[order], resolution, winding_fallback(queries))
        sync()
        stats.update(rs)
        stats["winding_voxels"] += rs["repair_voxels"]
        stats["repair_seconds"] = time.perf_counter() - t0
        stats["sign_seconds"] += stats["repair_seconds"]
    coords = cells.to(torch.int16).cpu().numpy() if resolution <= 32767 else cells.cpu().numpy()
    stats["voxels"] = len(coords)
    stats["band_seconds"] = time.perf_counter() - t_start
    res = BandResult(coords=coords, distance=dist.cpu().numpy(), stats=stats)
    res.device_keys = key  # sorted packed keys on the device, for the GPU sharp mask
    return res
