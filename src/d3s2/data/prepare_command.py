"""The ``d3s2 prepare`` and ``d3s2 prepare-merge`` commands: flags -> :func:`d3s2.data.prepare.run_prepare` /
:func:`d3s2.data.manifest.merge_manifests`, and the summary lines and exit status of a run."""

from __future__ import annotations

import sys
from pathlib import Path

from d3s2.data import manifest as mf
from d3s2.data.prepare import run_prepare
from d3s2.data.prepare_config import PrepareConfig
from d3s2.data.prepare_discovery import parse_shard
from d3s2.errors import D3S2Error

__all__ = ["add_parser", "add_merge_parser"]


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
