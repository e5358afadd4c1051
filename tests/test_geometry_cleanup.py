"""Floater removal, interior-shell removal, decimation and vertex normals (d3s2.geometry.cleanup)."""

import numpy as np
import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.geometry.cleanup import (
    clean_mesh,
    decimate,
    face_components,
    remove_interior_shells,
    remove_small_components,
    vertex_normals,
    visible_components,
)
from d3s2.geometry.marching_cubes import dense_marching_cubes

trimesh = pytest.importorskip("trimesh")


def _sphere(sub, radius, centre=(0.0, 0.0, 0.0)):
    m = trimesh.creation.icosphere(sub, radius=radius)
    m.apply_translation(centre)
    return m


def _concat(*meshes):
    return trimesh.util.concatenate(list(meshes))


def test_face_components_matches_trimesh():
    m = _concat(_sphere(2, 1.0), _sphere(1, 0.2, (3, 0, 0)), _sphere(1, 0.1, (0, 3, 0)))
    label, k = face_components(m.faces, len(m.vertices))
    assert k == 3
    ref = trimesh.graph.connected_component_labels(m.face_adjacency, node_count=len(m.faces))
    # same partition up to relabelling
    pairs = set(zip(label.tolist(), ref.tolist()))
    assert len(pairs) == 3


def test_remove_small_components_by_area_and_count():
    big, small, tiny = _sphere(3, 1.0), _sphere(2, 0.3, (3, 0, 0)), _sphere(1, 0.05, (0, 3, 0))
    m = _concat(big, small, tiny)
    out = remove_small_components(m, min_area_fraction=0.01)  # tiny: 0.25% of the area
    assert len(out.faces) == len(big.faces) + len(small.faces)
    out = remove_small_components(m, min_faces=len(small.faces) + 1)
    assert len(out.faces) == len(big.faces)
    assert out.is_watertight and np.isclose(out.area, big.area)
    out = remove_small_components(m, min_faces=10**9)  # the largest always survives
    assert len(out.faces) == len(big.faces)


def test_floaters_on_marching_cubes_output():
    g = np.stack(np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij"), -1)
    sdf = np.minimum(np.linalg.norm(g - 10.5, axis=-1) - 7, np.linalg.norm(g - [20.2, 20.3, 20.4], axis=-1) - 1.2)
    v, f = dense_marching_cubes(sdf.astype(np.float32), 0.0)
    m = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert face_components(m.faces, len(m.vertices))[1] == 2
    out = remove_small_components(m, min_area_fraction=0.05)
    assert face_components(out.faces, len(out.vertices))[1] == 1 and out.is_watertight
    assert np.linalg.norm(out.vertices.mean(0) - 10.5) < 0.1


def test_interior_shell_removed_outer_and_separate_kept():
    outer, inner, side = _sphere(3, 1.0), _sphere(2, 0.5), _sphere(2, 0.3, (2.0, 0.3, 0))
    m = _concat(outer, inner, side)
    label, visible = visible_components(m, views=6, image_size=64)
    assert visible.sum() == 2
    out = remove_interior_shells(m, views=6, image_size=64)
    assert len(out.faces) == len(outer.faces) + len(side.faces)
    assert np.abs(np.linalg.norm(out.vertices, axis=1) - 0.5).min() > 0.1  # no vertex of the inner sphere left


def test_decimate_hits_target():
    m = _sphere(5, 1.0)  # 20480 faces
    for target in (5000, 1200):
        out = decimate(m, target)
        assert abs(len(out.faces) - target) <= 0.02 * target + 2
        assert out.is_watertight
        assert abs(out.volume - m.volume) / m.volume < 0.02
    assert len(decimate(m, 10**6).faces) == len(m.faces)
    with pytest.raises(D3S2Error):
        decimate(m, 2)


def test_vertex_normals_match_trimesh_and_point_outward():
    m = _sphere(3, 1.0)
    v, f = np.array(m.vertices), np.array(m.faces)
    n = vertex_normals(torch.from_numpy(v), torch.from_numpy(f))
    ref = np.zeros_like(v)
    for tri in f:  # brute force: sum of incident faces' (area-weighted) cross products
        ref[tri] += np.cross(v[tri[1]] - v[tri[0]], v[tri[2]] - v[tri[0]])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(n.numpy(), ref, atol=1e-12)
    assert np.abs(n.numpy() - m.vertex_normals).max() < 1e-2  # trimesh weights by angle: nearly the same here
    radial = m.vertices / np.linalg.norm(m.vertices, axis=1, keepdims=True)
    assert (np.einsum("ij,ij->i", n.numpy(), radial) > 0.99).all()


def test_clean_mesh_pipeline():
    m = _concat(_sphere(4, 1.0), _sphere(2, 0.5), _sphere(1, 0.02, (2, 0, 0)))
    out = clean_mesh(m, min_area_fraction=0.001, remove_interior=True, target_faces=2000, views=6, image_size=64)
    assert face_components(out.faces, len(out.vertices))[1] == 1
    assert abs(len(out.faces) - 2000) <= 42
    assert np.abs(np.linalg.norm(out.vertices, axis=1) - 1.0).max() < 0.05


def _pocket_mesh(share: str):
    """An icosphere plus a small closed pocket inside it, glued at one sphere vertex (``"vertex"``) or along one
    sphere edge (``"edge"``, a non-manifold edge), plus a two-sided sliver on three sphere vertices: what quadric
    decimation can leave behind."""
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=3)
    v = np.asarray(s.vertices, dtype=np.float64)
    f = np.asarray(s.faces, dtype=np.int64)
    a, b = f[0, 0], f[0, 1]
    inward = -v[a] * 0.2
    if share == "vertex":
        extra_v = v[a] + inward + np.array([[0.05, 0, 0], [0, 0.05, 0], [0, 0, 0.05]])
        n = len(v)
        pocket = np.array([[a, n, n + 1], [a, n + 1, n + 2], [a, n + 2, n], [n, n + 2, n + 1]])
    else:
        extra_v = ((v[a] + v[b]) / 2 + inward)[None]
        n = len(v)
        pocket = np.array([[a, b, n], [b, a, n + 0]])  # replaced below by a closed tetra on edge (a, b)
        extra_v = np.vstack([extra_v, extra_v + np.array([[0.03, 0.02, 0.01]])])
        pocket = np.array([[a, b, n], [b, a, n + 1], [a, n, n + 1], [b, n + 1, n]])
    sliver = np.array([f[5], f[5][::-1]])
    return s, trimesh.Trimesh(np.vstack([v, extra_v]), np.vstack([f, pocket, sliver]), process=False)


