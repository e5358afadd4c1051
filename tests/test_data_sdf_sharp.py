"""Sharp-edge voxels (paper Sec. 3.2, L_sharp of Eq. 2)."""

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("igl")

from d3s2.data.mesh_io import NormalizeTransform  # noqa: E402
from d3s2.data.sdf import mesh_to_sparse_sdf  # noqa: E402
from d3s2.data.sharp import sharp_edges, sharp_voxel_mask  # noqa: E402

IDENTITY = NormalizeTransform(1.0)


def _dist_to_box_edges(p, half):
    """Distance of points to the 12 edges of the box [-half, half]."""
    best = np.full(len(p), np.inf)
    for axis in range(3):
        o = [a for a in range(3) if a != axis]
        for s0 in (-1, 1):
            for s1 in (-1, 1):
                d0 = p[:, o[0]] - s0 * half[o[0]]
                d1 = p[:, o[1]] - s1 * half[o[1]]
                da = np.maximum(np.abs(p[:, axis]) - half[axis], 0)
                best = np.minimum(best, np.sqrt(d0**2 + d1**2 + da**2))
    return best


def test_cube_edges_are_sharp_and_faces_are_not():
    half = np.array([0.5, 0.4, 0.3])
    box = trimesh.creation.box(extents=2 * half)
    assert len(sharp_edges(box)) == 12  # the face diagonals are flat
    r, radius = 64, 1.5
    h = 2 / r
    out = mesh_to_sparse_sdf(box, r, tau=3 * h, backend="cpu", transform=IDENTITY, sharp_radius=radius)
    d = _dist_to_box_edges(out.centers(), half)
    assert out.sharp.sum() > 0
    assert (d[out.sharp] <= radius * h + h / 16).all()
    assert out.sharp[d <= radius * h - h / 16].all()
    assert not out.sharp[d > radius * h + h / 16].any()


def test_sphere_has_no_sharp_voxels_and_threshold_is_configurable():
    sphere = trimesh.creation.icosphere(3, radius=0.8)
    out = mesh_to_sparse_sdf(sphere, 48, tau=0.1, backend="cpu", transform=IDENTITY)
    assert len(out) > 0 and out.sharp.sum() == 0
    cyl = trimesh.creation.cylinder(radius=0.5, height=1.0, sections=18)  # 20 degrees between side faces
    assert len(sharp_edges(cyl, 30.0)) == 36  # only the two rims (18 edges each)
    assert len(sharp_edges(cyl, 15.0)) == 36 + 18
    coords = mesh_to_sparse_sdf(cyl, 48, tau=0.1, backend="cpu", transform=IDENTITY, sharp_angle=None).coords
    assert sharp_voxel_mask(cyl, coords, 48, angle=15.0).sum() > sharp_voxel_mask(cyl, coords, 48, angle=30.0).sum() > 0


def test_split_vertices_are_merged_before_angles():
    box = trimesh.creation.box()
    soup = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(36).reshape(12, 3), process=False)
    assert len(sharp_edges(soup)) == 12
