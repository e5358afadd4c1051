"""Sparse marching cubes vs skimage.measure.marching_cubes(method='lorensen') on dense grids and sparse bands."""

import numpy as np
import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.geometry.marching_cubes import (
    CORNER_OFFSETS,
    EDGE_CORNERS,
    _case_polygons,
    dense_marching_cubes,
    grid_to_world,
    lorensen_tables,
    sparse_marching_cubes,
    sparse_sdf_to_mesh,
)

skimage_measure = pytest.importorskip("skimage.measure")
cKDTree = pytest.importorskip("scipy.spatial").cKDTree
trimesh = pytest.importorskip("trimesh")


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def sphere(shape=(20, 23, 18), centre=(9.3, 11.1, 8.7), radius=6.2):
    return (np.linalg.norm(_grid(shape) - np.array(centre), axis=-1) - radius).astype(np.float32)


def torus(shape=(26, 22, 24), centre=(12.6, 10.9, 11.3), big=7.1, small=2.6):
    p = _grid(shape) - np.array(centre)
    q = np.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2) - big
    return (np.sqrt(q**2 + p[..., 2] ** 2) - small).astype(np.float32)


def smooth_noise(shape=(18, 21, 19), seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal(shape), 1.5)
    return (field / field.std()).astype(np.float32)


def _sk_table():
    from skimage.measure import _marching_cubes_lewiner as lw
    from skimage.measure import _marching_cubes_lewiner_luts as luts

    return lw._to_array(luts.CASESCLASSIC).astype(np.int64)


def _newell(points):
    return sum(np.cross(points[i], points[(i + 1) % len(points)]) for i in range(len(points)))


def test_generated_table_matches_skimage_classic_table():
    """All 256 cases: same polygons (edge sets), triangle counts and orientation as skimage's Lorensen table."""
    sk = _sk_table()
    ours, count = (t.numpy() for t in lorensen_tables())
    mid = (CORNER_OFFSETS[EDGE_CORNERS[:, 0]] + CORNER_OFFSETS[EDGE_CORNERS[:, 1]]) / 2.0
    for case in range(256):
        sk_tris = [tuple(sk[case, 3 * i : 3 * i + 3]) for i in range(5) if sk[case, 3 * i] != -1]
        our_tris = [tuple(t) for t in ours[case, : count[case]]]
        assert len(sk_tris) == len(our_tris), case
        assert sorted(np.unique(np.array(sk_tris))) == sorted(np.unique(np.array(our_tris))) if sk_tris else True
        for cycle in _case_polygons(case):
            members = set(cycle)
            sk_p = [t for t in sk_tris if set(t) <= members]
            our_p = [t for t in our_tris if set(t) <= members]
            assert len(sk_p) == len(our_p) == len(cycle) - 2, case
            # skimage's table is in its x-y-z frame; its 'descent' output reverses each triangle in our axis order
            sk_n = sum(_newell(mid[list(t[::-1])]) for t in sk_p)
            our_n = sum(_newell(mid[list(t)]) for t in our_p)
            assert float(sk_n @ our_n) > 0, case


def _compare(ours, sk, tol=1e-5):
    (mv, mf), (sv, sf) = ours, sk
    mv, mf = mv.double().numpy(), mf.numpy()
    assert len(mf) == len(sf)
    assert len(mv) == len(sv)
    d, idx = cKDTree(mv).query(sv)
    assert d.max() < tol
    assert len(np.unique(idx)) == len(mv)  # a bijection
    assert cKDTree(sv).query(mv)[0].max() < tol
    # faces present in both (all one-triangle cells and every polygon with the same diagonal) wind the same way
    canon = lambda f: tuple(np.roll(f, -int(np.argmin(f))))  # noqa: E731
    sk_faces = {tuple(sorted(f)): canon(f) for f in idx[sf]}
    common = [(sk_faces[tuple(sorted(f))], canon(f)) for f in mf if tuple(sorted(f)) in sk_faces]
    assert len(common) >= 0.2 * len(mf)
    assert all(a == b for a, b in common)


@pytest.mark.parametrize("name", ["sphere", "torus", "noise0", "noise1"])
@pytest.mark.parametrize("direction", ["descent", "ascent"])
def test_dense_matches_skimage_lorensen(name, direction):
    fields = {"sphere": sphere, "torus": torus, "noise0": lambda: smooth_noise(seed=0)}
    fields["noise1"] = lambda: smooth_noise(seed=1)
    vol = fields[name]()
    level = 0.0 if not name.startswith("noise") else 0.3
    sv, sf, _, _ = skimage_measure.marching_cubes(vol, level, method="lorensen", gradient_direction=direction)
    _compare(dense_marching_cubes(vol, level, gradient_direction=direction), (sv, sf))


def test_sparse_band_matches_dense_skimage():
    """A band |s| < 1.8 voxels holds every cell that crosses the surface (|grad s| = 1), so the sparse result must be
    skimage's dense result; input order is shuffled."""
    vol = torus()
    coords = np.argwhere(np.abs(vol) < 1.8)
    vals = vol[tuple(coords.T)]
    perm = np.random.default_rng(0).permutation(len(coords))
    out = sparse_marching_cubes(torch.from_numpy(coords[perm]), torch.from_numpy(vals[perm]), None, 0.0)
    assert len(coords) < 0.5 * vol.size
    sv, sf, _, _ = skimage_measure.marching_cubes(vol, 0.0, method="lorensen")
    _compare(out, (sv, sf))


