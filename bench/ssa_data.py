"""Token layouts for the SSA benchmark: latent shells of real meshes (runs on a CPU machine with the [data] extra).

The latent grid of the 1024^3 stage is 128^3 (1024 / 8); its tokens are the latent cells near the surface. We take the
cells that a dense surface sampling touches (about the band of half a cell each side of the surface), with the mesh
scaled so that its longest side spans the grid. For each target N we rescale the mesh inside a larger/smaller grid
until the shell has at least N cells, then drop random cells down to exactly N. Coordinates are stored as int16 in
``bench/data/ssa_shells.npz`` (keys ``<mesh>_<N>``), because the GPU machine has no mesh packages.

    python bench/ssa_data.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

MESHES = {
    "bunny": ("pymeshfix", "examples/StanfordBunny.ply"),
    "duck": ("pybullet_data", "duck.obj"),
    "teddy": ("pybullet_data", "teddy2_VHACD_CHs.obj"),
}
TARGETS = [8192, 16384, 32768, 65536, 131072]


def load_mesh(name: str):
    import importlib

    import trimesh

    pkg, rel = MESHES[name]
    mod = importlib.import_module(pkg)
    base = mod.getDataPath() if pkg == "pybullet_data" else os.path.dirname(mod.__file__)
    mesh = trimesh.load(os.path.join(base, rel), force="mesh", process=False)
    v = mesh.vertices - mesh.bounds[0]
    mesh.vertices = v / v.max()
    return mesh


def shell(mesh, res: int, seed: int = 0) -> np.ndarray:
    """Cells of a res^3 grid within half a cell of the surface (distance from a surface point to the cell's box < 0.5
    cell), the band that the 1024 stage's 4/1024 distance threshold gives on its 128^3 latent grid."""
    import trimesh

    n_pts = int(mesh.area * (res / 0.35) ** 2) + 1000
    pts, _ = trimesh.sample.sample_surface(mesh, n_pts, seed=seed)
    p = pts * (res - 1) + 0.5  # keep a half-cell margin inside the grid
    out = []
    for dx in (-0.5, 0.5):
        for dy in (-0.5, 0.5):
            for dz in (-0.5, 0.5):
                c = np.floor(p + np.array([dx, dy, dz])).astype(np.int64)
                gap = np.maximum(np.maximum(c - p, p - (c + 1)), 0.0)  # distance from p to the box of c, per axis
                ok = (gap ** 2).sum(1) < 0.25
                out.append(c[ok])
    cells = np.unique(np.concatenate(out), axis=0)
    cells = cells[(cells >= 0).all(1) & (cells < res).all(1)]
    return cells


def block_stats(cells: np.ndarray, m: int) -> tuple[float, float]:
    _, counts = np.unique(cells // m, axis=0, return_counts=True)
    return float(counts.mean()), float((counts.astype(np.float64) ** 2).sum() / counts.sum())


def main() -> int:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    os.makedirs(out, exist_ok=True)
    arrays, stats = {}, {}
    rng = np.random.default_rng(0)
    for name in MESHES:
        mesh = load_mesh(name)
        c128 = shell(mesh, 128)
        stats[f"{name}_res128"] = {"tokens": int(len(c128)), "per4": block_stats(c128, 4)[0], "per8": block_stats(c128, 8)[0],
                                   "per8_weighted": block_stats(c128, 8)[1]}
        for target in TARGETS:
            res = int(round(128 * (target / len(c128)) ** 0.5))
            cells = shell(mesh, res)
            while len(cells) < target:
                res += 2
                cells = shell(mesh, res)
            keep = np.sort(rng.choice(len(cells), target, replace=False))
            cells = cells[keep]
            if cells.max() >= 2 ** 15:
                raise SystemExit("grid too large for int16")
            arrays[f"{name}_{target}"] = cells.astype(np.int16)
            p4, _ = block_stats(cells, 4)
            p8, p8w = block_stats(cells, 8)
            stats[f"{name}_{target}"] = {"res": res, "tokens": target, "per4": p4, "per8": p8, "per8_weighted": p8w}
            print(name, target, stats[f"{name}_{target}"], flush=True)
    tmp = os.path.join(out, "ssa_shells.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, os.path.join(out, "ssa_shells.npz"))
    with open(os.path.join(out, "ssa_shells_stats.json.tmp"), "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(os.path.join(out, "ssa_shells_stats.json.tmp"), os.path.join(out, "ssa_shells_stats.json"))
    print(json.dumps({k: v for k, v in stats.items() if k.endswith("res128")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
