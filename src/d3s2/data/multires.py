"""Multi-resolution sparse SDFs (paper Sec. 3.3): derive the volume at another resolution by trilinear interpolation.

For each candidate voxel of the target resolution (voxels holding a source voxel centre; dilated by one when upsampling
or with the truncated fallback) the 8 source voxel centres around its centre are looked up (voxel centres
``-1 + (i + 0.5) * 2 / R`` at both resolutions). When all 8 exist this is plain trilinear interpolation of the sparse
samples. Some are missing only at the outer rim of the band (a corner is within ``sqrt(3)`` source voxels of the target
centre, ``sqrt(3)/2`` for an even ratio such as 1024 -> 512, so all 8 exist whenever ``|s| < tau - sqrt(3) * h_src``).
Fallback, selectable:
- ``"drop"`` (default): the voxel is left out. The result is then the direct band minus (at most) that rim.
- ``"truncated"``: the band is read as a truncated SDF, a missing corner takes ``+-tau`` with the sign of the weighted
  mean of the present ones (trilinear interpolation of the clamped field, as on a dense truncated volume); this keeps
  the rim but its values under-estimate ``|s|`` there, so a few voxels just beyond tau enter.

Voxels with ``|s| < tau`` are kept. Sharp voxels: the source mask marks centres within ``sharp_radius`` source voxels
of a sharp edge (d3s2.data.sharp), a tube around the edges; a target voxel is sharp when its centre is within
``sharp_radius * (h_dst - h_src)`` of a sharp source centre, i.e. about ``sharp_radius`` target voxels of the edge.
"""

from __future__ import annotations

import numpy as np

from d3s2.data.sparse_sdf import SparseSDF, voxel_centers
from d3s2.errors import D3S2Error

__all__ = ["resample_sparse_sdf"]

_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.int64)
_NEIGH = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.int64)


def _pack(c: np.ndarray, r: int) -> np.ndarray:
    return (c[..., 0] * r + c[..., 1]) * r + c[..., 2]


def _unpack(k: np.ndarray, r: int) -> np.ndarray:
    return np.stack([k // (r * r), (k // r) % r, k % r], axis=1)


def resample_sparse_sdf(
    src: SparseSDF, resolution: int, tau: float | None = None, fallback: str = "drop", sharp_radius: float = 1.5
) -> SparseSDF:
    """Sparse SDF at ``resolution`` (usually lower, e.g. 1024 -> 512/384/256) from ``src`` (module docstring)."""
    if fallback not in ("drop", "truncated"):
        raise D3S2Error(f"unknown resampling fallback {fallback!r}; use 'drop' or 'truncated'")
    tau = src.tau if tau is None else float(tau)
    if tau > src.tau:
        raise D3S2Error(
            f"cannot resample to tau={tau} from a band stored with tau={src.tau}: values beyond are unknown"
        )
    r_src, r = src.resolution, int(resolution)
    if len(src) == 0:
        return SparseSDF(np.zeros((0, 3)), np.zeros(0), r, tau, src.scale, src.offset, np.zeros(0, bool))
    sc = src.coords.astype(np.int64)
    keys = _pack(sc, r_src)
    order = np.argsort(keys)
    keys, vals, sharp = keys[order], src.sdf[order].astype(np.float64), src.sharp[order]
    # candidate target voxels: those containing a source voxel centre (enough when downsampling without the rim)
    base = np.unique(_pack(np.floor((voxel_centers(sc, r_src) + 1.0) * (r / 2.0)).astype(np.int64), r))
    if fallback == "truncated" or r > r_src:
        base = _unpack(base, r)
        cand = (base[:, None, :] + _NEIGH[None]).reshape(-1, 3)
        cand = np.unique(_pack(cand[((cand >= 0) & (cand < r)).all(axis=1)], r))
    else:
        cand = base
    cand = _unpack(cand, r)
    # continuous source index of each target centre; the 8 surrounding source voxels and trilinear weights
    u = (voxel_centers(cand, r) + 1.0) * (r_src / 2.0) - 0.5
    i0 = np.floor(u).astype(np.int64)
    f = u - i0
    corners = i0[:, None, :] + _CORNERS[None]  # [M, 8, 3]
    w = np.prod(np.where(_CORNERS[None] == 1, f[:, None, :], 1.0 - f[:, None, :]), axis=2)  # [M, 8]
    inb = ((corners >= 0) & (corners < r_src)).all(axis=2)
    ck = _pack(np.clip(corners, 0, r_src - 1), r_src)
    pos = np.clip(np.searchsorted(keys, ck), 0, len(keys) - 1)
    present = inb & (keys[pos] == ck)
    cv = np.where(present, vals[pos], 0.0)
    wp = np.where(present, w, 0.0)
    mean_present = (wp * cv).sum(1) / np.maximum(wp.sum(1), 1e-30)
    fill = np.where(mean_present < 0, -src.tau, src.tau)
    s = (wp * cv).sum(1) + ((w - wp) * fill[:, None]).sum(1)
    full = (present | (w < 1e-9)).all(axis=1)  # a corner of zero weight need not exist
    keep = (full if fallback == "drop" else wp.sum(1) > 0) & (np.abs(s) < tau)
    coords, s = cand[keep], s[keep]
    out_sharp = np.zeros(len(coords), dtype=bool)
    if sharp.any() and len(coords):
        from scipy.spatial import cKDTree

        # sharp source centres fill a tube of radius sharp_radius * h_src around the edges: measure to the tube
        bound = max(sharp_radius * (2.0 / r - 2.0 / r_src), 0.0) + 1e-9
        d, _ = cKDTree(voxel_centers(sc[src.sharp], r_src)).query(
            voxel_centers(coords, r), k=1, distance_upper_bound=bound
        )
        out_sharp = d <= bound
    return SparseSDF(coords, s, r, tau, src.scale, src.offset, out_sharp)
