"""Where the pseudo-normal sign can be wrong on meshes made of several closed parts that interpenetrate (issue 25;
the ``"parts"`` sign rule of ``d3s2.data.sdf``, which ``sign="auto"`` uses; paper Sec. 5.1, sign of the SDF of Eq. 1).

The pseudo-normal sign of ``d3s2.geometry.pseudo_normal`` says "outside" whenever the point lies on the outer side of
the surface at its closest point ``c``. That is the truth only where the surface at ``c`` is *exposed*: the winding
number just outside it is 0 and just inside it is 1. Figures and CAD models are often unions of closed parts concatenated
without a boolean union; a point inside part A whose closest point lies on part B (B pokes into A) is then inside the
object although B's normal points away from it. Such voxels are few (under 1% of the band) but sit right where the VAE
learns the surface, and they punch holes and inner walls into the training targets.

Two tests mark the voxels the pseudo-normal may get wrong; the caller decides them by the generalised winding number
(``sign="parts"`` runs the first, ``buried_test=True`` adds the second; self-intersections within a part are otherwise
left to the cheaper sign repair of ``d3s2.data.sign_repair``):

- *Part hulls* (exact for unions of closed, non-self-intersecting parts): the mesh is split into parts, the connected
  components of its faces (vertices merged by position), each bounded by a 26-DOP (its extent along 13 directions:
  the axes, face and body diagonals; much tighter than a box around slanted parts). A point inside closed part A is
  inside A's DOP, and if its closest face is on another part B then A and B intersect, so their DOPs overlap. Hence:
  a voxel whose centre lies in the DOP of a part A other than the part of its closest face, with the two DOPs
  overlapping, is *suspect*.
  Every voxel inside some part other than the one of its closest face is therefore suspect, and the other voxels are
  inside or outside exactly as the (closed) part of their closest face says, which is what the pseudo-normal computes.
- *Buried faces* (within one part: a self-intersecting surface): the winding number of the face's own part is taken
  just outside and just inside each face's centroid (``1e-6`` along its normal) and just outside each vertex (along
  its area-weighted normal). A face where one of them lies on the other side of 1/2 than the pseudo-normal says
  (more than 1/2 outside, less inside) is buried. Suspect: voxels whose closest face ``f`` is buried, or has a
  buried face within ``|x - a| + diam(f)`` of the voxel ``x`` (``a`` a corner of ``f``): a face crossing another
  sheet of its part meets a buried face of that sheet (one with a corner beyond it), within ``diam(f)`` of every point
  of ``f``. Not detected: a sheet that pierces only the interiors of faces, none of its corners or centroids buried
  (a sliver smaller than the faces around it). Next to a hole the winding number only drifts towards 1/2; the
  pseudo-normal's own test (1-ring of a boundary edge) hands those voxels over.

With the buried-face test, clean single-part meshes pay only it (about 2.5 winding numbers per face, near the surface, where
the fast winding number is slowest: ~1.5 s for the 100k-face bunny on 2 cores); the hull test costs one
projection of the band candidates and one comparison pass per part whose DOP overlaps another part's; the proximity
test one bounded distance query (libigl, host) per band voxel near a buried face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d3s2.errors import D3S2Error
from d3s2.geometry.queries import CpuQueries, winding_factory

__all__ = ["PartTables", "face_parts", "buried_faces", "build_part_tables", "part_tables", "suspect_points"]

# 13 directions of a 26-DOP (axes, face diagonals, body diagonals): much tighter than a box around slanted parts
_DIRS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1],
     [1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]],
    dtype=np.float64,
)
_SORT_ABOVE = 64  # parts with overlapping boxes above which the band is sorted by x once (slab search per part)
_OFFSET = 1e-6  # along the face normal, in normalised units ([-1, 1]^3): well under a voxel at any resolution
_EXACT_BUDGET = 1e7  # point-triangle solid angles for the exact re-check of unsure samples (~0.4 s on 2 cores)


@dataclass
class PartTables:
    face_part: torch.Tensor  # int64 [F]: part (connected component) of each face
    lo: torch.Tensor  # float64 [K, D]: part bounding 26-DOPs, extent along each of the D = 13 directions _DIRS
    hi: torch.Tensor  # float64 [K, D]
    overlap: torch.Tensor  # bool [K, K]: DOPs overlap (diagonal False)
    dirs: torch.Tensor  # float64 [D, 3]
    buried: torch.Tensor  # bool [F]: not exposed w.r.t. its own part (buried_faces)
    face_diam: torch.Tensor  # float64 [F]: longest edge
    first_corner: torch.Tensor  # float64 [F, 3]
    buried_vertices: np.ndarray  # float64 [Vb, 3], host: the buried faces as a mesh (for the proximity test)
    buried_faces: np.ndarray  # int64 [Fb, 3]

    @property
    def num_parts(self) -> int:
        return len(self.lo)

    def to(self, device) -> "PartTables":
        moved = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device)
        return PartTables(**moved)


def _merged_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces [F, 3] over vertices merged by exact position (UV / normal seams do not split parts)."""
    _, merged = np.unique(np.asarray(vertices, dtype=np.float64), axis=0, return_inverse=True)
    return merged.reshape(-1)[np.asarray(faces, dtype=np.int64).reshape(-1, 3)]


