"""Parity harness: d3s2 against the authors' own code on the same weights and inputs (issue: release parity).

    python bench/parity/run.py --snapshot .snapshots/Direct3D-S2 --inputs bench/parity/inputs/bunny.npz \
        --size full --out bench/results            # GPU: every row at the release's sizes
    python bench/parity/run.py --snapshot ... --size small --device cpu   # CPU: reduced widths, no SS-DiT rows

The snapshot is a local copy of the public repository DreamTechAI/Direct3D-S2 (kept out of git; its direct3d_s2/
Python files travel with the benchmark); bench/parity/stubs stand in for torchsparse, flash_attn and the authors'
CUDA extension. Random weights are written in the release's layout and read by d3s2's public loader, so the loader is
part of every row. Writes ``parity-<card>.json`` (rows, versions, commit) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import torch  # noqa: E402


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def table(rows: list[dict]) -> str:
    lines = ["| component | measured | bound | ok | device |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['row']} | skipped: {r['skipped']} | | | |")
            continue
        if "max_rel" in r:
            m = f"max rel {r['max_rel']:.2e} (fro {r['fro_rel']:.1e})"
        elif "max_vertex_distance" in r:
            m = f"vertex {r['max_vertex_distance']:.1e}, faces unmatched {r['faces_not_matched']}"
        elif "max_abs_sigma" in r:
            m = f"sigma {r['max_abs_sigma']:.1e}, t {r['max_abs_timestep']:.1e}"
        elif "tokens_theirs" in r:
            m = f"{r['tokens_ours']} vs {r['tokens_theirs']} tokens"
        elif "max_abs" in r:
            m = f"max abs {r['max_abs']:.1e}"
        else:
            m = r.get("error", "")
        lines.append(f"| {r['row']} | {m} | {r.get('bound', '')} | {r.get('ok')} | {r.get('device', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot", required=True, help="folder of a DreamTechAI/Direct3D-S2 checkout")
    ap.add_argument("--inputs", default=str(HERE / "inputs" / "bunny.npz"), help="bench/parity/inputs.py output")
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--versions", nargs="+", default=["v1.1", "v1.0"])
    ap.add_argument("--rows", nargs="+", default=["scheduler", "preprocess", "cond", "band", "dense", "vae512",
                                                  "vae1024", "dit512", "dit1024", "mc512", "mc1024",
                                                  "refiner_512_patch", "refiner_1024_patch"],
                    help="rows to run (space- or comma-separated)")
    ap.add_argument("--refiner-patch", type=int, default=None,
                    help="refiner rows: patch side (default: the release's 192 / 256 at --size full, 32 small)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE.parents[1] / "bench" / "results")))
    ap.add_argument("--workdir", default=None, help="where the release folders are written (default: a temp dir)")
    args = ap.parse_args(argv)
    args.rows = [r for item in args.rows for r in item.split(",") if r]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import rows as R

    device = torch.device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="parity-"))
    results: list[dict] = []
    out_path = Path(args.out) / f"parity-{'h200' if 'H200' in card(device) else device.type}-{args.size}.json"

    def save():
        doc = {"card": card(device), "device": str(device), "torch": torch.__version__, "commit": commit(),
               "size": args.size, "python": platform.python_version(), "rows": results,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            import triton

            doc["triton"] = triton.__version__
        except ImportError:
            pass
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out_path)

    def run(name, fn, *a):
        t0 = time.perf_counter()
        try:
            got = fn(*a)
        except Exception as exc:  # a failing row is reported, the others still run
            got = {"row": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-3000:]}
        for r in got if isinstance(got, list) else [got]:
            r.setdefault("seconds_row", time.perf_counter() - t0)
            if "version" not in r:
                r["version"] = a[0].version if a and hasattr(a[0], "version") else None
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
        save()

    if "scheduler" in args.rows:
        run("scheduler", R.scheduler)
    for version in args.versions:
        h = R.Harness(args.snapshot, work, version, args.size, device, args.inputs)
        print(f"# {version} {args.size}: release folder {h.folder} built in {h.build_seconds:.1f} s", flush=True)
        first = version == args.versions[0]
        if first:
            for key, fn in (("cond", R.condition_tokens), ("preprocess", R.preprocess)):
                if key in args.rows:
                    run(key, fn, h)
            if "dense" in args.rows:
                run("dense VAE", R.dense_vae_decode, h)
                run("dense DiT", R.dense_dit, h)
        for stage in ("512", "1024"):
            if f"dit{stage}" in args.rows:
                run(f"SS-DiT {stage}", R.ss_dit, h, stage)
        if first:
            for stage in ("512", "1024"):
                if f"vae{stage}" in args.rows:
                    run(f"SS-VAE {stage}", R.ss_vae, h, stage)
                if f"mc{stage}" in args.rows:
                    run(f"MC {stage}", R.marching_cubes, h, stage, 0.2)
            if "band" in args.rows:
                run("band", R.token_band, h)
            import refiner_rows  # the refiners are the same in both versions

            for name in refiner_rows.NAMES:
                if name in args.rows:
                    run(name, refiner_rows.refiner_patch, h, name, args.refiner_patch)
        del h
    print(table(results))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
