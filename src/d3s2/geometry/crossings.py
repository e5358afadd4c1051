"""Winding numbers of points with respect to a *closed* triangle mesh by signed ray crossings, a fast exact stand-in
for the solid-angle sum of :mod:`d3s2.geometry.winding` used by clean-up's enclosed-component test (issue 24).

For a closed, consistently oriented mesh the generalised winding number is an integer, equal to the signed number of
crossings of any ray from the point. The ray is +x in a fixed rotated frame (so grid-aligned marching-cubes
vertices do not lie on it); candidate triangles come from a uniform 2-D grid over the projected bounding boxes, so
the cost is about ``points x (triangles per cell)`` instead of ``points x faces``. Points whose ray passes within
rounding of an edge or vertex, or that lie on the surface, are reported as ambiguous; callers evaluate those with
the exact solid-angle sum. Points outside the mesh's bounding box have winding number 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["is_closed", "crossing_winding_numbers"]

# a fixed, generic rotation: keeps the ray off the axis-aligned edges and vertex rows of marching-cubes meshes
_ROTS = (np.linalg.qr(np.array([[0.8147, 0.0975, 0.1576], [0.9058, 0.2785, 0.9706], [0.1270, 0.5469, 0.9572]]))[0],
         np.linalg.qr(np.array([[0.4218, 0.6557, 0.6787], [0.9157, 0.0357, 0.7577], [0.7922, 0.8491, 0.7431]]))[0])


def is_closed(faces: np.ndarray) -> bool:
    """The directed edges, as a multiset, equal their reverses: the faces form a closed, consistently oriented surface
    (boundary zero; non-manifold edges allowed), so the winding number is an integer given by signed crossings."""
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(f) == 0:
        return False
    a = f.reshape(-1)
    b = f[:, [1, 2, 0]].reshape(-1)
    n = int(max(a.max(), b.max())) + 1
    fwd = np.sort(a * n + b)
    return bool(np.array_equal(fwd, np.sort(b * n + a)))


def crossing_winding_numbers(points, vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    """``(w [P] int64, ambiguous [P] bool)`` for a closed mesh (see :func:`is_closed`); ``w`` is meaningless where
    ``ambiguous``. A point ambiguous along the first ray direction is retried along a second one."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    w, amb = _crossings(p, vertices, faces, _ROTS[0])
    if amb.any():
        w2, amb2 = _crossings(p[amb], vertices, faces, _ROTS[1])
        w[amb], amb[amb] = w2, amb2
    return w, amb


def _face_range(c: np.ndarray, corners: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per face the min and max of the vertex values ``c`` (1-D gathers and element-wise passes only)."""
    a, b, d = (c[k] for k in corners)
    lo = np.minimum(a, b)
    np.minimum(lo, d, out=lo)
    np.maximum(a, b, out=a)
    np.maximum(a, d, out=a)
    return lo, a


def _crossings(points, vertices, faces, rot) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    w = np.zeros(len(p), dtype=np.int64)
    amb = np.zeros(len(p), dtype=bool)
    if len(p) == 0 or len(f) == 0:
        return w, amb
    used = np.zeros(len(v), dtype=bool)
    used[f.reshape(-1)] = True
    # only the mesh's own vertices: a small container of a big mesh stays cheap (a gather, not a search, for big ones)
    v, f = v[used], (np.cumsum(used) - 1)[f]
    lo, hi = v.min(0), v.max(0)
    inside_box = np.all((p >= lo) & (p <= hi), axis=1)
    idx = np.nonzero(inside_box)[0]
    if len(idx) == 0:
        return w, amb
    centre = (lo + hi) / 2
    q = (p[idx] - centre) @ rot
    vr = (v - centre) @ rot  # rotated vertices; triangles are gathered per candidate only
    scale = float(np.abs(vr).max()) + 1e-300
    # projected (y, z) boxes of the faces from contiguous columns: strided gathers and row reductions cost several
    # times more on millions of faces
    corners = [np.ascontiguousarray(f[:, i]) for i in range(3)]
    ymin, ymax = _face_range(np.ascontiguousarray(vr[:, 1]), corners)
    zmin, zmax = _face_range(np.ascontiguousarray(vr[:, 2]), corners)
    del corners
    cell = max(float(max((ymax - ymin).max(), (zmax - zmin).max())), scale * 1e-9)
    origin = np.array([ymin.min(), zmin.min()])
    ncol = int(np.floor((zmax.max() - origin[1]) / cell)) + 3
    del ymax, zmax
    # each box spans at most 2 x 2 cells from its lower corner's cell
    tkey = np.floor((ymin - origin[0]) / cell).astype(np.int64) * ncol + np.floor((zmin - origin[1]) / cell).astype(np.int64)
    del ymin, zmin
    order = np.argsort(tkey, kind="stable")
    skey = tkey[order]
    pc = np.floor((q[:, 1:] - origin) / cell).astype(np.int64)
    pts, cand = [], []
    for dy in (0, 1):
        for dz in (0, 1):
            key = (pc[:, 0] - dy) * ncol + (pc[:, 1] - dz)
            a, b = np.searchsorted(skey, key, "left"), np.searchsorted(skey, key, "right")
            cnt = b - a
            rep = np.repeat(np.arange(len(q)), cnt)
            start = np.repeat(a - np.cumsum(cnt) + cnt, cnt)
            pts.append(rep)
            cand.append(order[start + np.arange(len(rep))])
    pi, ti = np.concatenate(pts), np.concatenate(cand)
    if len(pi):
        t = vr[f[ti]]  # [M, 3, 3]
        y, z = q[pi, 1, None] - t[:, :, 1], q[pi, 2, None] - t[:, :, 2]  # vertex -> point offsets [M, 3]
        # 2-D edge functions of the point against each projected edge (i -> i+1)
        e = y * np.roll(z, -1, 1) - z * np.roll(y, -1, 1)
        eps = 1e-10 * scale * scale
        near = (np.abs(e) <= eps).any(1)
        hit = ((e > eps).all(1) | (e < -eps).all(1))
        # x of the plane at the point's (y, z), by barycentric weights of the 2-D triangle
        area = e.sum(1)
        safe = np.where(area == 0, 1.0, area)
        bary = np.roll(e, -1, 1) / safe[:, None]  # weight of vertex i is the edge function opposite it
        xs = (bary * t[:, :, 0]).sum(1)
        dx = xs - q[pi, 0]
        on = (hit | near) & (np.abs(dx) <= 1e-9 * scale)
        ahead = hit & (dx > 0)
        sign = np.sign(area)  # projected orientation = sign of the normal's x
        np.add.at(w, idx[pi[ahead]], sign[ahead].astype(np.int64))
        bad = (near & (dx > -1e-9 * scale)) | on
        amb[idx[pi[bad]]] = True
    return w, amb
