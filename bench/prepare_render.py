"""Benchmark: seconds per mesh for the Sec. 5.1 renders (45 RGBA views at 518 x 518, 2x2 supersampling) + PNG writing.

Two steps, because the GPU machine has no trimesh / pybullet:

    # here: load meshes with their materials, normalise, save as portable npz (RenderMesh.save_npz)
    python bench/prepare_render.py export out/bench_meshes
    # anywhere (CPU here, CUDA on the GPU machine): time them; JSON under bench/results/
    PYTHONPATH=src python bench/prepare_render.py run out/bench_meshes --device cuda \
        --out bench/results/prepare_render_h100.json

Timed per mesh: upload + rasterise + shade + download of all views (``render_s``), and the whole job as `d3s2 prepare`
does it (renders, PNG encoding in a thread pool, cameras.json; ``total_s``). On CUDA it also checks that CUDA and CPU
renders agree (max abs uint8 difference) on two views of each mesh. Anchor: the target of issue 4, <= 10 s per mesh for
45 views on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from d3s2.data.render import Renderer, RenderMesh, RenderSettings, render_views, write_views  # noqa: E402
from d3s2.geometry.cameras import CameraSampling, sample_cameras  # noqa: E402


def export(out: Path) -> None:
    import pybullet_data
    import pymeshfix

    from d3s2.data.mesh_io import load_mesh, normalize_mesh
    from d3s2.data.render import load_render_mesh

    pb = Path(pybullet_data.getDataPath())
    meshes = {
        "duck_textured": pb / "duck.obj",
        "soccerball": pb / "soccerball.obj",
        "lego": pb / "lego" / "lego.obj",
        "bunny": Path(pymeshfix.__file__).parent / "examples" / "StanfordBunny.ply",  # ~100k faces, not watertight
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, path in meshes.items():
        _, t = normalize_mesh(load_mesh(path))
        m = load_render_mesh(path).transformed(t.scale, t.offset)
        m.save_npz(out / f"{name}.npz")
        print(name, m.num_faces, "faces")


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return "unknown"
    if not re.fullmatch(r"[0-9a-f]{40}", head):
        return "unknown"
    return head + (" + uncommitted changes" if dirty.strip() else "")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(mesh_dir: Path, device: str, views: int, size: int, out_json: Path | None, limit_s: float) -> dict:
    settings = RenderSettings(size=size, supersample=2)
    results = []
    t_start = time.perf_counter()
    files = sorted(mesh_dir.glob("*.npz"))
    # warm-up (CUDA context, kernels, allocator) on the first mesh, 2 views
    first = RenderMesh.load_npz(files[0])
    render_views(first, sample_cameras(first.bounding_radius(), size, CameraSampling(num_views=2)), settings, device)
    for f in files:
        if time.perf_counter() - t_start > limit_s:
            print(f"time limit reached, skipping {f.name}", flush=True)
            continue
        mesh = RenderMesh.load_npz(f)
        cams = sample_cameras(mesh.bounding_radius(), size, CameraSampling(num_views=views), seed=1)
        _sync(device)
        t0 = time.perf_counter()
        renderer = Renderer(mesh, settings, device)
        imgs = renderer.render_rgba(cams)
        _sync(device)
        render_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_views(Renderer(mesh, settings, device), cams, Path(tmp), threads=4 if device != "cpu" else 0)
            total_s = time.perf_counter() - t0
        rec = {
            "mesh": f.stem,
            "faces": mesh.num_faces,
            "views": views,
            "size": size,
            "supersample": settings.supersample,
            "render_s": round(render_s, 3),
            "total_s": round(total_s, 3),
            "ms_per_view": round(1000 * render_s / views, 1),
            "coverage": round(float(np.mean([(im[..., 3] > 0).mean() for im in imgs])), 3),
        }
        if device != "cpu":
            two = cams[:2]
            a = render_views(mesh, two, settings, "cpu")
            b = render_views(mesh, two, settings, device)
            rec["max_abs_diff_vs_cpu"] = int(max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)))
            rec["frac_pixels_diff_vs_cpu"] = float(np.mean([(x != y).any(-1).mean() for x, y in zip(a, b)]))
        print(json.dumps(rec), flush=True)
        results.append(rec)
    commit = _git_commit()
    card = (
        torch.cuda.get_device_name(0)
        if torch.device(device).type == "cuda"
        else f"cpu ({os.cpu_count()} cores: {platform.processor() or platform.machine()})"
    )
    doc = {
        "benchmark": "prepare_render",
        "what": f"{views} RGBA views at {size}x{size} (2x2 supersampled) per mesh, pure-PyTorch rasteriser",
        "anchor": "issue 4 target: <= 10 s per mesh for 45 views on the GPU machine",
        "device": device,
        "card": card,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "git_commit": commit,
        "results": results,
    }
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("mesh_dir", type=Path)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--views", type=int, default=45)
    r.add_argument("--size", type=int, default=518)
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("--limit-s", type=float, default=1e9, help="skip remaining meshes after this many seconds")
    args = ap.parse_args()
    if args.cmd == "export":
        export(args.out)
    else:
        run(args.mesh_dir, args.device, args.views, args.size, args.out, args.limit_s)


if __name__ == "__main__":
    main()
