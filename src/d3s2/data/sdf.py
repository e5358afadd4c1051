"""Mesh -> sparse signed distance volume of paper Eq. 1 (``|s(x)| < tau``) without a dense R^3 grid.

Narrow band: ``d3s2.data.sdf_band`` (an exact octree over the voxel grid, bounded distance queries of
``d3s2.geometry.queries``). Voxel centres follow ``d3s2.data.sparse_sdf``
(``x_i = -1 + (i + 0.5) * 2 / R``).

Sign (selectable, Sec. 5.1 "convert non-watertight meshes into watertight ones"):
- ``"winding"``: generalised winding number > 1/2 is inside (robust to holes and self-intersections). The winding number
  is evaluated once per octree cell whose distance ball contains the whole cell (``d > r_L``: no surface crosses it, so
  every voxel inside has the sign of its centre) and at voxels whose parent cell is not so resolved. On watertight
  meshes this is exactly the per-voxel winding-number sign; next to holes it may differ where the winding number is
  close to 1/2 (``sign_propagation=False`` evaluates it at every voxel).
- ``"pseudonormal"``: sign of ``dot(x - c, n)`` with ``c`` the closest surface point and ``n`` the angle-weighted
  pseudo-normal there (``d3s2.geometry.pseudo_normal``): exact for closed manifold meshes and nearly free (the closest
  face comes with the distance query); every band voxel gets its own sign. Where it does not apply (closest face in
  the 1-ring of a boundary / non-manifold edge, distance ~0, ``|dot|`` ~ 0) the voxel asks the generalised winding
  number (libigl's, on the host, for both back ends). Wrong inside meshes made of interpenetrating parts (a voxel
  inside part A whose closest point lies on part B, issue 25).
- ``"parts"``: ``"pseudonormal"``, and the winding number also decides (1) the voxels ``d3s2.data.part_signs``
  marks suspect: those inside the bounding 26-DOP of another part (connected component) overlapping the part of their
  closest face (exact for unions of closed parts), and (2) the voxels the sign repair of ``d3s2.data.sign_repair``
  finds: opposite signs on neighbours whose distances add up to more than a voxel cannot both be right, and the
  winding number peels such patches from their border (self-intersections within a part). On interpenetrating
  unions it decides 3-40% of the band (4 primitives: 38%, 15 V-HACD hulls: 23%), on a single-part mesh a few
  dozen voxels plus the 1-ring of its holes. Beyond ``d3s2.data.sdf_band.HOST_WINDING_MAX`` such voxels the GPU back
  end asks its own winding number (warp, on the device) instead of libigl's on the host.
- ``"shell"``: CLAY-style offset shell (``d3s2.data.shell``): watertight surface at distance ``eps`` around the mesh
  from a flood-filled unsigned-distance grid, the SDF is the signed distance to that shell.

``"auto"`` (``DEFAULT_SIGN``): ``"parts"``, checked against the winding number at up to 65,536 band voxels
(fixed seed); where more than 1% of those with a clear winding number (``|w - 1/2| > 1/4``) disagree, the band is
signed again with ``"winding"``. Before issue 25 ``auto`` checked plain ``"pseudonormal"`` (``auto_rule=
"pseudonormal"``), and meshes with under 1% wrong voxels (15 interpenetrating parts: 0.7%) kept their holes.
The statistics say which it chose (``sign_method``) and how many voxels the winding number decided
(``winding_voxels``; ``suspect_voxels`` of them marked by the part rule). Sign errors on the holed
Stanford bunny (R=256, tau=4 voxels, voxels >= 1.5 voxels from the surface, reference = the MeshFix-repaired bunny;
bench/results/prepare_sdf_sign_errors.json): pseudonormal 262 / 698,150 band voxels wrong, winding 756, shell 438,661 /
975,902; random points: 5, 5 and 31,905 of 195,067.
The shell's flood fill leaks through the bunny's open bottom, so its interior becomes "outside".

GPU (``backend="warp"`` on CUDA with a pseudo-normal sign): the octree, the float64 distance refinement, the sign and
the sharp mask stay on the GPU as torch tensors; only the winding-number fallback / check points (a few % of the band
on holed meshes, none on closed ones) and the result cross to the host. H100: 100k-face bunny at 1024 in 2.8 s
(warp's BVH closest-face queries 1.6 s of it), 4k-face duck 0.6 s (bench/results/prepare_sdf_h100.json).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from d3s2.data.mesh_io import DEFAULT_MARGIN, NormalizeTransform, load_mesh, normalize_mesh, validate_mesh
from d3s2.data.part_signs import part_tables, suspect_points
from d3s2.data.sdf_band import narrow_band
from d3s2.data.sharp import sharp_voxel_mask
from d3s2.data.shell import offset_shell
from d3s2.data.sparse_sdf import DEFAULT_TAU, SparseSDF, voxel_centers
from d3s2.errors import D3S2Error
from d3s2.geometry.pseudo_normal import pseudo_normal_sign
from d3s2.geometry.queries import CpuQueries, make_queries, resolve_backend, winding_fallback

DEFAULT_SIGN = "auto"
AUTO_CHECK_SAMPLES = 65536
AUTO_CHECK_MAX_DISAGREE = 0.01
SIGN_METHODS = ("auto", "parts", "winding", "pseudonormal", "shell")
AUTO_RULES = ("parts", "pseudonormal")

__all__ = [
    "DEFAULT_SIGN",
    "unsigned_band",
    "unsigned_distance",
    "signed_distance",
    "mesh_to_sparse_sdf",
]


def _mesh_arrays(mesh):
    mesh = validate_mesh(mesh)
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def _prepare_mesh(mesh, transform: NormalizeTransform | None, margin: float):
    if isinstance(mesh, (str, os.PathLike)):
        mesh = load_mesh(mesh)
    mesh = validate_mesh(mesh)
    if transform is None:
        mesh, transform = normalize_mesh(mesh, margin)
    return mesh, transform


def unsigned_band(mesh, resolution: int, tau: float = DEFAULT_TAU, backend: str = "auto", device: str | None = None):
    """Voxels of a mesh (already in [-1, 1]^3) with unsigned distance < tau: ``(coords int64 [N, 3], udf float64 [N])``.

    This is the 1024-stage input of the inference pipeline (the 512 mesh's band at 1024, tau = 4/1024)."""
    v, f = _mesh_arrays(mesh)
    res = narrow_band(make_queries(v, f, backend, device), resolution, tau, signed=False)
    return res.coords.astype(np.int64, copy=False), res.distance


def unsigned_distance(points: np.ndarray, mesh, backend: str = "auto", device: str | None = None) -> np.ndarray:
    """Exact distance from each point [N, 3] to the mesh surface (float64 [N])."""
    v, f = _mesh_arrays(mesh)
    return make_queries(v, f, backend, device).unsigned_distance(np.asarray(points, dtype=np.float64))


def signed_distance(
    points: np.ndarray,
    mesh,
    sign: str = "auto",
    backend: str = "auto",
    device: str | None = None,
    *,
    shell_resolution: int = 256,
) -> np.ndarray:
    """Signed distance (negative inside) of points [N, 3] to the mesh.

    ``sign="winding"``: distance to the mesh, sign from its generalised winding number. ``sign="pseudonormal"``: sign
    from the pseudo-normal at the closest point, winding number where that is ambiguous; ``"parts"``: also where
    ``d3s2.data.part_signs`` marks the point suspect; ``"auto"``: that, checked against the winding number as in
    ``mesh_to_sparse_sdf``. ``sign="shell"``: signed
    distance to the offset shell of the mesh (the mesh must already be normalised into [-1, 1]^3)."""
    sign = _resolve_sign(sign)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if sign == "shell":
        mesh = offset_shell(mesh, shell_resolution, backend=backend, device=device)
    v, f = _mesh_arrays(mesh)
    q = make_queries(v, f, backend, device)
    if sign in ("pseudonormal", "parts", "auto"):
        d, face = q.closest(points)
        pt, ft = torch.from_numpy(points), torch.from_numpy(face)
        s, _ = pseudo_normal_sign(q.pseudo_normal_tables().to("cpu"), pt, ft)
        s = s.numpy()
        amb = s == 0
        if sign != "pseudonormal":
            amb |= suspect_points(part_tables(q).to("cpu"), pt, ft).numpy()
        if amb.any():
            s[amb] = np.where(winding_fallback(q)(points[amb]), -1, 1)
        out = d * s
        if sign == "pseudonormal":
            return out
        bad, checked = pseudonormal_check(q, out, points=points)
        if bad <= AUTO_CHECK_MAX_DISAGREE * max(checked, 1):
            return out
    d = q.unsigned_distance(points)
    return np.where(q.inside(points), -d, d)


def _resolve_sign(sign: str) -> str:
    if sign not in SIGN_METHODS:
        raise D3S2Error(f"unknown sign method {sign!r}; use one of {', '.join(SIGN_METHODS)}")
    return sign


def pseudonormal_check(queries, sdf: np.ndarray, *, points=None, coords=None, resolution=None) -> tuple[int, int]:
    """(disagreeing, checked): points (or voxel ``coords`` at ``resolution``; a fixed-seed sample of at most
    ``AUTO_CHECK_SAMPLES``) whose sign disagrees with a clear generalised winding number (``|w - 1/2| > 1/4``;
    libigl's, else the back end's)."""
    n = len(sdf)
    if n == 0:
        return 0, 0
    idx = np.arange(n)
    if n > AUTO_CHECK_SAMPLES:
        idx = np.sort(np.random.default_rng(0).choice(n, AUTO_CHECK_SAMPLES, replace=False))
    p = np.asarray(points)[idx] if points is not None else voxel_centers(coords[idx], resolution)
    try:
        w = CpuQueries(queries.V, queries.F).winding_number(p)
        clear = np.abs(w - 0.5) > 0.25
        ins = w > 0.5
    except D3S2Error:  # no libigl: the back end's inside test, unfiltered
        ins = queries.inside(p)
        clear = np.ones(len(p), dtype=bool)
    bad = (sdf[idx][clear] < 0) != ins[clear]
    return int(bad.sum()), int(clear.sum())


def mesh_to_sparse_sdf(
    mesh,
    resolution: int,
    tau: float = DEFAULT_TAU,
    sign: str = "auto",
    backend: str = "auto",
    device: str | None = None,
    sharp_angle: float = 30.0,
    *,
    sharp_radius: float = 1.5,
    transform: NormalizeTransform | None = None,
    margin: float = DEFAULT_MARGIN,
    shell_resolution: int = 256,
    sign_propagation: bool = True,
    auto_rule: str = "parts",
    buried_test: bool = False,
    return_stats: bool = False,
):
    """Sparse SDF of Eq. 1 at ``resolution`` (any R, e.g. 256/384/512/1024) with the sharp-voxel mask of Eq. 2.

    ``mesh``: a path or a trimesh.Trimesh. Without ``transform`` the mesh is normalised here (``normalize_mesh``, margin
    0.95) and that transform is stored; with ``transform`` the mesh is taken as already normalised by it.
    ``sharp_angle``: dihedral angle (degrees) above which an edge is sharp; ``sharp_radius``: in voxels (see
    ``d3s2.data.sharp``); ``sharp_angle=None`` skips the mask. Returns ``SparseSDF`` (and a stats dict if asked).
    ``sign``: ``"auto"`` (checked pseudo-normal with the part rule, module docstring), ``"parts"``,
    ``"pseudonormal"``, ``"winding"``, ``"shell"``. ``auto_rule``: what ``"auto"`` checks, ``"parts"`` (default) or
    ``"pseudonormal"`` (the rule before issue 25, kept for benchmarks). ``buried_test``: the part rule also runs the
    buried-face test of ``d3s2.data.part_signs`` (about 2.5 winding numbers per face: off by default, the band's sign
    repair finds self-intersections within a part at a fraction of the cost).
    ``backend``: ``"auto"`` (warp on CUDA when present, else libigl), ``"cpu"`` (libigl) or ``"warp"`` (``device``
    ``"cuda"``/``"cpu"``); with warp on CUDA and a pseudo-normal sign the band, its sign and the sharp mask are
    computed on the GPU.
    """
    sign = _resolve_sign(sign)
    if auto_rule not in AUTO_RULES:
        raise D3S2Error(f"unknown auto_rule {auto_rule!r}; use one of {', '.join(AUTO_RULES)}")
    backend, device = resolve_backend(backend, device)
    mesh, transform = _prepare_mesh(mesh, transform, margin)
    target = mesh
    stats: dict = {"sign": sign, "backend": backend, "device": device}
    if sign == "shell":
        target = offset_shell(mesh, shell_resolution, backend=backend, device=device)
        stats["shell_faces"] = len(target.faces)
    v, f = _mesh_arrays(target)
    t0 = time.perf_counter()
    queries = make_queries(v, f, backend, device)
    stats["setup_seconds"] = time.perf_counter() - t0
    method = {"shell": "winding", "auto": auto_rule}.get(sign, sign)
    band = narrow_band(
        queries, resolution, tau, signed=True, sign_propagation=sign_propagation, sign_method=method,
        buried_test=buried_test,
    )
    if sign == "auto":
        t0 = time.perf_counter()
        bad, checked = pseudonormal_check(queries, band.distance, coords=band.coords, resolution=resolution)
        stats["check_seconds"] = time.perf_counter() - t0
        stats["check_disagree"], stats["check_voxels"] = bad, checked
        if bad > AUTO_CHECK_MAX_DISAGREE * max(checked, 1):
            method = "winding"
            band = narrow_band(
                queries, resolution, tau, signed=True, sign_propagation=sign_propagation, sign_method=method
            )
    stats["sign_method"] = method
    stats.update(band.stats)
    stats.setdefault("winding_voxels", 0)
    sharp = None
    if sharp_angle is not None:
        t0 = time.perf_counter()
        sharp = sharp_voxel_mask(
            mesh,
            band.coords,
            resolution,
            angle=sharp_angle,
            radius=sharp_radius,
            device_keys=getattr(band, "device_keys", None),
        )
        stats["sharp_seconds"] = time.perf_counter() - t0
        stats["sharp_voxels"] = int(sharp.sum())
    out = SparseSDF(
        coords=band.coords.astype(np.int16, copy=False),
        sdf=band.distance.astype(np.float16),
        resolution=resolution,
        tau=tau,
        scale=transform.scale,
        offset=transform.offset,
        sharp=sharp,
    )
    return (out, stats) if return_stats else out
