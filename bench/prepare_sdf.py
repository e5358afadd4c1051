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

Issue 25 (signs inside interpenetrating parts), the part rule of ``auto`` beside the auto before it, with far sign
errors vs the winding number and marching-cubes boundary edges (here, small sizes):
              python bench/prepare_sdf.py --names bunny duck union teddy2_VHACD_CHs --backends cpu \
                  --resolutions 128 256 --tau-voxels 2 --auto-rules parts pseudonormal --errors-max-res 256 \
                  --out bench/results/prepare_sdf_parts_cpu_here.json
GPU machine (H200; build .whl here once with `python bench/make_sdf_carry.py`, then carry .whl; two calls, each
well under 10 min):
              python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                  .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/prepare_sdf.py \
                  --meshes .whl/meshes --names bunny duck union teddy2_VHACD_CHs --backends warp --device cuda \
                  --resolutions 512 1024 --repeats 2 --auto-rules parts pseudonormal --errors-max-res 512 \
                  --out $OUT/prepare_sdf_parts_h200_warp.json
              (the same with --backends cpu --repeats 1 --errors-max-res 0 --out $OUT/prepare_sdf_parts_h200_cpu.json)

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

from d3s2.data.mesh_io import normalize_mesh, validate_mesh  # noqa: E402
from d3s2.data.sdf import mesh_to_sparse_sdf, signed_distance  # noqa: E402
from d3s2.data.sparse_sdf import DEFAULT_TAU, save_sparse_sdf  # noqa: E402
from d3s2.geometry.queries import make_queries, resolve_backend  # noqa: E402

PYBULLET_MESHES = ["duck.obj", "teddy2_VHACD_CHs.obj", "soccerball.obj"]


def union_mesh():
    """An interpenetrating union made here (issue 25): box, sphere and two cylinders poking into each other,
    concatenated without a boolean union (about 12k faces)."""
    import trimesh

    box = trimesh.creation.box(extents=(0.9, 0.5, 0.5))
    ball = trimesh.creation.icosphere(4, radius=0.35)
    ball.apply_translation((0.45, 0.2, 0.1))
    cyl = trimesh.creation.cylinder(radius=0.15, height=1.2, sections=64)
    cyl.apply_transform(trimesh.transformations.rotation_matrix(0.6, (1, 0, 0)))
    cyl.apply_translation((-0.25, 0.1, 0.0))
    cyl2 = trimesh.creation.cylinder(radius=0.08, height=1.4, sections=48)
    cyl2.apply_transform(trimesh.transformations.rotation_matrix(1.2, (0, 1, 0)))
    cyl2.apply_translation((0.1, -0.1, 0.15))
    m = trimesh.util.concatenate([box, ball, cyl, cyl2])
    return np.asarray(m.vertices), np.asarray(m.faces)


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
    out["union"] = union_mesh()
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


def far_sign_errors(mesh, sdf, resolution) -> dict:
    """Band voxels farther than 1.5 voxels from the surface whose sign a clear winding number (libigl,
    ``|w - 1/2| > 1/4``) contradicts (the measure of issue 25), and how many of those have w about 1."""
    q = make_queries(mesh.vertices, mesh.faces, "cpu")
    c = sdf.centers()
    w = q.winding_number(c)
    far = q.unsigned_distance(c) > 1.5 * 2.0 / resolution
    bad = far & (np.abs(w - 0.5) > 0.25) & ((sdf.sdf < 0) != (w > 0.5))
    return {"far_clear_sign_errors": int(bad.sum()), "far_clear_sign_errors_w1": int((bad & (w > 0.5)).sum())}


def boundary_edges(sdf) -> int:
    """Edges used by one face only of the marching-cubes surface of the band (0: closed)."""
    from d3s2.geometry.marching_cubes import sparse_marching_cubes

    _, f = sparse_marching_cubes(sdf.coords, sdf.sdf, sdf.resolution)
    f = f.cpu().numpy()
    if len(f) == 0:
        return 0
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, count = np.unique(e, axis=0, return_counts=True)
    return int((count == 1).sum())


