"""Which meshes a ``d3s2 prepare`` run takes, and the names and seeds of their items.

* :func:`discover_meshes`: the mesh files under a folder (recursive, sorted, hidden entries skipped; an extension list
  or a glob pattern);
* :func:`item_id_for`: an item's folder name, file-name safe and collision free (short hash of the relative path);
* :func:`item_seed`: an item's camera seed (the run's seed mixed with its path);
* :func:`shard_of` / :func:`parse_shard`: ``--shard I/N``, the items whose relative path hashes to I modulo N (N
  independent jobs split a corpus without coordination, stable when files are added).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path

from d3s2.errors import D3S2Error

__all__ = ["MESH_EXTENSIONS", "discover_meshes", "item_id_for", "item_seed", "shard_of", "parse_shard"]

MESH_EXTENSIONS = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")


def discover_meshes(mesh_dir: str | Path, pattern: str | None = None, exclude: str | Path | None = None) -> list[str]:
    """Relative POSIX paths of the mesh files under ``mesh_dir`` (recursive, sorted, hidden entries skipped).

    Without ``pattern`` every file with a mesh extension (obj, glb, gltf, ply, stl, off; any case) is taken; with it,
    files whose relative path or name matches the glob pattern.
    """
    root = Path(mesh_dir)
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or Path(dirpath, d).resolve() != skip)
        )
        for name in filenames:
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if pattern is not None:
                ok = fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(name, pattern)
            else:
                ok = name.lower().endswith(MESH_EXTENSIONS)
            if ok:
                found.append(rel)
    return sorted(found)


def item_id_for(rel: str) -> str:
    """Folder name of a mesh: its file-name-safe relative path plus a short hash (distinct paths never collide)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "__"))[-100:].strip("._") or "mesh"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def item_seed(rel: str, seed: int) -> int:
    return int(hashlib.sha1(f"{seed}:{rel}".encode()).hexdigest()[:8], 16)


def shard_of(rel: str, num_shards: int) -> int:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % num_shards


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise D3S2Error(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))
