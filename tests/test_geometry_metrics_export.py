"""Mesh metrics (Chamfer, F-score, volume IoU) vs brute force and mesh export round trips."""

import os

import numpy as np
import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.geometry.export import MESH_FORMATS, mesh_format, save_mesh
from d3s2.geometry.metrics import (
    as_points,
    chamfer_distance,
    f_score,
    kdtree_distances,
    mesh_chamfer_distance,
    mesh_f_score,
    surface_metrics,
    volume_iou,
)

trimesh = pytest.importorskip("trimesh")


def _brute(p, q):
    return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)).min(1)


def test_surface_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(300, 3)), rng.normal(size=(217, 3)) * 1.1
    dpq, dqp = _brute(p, q), _brute(q, p)
    np.testing.assert_allclose(kdtree_distances(p, q), dpq, rtol=1e-12)
    m = surface_metrics(p, q, thresholds=(0.2, 0.5))
    assert m["chamfer"] == pytest.approx(0.5 * (dpq.mean() + dqp.mean()), rel=1e-12)
    for t in (0.2, 0.5):
        prec, rec = (dpq < t).mean(), (dqp < t).mean()
        assert m[f"fscore@{t:g}"] == pytest.approx(2 * prec * rec / (prec + rec), rel=1e-12)
    # agrees with the torch helpers used in VAE validation
    assert float(chamfer_distance(torch.from_numpy(p), torch.from_numpy(q))) == pytest.approx(m["chamfer"], rel=1e-5)
    assert float(f_score(torch.from_numpy(p), torch.from_numpy(q), 0.5)) == pytest.approx(m["fscore@0.5"], rel=1e-5)


def test_mesh_metrics_on_spheres():
    a = trimesh.creation.icosphere(4, radius=1.0)
    b = trimesh.creation.icosphere(4, radius=1.05)
    assert mesh_chamfer_distance(a, a.copy(), n_points=20000) < 0.02  # sampling noise only
    cd = mesh_chamfer_distance(a, b, n_points=20000)
    assert 0.045 < cd < 0.06  # concentric spheres: every nearest distance is ~0.05 (+ sampling noise)
    assert mesh_f_score(a, b, threshold=0.06, n_points=20000) > 0.99
    assert mesh_f_score(a, b, threshold=0.04, n_points=20000) < 0.01
    assert as_points(a, 1000, seed=3).shape == (1000, 3)
    np.testing.assert_array_equal(as_points(a, 1000, seed=3), as_points(a, 1000, seed=3))


def test_volume_iou_of_shifted_spheres():
    a = trimesh.creation.icosphere(4, radius=1.0)
    b = a.copy()
    b.apply_translation([0.5, 0, 0])
    r, d = 1.0, 0.5
    lens = np.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    exact = lens / (2 * 4 / 3 * np.pi * r**3 - lens)
    assert volume_iou(a, b, n_points=40000) == pytest.approx(exact, abs=0.02)
    assert volume_iou(a, a.copy(), n_points=5000) == 1.0
    c = a.copy()
    c.apply_translation([3, 0, 0])
    assert volume_iou(a, c, n_points=5000) == 0.0


@pytest.mark.parametrize("fmt", MESH_FORMATS)
def test_export_round_trip(tmp_path, fmt):
    m = trimesh.creation.icosphere(2, radius=0.7)
    path = save_mesh(m, tmp_path / "sub" / f"mesh.{fmt}")
    assert os.path.exists(path) and not [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp_")]
    back = trimesh.load(path, force="mesh", process=False)
    if fmt == "stl":  # STL stores triangle soup
        back.merge_vertices()
    assert len(back.faces) == len(m.faces)
    assert back.is_watertight and back.volume == pytest.approx(m.volume, rel=1e-5)
    np.testing.assert_allclose(np.sort(back.vertices, axis=0), np.sort(m.vertices, axis=0), atol=1e-6)
    raw = open(path, "rb").read()
    if fmt == "obj":
        assert raw.count(b"\nvn ") == len(m.vertices)
    elif fmt == "ply":
        assert b"property float nx" in raw
    elif fmt == "glb":
        assert b'"NORMAL"' in raw


def test_export_format_argument_and_errors(tmp_path):
    m = trimesh.creation.icosphere(1)
    p = save_mesh(m, tmp_path / "noext", format="PLY")
    assert open(p, "rb").read().startswith(b"ply")
    assert mesh_format("a.GLB") == "glb"
    with pytest.raises(D3S2Error, match="unknown mesh format 'fbx'"):
        save_mesh(m, tmp_path / "x.fbx")
    with pytest.raises(D3S2Error, match="no extension"):
        save_mesh(m, tmp_path / "x")
    with pytest.raises(D3S2Error, match="empty"):
        save_mesh(trimesh.Trimesh(), tmp_path / "e.obj")
    assert sorted(os.listdir(tmp_path)) == ["noext"]
