"""One item of ``d3s2 prepare``: a mesh -> its folder of sparse SDFs, renders and ``done`` record (paper Sec. 3, 5.1).

:func:`process_item` normalises the mesh into [-1, 1]^3 (d3s2.data.mesh_io), writes the sparse SDF with sharp voxels at
each requested resolution (d3s2.data.sdf, Eq. 1-2) and the RGBA renders from random cameras (d3s2.data.render), then
the item's manifest record (written last: its presence means complete). Complete files of an interrupted run are
reused, a killed run's temporary files removed. A failure raises :class:`ItemError` naming its stage.

:func:`run_item` is what a worker runs: the record, or a failure record (also for unexpected errors, so the run goes
on), and the item's folder removed when a failure left it without any file.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from d3s2.data import manifest as mf
from d3s2.data.prepare_config import PrepareConfig
from d3s2.data.prepare_discovery import item_id_for, item_seed
from d3s2.errors import D3S2Error
from d3s2.fileio import remove_empty_dirs, remove_stale_temp_files

__all__ = ["ItemError", "process_item", "run_item", "failure_record", "resolve_devices", "is_finished"]


class ItemError(Exception):
    """A failure of one item at a named stage (load, sdf, render, write)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:500] if not isinstance(exc, D3S2Error) else msg[:500]


def resolve_devices(cfg: PrepareConfig) -> tuple[str, str | None]:
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
    render_device, sdf_device = resolve_devices(cfg)
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

    from d3s2.geometry.cameras import CameraSampling, sample_cameras
    from d3s2.data.render import Renderer, RenderSettings, load_render_mesh, write_views

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


def is_finished(out_dir: Path, rel: str, cfg: PrepareConfig) -> bool:
    rec = mf.read_done(out_dir / item_id_for(rel))
    if rec is None:
        return False
    have = set(rec.get("sdf", {}))
    same_render = cfg.views == 0 or rec.get("render_settings") == cfg.render_key()
    return {str(r) for r in cfg.resolutions} <= have and same_render and abs(rec.get("tau", -1) - cfg.tau) < 1e-12


def run_item(src: str, rel: str, out_dir: str, cfg: PrepareConfig) -> tuple[bool, dict]:
    ok, rec = _try_one(src, rel, out_dir, cfg)
    if not ok:
        remove_empty_dirs(Path(out_dir) / item_id_for(rel))  # folders with complete files stay: the rerun reuses them
    return ok, rec


def _try_one(src: str, rel: str, out_dir: str, cfg: PrepareConfig) -> tuple[bool, dict]:
    try:
        return True, process_item(src, rel, out_dir, cfg)
    except ItemError as exc:
        return False, failure_record(rel, exc.stage, exc.reason)
    except Exception as exc:  # a bug or an unexpected library error: log it, the run goes on
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return False, failure_record(rel, "unexpected", _reason(exc), where=tb)



def failure_record(rel: str, stage: str, reason: str, **extra) -> dict:
    """The failure log's record of the mesh at relative path ``rel``."""
    return {"item_id": item_id_for(rel), "source": rel, "stage": stage, "reason": reason, **extra}
