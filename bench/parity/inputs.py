"""Real-mesh inputs of the parity harness, computed once on a machine with d3s2's [data] extras (the GPU machine has
no mesh packages) and stored in one .npz:

- ``mesh_v`` / ``mesh_f``: the Stanford bunny of pymeshfix, repaired (watertight), normalised to [-0.95, 0.95]^3;
- ``tok512``: latent cells (64^3) of its 512 SDF band (tau = 1/128): the 512 SS-DiT token set;
- ``tok1024``: the release's 1024 token set of the bunny (renormalised, halved, grid points i/1023 - 0.5,
  udf < 4/1024, // 8; 128^3 cells) from d3s2's octree: the 1024 SS-DiT token set.

    PYTHONPATH=src python bench/parity/inputs.py bench/parity/inputs/bunny.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def bunny() -> tuple[np.ndarray, np.ndarray]:
    import os

    import pymeshfix

    from d3s2.data.mesh_io import load_mesh

    mesh = load_mesh(os.path.join(os.path.dirname(pymeshfix.__file__), "examples", "StanfordBunny.ply"))
    fix = pymeshfix.MeshFix(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int32))
    fix.repair()
    v, f = np.asarray(fix.points, dtype=np.float64), np.asarray(fix.faces, dtype=np.int64)
    lo, hi = v.min(0), v.max(0)
    return (v - (lo + hi) / 2) * (1.9 / float((hi - lo).max())), f


def band(v, f, resolution: int, tau: float):
    import trimesh

    from d3s2.data.mesh_io import NormalizeTransform
    from d3s2.data.sdf import mesh_to_sparse_sdf

    sdf = mesh_to_sparse_sdf(trimesh.Trimesh(v, f, process=False), resolution, tau, sharp_angle=None,
                             transform=NormalizeTransform(1.0, np.zeros(3)), backend="cpu")
    s = np.clip(sdf.sdf.astype(np.float32) / tau, -1, 1)
    return sdf.coords.astype(np.int16), s.astype(np.float16)


def main(out: str) -> None:
    import torch

    from d3s2.pipelines.token_band import latent_band_coords, release_band_mesh

    v, f = bunny()
    c512, _ = band(v, f, 512, 1 / 128)
    tok512 = np.unique(c512.astype(np.int64) // 8, axis=0)
    tok1024 = latent_band_coords(release_band_mesh(v), f, 1024, 4 / 1024, 8, device="cpu",
                                 rule="release")[:, 1:].numpy()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, mesh_v=v, mesh_f=f.astype(np.int32), tok512=tok512.astype(np.int16),
                        tok1024=tok1024.astype(np.int16))
    print(f"{out}: {len(f)} faces, tokens {len(tok512)} / {len(tok1024)}")
    del torch


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/parity/inputs/bunny.npz")
