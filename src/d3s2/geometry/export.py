"""Mesh export (issue 6: GLB, OBJ, PLY, STL through trimesh) with vertex normals and atomic writes.

The file is written to a temporary name in the target folder and renamed with ``os.replace``, so an interrupted export
never leaves a half-written mesh under the final name. STL stores face normals only (the format has no vertex normals);
GLB, OBJ and PLY carry per-vertex normals.
"""

from __future__ import annotations

import os

import numpy as np

from d3s2.errors import D3S2Error
from d3s2.fileio import atomic_write_bytes

__all__ = ["MESH_FORMATS", "mesh_format", "save_mesh"]

MESH_FORMATS = ("glb", "obj", "ply", "stl")


def mesh_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The export format: ``format`` if given, else the file extension; a D3S2Error for anything else."""
    fmt = format if format is not None else os.path.splitext(os.fspath(path))[1].lstrip(".")
    fmt = str(fmt).lower()
    if fmt not in MESH_FORMATS:
        shown = repr(fmt) if fmt else "(no extension)"
        raise D3S2Error(f"unknown mesh format {shown} for {os.fspath(path)!r}; use one of {', '.join(MESH_FORMATS)}")
    return fmt


def _export_bytes(mesh, fmt: str) -> bytes:
    import trimesh

    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
    out = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), vertex_normals=normals, process=False)
    if fmt == "obj":
        data = trimesh.exchange.obj.export_obj(out, include_normals=True, include_texture=False)
    elif fmt == "ply":
        data = trimesh.exchange.ply.export_ply(out, encoding="binary", vertex_normal=True)
    elif fmt == "stl":
        data = trimesh.exchange.stl.export_stl(out)
    else:
        data = trimesh.exchange.gltf.export_glb(trimesh.Scene(out), include_normals=True)
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def save_mesh(mesh, path: str | os.PathLike, format: str | None = None) -> str:
    """Write ``mesh`` (trimesh.Trimesh) to ``path`` as GLB / OBJ / PLY / STL (from ``format`` or the extension),
    atomically; returns the path. Parent folders are created."""
    fmt = mesh_format(path, format)
    if len(getattr(mesh, "faces", ())) == 0:
        raise D3S2Error(f"refusing to write an empty mesh to {os.fspath(path)!r}: the surface extraction found nothing")
    path = os.fspath(path)
    data = _export_bytes(mesh, fmt)
    atomic_write_bytes(path, data)
    return path
