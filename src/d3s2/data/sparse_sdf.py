"""Sparse SDF volume of paper Eq. 1: ``V = {(x_i, s(x_i)) : |s(x_i)| < tau}`` and its on-disk format.

Voxel convention (used everywhere in d3s2.data): at resolution ``R`` the cube ``[-1, 1]^3`` is split into ``R^3`` voxels
of size ``h = 2 / R``; voxel ``(i, j, k)`` (integers in ``[0, R)``) has its centre at ``x = -1 + (i + 0.5) * h`` (same
for y, z). SDF values are in the units of the normalised cube (not voxels), negative inside, positive outside; ``tau``
likewise (``tau = 1/128`` is 4 voxels at 1024, 2 at 512, 1 at 256).

File format: one ``.npz`` per mesh and resolution with arrays ``coords`` (int16 [N, 3], sorted lexicographically),
``sdf`` (float16 [N]), ``sharp`` (bool [N]), ``resolution``, ``tau``, ``scale``, ``offset`` ([3]), ``format_version``.
Files are written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from d3s2.errors import D3S2Error
from d3s2.fileio import atomic_open

FORMAT_VERSION = 1
DEFAULT_TAU = 1.0 / 128.0

__all__ = [
    "DEFAULT_TAU",
    "SparseSDF",
    "voxel_size",
    "voxel_centers",
    "points_to_voxels",
    "save_sparse_sdf",
    "load_sparse_sdf",
    "sparse_sdf_filename",
]


def voxel_size(resolution: int) -> float:
    return 2.0 / float(resolution)


def voxel_centers(coords: np.ndarray, resolution: int) -> np.ndarray:
    """Integer voxel coordinates [N, 3] -> float64 centres in [-1, 1]^3 (``-1 + (i + 0.5) * 2 / R``)."""
    return -1.0 + (np.asarray(coords, dtype=np.float64) + 0.5) * (2.0 / resolution)


def points_to_voxels(points: np.ndarray, resolution: int) -> np.ndarray:
    """Float points in [-1, 1]^3 -> integer index of the voxel containing them (clipped to ``[0, R)``), int64 [N, 3]."""
    idx = np.floor((np.asarray(points, dtype=np.float64) + 1.0) * (resolution / 2.0)).astype(np.int64)
    return np.clip(idx, 0, resolution - 1)


@dataclass
class SparseSDF:
    """Sparse SDF at one resolution (Eq. 1) with the sharp-edge voxel mask (Eq. 2, L_sharp) and the mesh transform."""

    coords: np.ndarray  # int16 [N, 3]
    sdf: np.ndarray  # float16 [N]
    resolution: int
    tau: float
    scale: float = 1.0
    offset: np.ndarray | None = None  # float64 [3]
    sharp: np.ndarray | None = None  # bool [N]

    def __post_init__(self) -> None:
        self.coords = np.ascontiguousarray(self.coords, dtype=np.int16).reshape(-1, 3)
        self.sdf = np.ascontiguousarray(self.sdf, dtype=np.float16).reshape(-1)
        self.resolution = int(self.resolution)
        self.tau = float(self.tau)
        self.scale = float(self.scale)
        self.offset = np.zeros(3) if self.offset is None else np.asarray(self.offset, dtype=np.float64).reshape(3)
        n = len(self.coords)
        self.sharp = np.zeros(n, dtype=bool) if self.sharp is None else np.asarray(self.sharp, dtype=bool).reshape(-1)
        if len(self.sdf) != n or len(self.sharp) != n:
            raise D3S2Error(f"SparseSDF arrays disagree: {n} coords, {len(self.sdf)} sdf, {len(self.sharp)} sharp")
        if not 1 <= self.resolution <= 32767:
            raise D3S2Error(f"SparseSDF resolution {self.resolution} does not fit int16 coordinates")

    def __len__(self) -> int:
        return len(self.coords)

    def centers(self) -> np.ndarray:
        return voxel_centers(self.coords, self.resolution)

    def to_dense(self, fill: float | None = None) -> np.ndarray:
        """Dense float32 [R, R, R] grid (small R only, for tests/visualisation); voxels not stored get ``fill``
        (default ``+tau``)."""
        r = self.resolution
        out = np.full((r, r, r), self.tau if fill is None else fill, dtype=np.float32)
        c = self.coords.astype(np.int64)
        out[c[:, 0], c[:, 1], c[:, 2]] = self.sdf.astype(np.float32)
        return out


def sparse_sdf_filename(mesh_id: str, resolution: int) -> str:
    """Canonical file name of one mesh's sparse SDF at one resolution."""
    return f"{mesh_id}.sdf{int(resolution)}.npz"


def save_sparse_sdf(path: str | os.PathLike, data: SparseSDF, *, compress: bool = True) -> str:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    path = os.fspath(path)
    arrays = dict(
        coords=data.coords,
        sdf=data.sdf,
        sharp=data.sharp,
        resolution=np.int64(data.resolution),
        tau=np.float64(data.tau),
        scale=np.float64(data.scale),
        offset=np.asarray(data.offset, dtype=np.float64),
        format_version=np.int64(FORMAT_VERSION),
    )
    with atomic_open(path, "wb") as fh:
        (np.savez_compressed if compress else np.savez)(fh, **arrays)
    return path


def load_sparse_sdf(path: str | os.PathLike) -> SparseSDF:
    """Read a file written by :func:`save_sparse_sdf`; a missing or malformed file raises D3S2Error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise D3S2Error(f"{path}: no such sparse SDF file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"coords", "sdf", "resolution", "tau"} - set(z.files)
            if missing:
                raise D3S2Error(f"{path}: not a d3s2 sparse SDF file (missing {sorted(missing)}); recreate it")
            return SparseSDF(
                coords=z["coords"],
                sdf=z["sdf"],
                resolution=int(z["resolution"]),
                tau=float(z["tau"]),
                scale=float(z["scale"]) if "scale" in z.files else 1.0,
                offset=z["offset"] if "offset" in z.files else None,
                sharp=z["sharp"] if "sharp" in z.files else None,
            )
    except D3S2Error:
        raise
    except Exception as exc:
        raise D3S2Error(f"{path}: unreadable sparse SDF file ({type(exc).__name__}: {exc}); recreate it") from exc
