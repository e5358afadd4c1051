"""Generalised winding number of points with respect to a triangle mesh (Jacobson et al. 2013), used by clean-up to
find components enclosed by another (issue 24: no inner shells in the output).

``w(p) = sum_f Omega_f(p) / (4 pi)``, the solid angle of each triangle seen from ``p`` by the formula of Van Oosterom
and Strackee; ``w`` is 1 inside and 0 outside a closed, outward-wound mesh, and degrades gracefully for open ones.
Vectorised torch, chunked over faces: ``O(points x faces)``, for a few sample points per component.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["winding_numbers"]


def winding_numbers(points, vertices, faces, budget: int = 1 << 20) -> np.ndarray:
    """``points [P, 3]``, mesh ``vertices [V, 3]``, ``faces [F, 3]`` -> winding numbers ``[P]`` (float64 numpy).
    ``budget``: point-face pairs per chunk (~100 bytes each)."""
    p = torch.as_tensor(np.asarray(points, dtype=np.float64)).reshape(-1, 3)
    v = torch.as_tensor(np.asarray(vertices, dtype=np.float64)).reshape(-1, 3)
    f = torch.as_tensor(np.asarray(faces, dtype=np.int64)).reshape(-1, 3)
    total = torch.zeros(len(p), dtype=torch.float64)
    if len(p) == 0 or len(f) == 0:
        return total.numpy()
    chunk = max(1, budget // len(p))
    for start in range(0, len(f), chunk):
        tri = v[f[start:start + chunk]]  # [C, 3, 3]
        a, b, c = (tri[None, :, i] - p[:, None] for i in range(3))  # [P, C, 3]
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)
        den = (la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb)
        total += torch.atan2(det, den).sum(1)
    return (total * (2.0 / (4.0 * math.pi))).numpy()
