"""Extraction + clean-up time and peak memory of closed vs today's surfaces (issue 24), on a sparse sphere band.

    python bench/closed_surface.py                       # H200 row: R=1024, ~1.2M faces, CUDA
    python bench/closed_surface.py --tiny --device cpu   # CPU smoke (R=128)

The band is built sparsely (8^3 blocks near the sphere, then voxels with |sdf| < --band voxels; never a dense R^3
grid); ``--holes`` drops that fraction of 16^3 blocks of the band (missing structure cells). Rows per surface mode:
``d3s2`` (today's: cells whose 8 corners exist), ``closed`` (geometry/closed.py), ``release`` (absent voxels = 1.0,
the release's semantics, vectorised tables). Per row: seconds of extraction and of the clean-up (enclosed components,
report), faces, boundary edges, components, volume vs the sphere's, peak CUDA bytes (vs a dense float32 R^3 grid).
Writes JSON to ``--out`` (default bench/results/closed_surface-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))


def sphere_band(resolution: int, radius_voxels: float, band: float, holes: float, device, seed: int = 0):
    """Sparse band of a sphere at the grid centre: coords [N, 3] int64, sdf [N] float32 (world units)."""
    b = 8
    nb = resolution // b
    g = torch.stack(torch.meshgrid(*[torch.arange(nb, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = resolution / 2
    d = ((g.double() + 0.5) * b - centre).norm(dim=1) - radius_voxels
    blocks = g[d.abs() < b * 0.87 + band + 1]
    if holes > 0:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        big = torch.div(blocks, 2, rounding_mode="floor")
        keys = (big[:, 0] * nb + big[:, 1]) * nb + big[:, 2]
        uniq, inv = torch.unique(keys, return_inverse=True)
        drop = (torch.rand(len(uniq), generator=gen) < holes).to(device)
        blocks = blocks[~drop[inv]]
    local = torch.stack(torch.meshgrid(*[torch.arange(b, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords, values = [], []
    for start in range(0, len(blocks), 4096):
        v = (blocks[start:start + 4096, None] * b + local[None]).reshape(-1, 3)
        s = (v.double() + 0.5 - centre).norm(dim=1) - radius_voxels
        keep = s.abs() < band
        coords.append(v[keep])
        values.append((s[keep] * 2 / resolution).float())
    return torch.cat(coords), torch.cat(values)


def run_mode(mode, coords, values, resolution, device):
    from d3s2.geometry.cleanup import clean_mesh
    from d3s2.geometry.report import mesh_report
    from d3s2.pipelines.surface import extract_surface

    import trimesh

    settings = SimpleNamespace(surface=mode, marching_cubes="lorensen")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    v, f = extract_surface(coords, values, resolution, 0.0, settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_extract = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    t0 = time.perf_counter()
    mesh = trimesh.Trimesh(v.cpu().numpy(), f.cpu().numpy(), process=False)
    out = clean_mesh(mesh, remove_enclosed=True)
    t_clean = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = mesh_report(out)
    t_report = time.perf_counter() - t0
    return {"surface": mode, "extract_seconds": t_extract, "cleanup_seconds": t_clean, "report_seconds": t_report,
            "peak_cuda_bytes_extract": peak, **rep.as_dict()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--faces", type=float, default=1.2e6, help="target face count of the sphere (sets its radius)")
    ap.add_argument("--band", type=float, default=2.0, help="band half-width in voxels")
    ap.add_argument("--holes", type=float, default=0.02, help="fraction of 16^3 blocks dropped from the band")
    ap.add_argument("--modes", default="d3s2,closed,release")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="R=128, ~40k faces (CPU smoke)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per mode (the first warms up; the last is kept)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.resolution, args.faces = 128, 4e4
    device = torch.device(args.device)
    radius = math.sqrt(args.faces / 37.7)  # Lorensen faces of a sphere ~ 37.7 r^2 (r in voxels), measured
    if radius > 0.45 * args.resolution:
        raise SystemExit(f"{args.faces:.0f} faces do not fit at {args.resolution}^3")
    t0 = time.perf_counter()
    coords, values = sphere_band(args.resolution, radius, args.band, args.holes, device)
    t_band = time.perf_counter() - t0
    rows = []
    for mode in args.modes.split(","):
        for _ in range(max(1, args.repeat)):
            row = run_mode(mode, coords, values, args.resolution, device)
        row["volume_rel_error"] = row["volume"] / (4 / 3 * math.pi * (radius * 2 / args.resolution) ** 3) - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    result = {
        "bench": "closed_surface", "commit": commit, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "host": platform.node(), "torch": torch.__version__, "resolution": args.resolution,
        "band_voxels": args.band, "holes": args.holes, "radius_voxels": radius, "voxels": len(coords),
        "band_seconds": t_band, "dense_float32_grid_bytes": 4 * args.resolution**3, "rows": rows,
    }
    out = args.out or os.path.join(REPO, "bench", "results",
                                   f"closed_surface-{'tiny-' if args.tiny else ''}{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    from d3s2.fileio import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
