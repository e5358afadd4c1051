"""`d3s2 prepare`: build the training corpus from a folder of meshes (paper Sec. 3, 3.3, 5.1).

Per mesh: normalise into [-1, 1]^3 (d3s2.data.mesh_io), sparse SDF with sharp voxels at each requested resolution
(d3s2.data.sdf, Eq. 1-2), and ``views`` RGBA renders from random cameras (d3s2.data.render, Sec. 5.1). Output:

    OUT_DIR/<item_id>/sdf_<R>.npz          sparse SDF at resolution R (d3s2.data.sparse_sdf format)
    OUT_DIR/<item_id>/renders/NNN.png      RGBA renders (alpha = object mask)
    OUT_DIR/<item_id>/cameras.json         per view: file, intrinsics, c2w, elevation, azimuth, focal length...
    OUT_DIR/<item_id>/done                 the item's manifest record, written last
    OUT_DIR/manifest[.shard-I-of-N].jsonl, OUT_DIR/failures[.shard-I-of-N].jsonl   (see d3s2.data.manifest)

Runs are resumable (finished items are skipped; files of an unfinished item that are complete are reused), every file is
written atomically, a bad mesh is logged with its reason and the run goes on. ``--shard I/N`` takes the items whose
relative path hashes to I modulo N, so N independent jobs split any corpus without coordination (stable when files are
added); ``d3s2 prepare-merge`` joins their results.

Hardening (issue 22): the global settings are checked before the first mesh (:mod:`d3s2.data.prepare_checks`);
temporary files a killed run left in an item's folder are removed when the item is taken up again; a failed item's
folder is removed when it holds no file, and otherwise kept because its complete files (an SDF, the renders) are reused
by the rerun; a run in which every selected item failed exits with status 1.
"""

from __future__ import annotations

import concurrent.futures as cf
import fnmatch
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d3s2.data import manifest as mf
from d3s2.errors import D3S2Error
from d3s2.fileio import remove_empty_dirs, remove_stale_temp_files

MESH_EXTENSIONS = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")


@dataclass
class PrepareConfig:
    resolutions: tuple[int, ...] = (512, 1024)
    views: int = 45
    image_size: int = 518
    supersample: int = 2
    tau: float = 1.0 / 128.0
    sign: str = "auto"
    sdf_backend: str = "auto"
    device: str | None = None  # None: SDF and renders on CUDA when present, else CPU
    sharp_angle: float = 30.0
    seed: int = 0
    up: str = "y"
    elevation_deg: tuple[float, float] = (10.0, 40.0)
    azimuth_deg: tuple[float, float] = (0.0, 180.0)
    focal_mm: tuple[float, float] = (30.0, 100.0)

    def render_key(self) -> dict:
        """What determines the renders: a finished item with other settings is redone."""
        keys = ("views", "image_size", "supersample", "seed", "up", "elevation_deg", "azimuth_deg", "focal_mm")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}


# ----------------------------------------------------------------------------------------------------------------------
# Discovery and sharding


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


# ----------------------------------------------------------------------------------------------------------------------
# One item


