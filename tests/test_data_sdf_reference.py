"""Brute-force references for the SDF tests (all triangles for every point; no BVH, no libigl, no warp), and tests that
check the references themselves against closed forms."""

import math

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")


def point_triangle_distance(points: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Exact distance of every point [P, 3] to every triangle [T, 3, 3] -> [P, T] (Ericson, Real-Time Collision
    Det.)."""
    p = points[:, None, :]
    a, b, c = tri[None, :, 0], tri[None, :, 1], tri[None, :, 2]
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = va + vb + vc
    with np.errstate(divide="ignore", invalid="ignore"):
        v_in = vb / denom
        w_in = vc / denom
        closest = a + ab * v_in[..., None] + ac * w_in[..., None]  # interior (default)
        # edge regions
        t_ab = np.clip(d1 / (d1 - d3), 0, 1)
        t_ac = np.clip(d2 / (d2 - d6), 0, 1)
        t_bc = np.clip((d4 - d3) / ((d4 - d3) + (d5 - d6)), 0, 1)
    closest = np.where(((vc <= 0) & (d1 >= 0) & (d3 <= 0))[..., None], a + ab * t_ab[..., None], closest)
    closest = np.where(((vb <= 0) & (d2 >= 0) & (d6 <= 0))[..., None], a + ac * t_ac[..., None], closest)
    closest = np.where(
        ((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0))[..., None], b + (c - b) * t_bc[..., None], closest
    )
    closest = np.where(((d1 <= 0) & (d2 <= 0))[..., None], a, closest)
    closest = np.where(((d3 >= 0) & (d4 <= d3))[..., None], b, closest)
    closest = np.where(((d6 >= 0) & (d5 <= d6))[..., None], c, closest)
    return np.linalg.norm(p - closest, axis=-1)


def exact_winding_number(points: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Generalised winding number: sum of signed solid angles / 4 pi (Van Oosterom and Strackee)."""
    a = tri[None, :, 0] - points[:, None]
    b = tri[None, :, 1] - points[:, None]
    c = tri[None, :, 2] - points[:, None]
    la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
    det = (a * np.cross(b, c)).sum(-1)
    div = la * lb * lc + (a * b).sum(-1) * lc + (a * c).sum(-1) * lb + (b * c).sum(-1) * la
    return (2.0 * np.arctan2(det, div)).sum(-1) / (4.0 * math.pi)


def brute_force_sdf(points: np.ndarray, mesh, chunk: int = 256):
    """(unsigned distance, exact winding number) of every point, float64."""
    tri = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)]
    d = np.empty(len(points))
    w = np.empty(len(points))
    for s in range(0, len(points), chunk):
        p = points[s : s + chunk]
        d[s : s + chunk] = point_triangle_distance(p, tri).min(axis=1)
        w[s : s + chunk] = exact_winding_number(p, tri)
    return d, w


def dense_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.arange(resolution)
    ijk = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return ijk, -1.0 + (ijk + 0.5) * (2.0 / resolution)


def box_sdf(p: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)


def test_reference_distance_matches_box_closed_form():
    half = np.array([0.5, 0.3, 0.2])
    box = trimesh.creation.box(extents=2 * half)
    rng = np.random.default_rng(0)
    p = rng.uniform(-0.8, 0.8, (500, 3))
    d, w = brute_force_sdf(p, box)
    ref = box_sdf(p, half)
    np.testing.assert_allclose(d, np.abs(ref), atol=1e-12)
    inside = ref < 0
    np.testing.assert_allclose(w[inside], 1.0, atol=1e-9)
    np.testing.assert_allclose(w[~inside], 0.0, atol=1e-9)


def test_reference_winding_number_of_open_mesh_is_fractional():
    box = trimesh.creation.box()
    half_open = trimesh.Trimesh(box.vertices, box.faces[2:], process=False)  # one side removed
    w = exact_winding_number(np.zeros((1, 3)), np.asarray(half_open.vertices)[half_open.faces])
    assert 0.7 < w[0] < 0.9  # 5 of 6 faces seen from the centre: 5/6


def reference_band(mesh, resolution: int, tau: float):
    """Dense brute-force band: every voxel centre of the R^3 grid with exact distance < tau, its distance and exact
    winding number. Points provably farther (distance to the nearest vertex minus the longest edge >= tau) skip the
    brute force."""
    from scipy.spatial import cKDTree

    ijk, p = dense_centres(resolution)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    longest = float(np.asarray(mesh.edges_unique_length).max())
    dv, _ = cKDTree(v).query(p)
    near = dv - longest < tau
    d, w = brute_force_sdf(p[near], mesh)
    keep = d < tau
    return ijk[near][keep], d[keep], w[keep]


def test_reference_band_skips_only_far_points():
    sphere = trimesh.creation.icosphere(1, radius=0.6)
    ijk, d, _ = reference_band(sphere, 16, 0.2)
    _, p = dense_centres(16)
    full, _ = brute_force_sdf(p, sphere)
    assert len(ijk) == int((full < 0.2).sum()) > 0