def test_cells_need_all_eight_corners():
    vol = sphere()
    coords = np.argwhere(np.abs(vol) < 1.8)
    keep = np.ones(len(coords), bool)
    keep[np.random.default_rng(1).choice(len(coords), 40, replace=False)] = False  # punch holes in the band
    v, f = sparse_marching_cubes(coords[keep], vol[tuple(coords[keep].T)], None, 0.0)
    full_v, full_f = sparse_marching_cubes(coords, vol[tuple(coords.T)], None, 0.0)
    assert 0 < len(f) < len(full_f)
    # every kept triangle exists in the full result (welded vertex positions are identical)
    lookup = {tuple(np.round(p, 6)) for p in full_v.numpy()}
    assert all(tuple(np.round(p, 6)) in lookup for p in v.numpy())


def test_closed_sphere_is_watertight_and_outward():
    vol = sphere()
    v, f = dense_marching_cubes(vol, 0.0)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert mesh.is_watertight
    assert mesh.euler_number == 2
    assert mesh.volume > 0  # outward normals
    assert abs(mesh.volume - 4 / 3 * np.pi * 6.2**3) / (4 / 3 * np.pi * 6.2**3) < 0.03
    centre = np.array([9.3, 11.1, 8.7])
    radial = mesh.triangles_center - centre
    assert (np.einsum("ij,ij->i", mesh.face_normals, radial) > 0).mean() > 0.99
    vf, ff = dense_marching_cubes(vol, 0.0, gradient_direction="ascent")
    assert torch.equal(ff, f.flip(1)) and torch.equal(vf, v)


def test_chunked_equals_unchunked():
    vol = smooth_noise(seed=2)
    coords = np.argwhere(np.abs(vol) < 1.0)
    vals = vol[tuple(coords.T)]
    v1, f1 = sparse_marching_cubes(coords, vals, 32, 0.1)
    v2, f2 = sparse_marching_cubes(coords, vals, 32, 0.1, chunk_size=97)
    assert len(f1) > 100
    assert torch.equal(v1, v2) and torch.equal(f1, f2)


def test_world_units_and_sparse_sdf_to_mesh():
    from d3s2.data.sparse_sdf import SparseSDF

    r = 24
    g = _grid((r, r, r))
    world = -1 + (g + 0.5) * 2 / r
    sdf = np.linalg.norm(world - 0.05, axis=-1) - 0.6
    coords = np.argwhere(np.abs(sdf) < 3 * 2 / r)
    data = SparseSDF(coords=coords, sdf=sdf[tuple(coords.T)], resolution=r, tau=3 * 2 / r)
    vg, f = sparse_marching_cubes(data.coords, data.sdf, r, 0.0, dtype=torch.float64)
    vw, fw = sparse_marching_cubes(data.coords, data.sdf, r, 0.0, world=True, dtype=torch.float64)
    assert torch.equal(f, fw)
    assert torch.allclose(vw, grid_to_world(vg, r))
    mesh = sparse_sdf_to_mesh(data)
    assert mesh.is_watertight and mesh.volume > 0
    radius = np.linalg.norm(mesh.vertices - 0.05, axis=1)
    assert np.abs(radius - 0.6).max() < 0.02  # fp16 SDF, linear interpolation


def test_empty_and_errors():
    vol = sphere() + 100.0
    v, f = dense_marching_cubes(vol, 0.0)
    assert v.shape == (0, 3) and f.shape == (0, 3)
    v, f = sparse_marching_cubes(np.zeros((0, 3), np.int64), np.zeros(0, np.float32), 8)
    assert len(f) == 0
    with pytest.raises(D3S2Error, match="duplicate"):
        sparse_marching_cubes(np.array([[0, 0, 0], [0, 0, 0]]), np.array([1.0, -1.0]), 4)
    with pytest.raises(D3S2Error, match="NaN"):
        sparse_marching_cubes(np.array([[0, 0, 0]]), np.array([np.nan]), 4)
    with pytest.raises(D3S2Error, match="values"):
        sparse_marching_cubes(np.array([[0, 0, 0]]), np.array([1.0, 2.0]), 4)
    with pytest.raises(D3S2Error, match="resolution"):
        sparse_marching_cubes(np.array([[0, 0, 9]]), np.array([1.0]), 4)
    with pytest.raises(D3S2Error, match="gradient_direction"):
        dense_marching_cubes(sphere(), 0.0, gradient_direction="up")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    vol = torus()
    coords = torch.from_numpy(np.argwhere(np.abs(vol) < 1.8))
    vals = torch.from_numpy(vol[tuple(coords.numpy().T)])
    v1, f1 = sparse_marching_cubes(coords, vals, None, 0.0)
    v2, f2 = sparse_marching_cubes(coords.cuda(), vals.cuda(), None, 0.0, chunk_size=1000)
    assert torch.equal(f1, f2.cpu())
    assert torch.allclose(v1, v2.cpu(), atol=1e-5)