class ItemError(Exception):
    """A failure of one item at a named stage (load, sdf, render, write)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:500] if not isinstance(exc, D3S2Error) else msg[:500]


def _resolve_devices(cfg: PrepareConfig) -> tuple[str, str | None]:
    """(render device, SDF device) from --device."""
    import torch

    if cfg.device is None:
        if torch.cuda.is_available():
            return "cuda", None  # the SDF back end picks warp on CUDA itself
        return "cpu", "cpu"  # no GPU: skip the SDF back end's CUDA probe (slow, and noisy on CPU-only machines)
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise D3S2Error(f"--device {cfg.device}: no CUDA device is visible; drop --device or use --device cpu")
    return str(cfg.device), str(cfg.device)


def _existing_sdf(path: Path, resolution: int, tau: float):
    from d3s2.data.sparse_sdf import load_sparse_sdf

    if not path.is_file():
        return None
    try:
        sdf = load_sparse_sdf(path)
    except D3S2Error:
        return None
    return sdf if sdf.resolution == resolution and abs(sdf.tau - tau) < 1e-12 and len(sdf) else None


def process_item(src: str | Path, rel: str, out_dir: str | Path, cfg: PrepareConfig) -> dict:
    """Prepare one mesh into ``out_dir/<item_id>/``; returns its manifest record or raises ItemError."""
    from d3s2.data.mesh_io import load_mesh, normalize_mesh
    from d3s2.data.sdf import mesh_to_sparse_sdf
    from d3s2.data.sparse_sdf import save_sparse_sdf

    t0 = time.perf_counter()
    item_id = item_id_for(rel)
    item_dir = Path(out_dir) / item_id
    render_device, sdf_device = _resolve_devices(cfg)
    try:
        mesh, transform = normalize_mesh(load_mesh(src))
    except Exception as exc:
        raise ItemError("load", _reason(exc)) from exc
    item_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(item_dir)  # a killed run's half-written files (this job owns the item now)
    record = {
        "item_id": item_id,
        "source": rel,
        "vertices": int(len(mesh.vertices)),
        "faces": int(len(mesh.faces)),
        "scale": float(transform.scale),
        "offset": [float(x) for x in transform.offset],
        "tau": cfg.tau,
        "sdf": {},
    }
    timings = {}
    for res in cfg.resolutions:
        path = item_dir / f"sdf_{res}.npz"
        t = time.perf_counter()
        sdf = _existing_sdf(path, res, cfg.tau)
        sign_info = {"reused": True}  # written by an interrupted run: its sign statistics are not known here
        if sdf is None:
            try:
                sdf, st = mesh_to_sparse_sdf(
                    mesh,
                    res,
                    tau=cfg.tau,
                    sign=cfg.sign,
                    backend=cfg.sdf_backend,
                    device=sdf_device,
                    sharp_angle=cfg.sharp_angle,
                    transform=transform,
                    return_stats=True,
                )
            except Exception as exc:
                raise ItemError("sdf", f"resolution {res}: {_reason(exc)}") from exc
            if len(sdf) == 0:
                raise ItemError("sdf", f"resolution {res}: no voxel within tau={cfg.tau:g} of the surface (empty band)")
            save_sparse_sdf(path, sdf)
            # how the signs were decided (issue 25): the method auto settled on, the voxels the winding number decided
            sign_info = {"sign_method": st.get("sign_method"), "winding_voxels": int(st.get("winding_voxels", 0))}
        record["sdf"][str(res)] = {
            "file": path.name,
            "voxels": int(len(sdf)),
            "sharp": int(sdf.sharp.sum()),
            **sign_info,
        }
        timings[f"sdf_{res}"] = round(time.perf_counter() - t, 3)

    record["views"] = int(cfg.views)
    if cfg.views > 0:
        t = time.perf_counter()
        try:
            _render_item(src, rel, item_dir, transform, cfg, render_device)
        except ItemError:
            raise
        except Exception as exc:
            raise ItemError("render", _reason(exc)) from exc
        record["renders"] = "renders"
        record["cameras"] = "cameras.json"
        timings["render"] = round(time.perf_counter() - t, 3)
    record["render_settings"] = cfg.render_key()
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["timings"] = timings
    mf.atomic_write_json(item_dir / mf.DONE_MARKER, record)
    return record


def _render_item(src, rel: str, item_dir: Path, transform, cfg: PrepareConfig, device: str) -> None:
    import torch

    from d3s2.data.render import Renderer, RenderSettings, load_render_mesh, write_views
    from d3s2.geometry.cameras import CameraSampling, sample_cameras

    cam_path = item_dir / "cameras.json"
    key = cfg.render_key()
    if cam_path.is_file():  # resume: renders of an interrupted run with the same settings are complete
        try:
            old = json.loads(cam_path.read_text())
            if old.get("settings") == key and all((item_dir / v["file"]).is_file() for v in old["views"]):
                return
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            pass  # a damaged cameras.json: render again
    mesh = load_render_mesh(src).transformed(transform.scale, transform.offset)
    sampling = CameraSampling(
        num_views=cfg.views,
        elevation_deg=cfg.elevation_deg,
        azimuth_deg=cfg.azimuth_deg,
        focal_mm=cfg.focal_mm,
        up=cfg.up,
    )
    cameras = sample_cameras(mesh.bounding_radius(), cfg.image_size, sampling, seed=item_seed(rel, cfg.seed))
    renderer = Renderer(mesh, RenderSettings(size=cfg.image_size, supersample=cfg.supersample), device=device)
    views = write_views(renderer, cameras, item_dir, threads=4 if torch.device(device).type == "cuda" else 0)
    mf.atomic_write_json(cam_path, {"settings": key, "views": views})


def _is_finished(out_dir: Path, rel: str, cfg: PrepareConfig) -> bool:
    rec = mf.read_done(out_dir / item_id_for(rel))
    if rec is None:
        return False
    have = set(rec.get("sdf", {}))
    same_render = cfg.views == 0 or rec.get("render_settings") == cfg.render_key()
    return {str(r) for r in cfg.resolutions} <= have and same_render and abs(rec.get("tau", -1) - cfg.tau) < 1e-12


# ----------------------------------------------------------------------------------------------------------------------
# Worker plumbing


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # N workers on N cores: no oversubscription


def _run_one(src: str, rel: str, out_dir: str, cfg: PrepareConfig) -> tuple[bool, dict]:
    ok, rec = _try_one(src, rel, out_dir, cfg)
    if not ok:
        remove_empty_dirs(Path(out_dir) / item_id_for(rel))  # folders with complete files stay: the rerun reuses them
    return ok, rec


def _try_one(src: str, rel: str, out_dir: str, cfg: PrepareConfig) -> tuple[bool, dict]:
    try:
        return True, process_item(src, rel, out_dir, cfg)
    except ItemError as exc:
        return False, {"item_id": item_id_for(rel), "source": rel, "stage": exc.stage, "reason": exc.reason}
    except Exception as exc:  # a bug or an unexpected library error: log it, the run goes on
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return False, {
            "item_id": item_id_for(rel),
            "source": rel,
            "stage": "unexpected",
            "reason": _reason(exc),
            "where": tb,
        }


@dataclass
class PrepareSummary:
    found: int = 0
    selected: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    manifest: str = ""
    failures: str = ""
    failed_items: list = field(default_factory=list)

    def line(self) -> str:
        return (
            f"prepare: {self.done} done, {self.skipped} skipped, {self.failed} failed of {self.selected} meshes "
            f"in {self.seconds:.1f} s (manifest: {self.manifest}; failures: {self.failures})"
        )


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_probe.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise D3S2Error(
            f"output folder {out_dir} is not writable ({exc.strerror or exc}); choose another OUT_DIR"
        ) from exc


def run_prepare(
    mesh_dir: str | Path,
    out_dir: str | Path,
    cfg: PrepareConfig | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    pattern: str | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Prepare every (selected) mesh under ``mesh_dir`` into ``out_dir``. Raises D3S2Error only for unusable input."""
    t0 = time.perf_counter()
    cfg = PrepareConfig() if cfg is None else cfg
    mesh_dir, out_dir = Path(mesh_dir), Path(out_dir)
    if not mesh_dir.is_dir():
        raise D3S2Error(f"mesh folder {mesh_dir} does not exist or is not a folder")
    if not cfg.resolutions and cfg.views <= 0:
        raise D3S2Error("nothing to do: give --resolutions and/or --views > 0")
    from d3s2.data.prepare_checks import check_prepare_config

    check_prepare_config(cfg)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise D3S2Error(f"--workers must be an integer >= 1, got {workers!r}")
    if any(r < 2 or r > 32767 for r in cfg.resolutions):
        raise D3S2Error(f"--resolutions must be in [2, 32767], got {list(cfg.resolutions)}")
    files = discover_meshes(mesh_dir, pattern, exclude=out_dir)
    if not files:
        what = f"matching {pattern!r}" if pattern else f"with extension {', '.join(MESH_EXTENSIONS)}"
        raise D3S2Error(f"no mesh files {what} found under {mesh_dir}")
    _check_out_dir(out_dir)
    _resolve_devices(cfg)  # fail early on --device cuda without a GPU
    selected = [f for f in files if shard is None or shard_of(f, shard[1]) == shard[0]]
    summary = PrepareSummary(found=len(files), selected=len(selected))
    man_path, fail_path = mf.manifest_path(out_dir, shard), mf.failures_path(out_dir, shard)
    summary.manifest, summary.failures = str(man_path), str(fail_path)
    todo = [f for f in selected if not _is_finished(out_dir, f, cfg)]
    summary.skipped = len(selected) - len(todo)

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="prepare", unit="mesh", disable=not progress, file=sys.stderr)

    def record(ok: bool, rec: dict) -> None:
        if ok:
            summary.done += 1
            mf.append_jsonl(man_path, rec)
        else:
            summary.failed += 1
            summary.failed_items.append(rec)
            mf.append_jsonl(fail_path, rec)
        bar.update(1)
        bar.set_postfix(done=summary.done, failed=summary.failed, refresh=False)

    jobs = [(str(mesh_dir / rel), rel, str(out_dir), cfg) for rel in todo]
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                record(*_run_one(*job))
        else:
            _run_pool(jobs, workers, record)
    finally:
        bar.close()
    if shard is None or shard[1] == 1:
        mf.merge_manifests([out_dir])  # one consistent manifest.jsonl / failures.jsonl for the whole folder
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_pool(jobs: list, workers: int, record) -> None:
    """Process pool (spawn: safe with CUDA and threads) with a bounded number of items in flight.

    A worker that dies (crash in a native library, out of memory) breaks the pool: the items in flight are logged as
    failed with that reason (a rerun retries them) and a fresh pool takes the rest.
    """
    ctx = mp.get_context("spawn")
    pending = list(reversed(jobs))
    while pending:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
        inflight: dict[cf.Future, tuple] = {}
        broken = False
        try:
            while pending or inflight:
                while pending and len(inflight) < 2 * workers:
                    job = pending.pop()
                    inflight[pool.submit(_run_one, *job)] = job
                finished, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    job = inflight.pop(fut)
                    try:
                        record(*fut.result())
                    except cf.process.BrokenProcessPool:
                        broken = True
                        record(False, _crash_record(job))
                if broken:
                    for job in inflight.values():
                        record(False, _crash_record(job))
                    inflight.clear()
                    break
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)


