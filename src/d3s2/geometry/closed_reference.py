"""Dense NumPy / SciPy reference of :func:`d3s2.geometry.closed.closed_band` for tests (small grids only): the same
labels (coarse shell, 26-connected outside flood fill by ``scipy.ndimage.label``, 6-neighbour majority propagation with
ties to outside) on a dense ``(R + 2)^3`` grid, returned as the dense volume marching cubes runs on."""

from __future__ import annotations

import numpy as np

from d3s2.geometry.closed import PAD, default_factor

__all__ = ["closed_volume_dense"]


def closed_volume_dense(coords, values, resolution: int, level: float = 0.0, *, factor: int | None = None,
                        close: int = 1) -> np.ndarray:
    """Dense ``[R + 2, R + 2, R + 2]`` float32 volume in the padded frame: decoded values where given, ``level +/- c``
    elsewhere (``c`` = the largest ``|value - level|``)."""
    from scipy import ndimage

    q = np.asarray(coords, dtype=np.int64).reshape(-1, 3) + PAD
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    f = factor or default_factor(resolution)
    P = resolution + 2 * PAD
    C = -(-P // f)
    c = max(float(np.abs(vals.astype(np.float64) - level).max()), 1e-6)
    occ = np.zeros((C, C, C), dtype=bool)
    occ[tuple((q // f).T)] = True
    cube = np.ones((3, 3, 3), dtype=bool)
    shell = ndimage.binary_dilation(occ, cube, iterations=close) if close > 0 else occ
    comp, _ = ndimage.label(~shell, structure=cube)
    border = np.unique(np.concatenate([comp[0].ravel(), comp[-1].ravel(), comp[:, 0].ravel(), comp[:, -1].ravel(),
                                       comp[:, :, 0].ravel(), comp[:, :, -1].ravel()]))
    outside = np.isin(comp, border[border > 0])
    up = lambda a: a.repeat(f, 0).repeat(f, 1).repeat(f, 2)  # noqa: E731 - coarse -> voxel
    lab = np.where(up(outside), 1, -1).astype(np.int8)
    lab[up(shell)] = 0
    g = np.indices(lab.shape)
    lab[((g < PAD) | (g >= P - PAD)).any(0) & up(shell)] = 1
    active = np.zeros(lab.shape, dtype=bool)
    active[tuple(q.T)] = True
    lab[tuple(q.T)] = np.where(vals > level, 1, -1)
    while True:
        x = np.pad(lab, 1, constant_values=1).astype(np.int16)
        nb = [x[:-2, 1:-1, 1:-1], x[2:, 1:-1, 1:-1], x[1:-1, :-2, 1:-1], x[1:-1, 2:, 1:-1], x[1:-1, 1:-1, :-2],
              x[1:-1, 1:-1, 2:]]
        s = sum(nb)
        known = sum((t != 0).astype(np.int16) for t in nb)
        upd = (lab == 0) & (known > 0)
        if not upd.any():
            break
        lab[upd] = np.where(s[upd] >= 0, 1, -1)
    vol = (level + c * lab.astype(np.float64)).astype(np.float32)
    vol[tuple(q.T)] = vals
    return np.ascontiguousarray(vol[:P, :P, :P])
