"""Pseudo-normal sign (d3s2.geometry.pseudo_normal, sign="pseudonormal"/"auto" of d3s2.data.sdf), the device-side octree
(run on the CPU through warp's CPU device) and the device-side sharp mask."""

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("igl")
torch = pytest.importorskip("torch")

from test_data_sdf_reference import brute_force_sdf, point_triangle_distance  # noqa: E402

from d3s2.data.mesh_io import NormalizeTransform  # noqa: E402
from d3s2.data.sdf import DEFAULT_SIGN, mesh_to_sparse_sdf, signed_distance  # noqa: E402
from d3s2.data.sdf_band import narrow_band  # noqa: E402
from d3s2.data.sharp import sharp_edges, sharp_voxel_mask  # noqa: E402
from d3s2.errors import D3S2Error  # noqa: E402
from d3s2.geometry.pseudo_normal import build_tables, closest_point_on_triangles, pseudo_normal_sign  # noqa: E402
from d3s2.geometry.queries import CpuQueries  # noqa: E402

IDENTITY = NormalizeTransform(1.0)
BOX1 = (np.zeros(3), np.array([0.4, 0.25, 0.25]))
BOX2 = (np.array([0.1, 0.1, 0.05]), np.array([0.25, 0.4, 0.25]))


def _two_overlapping_boxes():
    parts = []
    for c, half in (BOX1, BOX2):
        b = trimesh.creation.box(extents=2 * half)
        b.apply_translation(c)
        parts.append(b)
    return trimesh.util.concatenate(parts)


def _inside_boxes(p):
    return np.any([(np.abs(p - c) < half).all(1) for c, half in (BOX1, BOX2)], axis=0)


def test_closest_point_matches_brute_force():
    rng = np.random.default_rng(0)
    tri = rng.normal(size=(200, 3, 3))
    tri[:5, 2] = tri[:5, 0]  # degenerate triangles (a segment) too
    p = rng.normal(size=(200, 3)) * 1.5
    c, region = closest_point_on_triangles(*(torch.from_numpy(x) for x in (p, tri[:, 0], tri[:, 1], tri[:, 2])))
    ref = point_triangle_distance(p, tri)[np.arange(200), np.arange(200)]
    np.testing.assert_allclose(np.linalg.norm(p - c.numpy(), axis=1), ref, rtol=1e-9, atol=1e-12)
    assert set(np.unique(region.numpy()).tolist()) == set(range(7))  # every region is visited


def test_tables_flag_exactly_the_open_parts():
    sphere = trimesh.creation.icosphere(2, radius=0.8)
    assert not build_tables(sphere.vertices, sphere.faces).unreliable.any()
    holed = trimesh.Trimesh(sphere.vertices, sphere.faces[3:], process=False)
    flags = build_tables(holed.vertices, holed.faces).unreliable.numpy()
    boundary = np.unique(np.ravel(trimesh.grouping.group_rows(holed.edges_sorted, require_count=1)) // 3)
    assert flags[boundary].all() and 0 < flags.sum() < 0.2 * len(flags)
    # unmerged vertices (UV seams) are merged for the adjacency: a split box is still closed
    box = trimesh.creation.box()
    split = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(36).reshape(12, 3), process=False)
    assert not build_tables(split.vertices, split.faces).unreliable.any()


@pytest.mark.parametrize("kind", ["torus", "box"])
def test_pseudonormal_equals_winding_on_closed_meshes(kind):
    mesh = trimesh.creation.torus(0.6, 0.25) if kind == "torus" else trimesh.creation.box(extents=(1.2, 0.7, 0.5))
    q = CpuQueries(mesh.vertices, mesh.faces)
    r, tau = 48, 3 * 2 / 48
    a = narrow_band(q, r, tau, sign_method="winding")
    b = narrow_band(q, r, tau, sign_method="pseudonormal")
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.distance, b.distance)
    assert b.stats["sign_queries"] == 0  # closed manifold: no winding-number fallback at all


def test_pseudonormal_on_holed_mesh_against_exact_winding():
    s = trimesh.creation.icosphere(2, radius=0.8)
    holed = trimesh.Trimesh(s.vertices, s.faces[3:], process=False)
    r, tau = 32, 2.5 * 2 / 32
    band = narrow_band(CpuQueries(holed.vertices, holed.faces), r, tau, sign_method="pseudonormal")
    d, w = brute_force_sdf(-1.0 + (band.coords + 0.5) * (2.0 / r), holed)
    np.testing.assert_allclose(np.abs(band.distance), d, atol=1e-9)
    clear = np.abs(w - 0.5) > 0.1
    assert np.array_equal(band.distance[clear] < 0, w[clear] > 0.5)
    assert 0 < band.stats["sign_queries"] < 0.5 * len(band.coords)  # the fallback runs near the hole only


