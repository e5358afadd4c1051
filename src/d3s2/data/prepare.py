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

Modules: the settings (:mod:`d3s2.data.prepare_config`, checked by :mod:`d3s2.data.prepare_checks`), which meshes and
their item names (:mod:`d3s2.data.prepare_discovery`), one item (:mod:`d3s2.data.prepare_item`), the commands
(:mod:`d3s2.data.prepare_command`); this module runs a whole folder, on one process or a pool of workers.

Hardening (issue 22): the global settings are checked before the first mesh (:mod:`d3s2.data.prepare_checks`);
temporary files a killed run left in an item's folder are removed when the item is taken up again; a failed item's
folder is removed when it holds no file, and otherwise kept because its complete files (an SDF, the renders) are reused
by the rerun; a run in which every selected item failed exits with status 1.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from d3s2.data import manifest as mf
from d3s2.data.prepare_config import PrepareConfig
from d3s2.data.prepare_discovery import MESH_EXTENSIONS, discover_meshes, item_id_for, parse_shard, shard_of
from d3s2.data.prepare_item import ItemError, failure_record, is_finished, process_item, resolve_devices, run_item
from d3s2.errors import D3S2Error

# the prepare step's public names, importable from here as before the split into modules
__all__ = ["run_prepare", "PrepareSummary", "PrepareConfig", "MESH_EXTENSIONS", "discover_meshes", "item_id_for",
           "parse_shard", "shard_of", "ItemError", "process_item"]


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
    files = discover_meshes(mesh_dir, pattern, exclude=out_dir)
    if not files:
        what = f"matching {pattern!r}" if pattern else f"with extension {', '.join(MESH_EXTENSIONS)}"
        raise D3S2Error(f"no mesh files {what} found under {mesh_dir}")
    _check_out_dir(out_dir)
    resolve_devices(cfg)  # fail early on --device cuda without a GPU
    selected = [f for f in files if shard is None or shard_of(f, shard[1]) == shard[0]]
    summary = PrepareSummary(found=len(files), selected=len(selected))
    man_path, fail_path = mf.manifest_path(out_dir, shard), mf.failures_path(out_dir, shard)
    summary.manifest, summary.failures = str(man_path), str(fail_path)
    todo = [f for f in selected if not is_finished(out_dir, f, cfg)]
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
                record(*run_item(*job))
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
                    inflight[pool.submit(run_item, *job)] = job
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
    return failure_record(
        job[1],
        "worker",
        "worker process died (native crash or out of memory) while this or a concurrent item ran; rerun to retry",
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # N workers on N cores: no oversubscription