def time_sparse(
    meshes, names, resolutions, backend, device, repeats, save_dir=None, sign="auto", auto_rule="parts",
    errors_max_res=0, tau_voxels=None,
):
    """``tau_voxels``: band half-width in voxels of each resolution (default: tau = 1/128, 2 voxels at 512)."""
    rows = []
    for name in names:
        mesh, transform = normalize_mesh(to_trimesh(meshes[name]))
        for r in resolutions:
            times, stats = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                out, stats = mesh_to_sparse_sdf(
                    mesh,
                    r,
                    tau=DEFAULT_TAU if tau_voxels is None else tau_voxels * 2.0 / r,
                    sign=sign,
                    backend=backend,
                    device=device,
                    transform=transform,
                    auto_rule=auto_rule,
                    return_stats=True,
                )
                times.append(time.perf_counter() - t0)
            row = {
                "mesh": name,
                "faces": int(len(mesh.faces)),
                "resolution": r,
                "tau_voxels": float(out.tau * r / 2.0),
                "backend": backend,
                "device": device,
                "sign": sign,
                "auto_rule": auto_rule if sign == "auto" else None,
                "sign_method": stats.get("sign_method"),
                "check_disagree": stats.get("check_disagree"),
                "winding_voxels": stats.get("winding_voxels"),
                "suspect_voxels": stats.get("suspect_voxels"),
                "seconds": float(np.median(times)),
                "all_seconds": times,
                "voxels": int(len(out)),
                "sharp_voxels": int(out.sharp.sum()),
                "distance_queries": stats["distance_queries"],
                "sign_queries": stats["sign_queries"],
                **{k: stats[k] for k in stats if k.endswith("_seconds")},
                **{k: stats[k] for k in ("repair_voxels", "repair_flips", "repair_rounds") if k in stats},
            }
            if save_dir:
                t0 = time.perf_counter()
                path = save_sparse_sdf(os.path.join(save_dir, f"{name}.sdf{r}.npz"), out)
                row["save_seconds_compressed"] = time.perf_counter() - t0
                row["file_mb"] = os.path.getsize(path) / 2**20
                os.unlink(path)
            if r <= errors_max_res:
                t0 = time.perf_counter()
                row.update(far_sign_errors(mesh, out, r))
                row["mc_boundary_edges"] = boundary_edges(out)
                row["error_count_seconds"] = time.perf_counter() - t0
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

            from d3s2.geometry.pseudo_normal import pseudo_normal_sign
            from d3s2.geometry.queries import winding_fallback

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
    from d3s2.geometry.queries import WarpQueries

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


def rule_ratios(rows) -> list:
    """sign auto, the part rule vs the rule before issue 25, per mesh / resolution / back end: seconds and ratio."""
    key = lambda r: (r["mesh"], r["resolution"], r["backend"])  # noqa: E731
    by = {}
    for r in rows:
        if r.get("sign") == "auto":
            by.setdefault(key(r), {})[r["auto_rule"]] = r
    out = []
    for (mesh, res, backend), d in sorted(by.items()):
        if "parts" in d and "pseudonormal" in d:
            new, old = d["parts"], d["pseudonormal"]
            out.append(
                {
                    "mesh": mesh,
                    "resolution": res,
                    "backend": backend,
                    "seconds_parts": new["seconds"],
                    "seconds_before": old["seconds"],
                    "ratio": new["seconds"] / max(old["seconds"], 1e-9),
                    "sign_method_parts": new["sign_method"],
                    "sign_method_before": old["sign_method"],
                    "winding_voxels_parts": new["winding_voxels"],
                    "winding_voxels_before": old["winding_voxels"],
                    "voxels": new["voxels"],
                    **{f"{k}_parts": new[k] for k in ("far_clear_sign_errors", "mc_boundary_edges") if k in new},
                    **{f"{k}_before": old[k] for k in ("far_clear_sign_errors", "mc_boundary_edges") if k in old},
                }
            )
    return out


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
    ap.add_argument(
        "--auto-rules",
        nargs="*",
        default=["parts"],
        choices=["parts", "pseudonormal"],
        help="rules timed with sign auto: parts (issue 25) and/or pseudonormal (the auto before it)",
    )
    ap.add_argument(
        "--tau-voxels", type=float, default=None, help="band half-width in voxels (default: tau = 1/128 at every R)"
    )
    ap.add_argument(
        "--errors-max-res",
        type=int,
        default=0,
        help="count far sign errors vs the winding number and marching-cubes boundary edges up to this resolution",
    )
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
            for rule in args.auto_rules if sg == "auto" else ["parts"]:
                result["sparse"] += time_sparse(
                    meshes, nm, rr, b, dev, args.repeats, args.save_dir, sign=sg, auto_rule=rule,
                    errors_max_res=args.errors_max_res, tau_voxels=args.tau_voxels,
                )
                dump()
        if args.dense and b == "warp":
            result["dense"] += time_dense(meshes, "bunny", args.dense, b, dev, sign="pseudonormal")
            dump()
    if args.sign_errors:
        result["sign_errors"] = sign_errors(meshes, signs=args.signs)
    result["parts_vs_before"] = rule_ratios(result["sparse"])
    dump()
    print("wrote", out)


if __name__ == "__main__":
    main()