def test_auto_sign_falls_back_to_winding_on_self_intersections():
    mesh = _two_overlapping_boxes()
    r, tau = 32, 3 * 2 / 32
    pn = mesh_to_sparse_sdf(mesh, r, tau=tau, sign="pseudonormal", backend="cpu", transform=IDENTITY)
    # the sampled check alone (the auto rule before issue 25) falls back to the winding number here
    auto, st = mesh_to_sparse_sdf(
        mesh, r, tau=tau, backend="cpu", transform=IDENTITY, auto_rule="pseudonormal", return_stats=True
    )
    truth = _inside_boxes(auto.centers())
    assert ((pn.sdf < 0) != truth).sum() > 50  # the inner faces fool the pseudo-normal ...
    assert st["sign_method"] == "winding" and st["check_disagree"] > 0.01 * st["check_voxels"]
    assert ((auto.sdf < 0) != truth).sum() == 0  # ... and the checked default catches it
    # the default auto rule decides the voxels inside the other box by the winding number, no fallback needed
    parts, st = mesh_to_sparse_sdf(mesh, r, tau=tau, backend="cpu", transform=IDENTITY, return_stats=True)
    assert st["sign_method"] == "parts" and 0 < st["winding_voxels"] < len(parts)
    assert np.array_equal(parts.coords, auto.coords) and ((parts.sdf < 0) != truth).sum() == 0
    p = np.random.default_rng(0).uniform(-0.6, 0.6, (500, 3))
    assert ((signed_distance(p, mesh, backend="cpu") < 0) != _inside_boxes(p)).sum() == 0
    closed, st = mesh_to_sparse_sdf(trimesh.creation.box(), 24, backend="cpu", transform=IDENTITY, return_stats=True)
    assert st["sign_method"] == "parts" and st["check_disagree"] == 0 and st["winding_voxels"] == 0
    assert DEFAULT_SIGN == "auto"


def test_pseudo_normal_sign_marks_ambiguous_points():
    box = trimesh.creation.box()
    tab = build_tables(box.vertices, box.faces)
    p = torch.tensor(
        [[0.0, 0.0, 0.5], [0.0, 0.0, 0.7], [0.0, 0.0, 0.3], [0.7, 0.7, 0.7], [0.4, 0.4, 0.4]], dtype=torch.float64
    )
    face = torch.from_numpy(CpuQueries(box.vertices, box.faces).closest(p.numpy())[1])
    sign, dist = pseudo_normal_sign(tab, p, face)
    assert sign.tolist() == [0, 1, -1, 1, -1]  # on the surface: ambiguous; outside a corner: vertex pseudo-normal
    np.testing.assert_allclose(dist.numpy(), [0.0, 0.2, 0.2, np.sqrt(3) * 0.2, 0.1], atol=1e-12)


def _skip_without_warp_cpu():
    wp = pytest.importorskip("warp")
    wp.config.quiet = True
    wp.init()
    if not wp.is_cpu_available():  # e.g. the stripped warp wheel on the GPU machine (no CPU build chain)
        pytest.skip("warp has no CPU build chain here")


def test_device_octree_on_warp_cpu_matches_cpu_backend():
    _skip_without_warp_cpu()
    mesh = _two_overlapping_boxes()
    s = trimesh.creation.icosphere(2, radius=0.8)
    holed = trimesh.Trimesh(s.vertices, s.faces[3:], process=False)
    for m, sign in ((holed, "pseudonormal"), (mesh, "auto")):
        a = mesh_to_sparse_sdf(m, 40, tau=0.15, sign=sign, backend="cpu", transform=IDENTITY)
        b, st = mesh_to_sparse_sdf(
            m, 40, tau=0.15, sign=sign, backend="warp", device="cpu", transform=IDENTITY, return_stats=True
        )
        assert np.array_equal(a.coords, b.coords)
        assert np.array_equal(a.sdf, b.sdf)  # float64 refinement: identical after float16 rounding here
        assert np.array_equal(a.sharp, b.sharp) and (a.sharp.sum() > 0) == (m is mesh)


def test_device_sharp_mask_matches_kdtree():
    box = trimesh.creation.box(extents=(1.1, 0.7, 0.5))
    r = 40
    rng = np.random.default_rng(0)
    coords = np.unique(rng.integers(0, r, (20000, 3)), axis=0)  # lexicographically sorted, like a band
    key = torch.from_numpy((coords[:, 0] * r + coords[:, 1]) * r + coords[:, 2])
    for radius in (1.5, 2.2):
        a = sharp_voxel_mask(box, coords, r, radius=radius)
        b = sharp_voxel_mask(box, coords, r, radius=radius, device_keys=key)
        assert a.sum() > 100 and np.array_equal(a, b)
    assert len(sharp_edges(box)) == 12


def test_narrow_band_rejects_unknown_sign_method():
    box = trimesh.creation.box()
    with pytest.raises(D3S2Error):
        narrow_band(CpuQueries(box.vertices, box.faces), 16, 0.1, sign_method="normals")
