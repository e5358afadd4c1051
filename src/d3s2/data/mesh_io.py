"""Mesh loading, validation and normalisation into the [-1, 1]^3 cube (paper Sec. 3 / 5.1 data preparation).

Convention (shared by every d3s2 data file): a mesh is mapped by ``v_norm = v * scale + offset`` where the bounding box
is centred at the origin and its longest side spans ``2 * margin`` (``margin = 0.95`` as in the authors' release), so
the normalised mesh lies in ``[-margin, margin]^3``. ``scale`` (float) and ``offset`` (3 floats) are stored with every
output so that results can be mapped back with ``v = (v_norm - offset) / scale``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from d3s2.errors import D3S2Error

DEFAULT_MARGIN = 0.95

__all__ = [
    "DEFAULT_MARGIN",
    "NormalizeTransform",
    "load_mesh",
    "validate_mesh",
    "normalize_mesh",
    "load_normalized_mesh",
]


@dataclass(frozen=True)
class NormalizeTransform:
    """``v_norm = v * scale + offset`` (see module docstring)."""

    scale: float
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) * self.scale + self.offset

    def invert(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.offset) / self.scale


def _trimesh():
    try:
        import trimesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise D3S2Error("trimesh is not installed: install the data extra with `pip install d3s2[data]`") from exc
    return trimesh


def _flatten(obj, source: str):
    """A trimesh Scene (glb/gltf/obj with groups) becomes one Trimesh with every node's transform applied."""
    trimesh = _trimesh()
    if isinstance(obj, trimesh.Scene):
        meshes = []
        for node_name in obj.graph.nodes_geometry:
            transform, geom_name = obj.graph[node_name]
            geom = obj.geometry.get(geom_name)
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0:
                m = geom.copy()
                m.apply_transform(transform)
                meshes.append(m)
        if not meshes:
            kinds = sorted({type(g).__name__ for g in obj.geometry.values()})
            what = f"only {', '.join(kinds)}" if kinds else "no geometry"
            raise D3S2Error(f"{source}: scene has no triangle mesh ({what}); give a file with faces")
        return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)
    if isinstance(obj, (list, tuple)):
        meshes = [_flatten(o, source) for o in obj]
        return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)
    return obj


def validate_mesh(mesh, source: str = "mesh"):
    """Return ``mesh`` as a float64/int64 trimesh.Trimesh or raise D3S2Error with a one-line reason."""
    trimesh = _trimesh()
    if isinstance(mesh, trimesh.PointCloud):
        raise D3S2Error(f"{source}: is a point cloud ({len(mesh.vertices)} points, no faces); give a triangle mesh")
    if not isinstance(mesh, trimesh.Trimesh):
        raise D3S2Error(f"{source}: is a {type(mesh).__name__}, not a triangle mesh; give a file with faces")
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    if v.size == 0:
        raise D3S2Error(f"{source}: mesh is empty (no vertices); give a non-empty mesh")
    if f.size == 0:
        raise D3S2Error(f"{source}: mesh has {len(v)} vertices but no faces (point cloud?); give a triangle mesh")
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise D3S2Error(f"{source}: {bad} vertices are NaN or infinite; repair or drop the mesh")
    if f.ndim != 2 or f.shape[1] != 3 or f.min() < 0 or f.max() >= len(v):
        raise D3S2Error(f"{source}: face indices are invalid (shape {f.shape}, {len(v)} vertices); repair the mesh")
    used = v[np.unique(f)]
    extent = used.max(axis=0) - used.min(axis=0)
    if float(np.max(extent)) <= 0.0:
        raise D3S2Error(f"{source}: mesh is degenerate (all face vertices coincide); give a mesh with extent")
    return mesh


def load_mesh(path: str | os.PathLike, *, process: bool = False):
    """Load any mesh or scene trimesh reads (obj, glb/gltf, ply, stl, off, ...) as one validated Trimesh.

    Scenes are flattened with their node transforms. ``process=False`` keeps the vertices as stored (merging is left to
    the steps that need it), which is faster on big files.
    """
    trimesh = _trimesh()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise D3S2Error(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise D3S2Error(f"{path}: file is empty; give a mesh file")
    try:
        obj = trimesh.load(path, process=process, skip_materials=False)
    except D3S2Error:
        raise
    except Exception as exc:  # trimesh raises many types for unreadable files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise D3S2Error(f"{path}: not a readable mesh ({msg[:160]}); give an obj/glb/gltf/ply/stl/off file") from exc
    mesh = _flatten(obj, path)
    return validate_mesh(mesh, path)


def normalize_mesh(mesh, margin: float = DEFAULT_MARGIN, *, copy: bool = True):
    """Centre the bounding box at the origin and scale the longest side to ``2 * margin``.

    Returns ``(normalised_mesh, NormalizeTransform)``. Only vertices referenced by faces define the box.
    """
    if not 0.0 < margin <= 1.0:
        raise D3S2Error(f"margin must be in (0, 1], got {margin}")
    mesh = validate_mesh(mesh)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    used = v[np.unique(np.asarray(mesh.faces))]
    lo, hi = used.min(axis=0), used.max(axis=0)
    centre = (lo + hi) / 2.0
    scale = 2.0 * margin / float(np.max(hi - lo))
    transform = NormalizeTransform(scale=scale, offset=-centre * scale)
    out = mesh.copy() if copy else mesh
    out.vertices = transform.apply(v)
    return out, transform


def load_normalized_mesh(path: str | os.PathLike, margin: float = DEFAULT_MARGIN):
    """``load_mesh`` then ``normalize_mesh``: returns ``(mesh, NormalizeTransform)``."""
    return normalize_mesh(load_mesh(path), margin, copy=False)