def face_parts(vertices: np.ndarray, faces: np.ndarray, merged_faces: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Connected components of the faces (sharing a vertex, vertices merged by exact position) -> (label int64 [F],
    number of parts)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    F = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(F) == 0:
        return np.zeros(0, dtype=np.int64), 0
    Fm = _merged_faces(vertices, F) if merged_faces is None else merged_faces
    n = int(Fm.max()) + 1
    rows = np.concatenate([Fm[:, 0], Fm[:, 1]])
    cols = np.concatenate([Fm[:, 1], Fm[:, 2]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, vlabel = connected_components(graph, directed=False)
    # renumber the parts that own faces (merged vertex ids no face uses would leave empty labels)
    used, label = np.unique(vlabel[Fm[:, 0]], return_inverse=True)
    return label.reshape(-1).astype(np.int64), len(used)


def buried_faces(
    vertices: np.ndarray, faces: np.ndarray, winding, merged_faces: np.ndarray | None = None
) -> np.ndarray:
    """bool [F]: faces not exposed at their centroid or at one of their corners (module docstring). ``winding``:
    ``(points [M, 3], exact=False) -> float64 [M]`` generalised winding numbers of the mesh (``exact=True``: the plain
    sum over all faces, asked for the samples the fast one puts more than 1/4 from the expected value, when their count
    times F is under ``_EXACT_BUDGET``). A corner is tested along the
    area-weighted normal of its (merged) vertex. Degenerate faces are left False (the pseudo-normal already hands their
    voxels to the winding number)."""
    V = np.asarray(vertices, dtype=np.float64)
    F = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(F) == 0:
        return np.zeros(0, dtype=bool)
    Fm = _merged_faces(V, F) if merged_faces is None else merged_faces
    a, b, c = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    cross = np.cross(b - a, c - a)
    norm = np.linalg.norm(cross, axis=1)
    ok = norm > 1e-300
    n = cross[ok] / norm[ok, None]
    centre = ((a + b + c) / 3.0)[ok]
    # merged vertices: position and area-weighted normal
    nv = int(Fm.max()) + 1
    pos = np.zeros((nv, 3))
    pos[Fm.reshape(-1)] = V[F.reshape(-1)]
    vn = np.zeros((nv, 3))
    for k in range(3):
        np.add.at(vn, Fm[:, k], cross)
    vlen = np.linalg.norm(vn, axis=1)
    vok = vlen > 1e-300
    vn = np.where(vok[:, None], vn / np.where(vok, vlen, 1.0)[:, None], 0.0)
    m = len(centre)
    # a vertex is tested on its outer side only: the summed normal points out of the solid at any closed vertex, but
    # not always into it (a thin wedge), so an inner test there would flag sound vertices
    pts = np.concatenate([centre + _OFFSET * n, centre - _OFFSET * n, pos + _OFFSET * vn])
    expect = np.concatenate([np.zeros(m), np.ones(m), np.zeros(nv)])
    w = winding(pts)
    # flagged: the winding number right at the face puts the sample on the other side of 1/2 than the pseudo-normal
    # does (next to a hole it only drifts towards 1/2: the pseudo-normal's own 1-ring test hands those over)
    off = (w > 0.5) != (expect > 0.5)
    unsure = np.abs(w - expect) > 0.25
    if unsure.any() and int(unsure.sum()) * len(F) <= _EXACT_BUDGET:
        # the fast (hierarchical) winding number errs next to slivers (0.4 instead of 0 beside a 1e-5-wide face of a
        # convex hull): the samples it puts far from the expected value ask the exact sum over all faces
        idx = np.nonzero(unsure)[0]
        off[idx] = (winding(pts[idx], exact=True) > 0.5) != (expect[idx] > 0.5)
    face_bad = off[:m] | off[m : 2 * m]
    vert_bad = vok & off[2 * m :]
    out = np.zeros(len(F), dtype=bool)
    out[ok] = face_bad
    out |= vert_bad[Fm].any(axis=1)
    return out


def build_part_tables(vertices: np.ndarray, faces: np.ndarray, winding_of, device="cpu") -> PartTables:
    """Parts, their DOPs and the buried faces of a mesh. ``winding_of(V, F)`` -> a ``winding`` function (as in
    :func:`buried_faces`) of the mesh ``(V, F)``: each part is tested against its own winding number, so the faces
    inside *other* parts (the hull test's business) are not flagged (one that ignores ``(V, F)`` and answers for the
    whole mesh flags more faces: more suspects, signs still right). ``winding_of=None``: no buried-face test."""
    V = np.asarray(vertices, dtype=np.float64)
    F = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    Fm = _merged_faces(V, F) if len(F) else np.zeros((0, 3), dtype=np.int64)
    label, k = face_parts(V, F, Fm)
    D = len(_DIRS)
    if k <= 1 and winding_of is None:  # one part: no hull test, nothing to build
        e = np.zeros((k, D))
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
        return PartTables(
            face_part=t(label), lo=t(e), hi=t(e), overlap=t(np.zeros((k, k), dtype=bool)), dirs=t(_DIRS),
            buried=t(np.zeros(len(F), dtype=bool)), face_diam=t(np.zeros(len(F))), first_corner=t(np.zeros((len(F), 3))),
            buried_vertices=np.zeros((0, 3)), buried_faces=np.zeros((0, 3), dtype=np.int64),
        )
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
    buried = np.zeros(len(F), dtype=bool)
    if winding_of is None:
        pass
    elif k == 1:
        buried = buried_faces(V, F, winding_of(V, F), Fm)
    elif k > 1:
        order = np.argsort(label, kind="stable")
        bounds = np.searchsorted(label[order], np.arange(k + 1))
        for a in range(k):
            idx = order[bounds[a] : bounds[a + 1]]
            used, sub = np.unique(F[idx], return_inverse=True)
            sub = sub.reshape(-1, 3)
            sub_merged = np.unique(Fm[idx], return_inverse=True)[1].reshape(-1, 3)
            buried[idx] = buried_faces(V[used], sub, winding_of(V[used], sub), sub_merged)
    e = V[F[:, [1, 2, 0]]] - V[F]
    diam = np.linalg.norm(e, axis=2).max(axis=1) if len(F) else np.zeros(0)
    used, bf = np.unique(F[buried], return_inverse=True)

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    return PartTables(
        face_part=t(label),
        lo=t(lo),
        hi=t(hi),
        overlap=t(overlap),
        dirs=t(_DIRS),
        buried=t(buried),
        face_diam=t(diam),
        first_corner=t(V[F[:, 0]] if len(F) else np.zeros((0, 3))),
        buried_vertices=V[used],
        buried_faces=bf.reshape(-1, 3).astype(np.int64),
    )


def part_tables(queries, buried_test: bool = False) -> PartTables:
    """Parts, part hulls and (``buried_test``) buried faces of the mesh of ``queries`` (a ``CpuQueries`` /
    ``WarpQueries`` of ``d3s2.geometry.queries``), built once each and kept on the queries object; on the host for
    libigl queries, on the query device otherwise (the buried-face winding numbers through ``winding_factory``)."""
    cache = queries.__dict__.setdefault("_part_tables", {})
    if buried_test not in cache:
        device = "cpu" if isinstance(queries, CpuQueries) else queries.torch_device
        cache[buried_test] = build_part_tables(
            queries.V, queries.F, winding_factory(queries) if buried_test else None, device
        )
    return cache[buried_test]


def _near_buried(tables: PartTables, points: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """bool [N]: a buried face (of any part) lies within ``|x - a| + diam(f)`` of the point ``x`` (``f`` its closest
    face, ``a`` a corner of ``f``). If ``f`` crosses a sheet of its own part, a face of that sheet crossing ``f`` has a
    corner beyond ``f``, so it is buried, and it comes within ``diam(f)`` of the closest point ``c`` of ``x``
    (``|x - c| <= |x - a|``)."""
    out = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    if len(tables.buried_faces) == 0 or len(points) == 0:
        return out
    bound = torch.linalg.norm(points - tables.first_corner[face], dim=1) + tables.face_diam[face]
    verts = torch.as_tensor(tables.buried_vertices, device=points.device)
    box_lo, box_hi = verts.min(dim=0).values, verts.max(dim=0).values
    gap = torch.linalg.norm(torch.clamp(torch.maximum(box_lo - points, points - box_hi), min=0.0), dim=1)
    cand = torch.nonzero(gap <= bound).squeeze(1)  # only these cross to the host
    if len(cand) == 0:
        return out
    b = bound[cand].cpu().numpy()
    try:
        q = CpuQueries(tables.buried_vertices, tables.buried_faces)
    except D3S2Error:  # no libigl: every candidate stays suspect (safe, only slower)
        out[cand] = True
        return out
    d = q.unsigned_distance(points[cand].cpu().numpy(), upper_bound=float(b.max()) * (1 + 1e-9) + 1e-12)
    out[cand[torch.from_numpy(d <= b).to(points.device)]] = True
    return out


def suspect_points(tables: PartTables, points: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """bool [N]: points (float64 [N, 3]) with closest face ``face`` (int64 [N]) whose pseudo-normal sign may be wrong
    (module docstring); on the tables' device."""
    suspect = tables.buried[face] | _near_buried(tables, points, face)
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
