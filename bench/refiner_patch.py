"""One refiner patch forward (issue 20): seconds and peak GPU memory of d3s2's release-shaped refiner networks.

    PYTHONPATH=src python3 bench/refiner_patch.py --out $OUT                 # H200: 192^3 (512 SDF refiner) and
                                                                             # 256^3 (1024 sign refiner), fp16 + fp32
    PYTHONPATH=src python3 bench/refiner_patch.py --tiny --out /tmp/x        # CPU check of the script (seconds)

Models: :class:`d3s2.models.refiner.SDFRefiner` / :class:`~d3s2.models.refiner.SignRefiner` at the release's size
(134.7 M parameters each) with random weights (built on the device), cast to each ``--dtypes`` entry as the release
runs them (``.to(dtype)``: convs / linears in that dtype, GroupNorm fp32). Input: one patch as densified from a
decoded band (SDF 1 outside two voxels of a bumpy sphere, ``s / tau`` inside; features random in the band, 0
outside). Under ``torch.no_grad`` (the lean path). Reported per (model, dtype): median seconds of ``--repeats`` runs
after a warm-up, peak memory above the weights and the input (``torch.cuda.max_memory_allocated``; includes cuDNN
workspaces), the live activations' peak of the same forward traced on the meta device (``live_bytes.py``; without
workspaces), the output's range. ``--tiny``: 32^3 patches of the same networks on the CPU (no memory figure). Writes
``refiner_patch-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE / "parity"))

from results_io import write_json  # noqa: E402

from timing import timed  # noqa: E402


def patch_case(which: str, patch: int, dtype: torch.dtype, dev: torch.device):
    """``(model, args, band_voxels)``: the release-shaped random refiner ``which`` on ``dev`` in ``dtype`` (seed 0,
    built on the device) and its forward's inputs, one band patch of side ``patch`` (also used by refiner_speed.py)."""
    from refiner_rows import band_patch

    from d3s2.models.refiner import build_refiner

    torch.manual_seed(0)
    with torch.device(dev):
        model = build_refiner(which).eval()
    model.to(dev, dtype)
    sdf, feats, band = band_patch(patch, 0 if which == "refiner_1024" else model.feature_channels)
    return model, [sdf.to(dev, dtype)] + ([feats.to(dev, dtype)] if feats is not None else []), band


def run_one(which: str, patch: int, dtype: torch.dtype, dev: torch.device, repeats: int) -> dict:
    from d3s2.models.refiner import build_refiner

    model, args, band = patch_case(which, patch, dtype, dev)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            out, seconds, peak = timed(model, dev, *args)
            if i:
                times.append(seconds)
            if i < repeats:
                del out
    from live_bytes import meta_patch_peak

    meta = build_refiner(which, empty=True).to(dtype)
    margs = [torch.empty(a.shape, device="meta", dtype=a.dtype) for a in args]
    meta_peak = meta_patch_peak(meta, *margs) / 2 ** 30
    res = {"model": which, "activation_peak_gib_meta": meta_peak, "patch": patch, "dtype": str(dtype).replace("torch.", ""), "band_voxels": band,
           "seconds_median": statistics.median(times), "seconds": times, "peak_gib_above_weights_and_input": peak,
           "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
           "out_min": float(out.min()), "out_max": float(out.max()), "finite": bool(torch.isfinite(out).all())}
    del model, out, args
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="32^3 patches (CPU check)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = False
    dtypes = [getattr(torch, d) for d in args.dtypes] if dev.type == "cuda" else [torch.float32]
    rows = []
    for which, patch in (("refiner_512", 192), ("refiner_1024", 256)):
        for dt in dtypes:
            r = run_one(which, 32 if args.tiny else patch, dt, dev, 1 if args.tiny else args.repeats)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "seconds"}), flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    doc = {"card": name, "torch": torch.__version__, "tiny": args.tiny, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = write_json(Path(args.out) / f"refiner_patch-{'h200' if 'H200' in name else dev.type}"
                                       f"{'-tiny' if args.tiny else ''}.json", doc)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
