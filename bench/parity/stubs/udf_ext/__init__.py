"""Stand-in for the authors' ``udf_ext`` CUDA extension (third_party/voxelize; see ../README.md), in plain PyTorch.

``compute_valid_udf(vertices [V, 3] float32, faces [F, 3] int32, udf [dim^3] int32, n_faces, dim, threshold)``
updates ``udf`` in place: for every triangle, the grid points ``(i, j, k) / (dim - 1) - 0.5`` inside the triangle's
bounding box (grown by ``int(threshold + 1)`` points each side, clamped to the grid) whose float32 point-triangle
distance ``d`` is below ``threshold / dim`` get ``udf = min(udf, int(d * 1e7))``. The distance follows the
extension's construction: projection onto the plane with a same-side test of the three edge cross products, else the
nearest of the three clamped edge distances; degenerate triangles fall back to points / segments.
"""

from __future__ import annotations

import torch

__all__ = ["compute_valid_udf", "point_triangle_distance"]

_PAIRS = 1 << 23  # (triangle, grid point) pairs per chunk


def _cross(a, b):
    return torch.stack([a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1], a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
                        a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]], -1)


def _dot(a, b):
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _segment_distance(p, a, b):
    d = b - a
    t = _dot(p - a, d) / _dot(d, d)
    closest = torch.where((t < 0)[..., None], a, torch.where((t > 1)[..., None], b, a + t[..., None] * d))
    return torch.sqrt(_dot(p - closest, p - closest))


def point_triangle_distance(p: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """float32 distance of points ``p [..., 3]`` to triangles ``v0, v1, v2 [..., 3]`` (broadcast)."""
    e0, e1 = v1 - v0, v2 - v0
    normal = _cross(e0, e1)
    qv = p - v0
    nn = _dot(normal, normal)
    length = torch.sqrt(nn)
    unit = normal * torch.where(length == 0, torch.zeros_like(length), 1 / length)[..., None]
    plane = _dot(unit, qv)
    proj = p - plane[..., None] * unit
    c0 = _cross(v0 - v1, v0 - proj)
    c1 = _cross(v1 - v2, v1 - proj)
    c2 = _cross(v2 - v0, v2 - proj)
    inside = (_dot(c0, c1) > 0) & (_dot(c1, c2) > 0) & (_dot(c0, c2) > 0)
    edges = torch.minimum(torch.minimum(_segment_distance(p, v0, v1), _segment_distance(p, v0, v2)),
                          _segment_distance(p, v1, v2))
    d = torch.where(inside, plane.abs(), edges)
    d = torch.where(nn == 0, torch.sqrt(_dot(qv, qv)), d)
    same01, same02, same12 = (v0 == v1).all(-1), (v0 == v2).all(-1), (v1 == v2).all(-1)
    d = torch.where(same12 & ~same01, _segment_distance(p, v0, v1), d)
    d = torch.where(same02 & ~same01, _segment_distance(p, v0, v1), d)
    d = torch.where(same01 & ~same02, _segment_distance(p, v0, v2), d)
    return torch.where(same01 & same02, torch.sqrt(_dot(p - v0, p - v0)), d)


def compute_valid_udf(vertices, faces, udf, n_faces, dim=512, threshold=8.0):
    v = vertices.float()
    tri = v[faces[:n_faces].long()]  # [F, 3, 3]
    lo = tri.min(1).values.double()
    hi = tri.max(1).values.double()
    grow = int(threshold + 1)
    # the extension converts (x + 0.5) * (dim - 1) to float before floorf
    imin = (torch.floor(((lo + 0.5) * (dim - 1)).float()).long() - grow).clamp(0, dim - 1)
    imax = (torch.floor(((hi + 0.5) * (dim - 1)).float()).long() + grow).clamp(0, dim - 1)
    ext = imax - imin + 1  # [F, 3]
    order = torch.argsort(ext.prod(1))
    bound = threshold / dim
    start = 0
    while start < len(order):
        box = ext[order[start]].clone()
        stop = start + 1
        # grow the chunk while the padded box keeps the pair count bounded
        while stop < len(order):
            cand = torch.maximum(box, ext[order[min(len(order) - 1, stop + 255)]])
            if int(cand.prod()) * (min(len(order), stop + 256) - start) > _PAIRS:
                break
            box, stop = cand, min(len(order), stop + 256)
        sel = order[start:stop]
        box = ext[sel].max(0).values
        g = [torch.arange(int(b), device=v.device) for b in box]
        local = torch.stack(torch.meshgrid(*g, indexing="ij"), -1).reshape(-1, 3)  # [P, 3]
        for s in range(0, len(sel), max(1, _PAIRS // max(1, len(local)))):
            t = sel[s:s + max(1, _PAIRS // max(1, len(local)))]
            idx = imin[t][:, None, :] + local[None]  # [T, P, 3]
            ok = (idx <= imax[t][:, None, :]).all(-1)
            pts = (idx.float() / (dim - 1) - 0.5)
            tt = tri[t]
            d = point_triangle_distance(pts, tt[:, None, 0], tt[:, None, 1], tt[:, None, 2])
            hit = ok & (d < bound)
            flat = (idx[..., 0] * dim + idx[..., 1]) * dim + idx[..., 2]
            udf.scatter_reduce_(0, flat[hit], (d[hit] * 10000000).to(torch.int32), reduce="amin")
        start = stop
    return udf
