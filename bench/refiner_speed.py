"""Where a refiner patch spends its time, and what cuDNN settings change it (issue 20: the 1024 budget).

    PYTHONPATH=src python3 bench/refiner_speed.py --out $OUT          # H200: both release-shaped refiners, fp16
    PYTHONPATH=src python3 bench/refiner_speed.py --tiny --out /tmp/x # CPU check of the script

One patch forward (192^3 SDF refiner, 256^3 sign refiner; random weights, the band inputs of refiner_patch.py) under
``torch.no_grad`` in each layout/setting: ``ncdhw`` (today), ``ncdhw+benchmark`` (``cudnn.benchmark``),
``channels_last`` (model and input in ``torch.channels_last_3d``), ``channels_last+benchmark``. Per variant: median
seconds of ``--repeats`` after a warm-up (which is where benchmark mode tunes), peak memory above weights + input,
max |difference| to the ``ncdhw`` output. A ``torch.profiler`` table (top CUDA kernels) of the first and of the
fastest variant goes to ``refiner_speed-<card>-profile.txt``; the numbers to ``refiner_speed-<card>.json``.
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
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE / "parity"))
sys.path.insert(0, str(HERE))

from results_io import write_json  # noqa: E402

VARIANTS = {"ncdhw": (False, False), "ncdhw+benchmark": (False, True), "channels_last": (True, False),
            "channels_last+benchmark": (True, True)}


def forward_timed(model, args, dev, repeats):
    times, peak, out = [], None, None
    for i in range(repeats + 1):
        out = None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = model(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30
        if i:
            times.append(time.perf_counter() - t0)
    return out, times, peak


def profile_table(model, args, dev) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        model(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    a = ap.parse_args(argv)
    from refiner_patch import patch_case

    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    rows, tables = [], []
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    for which, patch in (("refiner_512", 192), ("refiner_1024", 256)):
        p = 32 if a.tiny else patch
        model, base_args, _ = patch_case(which, p, dtype, dev)
        ref, best = None, None
        for name, (cl, bench) in ((n, VARIANTS[n]) for n in a.variants):
            torch.backends.cudnn.benchmark = bench
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            model.to(memory_format=fmt)
            args = [t.contiguous(memory_format=fmt) for t in base_args]
            with torch.no_grad():
                try:
                    out, times, peak = forward_timed(model, args, dev, 1 if a.tiny else a.repeats)
                except Exception as exc:  # a variant that fails is reported, the others still run
                    rows.append({"model": which, "variant": name, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                out = out.float()
                if ref is None:
                    ref = out
                    tables.append(f"== {which} {name}\n{profile_table(model, args, dev)}")
                r = {"model": which, "patch": p, "dtype": str(dtype), "variant": name,
                     "seconds_median": statistics.median(times), "seconds": times, "peak_gib": peak,
                     "max_abs_diff_to_ncdhw": float((out - ref).abs().max()), "finite": bool(torch.isfinite(out).all())}
            rows.append(r)
            print(json.dumps(r), flush=True)
            if best is None or r["seconds_median"] < best[1]:
                best = (name, r["seconds_median"], cl, bench)
            del out, args
        if best and best[0] != "ncdhw":
            torch.backends.cudnn.benchmark = best[3]
            fmt = torch.channels_last_3d if best[2] else torch.contiguous_format
            model.to(memory_format=fmt)
            with torch.no_grad():
                tables.append(f"== {which} {best[0]}\n"
                              f"{profile_table(model, [t.contiguous(memory_format=fmt) for t in base_args], dev)}")
        del model, ref, base_args
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    tag = "h200" if "H200" in card else dev.type
    out = Path(a.out)
    doc = {"bench": "refiner_speed", "card": card, "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "tiny": a.tiny, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(out / f"refiner_speed-{tag}.json", doc)
    write_json(out / f"refiner_speed-{tag}-profile.txt", None, text="\n\n".join(tables))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
