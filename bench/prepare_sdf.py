"""Benchmark: mesh -> sparse SDF (paper Eq. 1) seconds per mesh, sparse narrow band vs a dense-grid baseline, and the
sign errors of the sign methods on the non-watertight Stanford bunny.

Here (CPU):   python bench/prepare_sdf.py --backends cpu --resolutions 512 1024 --dense 128 --sign-errors
              python bench/prepare_sdf.py --export-meshes .sdf_carry/meshes     (npz copies for a machine without the
                                                                                 pymeshfix / pybullet packages)
GPU machine (device tool; carry .sdf_carry, which holds the warp 1.2.2 / libigl / trimesh wheels and the npz meshes):
              pip install --target /tmp/site .sdf_carry/*.whl && PYTHONPATH=/tmp/site:src \
              python3 bench/prepare_sdf.py --meshes .sdf_carry/meshes --names bunny duck --backends warp cpu \
                  --cpu-names bunny --device cuda --resolutions 512 1024 --repeats 2 --signs-timed auto winding \
                  --dense 256 512 --save-dir /tmp/s --out $OUT/prepare_sdf_h100.json

``--signs-timed``: sign methods to time (``auto`` = checked pseudo-normal, ``winding``, ...); ``--winding-max-res``
bounds the resolutions timed with ``winding`` on warp (its winding-number query is the slow part there).
Writes one JSON (machine, versions, git commit, per-case seconds and per-stage seconds) under bench/results/ (or
--out), rewritten after every section so a run cut short still leaves its numbers.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from d3s2.data.backends import make_queries, resolve_backend  # noqa: E402
from d3s2.data.mesh_io import normalize_mesh, validate_mesh  # noqa: E402
from d3s2.data.sdf import mesh_to_sparse_sdf, signed_distance  # noqa: E402
from d3s2.data.sparse_sdf import save_sparse_sdf  # noqa: E402

PYBULLET_MESHES = ["duck.obj", "teddy2_VHACD_CHs.obj", "soccerball.obj"]


def package_meshes() -> dict:
    """name -> (vertices, faces) from the installed pymeshfix / pybullet_data packages (never copied into the repo)."""
    import trimesh

    out = {}
    import pymeshfix

    bunny = trimesh.load(os.path.join(os.path.dirname(pymeshfix.__file__), "examples", "StanfordBunny.ply"))
    out["bunny"] = (np.asarray(bunny.vertices), np.asarray(bunny.faces))
    fix = pymeshfix.MeshFix(np.asarray(bunny.vertices, np.float64), np.asarray(bunny.faces, np.int32))
    fix.repair()
    out["bunny_repaired"] = (np.asarray(fix.points), np.asarray(fix.faces))
    import pybullet_data

    root = pybullet_data.getDataPath()
    for name in PYBULLET_MESHES:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        from d3s2.data.mesh_io import load_mesh

        m = load_mesh(path)
        out[os.path.splitext(name)[0]] = (np.asarray(m.vertices), np.asarray(m.faces))
    return out


def npz_meshes(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".npz"):
            z = np.load(os.path.join(folder, f))
            out[f[:-4]] = (z["vertices"], z["faces"])
    return out


def to_trimesh(vf):
    import trimesh

    return validate_mesh(trimesh.Trimesh(vf[0], vf[1], process=False))


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def machine_info(device: str | None) -> dict:
    info = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "commit": git_commit(),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except Exception:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except Exception:
        pass
    for mod in ("warp", "igl", "trimesh", "scipy", "skimage"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["card"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def time_sparse(meshes, names, resolutions, backend, device, repeats, save_dir=None, sign="auto"):
    rows = []
    for name in names:
        mesh, transform = normalize_mesh(to_trimesh(meshes[name]))
        for r in resolutions:
            times, stats = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                out, stats = mesh_to_sparse_sdf(
                    mesh, r, sign=sign, backend=backend, device=device, transform=transform, return_stats=True
                )
                times.append(time.perf_counter() - t0)
            row = {
                "mesh": name,
                "faces": int(len(mesh.faces)),
                "resolution": r,
                "backend": backend,
                "device": device,
                "sign": sign,
                "sign_method": stats.get("sign_method"),
                "check_disagree": stats.get("check_disagree"),
                "seconds": float(np.median(times)),
                "all_seconds": times,
                "voxels": int(len(out)),
                "sharp_voxels": int(out.sharp.sum()),
                "distance_queries": stats["distance_queries"],
                "sign_queries": stats["sign_queries"],
                **{k: stats[k] for k in stats if k.endswith("_seconds")},
            }
            if save_dir:
                t0 = time.perf_counter()
                path = save_sparse_sdf(os.path.join(save_dir, f"{name}.sdf{r}.npz"), out)
                row["save_seconds_compressed"] = time.perf_counter() - t0
                row["file_mb"] = os.path.getsize(path) / 2**20
                os.unlink(path)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def time_dense(meshes, name, resolutions, backend, device, tau=1 / 128, sign="winding"):
    """Baseline: every voxel centre of the dense R^3 grid (distance + sign), then |s| < tau. ``sign="pseudonormal"``
    with warp: closest face + pseudo-normal on the device (winding number for the ambiguous points)."""
    rows = []
    mesh, _ = normalize_mesh(to_trimesh(meshes[name]))
    for r in resolutions:
        t0 = time.perf_counter()
        q = make_queries(mesh.vertices, mesh.faces, backend, device)
        g = (np.arange(r, dtype=np.float32) + 0.5) * (2.0 / r) - 1.0
        n_band = 0
        step = max(1, (1 << 24 if device and str(device).startswith("cuda") else 1 << 21) // (r * r))
        if sign == "pseudonormal" and hasattr(q, "closest_torch"):
            import torch

            from d3s2.data.backends import winding_fallback
            from d3s2.data.pseudo_normal import pseudo_normal_sign

            dev = q.torch_device
            gt = torch.from_numpy(g.astype(np.float64)).to(dev)
            tables = q.pseudo_normal_tables()
            for i in range(0, r, step):
                p = torch.stack(torch.meshgrid(gt[i : i + step], gt, gt, indexing="ij"), -1).reshape(-1, 3)
                d, face = q.closest_torch(p)
                sg, d = pseudo_normal_sign(tables, p, face)
                amb = torch.nonzero(sg == 0).squeeze(1)
                if len(amb):
                    ins = winding_fallback(q)(p[amb].cpu().numpy())
                    sg[amb] = torch.from_numpy(np.where(ins, -1, 1).astype(np.int8)).to(dev)
                n_band += int(((d * sg).abs() < tau).sum())
            if dev.type == "cuda":
                torch.cuda.synchronize()
        else:
            for i in range(0, r, step):  # x-slabs bound host memory
                p = np.stack(np.meshgrid(g[i : i + step], g, g, indexing="ij"), -1).reshape(-1, 3)
                d = q.unsigned_distance(p)
                ins = q.inside(p)
                s = np.where(ins, -d, d)
                n_band += int((np.abs(s) < tau).sum())
        row = {
            "mesh": name,
            "resolution": r,
            "backend": backend,
            "device": device,
            "sign": sign,
            "dense": True,
            "seconds": time.perf_counter() - t0,
            "points": r**3,
            "band_voxels": n_band,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sign_errors(
    meshes, resolution=256, shell_resolution=256, n_random=200_000, signs=("winding", "pseudonormal", "shell")
):
    """Sign errors of the ``signs`` methods on the holed bunny. Reference: the bunny repaired by MeshFix (watertight),
    inside = its winding number > 1/2. Band: sparse SDF at ``resolution`` with tau = 4 voxels; counted at voxels at
    least
    1.5 voxels from the original surface (beyond the shell's eps = 1 shell voxel offset, which is not a sign error).
    Random: 200k uniform points in [-1, 1]^3 at least 1.5 voxels from the surface."""
    bunny = to_trimesh(meshes["bunny"])
    mesh, t = normalize_mesh(bunny)
    rep_v, rep_f = meshes["bunny_repaired"]
    ref = make_queries(t.apply(rep_v), rep_f, "cpu")
    orig = make_queries(mesh.vertices, mesh.faces, "cpu")
    h = 2.0 / resolution
    rng = np.random.default_rng(0)
    rand = rng.uniform(-1, 1, (n_random, 3))
    rand_far = rand[orig.unsigned_distance(rand) >= 1.5 * h]
    ref_rand = ref.inside(rand_far)
    result = {
        "resolution": resolution,
        "tau_voxels": 4,
        "min_distance_voxels": 1.5,
        "shell_resolution": shell_resolution,
        "reference": "pymeshfix-repaired bunny (watertight), winding number > 1/2",
    }
    for sign in signs:
        t0 = time.perf_counter()
        out, st = mesh_to_sparse_sdf(
            mesh,
            resolution,
            tau=4 * h,
            sign=sign,
            backend="cpu",
            transform=t,
            shell_resolution=shell_resolution,
            sharp_angle=None,
            return_stats=True,
        )
        el = time.perf_counter() - t0
        c = out.centers()
        far = orig.unsigned_distance(c) >= 1.5 * h
        err = (out.sdf[far] < 0) != ref.inside(c[far])
        s_rand = signed_distance(rand_far, mesh, sign=sign, backend="cpu", shell_resolution=shell_resolution)
        err_rand = (s_rand < 0) != ref_rand
        result[sign] = {
            "band_voxels": int(len(out)),
            "band_voxels_checked": int(far.sum()),
            "band_sign_errors": int(err.sum()),
            "random_points_checked": int(len(rand_far)),
            "random_sign_errors": int(err_rand.sum()),
            "winding_queries": int(st["sign_queries"]),
            "seconds": el,
        }
        print(sign, json.dumps(result[sign]), flush=True)
    return result


def diagnose(meshes, device, n=500_000, tau=1 / 128):
    """Where warp time goes: upload+kernel+download of n near-surface points, per transfer path and query."""
    from d3s2.data.backends import WarpQueries

    mesh, _ = normalize_mesh(to_trimesh(meshes["bunny"]))
    rng = np.random.default_rng(0)
    import trimesh

    pts = trimesh.sample.sample_surface(mesh, n, seed=0)[0] + rng.uniform(-tau, tau, (n, 3))
    rows = []
    for transfer in ("torch", "warp"):
        try:
            t0 = time.perf_counter()
            q = WarpQueries(mesh.vertices, mesh.faces, device=device, transfer=transfer)
            row = {"transfer": transfer, "points": n, "mesh_build_s": time.perf_counter() - t0}
            q.unsigned_distance(pts[:1000], 2 * tau)
            q.inside(pts[:1000], 2 * tau)
            for name, fn in (
                ("udf_bounded_s", lambda: q.unsigned_distance(pts, 2 * tau)),
                ("inside_bounded_s", lambda: q.inside(pts, 2 * tau)),
                ("inside_unbounded_s", lambda: q.inside(pts)),
            ):
                t0 = time.perf_counter()
                fn()
                row[name] = time.perf_counter() - t0
        except Exception as exc:  # report and go on: this is a diagnosis
            row = {"transfer": transfer, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meshes", help="folder of <name>.npz (vertices, faces); default: installed packages")
    ap.add_argument("--export-meshes", help="write the package meshes as npz into this folder and exit")
    ap.add_argument("--names", nargs="*", default=None, help="meshes to time (default: all but bunny_repaired)")
    ap.add_argument("--backends", nargs="*", default=["cpu"], choices=["cpu", "warp"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--resolutions", nargs="*", type=int, default=[512, 1024])
    ap.add_argument("--dense", nargs="*", type=int, default=[], help="dense-grid baseline resolutions (bunny)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--signs-timed", nargs="*", default=["auto"], help="sign methods timed by the sparse runs")
    ap.add_argument("--winding-max-res", type=int, default=512, help="warp + winding: only resolutions up to this")
    ap.add_argument("--cpu-resolutions", nargs="*", type=int, default=None, help="resolutions for backend cpu")
    ap.add_argument("--cpu-names", nargs="*", default=None, help="meshes for backend cpu (default: --names)")
    ap.add_argument("--sign-errors", action="store_true")
    ap.add_argument("--signs", nargs="*", default=["winding", "pseudonormal", "shell"], help="for --sign-errors")
    ap.add_argument("--diagnose", action="store_true", help="time warp transfers and kernels separately first")
    ap.add_argument("--save-dir", default=None, help="also time the compressed npz write here")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpus", type=int, default=None, help="pin this process to the first N cores (e.g. 2)")
    args = ap.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cpus]))

    if args.export_meshes:
        os.makedirs(args.export_meshes, exist_ok=True)
        for name, (v, f) in package_meshes().items():
            np.savez(
                os.path.join(args.export_meshes, name + ".npz"),
                vertices=np.asarray(v, np.float32),
                faces=np.asarray(f, np.int32),
            )
            print("exported", name, len(f), "faces")
        return
    meshes = npz_meshes(args.meshes) if args.meshes else package_meshes()
    names = args.names or [n for n in meshes if n != "bunny_repaired"]
    result = {
        "bench": "prepare_sdf",
        "args": vars(args),
        "machine": machine_info(args.device),
        "sparse": [],
        "dense": [],
    }
    if args.diagnose:
        result["diagnose"] = diagnose(meshes, args.device or "cuda")
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"prepare_sdf_{'_'.join(args.backends)}_{int(time.time())}.json",
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def dump():
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, out)

    for backend in args.backends:
        b, dev = resolve_backend(backend, args.device)
        if b == "warp":  # compile / load the kernels outside the timings
            for sg in ("pseudonormal", "winding"):
                mesh_to_sparse_sdf(to_trimesh(meshes[names[0]]), 64, sign=sg, backend=b, device=dev)
        res = args.resolutions if b == "warp" or args.cpu_resolutions is None else args.cpu_resolutions
        nm = names if b == "warp" or args.cpu_names is None else args.cpu_names
        for sg in args.signs_timed:
            rr = [r for r in res if r <= args.winding_max_res] if (b == "warp" and sg == "winding") else res
            result["sparse"] += time_sparse(meshes, nm, rr, b, dev, args.repeats, args.save_dir, sign=sg)
            dump()
        if args.dense and b == "warp":
            result["dense"] += time_dense(meshes, "bunny", args.dense, b, dev, sign="pseudonormal")
            dump()
    if args.sign_errors:
        result["sign_errors"] = sign_errors(meshes, signs=args.signs)
    dump()
    print("wrote", out)


if __name__ == "__main__":
    main()