@pytest.mark.parametrize("share", ["vertex", "edge"])
def test_decimation_artifacts_pockets_and_slivers_removed(share):
    from d3s2.geometry.cleanup import drop_duplicate_faces, edge_components, remove_decimation_artifacts
    from d3s2.geometry.report import mesh_report

    sphere, messy = _pocket_mesh(share)
    assert len(drop_duplicate_faces(messy).faces) == len(messy.faces) - 2
    assert edge_components(messy.faces)[1] >= 2  # the pocket is its own piece by edges
    out = remove_decimation_artifacts(messy)
    assert len(out.faces) == len(sphere.faces)
    rep = mesh_report(out)
    assert rep.closed and rep.boundary_edges == 0 and rep.nonmanifold_edges == 0 and rep.components == 1
    assert out.is_watertight and abs(out.volume - sphere.volume) < 1e-9
    # nothing to repair: unchanged
    assert len(remove_decimation_artifacts(sphere).faces) == len(sphere.faces)


def test_clean_mesh_keeps_the_given_vertex_normals_of_what_it_keeps():
    # the pipeline computes normals on the device; clean-up used to drop them and recompute trimesh's (seconds at 1024)
    from d3s2.geometry.cleanup import clean_mesh, face_areas

    outer, inner, far = _sphere(3, 1.0), _sphere(1, 0.2), _sphere(1, 0.2, (3.0, 0.0, 0.0))
    m = _concat(outer, inner, far)
    given = np.random.default_rng(0).normal(size=(len(m.vertices), 3))
    given /= np.linalg.norm(given, axis=1, keepdims=True)
    m = trimesh.Trimesh(m.vertices, m.faces, vertex_normals=given, process=False)
    assert np.allclose(face_areas(m.vertices, m.faces), m.area_faces, rtol=1e-12, atol=1e-15)
    out = clean_mesh(m, remove_enclosed=True)  # the inner sphere goes, the far one stays
    assert len(out.faces) == len(outer.faces) + len(far.faces)
    keep = np.ones(len(m.vertices), dtype=bool)
    keep[len(outer.vertices):len(outer.vertices) + len(inner.vertices)] = False
    assert np.allclose(out.vertex_normals, given[keep])
    same = clean_mesh(trimesh.Trimesh(far.vertices, far.faces, vertex_normals=given[:len(far.vertices)],
                                      process=False), remove_enclosed=True)
    assert np.allclose(same.vertex_normals, given[:len(far.vertices)])
