"""On-disk format of sparse SDFs: one npz per mesh and resolution, atomic writes."""

import os

import numpy as np
import pytest

from d3s2.data.sparse_sdf import (
    SparseSDF,
    load_sparse_sdf,
    points_to_voxels,
    save_sparse_sdf,
    sparse_sdf_filename,
    voxel_centers,
)
from d3s2.errors import D3S2Error


def _example(n=1000, r=1024):
    rng = np.random.default_rng(0)
    return SparseSDF(
        coords=rng.integers(0, r, (n, 3)),
        sdf=rng.uniform(-1 / 128, 1 / 128, n),
        resolution=r,
        tau=1 / 128,
        scale=0.3,
        offset=[0.1, -0.2, 0.3],
        sharp=rng.random(n) < 0.1,
    )


@pytest.mark.parametrize("compress", [True, False])
def test_roundtrip(tmp_path, compress):
    a = _example()
    path = tmp_path / "sub" / sparse_sdf_filename("mesh_01", 1024)
    save_sparse_sdf(path, a, compress=compress)
    assert os.listdir(tmp_path / "sub") == ["mesh_01.sdf1024.npz"]  # no temporary file left behind
    b = load_sparse_sdf(path)
    assert b.coords.dtype == np.int16 and b.sdf.dtype == np.float16 and b.sharp.dtype == bool
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.sdf, b.sdf) and np.array_equal(a.sharp, b.sharp)
    assert (b.resolution, b.tau, b.scale) == (1024, 1 / 128, 0.3)
    np.testing.assert_array_equal(b.offset, [0.1, -0.2, 0.3])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    a = _example()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError):
        save_sparse_sdf(tmp_path / "x.npz", a)
    assert os.listdir(tmp_path) == []


def test_bad_files(tmp_path):
    with pytest.raises(D3S2Error, match="no such"):
        load_sparse_sdf(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(D3S2Error, match="unreadable"):
        load_sparse_sdf(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(D3S2Error, match="missing"):
        load_sparse_sdf(other)
    with pytest.raises(D3S2Error):
        SparseSDF(np.zeros((3, 3)), np.zeros(2), 64, 0.1)


def test_voxel_convention():
    r = 4
    c = voxel_centers(np.array([[0, 1, 3]]), r)
    np.testing.assert_allclose(c, [[-0.75, -0.25, 0.75]])
    assert np.array_equal(points_to_voxels(c, r), [[0, 1, 3]])
    assert np.array_equal(points_to_voxels(np.array([[-1.0, 0.0, 1.0]]), r), [[0, 2, 3]])
    dense = _example(50, 16).to_dense()
    assert dense.shape == (16, 16, 16)
