"""Benchmark: submanifold sparse conv 3^3 at ~1M voxels of a real mesh shell vs dense ``F.conv3d`` (paper Sec. 3.1).

The coordinates are a voxelised surface of pybullet_data's duck (``--make-data`` builds them here, where pybullet is
installed, into ``bench/data/duck_shell_<R>.npz``: int16 [N, 3]). On the GPU: channels 32/64/128, fp16 and bf16,
forward and forward+backward, median ms (``triton.testing.do_bench``), effective TFLOP/s counted on the real pairs
(``2 * pairs * Cin * Cout`` per forward, 3x that for forward+backward), next to ``F.conv3d`` on the dense grid of the
same extent wherever it fits in memory. A correctness check against dense ``conv3d`` on a crop runs first.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 bench/sparse_conv.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from d3s2.sparse import (  # noqa: E402
    SparseConv3d,
    SparseTensor,
    dense_padding,
    kernel_to_dense_weight,
    neighbor_map,
)

DATA = ROOT / "bench" / "data"
DEFAULT_RES = 560


def make_data(resolution: int, mesh: str = "duck") -> Path:
    from d3s2.selfcheck import load_pybullet_mesh, surface_voxels

    vox = surface_voxels(load_pybullet_mesh(mesh), resolution, points_per_voxel=12.0)
    path = DATA / f"{mesh}_shell_{resolution}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, coords=vox.astype(np.int16), resolution=np.int32(resolution), mesh=mesh)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(vox)} voxels at {resolution}^3, {path.stat().st_size / 1e6:.1f} MB")
    return path


def load_data(path: Path, device) -> tuple[torch.Tensor, int]:
    d = np.load(path)
    xyz = torch.from_numpy(d["coords"].astype(np.int32))
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32), xyz], 1).to(device)
    return coords, int(d["resolution"])


def bench_ms(fn) -> float:
    if not torch.cuda.is_available():  # CPU smoke run of the script itself
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    # a single slow call (a dense fallback path) is reported as is rather than repeated
    fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    if s.elapsed_time(e) > 1000:
        return float(s.elapsed_time(e))
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    except ImportError:  # CUDA events
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return float(np.median(times))


def check_crop(coords: torch.Tensor, device) -> dict:
    """fp32 sparse conv (k3 s1, k2 s2) + gradients vs dense conv3d on a 96^3 crop of the shell."""
    lo = coords[:, 1:].float().mean(0).long() - 48
    sel = ((coords[:, 1:] >= lo) & (coords[:, 1:] < lo + 96)).all(1)
    c = coords[sel].clone()
    c[:, 1:] -= lo.to(c.dtype)
    torch.manual_seed(0)
    x = SparseTensor(torch.randn(len(c), 8, device=device), c, 1, 96)
    out = {"crop_voxels": int(len(c))}
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for k, s in [(3, 1), (2, 2)]:
        conv = SparseConv3d(8, 16, k, s).to(device)
        feats = x.feats.clone().requires_grad_(True)
        y = conv(x.replace(feats))
        g = torch.randn_like(y.feats)
        (y.feats * g).sum().backward()
        y = y.detach()
        dense = x.to_dense().requires_grad_(True)
        w = kernel_to_dense_weight(conv.kernel.detach()).requires_grad_(True)
        ref = F.conv3d(dense, w, conv.bias.detach(), stride=s, padding=dense_padding(k))
        yc = y.coords.long()
        ref_rows = ref[0, :, yc[:, 1], yc[:, 2], yc[:, 3]].t()
        (ref_rows * g).sum().backward()
        xc = x.coords.long()
        gx_ref = dense.grad[0, :, xc[:, 1], xc[:, 2], xc[:, 3]].t()
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))  # noqa: E731
        out[f"k{k}s{s}"] = {"fwd_rel_err": rel(y.feats, ref_rows.detach()), "dx_rel_err": rel(feats.grad, gx_ref)}
        for dt in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                yh = conv.to(dt)(x.to(dt)).feats.float()
            out[f"k{k}s{s}"][f"{dt}".replace("torch.", "") + "_vs_fp32_rel"] = float(
                (yh - y.feats).norm() / y.feats.norm())
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # the device copy of the tree has no .git: pass --commit
        return "unknown"


def write_json(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-data", action="store_true", help="voxelise the mesh here (needs pybullet) and exit")
    ap.add_argument("--resolution", type=int, default=DEFAULT_RES)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--commit", default=None, help="git commit to record (the device copy has no .git)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--dense-budget-s", type=float, default=90.0, help="stop starting dense runs after this long")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (tiny data) to test the script")
    args = ap.parse_args()
    if args.make_data:
        make_data(args.resolution)
        return 0
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("this benchmark needs a CUDA device (--cpu-smoke runs it tiny on the CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    slug = card.replace("NVIDIA ", "").replace(" ", "-").split("-")[0].lower()  # e.g. h100
    path = args.data or DATA / f"duck_shell_{args.resolution}.npz"
    coords, res = load_data(path, dev)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "benchmark": "sparse_conv", "card": card, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": args.commit or git_commit(),
        "data": path.name, "resolution": res, "voxels": int(len(coords)), "kernel": 3,
        "timing": "median ms, triton.testing.do_bench (warmup 25 ms, rep 200 ms)", "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"sparse_conv-{slug}.json"
    print(f"{card}, torch {torch.__version__}, triton {triton_version}; {len(coords)} voxels at {res}^3")

    result["check"] = check_crop(coords, dev)
    print("check vs dense conv3d on a crop (fp32):", json.dumps(result["check"]))

    x0 = SparseTensor(torch.zeros(len(coords), 1, device=dev), coords, 1, res)
    sync(dev)
    t = time.perf_counter()
    nmap, _ = neighbor_map(x0, 3)
    sync(dev)
    result["map_build_ms"] = (time.perf_counter() - t) * 1e3
    pairs = nmap.num_pairs
    result["pairs"] = pairs
    print(f"neighbour map: {pairs} pairs ({pairs / len(coords):.2f} per voxel), "
          f"built in {result['map_build_ms']:.1f} ms")
    t = time.perf_counter()
    x_sorted = SparseTensor(torch.zeros(len(coords), 1, device=dev), coords, 1, res)  # construction incl. dup check
    sync(dev)
    result["tensor_build_ms"] = (time.perf_counter() - t) * 1e3
    del x_sorted

    free_bytes = torch.cuda.mem_get_info()[0] if dev.type == "cuda" else 2**30
    rows = {}
    for c in args.channels:  # sparse first: the numbers this benchmark exists for
        for dname in args.dtypes:
            dt = getattr(torch, dname)
            row = {"channels": c, "dtype": dname}
            conv = SparseConv3d(c, c, 3).to(dev, dt)
            x = x0.replace(torch.randn(len(coords), c, device=dev, dtype=dt))
            fwd_flop = 2.0 * pairs * c * c
            with torch.no_grad():
                row["sparse_fwd_ms"] = bench_ms(lambda: conv(x))
            feats = x.feats.clone().requires_grad_(True)
            xg = x.replace(feats)
            g = torch.randn(len(coords), c, device=dev, dtype=dt)

            def fb():
                conv(xg).feats.backward(g)
                feats.grad = conv.kernel.grad = conv.bias.grad = None

            row["sparse_fwd_bwd_ms"] = bench_ms(fb)
            row["sparse_fwd_tflops"] = fwd_flop / row["sparse_fwd_ms"] / 1e9
            row["sparse_fwd_bwd_tflops"] = 3 * fwd_flop / row["sparse_fwd_bwd_ms"] / 1e9
            del feats, xg, x, conv, g
            rows[(c, dname)] = row
            result["rows"].append(row)
            write_json(result, out_json)
            print(f"C={c:4d} {dname:9s} sparse fwd {row['sparse_fwd_ms']:7.2f} ms "
                  f"({row['sparse_fwd_tflops']:5.1f} TF/s)"
                  f"  fwd+bwd {row['sparse_fwd_bwd_ms']:7.2f} ms ({row['sparse_fwd_bwd_tflops']:5.1f} TF/s)")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        free_bytes = torch.cuda.mem_get_info()[0]
    # cuDNN's exhaustive search spent minutes on the 560^3 backward (first H100 run): use its heuristics
    torch.backends.cudnn.benchmark = False
    t_dense = time.perf_counter()
    for (c, dname), row in rows.items():  # dense conv3d on the full grid: x, y (+ grad y, grad x) in dt
        dt = getattr(torch, dname)
        elem = res**3 * c * torch.finfo(dt).bits // 8
        dense_flop = 2.0 * res**3 * 27 * c * c
        row["dense_grid"] = res
        for name, ntens in (("fwd", 2), ("fwd_bwd", 4)):
            key = f"dense_{name}_ms"
            row[key] = None
            if args.no_dense:
                continue
            if ntens * elem > 0.7 * free_bytes:
                row[f"dense_{name}_note"] = f"does not fit ({ntens} x {elem / 2**30:.1f} GiB)"
                continue
            if time.perf_counter() - t_dense > args.dense_budget_s:
                row[f"dense_{name}_note"] = "skipped: dense time budget spent"
                continue
            dense = w = gd = None
            try:
                dense = torch.randn(1, c, res, res, res, device=dev, dtype=dt)
                w = torch.randn(c, c, 3, 3, 3, device=dev, dtype=dt)
                if name == "fwd":
                    with torch.no_grad():
                        row[key] = bench_ms(lambda: F.conv3d(dense, w, padding=1))
                else:
                    dense.requires_grad_(True)
                    w.requires_grad_(True)
                    gd = torch.randn(1, c, res, res, res, device=dev, dtype=dt)

                    def dfb():
                        F.conv3d(dense, w, padding=1).backward(gd)
                        dense.grad = w.grad = None

                    row[key] = bench_ms(dfb)
                row[f"dense_{name}_tflops"] = (dense_flop if name == "fwd" else 3 * dense_flop) / row[key] / 1e9
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # e.g. > 2^31 elements for cuDNN
                row[key] = None
                row[f"dense_{name}_note"] = str(exc).splitlines()[0][:200]
            finally:
                dense = w = gd = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            write_json(result, out_json)
    print(f"\n{'C':>4} {'dtype':9} {'sparse fwd ms':>13} {'TF/s':>6} {'fwd+bwd ms':>11} {'TF/s':>6} | "
          f"{'dense fwd ms':>12} {'fwd+bwd ms':>11}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for (c, dname), row in rows.items():
        print(f"{c:4d} {dname:9} {row['sparse_fwd_ms']:13.2f} {row['sparse_fwd_tflops']:6.1f} "
              f"{row['sparse_fwd_bwd_ms']:11.2f} {row['sparse_fwd_bwd_tflops']:6.1f} | "
              f"{fmt(row.get('dense_fwd_ms')):>12} {fmt(row.get('dense_fwd_bwd_ms')):>11}")
    if dev.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write_json(result, out_json)
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