def _crash_record(job: tuple) -> dict:
    rel = job[1]
    return {
        "item_id": item_id_for(rel),
        "source": rel,
        "stage": "worker",
        "reason": "worker process died (native crash or out of memory) while this or a concurrent item ran; "
        "rerun to retry",
    }


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def _cmd_prepare(args) -> int:
    cfg = PrepareConfig(
        resolutions=tuple(args.resolutions),
        views=args.views,
        image_size=args.image_size,
        supersample=args.supersample,
        tau=args.tau,
        sign=args.sign,
        sdf_backend=args.sdf_backend,
        device=args.device,
        sharp_angle=args.sharp_angle,
        seed=args.seed,
        up=args.up,
    )
    summary = run_prepare(
        args.mesh_dir,
        args.out_dir,
        cfg,
        workers=args.workers,
        shard=parse_shard(args.shard),
        pattern=args.glob,
        progress=not args.no_progress,
    )
    for rec in summary.failed_items[:20]:
        print(f"  failed: {rec['source']} [{rec['stage']}] {rec['reason']}", file=sys.stderr)
    if len(summary.failed_items) > 20:
        print(f"  ... {len(summary.failed_items) - 20} more in {summary.failures}", file=sys.stderr)
    print(summary.line())
    if summary.failed and not summary.done and not summary.skipped:
        print(f"prepare: every item failed (see {summary.failures})", file=sys.stderr)
        return 1
    return 0


