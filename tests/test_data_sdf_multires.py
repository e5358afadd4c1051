"""Multi-resolution sparse SDFs (paper Sec. 3.3): derived by trilinear interpolation vs computed directly."""

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("igl")

from d3s2.data.mesh_io import NormalizeTransform  # noqa: E402
from d3s2.data.multires import resample_sparse_sdf  # noqa: E402
from d3s2.data.sdf import mesh_to_sparse_sdf  # noqa: E402
from d3s2.errors import D3S2Error  # noqa: E402

IDENTITY = NormalizeTransform(1.0)


def _key(c, r):
    c = np.asarray(c, dtype=np.int64)
    return (c[:, 0] * r + c[:, 1]) * r + c[:, 2]


@pytest.fixture(scope="module")
def torus_and_box():
    return {
        "torus": trimesh.creation.torus(0.6, 0.25, major_sections=96, minor_sections=48),
        "box": trimesh.creation.box(extents=(1.2, 0.8, 0.5)),
    }


@pytest.mark.parametrize("name", ["torus", "box"])
@pytest.mark.parametrize("r_hi,r_lo", [(128, 64), (128, 48), (96, 32)])
def test_derived_agrees_with_direct(torus_and_box, name, r_hi, r_lo):
    mesh = torus_and_box[name]
    tau = 4 * 2 / r_lo
    hi = mesh_to_sparse_sdf(mesh, r_hi, tau=tau, backend="cpu", transform=IDENTITY)
    lo = mesh_to_sparse_sdf(mesh, r_lo, tau=tau, backend="cpu", transform=IDENTITY)
    der = resample_sparse_sdf(hi, r_lo)
    h_lo, h_hi = 2 / r_lo, 2 / r_hi
    assert der.resolution == r_lo and der.tau == tau
    kd, kl = _key(der.coords, r_lo), _key(lo.coords, r_lo)
    assert np.all(np.diff(kd) > 0)  # sorted, unique
    # nothing outside the direct band; everything of the direct band except its outer rim (fallback "drop")
    assert np.isin(kd, kl).all()
    rim = np.abs(lo.sdf.astype(np.float64)) >= tau - np.sqrt(3) * h_hi - 1e-3
    assert np.isin(kl[~rim], kd).all()
    # values: trilinear interpolation error well below a voxel of the target grid
    common, ia, ib = np.intersect1d(kd, kl, return_indices=True)
    err = np.abs(der.sdf[ia].astype(np.float64) - lo.sdf[ib].astype(np.float64))
    assert err.max() < 0.15 * h_lo
    assert err.mean() < 0.01 * h_lo
    assert ((der.sdf[ia] < 0) == (lo.sdf[ib] < 0))[np.abs(lo.sdf[ib].astype(np.float64)) > 0.15 * h_lo].all()


def test_truncated_fallback_keeps_the_rim(torus_and_box):
    mesh = torus_and_box["torus"]
    tau = 4 * 2 / 64
    hi = mesh_to_sparse_sdf(mesh, 128, tau=tau, backend="cpu", transform=IDENTITY)
    lo = mesh_to_sparse_sdf(mesh, 64, tau=tau, backend="cpu", transform=IDENTITY)
    drop = resample_sparse_sdf(hi, 64)
    trunc = resample_sparse_sdf(hi, 64, fallback="truncated")
    kl, kt = _key(lo.coords, 64), _key(trunc.coords, 64)
    assert len(trunc) > len(drop)
    assert np.isin(kl, kt).all()  # the whole direct band
    common, ia, ib = np.intersect1d(kt, kl, return_indices=True)
    assert np.abs(trunc.sdf[ia].astype(np.float64) - lo.sdf[ib].astype(np.float64)).max() < 0.15 * 2 / 64
    with pytest.raises(D3S2Error):
        resample_sparse_sdf(hi, 64, fallback="nearest")
    with pytest.raises(D3S2Error):
        resample_sparse_sdf(hi, 64, tau=2 * tau)


def test_sharp_mask_is_carried_to_lower_resolution(torus_and_box):
    mesh = torus_and_box["box"]
    tau = 4 * 2 / 48
    hi = mesh_to_sparse_sdf(mesh, 96, tau=tau, backend="cpu", transform=IDENTITY)
    lo = mesh_to_sparse_sdf(mesh, 48, tau=tau, backend="cpu", transform=IDENTITY)
    der = resample_sparse_sdf(hi, 48)
    common, ia, ib = np.intersect1d(_key(der.coords, 48), _key(lo.coords, 48), return_indices=True)
    a, b = der.sharp[ia], lo.sharp[ib]
    assert b.sum() > 0
    assert (a & b).sum() / (a | b).sum() > 0.6
