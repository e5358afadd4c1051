"""Where the pseudo-normal sign can be wrong on meshes made of several closed parts that interpenetrate (issue 25;
the ``"parts"`` sign rule of ``d3s2.data.sdf``, which ``sign="auto"`` uses; paper Sec. 5.1, sign of the SDF of Eq. 1).

The pseudo-normal sign of ``d3s2.data.pseudo_normal`` says "outside" whenever the point lies on the outer side of the
surface at its closest point ``c``. That is the truth only where the surface at ``c`` is *exposed*: the winding number
just outside it is 0 and just inside it is 1. Figures and CAD models are often unions of closed parts concatenated
without a boolean union; a point inside part A whose closest point lies on part B (B pokes into A) is then inside the
object although B's normal points away from it. Such voxels are few (under 1% of the band) but sit right where the VAE
learns the surface, and they punch holes and inner walls into the training targets.

Two tests mark the voxels the pseudo-normal may get wrong; the caller decides them by the generalised winding number:

- *Part hulls* (exact for unions of closed, non-self-intersecting parts): the mesh is split into parts, the connected
  components of its faces (vertices merged by position), each bounded by a 26-DOP (its extent along 13 directions:
  the axes, face and body diagonals; much tighter than a box around slanted parts). A point inside closed part A is
  inside A's DOP, and if its closest face is on another part B then A and B intersect, so their DOPs overlap. Hence:
  a voxel whose centre lies in the DOP of a part A other than the part of its closest face, with the two DOPs
  overlapping, is *suspect*.
  Every voxel inside some part other than the one of its closest face is therefore suspect, and the other voxels are
  inside or outside exactly as the (closed) part of their closest face says, which is what the pseudo-normal computes.
- *Buried faces* (within one part, e.g. a self-intersecting surface): the winding number of the whole mesh is taken
  just outside and just inside each face's centroid (``1e-6`` along its normal); a face where it is not about 0 and 1
  (``|w - expected| > 1/4``) is buried, and voxels whose closest face is buried are suspect. Not detected: a face that
  crosses another sheet of its own part while its centroid stays exposed (the buried piece of that face is missed).

Single-part meshes pay only the buried-face test (two winding numbers per face); the hull test costs one projection
of the band candidates and one comparison pass per part whose DOP overlaps another part's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PartTables", "face_parts", "buried_faces", "build_part_tables", "suspect_points"]

# 13 directions of a 26-DOP (axes, face diagonals, body diagonals): much tighter than a box around slanted parts
_DIRS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1],
     [1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]],
    dtype=np.float64,
)
_SORT_ABOVE = 64  # parts with overlapping boxes above which the band is sorted by x once (slab search per part)
_OFFSET = 1e-6  # along the face normal, in normalised units ([-1, 1]^3): well under a voxel at any resolution


@dataclass
class PartTables:
    face_part: torch.Tensor  # int64 [F]: part (connected component) of each face
    lo: torch.Tensor  # float64 [K, D]: part bounding 26-DOPs, extent along each of the D = 13 directions _DIRS
    hi: torch.Tensor  # float64 [K, D]
    overlap: torch.Tensor  # bool [K, K]: DOPs overlap (diagonal False)
    dirs: torch.Tensor  # float64 [D, 3]
    buried: torch.Tensor  # bool [F]: the winding number next to the face centroid is not 0 outside / 1 inside

    @property
    def num_parts(self) -> int:
        return len(self.lo)

    def to(self, device) -> "PartTables":
        return PartTables(*(getattr(self, k).to(device) for k in self.__dataclass_fields__))


def face_parts(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of the faces (sharing a vertex, vertices merged by exact position) -> (label int64 [F],
    number of parts)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    F = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(F) == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, merged = np.unique(np.asarray(vertices, dtype=np.float64), axis=0, return_inverse=True)
    Fm = merged.reshape(-1)[F]
    n = int(Fm.max()) + 1
    rows = np.concatenate([Fm[:, 0], Fm[:, 1]])
    cols = np.concatenate([Fm[:, 1], Fm[:, 2]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    k, vlabel = connected_components(graph, directed=False)
    label = vlabel[Fm[:, 0]].astype(np.int64)
    # renumber the parts that own faces (unused merged vertices would leave empty labels)
    used, label = np.unique(label, return_inverse=True)
    return label.reshape(-1), len(used)


def buried_faces(vertices: np.ndarray, faces: np.ndarray, winding) -> np.ndarray:
    """bool [F]: faces whose centroid is not exposed (module docstring). ``winding``: points [M, 3] -> generalised
    winding numbers float64 [M] of the whole mesh. Degenerate faces are left False (the pseudo-normal already hands
    their voxels to the winding number)."""
    V = np.asarray(vertices, dtype=np.float64)
    F = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(F) == 0:
        return np.zeros(0, dtype=bool)
    a, b, c = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    n = np.cross(b - a, c - a)
    norm = np.linalg.norm(n, axis=1)
    ok = norm > 1e-300
    n = n[ok] / norm[ok, None]
    centre = ((a + b + c) / 3.0)[ok]
    w = winding(np.concatenate([centre + _OFFSET * n, centre - _OFFSET * n]))
    m = len(centre)
    out = np.zeros(len(F), dtype=bool)
    out[ok] = (np.abs(w[:m]) > 0.25) | (np.abs(w[m:] - 1.0) > 0.25)
    return out


def build_part_tables(vertices: np.ndarray, faces: np.ndarray, winding, device="cpu") -> PartTables:
    """Parts, their boxes and the buried faces of a mesh (``winding`` as in :func:`buried_faces`)."""
    V = np.asarray(vertices, dtype=np.float64)
    F = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    label, k = face_parts(V, F)
    D = len(_DIRS)
    lo = np.full((k, D), np.inf)
    hi = np.full((k, D), -np.inf)
    for corner in range(3):
        p = V[F[:, corner]] @ _DIRS.T
        np.minimum.at(lo, label, p)
        np.maximum.at(hi, label, p)
    pad = 1e-9 * (1.0 + np.abs(lo).max(initial=0.0) + np.abs(hi).max(initial=0.0))  # round-off of the projections
    lo -= pad
    hi += pad
    if k <= 4096:
        overlap = ((lo[:, None, :] <= hi[None, :, :]) & (lo[None, :, :] <= hi[:, None, :])).all(axis=2)
        np.fill_diagonal(overlap, False)
    else:  # a K^2 matrix would be too large: treat every pair as overlapping (more suspects, still correct)
        overlap = ~np.eye(k, dtype=bool)
    buried = buried_faces(V, F, winding)

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    return PartTables(
        face_part=t(label), lo=t(lo), hi=t(hi), overlap=t(overlap), dirs=t(_DIRS), buried=t(buried)
    )


def suspect_points(tables: PartTables, points: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """bool [N]: points (float64 [N, 3]) with closest face ``face`` (int64 [N]) whose pseudo-normal sign may be wrong
    (module docstring); on the tables' device."""
    suspect = tables.buried[face]
    if tables.num_parts < 2 or len(points) == 0:
        return suspect
    part = tables.face_part[face]
    has_partner = tables.overlap.any(dim=1)
    cand = torch.nonzero(has_partner[part]).squeeze(1)
    if len(cand) == 0:
        return suspect
    p, pp = points[cand] @ tables.dirs.T, part[cand]  # [M, D] projections
    hit = torch.zeros(len(cand), dtype=torch.bool, device=points.device)
    parts = torch.nonzero(has_partner).squeeze(1).tolist()
    if len(parts) <= _SORT_ABOVE:
        for a in parts:
            inside = ((p >= tables.lo[a]) & (p <= tables.hi[a])).all(dim=1)
            hit |= inside & tables.overlap[a][pp]
    else:  # many parts: sort along x once, each part then scans only its x-slab
        xs, order = torch.sort(p[:, 0].contiguous())
        lo_i = torch.searchsorted(xs, tables.lo[:, 0].contiguous(), right=False).tolist()
        hi_i = torch.searchsorted(xs, tables.hi[:, 0].contiguous(), right=True).tolist()
        for a in parts:
            if hi_i[a] <= lo_i[a]:
                continue
            idx = order[lo_i[a] : hi_i[a]]
            q = p[idx, 1:]
            inside = ((q >= tables.lo[a, 1:]) & (q <= tables.hi[a, 1:])).all(dim=1)
            hit[idx[inside & tables.overlap[a][pp[idx]]]] = True
    suspect = suspect.clone()
    suspect[cand] |= hit
    return suspect