def _cmd_merge(args) -> int:
    dirs = [Path(d) for d in args.out_dirs]
    for d in dirs:
        if not d.is_dir():
            raise D3S2Error(f"{d} is not a folder written by d3s2 prepare")
    counts = mf.merge_manifests(dirs, args.output)
    print(
        f"prepare-merge: {counts['items']} items, {counts['failed']} failed, {counts['duplicates']} duplicates "
        f"-> {counts['manifest']}"
    )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="meshes -> sparse SDFs (+ sharp voxels) and RGBA renders for training (resumable, shardable)",
        description=(
            "Prepare a folder of meshes for training: for each mesh (found recursively: obj, glb, gltf, ply, stl, off) "
            "write OUT_DIR/<item_id>/sdf_<R>.npz for each resolution, renders/NNN.png and cameras.json. Finished items "
            "are skipped on rerun; bad meshes are logged to failures.jsonl and the run goes on."
        ),
    )
    p.add_argument("mesh_dir", help="folder searched recursively for mesh files")
    p.add_argument("out_dir", help="output folder (created)")
    p.add_argument(
        "--resolutions", type=int, nargs="*", default=[512, 1024], help="sparse SDF resolutions (default 512 1024)"
    )
    p.add_argument("--views", type=int, default=45, help="renders per mesh (default 45; 0 = none)")
    p.add_argument("--image-size", type=int, default=518, help="render size in pixels (default 518)")
    p.add_argument("--supersample", type=int, default=2, help="antialiasing sub-samples per pixel side (default 2)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--device", default=None, help="cuda or cpu for SDF and renders (default: cuda when present)")
    p.add_argument("--shard", default=None, metavar="I/N", help="process only shard I of N (hash of the relative path)")
    p.add_argument(
        "--sign",
        default="auto",
        choices=["auto", "parts", "pseudonormal", "winding", "shell"],
        help="SDF sign method (default auto)",
    )
    p.add_argument("--sdf-backend", default="auto", choices=["auto", "cpu", "warp"], help="SDF query back end")
    p.add_argument("--tau", type=float, default=1.0 / 128.0, help="band half-width in [-1,1] units (default 1/128)")
    p.add_argument("--sharp-angle", type=float, default=30.0, help="dihedral angle (deg) of sharp edges (default 30)")
    p.add_argument(
        "--glob", default=None, metavar="PATTERN", help="take files matching this glob instead of mesh extensions"
    )
    p.add_argument("--seed", type=int, default=0, help="camera seed (mixed with each mesh's path)")
    p.add_argument("--up", default="y", choices=["y", "z"], help="up axis of the meshes for the cameras (default y)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def add_merge_parser(sub) -> None:
    m = sub.add_parser(
        "prepare-merge",
        help="join the manifests and failure logs of prepare runs (shards) into manifest.jsonl / failures.jsonl",
    )
    m.add_argument("out_dirs", nargs="+", help="output folders of d3s2 prepare runs")
    m.add_argument("--output", default=None, help="folder for the merged files (default: the first OUT_DIR)")
    m.set_defaults(func=_cmd_merge)
