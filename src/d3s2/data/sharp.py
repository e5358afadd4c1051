"""Sharp-edge voxels for the L_sharp term of paper Eq. 2 (Sec. 3.2: "active voxels situated near the sharp edges").

An edge is sharp when the angle between the normals of its two faces (the dihedral deviation from flat) exceeds
``angle`` degrees (default 30). Vertices are merged by position first, so UV/normal seams are not mistaken for
boundaries and boundary edges (one face) are never sharp. A band voxel is sharp when its centre lies within ``radius``
voxels of a sharp edge. Distances are measured to points sampled along the edges every ``h / 8`` (error < h / 16), after
a cheap candidate filter (edge samples voxelised and dilated), so the cost scales with the total sharp-edge length, not
with the band.
"""

from __future__ import annotations

import math

import numpy as np

from d3s2.data.sparse_sdf import voxel_centers, voxel_size

__all__ = ["sharp_edges", "sharp_voxel_mask"]


def sharp_edges(mesh, angle: float = 30.0) -> np.ndarray:
    """Sharp edges as segments, float64 [E, 2, 3]."""
    import trimesh

    m = trimesh.Trimesh(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), process=False)
    m.merge_vertices(merge_tex=True, merge_norm=True)
    if len(m.faces) < 2:
        return np.zeros((0, 2, 3))
    angles = m.face_adjacency_angles
    edges = m.face_adjacency_edges[angles > math.radians(angle)]
    return m.vertices[edges]


def _pack(c: np.ndarray, r: int) -> np.ndarray:
    c = c.astype(np.int64)
    return (c[:, 0] * r + c[:, 1]) * r + c[:, 2]


def sharp_voxel_mask(
    mesh,
    coords: np.ndarray,
    resolution: int,
    angle: float = 30.0,
    radius: float = 1.5,
    segments: np.ndarray | None = None,
    device_keys=None,
) -> np.ndarray:
    """bool [N]: voxels (``coords`` at ``resolution``) whose centre is within ``radius`` voxels of a sharp edge.

    ``device_keys``: optional torch int64 tensor of the band's packed keys ``(i * R + j) * R + k``, sorted, on a
    device (what the GPU narrow band returns): the same test then runs there (``_mask_torch``)."""
    coords = np.asarray(coords)
    mask = np.zeros(len(coords), dtype=bool)
    seg = sharp_edges(mesh, angle) if segments is None else segments
    if len(seg) == 0 or len(coords) == 0:
        return mask
    h = voxel_size(resolution)
    samples = _edge_samples(seg, h)
    if device_keys is not None:
        return _mask_torch(samples, device_keys, resolution, radius)
    # candidate voxels: voxels of the samples, dilated by the radius (in the max norm) plus one for the voxel extent
    base = np.unique(np.floor((samples + 1.0) / h).astype(np.int64), axis=0)
    k = int(math.ceil(radius)) + 1
    r = np.arange(-k, k + 1)
    offs = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    keys = []
    for o in offs:
        c = base + o
        c = c[((c >= 0) & (c < resolution)).all(axis=1)]
        keys.append(_pack(c, resolution))
    keys = np.unique(np.concatenate(keys))
    band_keys = _pack(coords, resolution)
    if len(band_keys) > 1 and bool((np.diff(band_keys) > 0).all()):  # sorted band (as narrow_band emits): binary search
        pos = np.clip(np.searchsorted(band_keys, keys), 0, len(band_keys) - 1)
        cand = np.unique(pos[band_keys[pos] == keys])
    else:
        cand = np.nonzero(np.isin(band_keys, keys))[0]
    if len(cand) == 0:
        return mask
    from scipy.spatial import cKDTree

    tree = cKDTree(samples)
    dist, _ = tree.query(voxel_centers(coords[cand], resolution), k=1, distance_upper_bound=radius * h)
    mask[cand] = dist <= radius * h
    return mask


def _edge_samples(seg: np.ndarray, h: float) -> np.ndarray:
    """Points along each segment every ``h / 8`` or closer, both ends included, float64 [S, 3]."""
    step = h / 8.0
    lengths = np.linalg.norm(seg[:, 1] - seg[:, 0], axis=1)
    n = np.maximum(np.ceil(lengths / step).astype(np.int64), 1)
    seg_id = np.repeat(np.arange(len(seg)), n + 1)
    t = _ramps(n)
    return seg[seg_id, 0] + t[:, None] * (seg[seg_id, 1] - seg[seg_id, 0])


def _mask_torch(samples: np.ndarray, keys, resolution: int, radius: float) -> np.ndarray:
    """The test of ``sharp_voxel_mask`` on a device: every (sample, voxel within ``ceil(radius) + 1`` in the max norm)
    pair is checked directly (a voxel is sharp iff some sample lies within ``radius * h`` of its centre, which is what
    the k-d tree answers on the CPU); no tree, no unique."""
    import torch

    dev = keys.device
    h = voxel_size(resolution)
    mask = torch.zeros(len(keys), dtype=torch.bool, device=dev)
    k = int(math.ceil(radius)) + 1
    r = torch.arange(-k, k + 1, device=dev)
    offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    pts = torch.from_numpy(np.ascontiguousarray(samples)).to(dev)
    base = torch.floor((pts + 1.0) / h).to(torch.int64)
    chunk = max(1, (1 << 25) // len(offs))
    for s in range(0, len(pts), chunk):
        c = base[s : s + chunk, None, :] + offs[None]
        ok = ((c >= 0) & (c < resolution)).all(-1)
        centre = -1.0 + (c.to(torch.float64) + 0.5) * h
        ok &= torch.linalg.norm(centre - pts[s : s + chunk, None, :], dim=-1) <= radius * h
        c = c[ok]
        q = (c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]
        pos = torch.searchsorted(keys, q).clamp(max=len(keys) - 1)
        mask[pos[keys[pos] == q]] = True
    return mask.cpu().numpy()


def _ramps(n: np.ndarray) -> np.ndarray:
    """Concatenation of ``linspace(0, 1, k + 1)`` for each k in n, vectorised."""
    total = int((n + 1).sum())
    starts = np.repeat(np.cumsum(n + 1) - (n + 1), n + 1)
    idx = np.arange(total) - starts
    return idx / np.repeat(n, n + 1)
