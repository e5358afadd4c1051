"""Benchmark: sparse marching cubes (d3s2.geometry) on real sparse SDF bands vs skimage on the dense grid (CPU).

The band is the sparse SDF of paper Eq. 1 (|s| < tau = 1/128, at least 2 voxels) of the MeshFix-repaired Stanford bunny (pymeshfix's
example, loaded from the installed package) made by d3s2.data.sdf.mesh_to_sparse_sdf. The dense baseline is what the
authors' release does (dense grid -> skimage marching cubes on the CPU): the band is written into a dense R^3 grid and
the voxels outside the band get +tau outside / -tau inside (connected components of the non-band voxels; those touching
the grid border are outside), so both see the same surface. Both skimage methods are timed ('lorensen' = our table,
'lewiner' = skimage's default). Dense grids are built only where they fit (--dense).

    python bench/marching_cubes.py --sparse 256 512 1024 --dense 256 512 --threads 1

Writes bench/results/marching_cubes-cpu.json (machine, versions, git commit, shapes, median seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from d3s2.data.sdf import mesh_to_sparse_sdf  # noqa: E402
from d3s2.data.sparse_sdf import load_sparse_sdf, save_sparse_sdf  # noqa: E402
from d3s2.geometry.marching_cubes import sparse_marching_cubes  # noqa: E402


def bunny():
    import pymeshfix
    import trimesh

    m = trimesh.load(os.path.join(os.path.dirname(pymeshfix.__file__), "examples", "StanfordBunny.ply"))
    fix = pymeshfix.MeshFix(np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int32))
    fix.repair()
    return trimesh.Trimesh(np.asarray(fix.points), np.asarray(fix.faces), process=False)


def band(resolution: int, cache: str):
    path = os.path.join(cache, f"bunny_repaired.sdf{resolution}.npz")
    if os.path.isfile(path):
        return load_sparse_sdf(path), None
    t0 = time.perf_counter()
    # tau = 1/128 (the paper's) but at least 2 voxels: a cell crossing the surface has corners up to sqrt(3) voxels away
    sdf = mesh_to_sparse_sdf(bunny(), resolution, tau=max(1.0 / 128.0, 4.0 / resolution), sharp_angle=None, backend="cpu")
    seconds = time.perf_counter() - t0
    save_sparse_sdf(path, sdf, compress=False)
    return sdf, seconds


def dense_from_band(sdf) -> np.ndarray:
    from scipy import ndimage

    r = sdf.resolution
    vol = np.full((r, r, r), np.float32(sdf.tau), dtype=np.float32)
    c = sdf.coords.astype(np.int64)
    vol[c[:, 0], c[:, 1], c[:, 2]] = sdf.sdf.astype(np.float32)
    free = np.ones((r, r, r), dtype=bool)
    free[c[:, 0], c[:, 1], c[:, 2]] = False
    label, _ = ndimage.label(free)
    border = np.unique(np.concatenate([label[[0, -1]].ravel(), label[:, [0, -1]].ravel(), label[:, :, [0, -1]].ravel()]))
    inside = free & ~np.isin(label, border)
    vol[inside] = -np.float32(sdf.tau)
    return vol


_MEMORY_PROBE = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from d3s2.data.sparse_sdf import load_sparse_sdf
from d3s2.geometry.marching_cubes import sparse_marching_cubes
sdf = load_sparse_sdf(sys.argv[2])
c = torch.from_numpy(sdf.coords.astype(np.int64)); v = torch.from_numpy(sdf.sdf.astype(np.float32))
torch.set_num_threads(int(sys.argv[3]))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
out = sparse_marching_cubes(c, v, sdf.resolution)
# VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child of a big parent would report the parent's size
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()
print(before, int(hwm[1]) * 1024)
"""


def peak_memory(path: str) -> dict:
    """Peak RSS of one sparse marching cubes call in a fresh process, above the RSS after loading the band."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    threads = str(torch.get_num_threads())
    out = subprocess.check_output([sys.executable, "-c", _MEMORY_PROBE, src, path, threads], text=True).split()
    before, peak = int(out[0]), int(out[1])
    return {"rss_after_load_bytes": before, "peak_rss_bytes": peak, "mc_peak_above_load_bytes": peak - before}


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times, out


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=os.path.dirname(__file__)).strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--dense", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--level", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None, help="cells per chunk (default: the library's, 2^18 on CPU)")
    ap.add_argument("--cache", default="/tmp/d3s2_bench_mc")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (skimage is single-threaded; "
                    "on a shared, oversubscribed CPU 1 thread is both fairer and far more stable)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "marching_cubes-cpu.json"))
    args = ap.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    import skimage
    import trimesh
    from scipy.spatial import cKDTree
    from skimage.measure import marching_cubes as sk_mc

    result = {
        "bench": "marching_cubes",
        "args": vars(args),
        "machine": {
            "device": "cpu",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "skimage": skimage.__version__,
            "commit": git_commit(),
            "loadavg_start": os.getloadavg(),
        },
        "mesh": "MeshFix-repaired Stanford bunny (pymeshfix examples/StanfordBunny.ply), sign=winding, tau=max(1/128, 2 voxels)",
        "cases": [],
    }
    for r in sorted(set(args.sparse) | set(args.dense)):
        sdf, sdf_seconds = band(r, args.cache)
        coords = torch.from_numpy(sdf.coords.astype(np.int64))
        values = torch.from_numpy(sdf.sdf.astype(np.float32))
        case = {"resolution": r, "band_voxels": len(sdf), "sdf_seconds": sdf_seconds}
        print(f"R={r}: {len(sdf)} band voxels", flush=True)
        med, times, (v, f) = timed(
            lambda: sparse_marching_cubes(coords, values, r, args.level, chunk_size=args.chunk), args.repeats
        )
        mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
        case["sparse"] = {
            "median_s": med,
            "all_s": times,
            "vertices": len(v),
            "faces": len(f),
            "watertight": bool(mesh.is_watertight),
            "euler": int(mesh.euler_number),
            "volume_positive": bool(mesh.volume > 0),
        }
        case["sparse"]["memory"] = peak_memory(os.path.join(args.cache, f"bunny_repaired.sdf{r}.npz"))
        print(f"  sparse MC {med:.3f} s, {len(f)} faces, watertight {mesh.is_watertight}, "
              f"+{case['sparse']['memory']['mc_peak_above_load_bytes'] / 2**30:.2f} GiB peak", flush=True)
        if r in args.dense:
            t0 = time.perf_counter()
            vol = dense_from_band(sdf)
            case["dense_fill_s"] = time.perf_counter() - t0
            case["dense_bytes"] = int(vol.nbytes)
            for method in ("lorensen", "lewiner"):
                reps = 1 if r >= 512 else args.repeats
                med_sk, times_sk, (sv, sf, _, _) = timed(
                    lambda: sk_mc(vol, args.level, method=method, gradient_direction="descent"), reps
                )
                entry = {"median_s": med_sk, "all_s": times_sk, "vertices": len(sv), "faces": len(sf)}
                if method == "lorensen":
                    d = cKDTree(v.double().numpy()).query(sv)[0]
                    entry["same_face_count"] = len(sf) == len(f)
                    entry["same_vertex_count"] = len(sv) == len(v)
                    entry["max_vertex_distance_voxels"] = float(d.max())
                entry["speedup_sparse_vs_skimage"] = med_sk / med
                case[f"skimage_{method}"] = entry
                print(f"  skimage {method} {med_sk:.3f} s, {len(sf)} faces", flush=True)
            del vol
        result["cases"].append(case)
    result["machine"]["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
