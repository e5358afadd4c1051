"""Mesh loading, validation and normalisation (d3s2.data.mesh_io)."""

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")

from d3s2.data.mesh_io import load_mesh, load_normalized_mesh, normalize_mesh, validate_mesh  # noqa: E402
from d3s2.data.sdf import mesh_to_sparse_sdf  # noqa: E402
from d3s2.errors import D3S2Error  # noqa: E402


@pytest.mark.parametrize("ext", ["obj", "glb", "ply", "stl", "off"])
def test_load_formats(tmp_path, ext):
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    path = tmp_path / f"box.{ext}"
    box.export(path)
    mesh = load_mesh(path)
    assert isinstance(mesh, trimesh.Trimesh)
    np.testing.assert_allclose(mesh.bounds, box.bounds, atol=1e-6)
    assert len(mesh.faces) == 12


def test_scene_is_flattened_with_transforms(tmp_path):
    scene = trimesh.Scene()
    a = trimesh.creation.box(extents=(1, 1, 1))
    scene.add_geometry(a, node_name="a", transform=trimesh.transformations.translation_matrix((3.0, 0, 0)))
    scene.add_geometry(a.copy(), node_name="b", transform=trimesh.transformations.translation_matrix((-3.0, 0, 0)))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path)
    assert len(mesh.faces) == 24
    np.testing.assert_allclose(mesh.bounds, [[-3.5, -0.5, -0.5], [3.5, 0.5, 0.5]], atol=1e-6)


def test_normalize_convention():
    mesh = trimesh.creation.box(extents=(4.0, 2.0, 1.0))
    mesh.apply_translation((1.0, 2.0, 3.0))
    norm, t = normalize_mesh(mesh)
    np.testing.assert_allclose(norm.bounds, [[-0.95, -0.475, -0.2375], [0.95, 0.475, 0.2375]], atol=1e-12)
    np.testing.assert_allclose(t.invert(norm.vertices), mesh.vertices, atol=1e-12)
    np.testing.assert_allclose(mesh.bounds[0] + 0, [-1.0, 1.0, 2.5])  # the input is not modified
    norm2, t2 = normalize_mesh(mesh, margin=0.5)
    assert np.abs(norm2.vertices).max() == pytest.approx(0.5)
    with pytest.raises(D3S2Error):
        normalize_mesh(mesh, margin=1.5)


def test_load_normalized(tmp_path):
    path = tmp_path / "t.ply"
    trimesh.creation.torus(2.0, 0.5).export(path)
    mesh, t = load_normalized_mesh(path)
    assert np.abs(mesh.vertices).max() == pytest.approx(0.95)
    assert t.scale == pytest.approx(0.95 / 2.5, rel=1e-3)


def _expect_error(fn, *words):
    with pytest.raises(D3S2Error) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg.lower()


def test_bad_inputs(tmp_path):
    text = tmp_path / "notes.obj"
    text.write_text("this is not a mesh\njust words\n")
    _expect_error(lambda: load_mesh(text))
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    _expect_error(lambda: load_mesh(png))
    empty = tmp_path / "empty.stl"
    empty.write_bytes(b"")
    _expect_error(lambda: load_mesh(empty), "empty")
    _expect_error(lambda: load_mesh(tmp_path / "missing.obj"), "no such file")
    _expect_error(lambda: validate_mesh(trimesh.Trimesh()), "empty")
    box = trimesh.creation.box()
    v = box.vertices.copy()
    v[3] = np.nan
    _expect_error(lambda: validate_mesh(trimesh.Trimesh(v, box.faces, process=False)), "nan")
    v[3] = np.inf
    _expect_error(lambda: mesh_to_sparse_sdf(trimesh.Trimesh(v, box.faces, process=False), 16, backend="cpu"), "nan")
    cloud = trimesh.PointCloud(np.random.default_rng(0).normal(size=(50, 3)))
    _expect_error(lambda: validate_mesh(cloud), "point cloud")
    ply = tmp_path / "cloud.ply"
    cloud.export(ply)
    _expect_error(lambda: load_mesh(ply), "point")
    _expect_error(lambda: validate_mesh(trimesh.Trimesh(box.vertices, np.zeros((0, 3), int))), "no faces")
    _expect_error(lambda: validate_mesh("a string"), "not a triangle mesh")
    flat = trimesh.Trimesh(np.zeros((3, 3)), [[0, 1, 2]], process=False)
    _expect_error(lambda: validate_mesh(flat), "degenerate")
    _expect_error(lambda: mesh_to_sparse_sdf(str(text), 16, backend="cpu"))


def test_bad_item_does_not_stop_a_batch(tmp_path):
    good = tmp_path / "good.obj"
    trimesh.creation.box().export(good)
    bad = tmp_path / "bad.obj"
    bad.write_text("garbage")
    done, failed = [], []
    for p in (bad, good):
        try:
            done.append(len(mesh_to_sparse_sdf(str(p), 16, tau=0.2, backend="cpu")))
        except D3S2Error as exc:
            failed.append(str(exc))
    assert len(done) == 1 and done[0] > 0 and len(failed) == 1 and "bad.obj" in failed[0]
