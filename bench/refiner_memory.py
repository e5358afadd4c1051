"""Peak GPU memory of the 1024 sign-refiner run by phase (issue 20: the 12 GB budget at 1024).

    PYTHONPATH=src python3 bench/refiner_memory.py --out $OUT      # H200; --tiny on a CPU (wiring only)

A release-shaped random :class:`~d3s2.models.refiner.SignRefiner` (fp16, its output layer sharpened as in
bench/refiners.py so that the signs follow the band) on a synthetic decoded band at 1024 (a bumpy sphere, ``--tau``
voxels each side: about as many voxels as the pipeline bench's decoded bunny, 23.7 M). Reports, above the memory
held before the call (weights + band): the peak of ``refined_sign_grid`` (pooling + 27 patches), the peak of one
network forward, and the peak of the whole ``refine_signs_1024`` (signs + off-band corners + sorted field), with
seconds and the field's size. Writes ``refiner_memory-<card>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "parity"))

from results_io import write_json  # noqa: E402


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tau", type=float, default=8.0)
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    a = ap.parse_args(argv)
    from refiners import sharpen_sign_refiner
    from rows import synthetic_band

    from d3s2.geometry.refine import refine_signs_1024, refined_sign_grid
    from d3s2.models.refiner import SignRefiner, SignRefinerConfig, build_refiner

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    cuda = dev.type == "cuda"
    R = 64 if a.tiny else 1024
    torch.manual_seed(0)
    if a.tiny:
        net = SignRefiner(SignRefinerConfig(block_out_channels=[4, 8], patch_size=16, patch_stride=8,
                                            resolution=32)).eval()
    else:
        with torch.device(dev):
            net = build_refiner("refiner_1024").eval()
        net.to(dev, torch.float16)
    with torch.no_grad():
        sharpen_sign_refiner(net)
    coords, sdf = synthetic_band(R, 0.6, tau_voxels=a.tau, device=dev)
    c4 = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32, device=dev), coords], 1)
    del coords
    sdf = sdf.to(net.dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    forward_peaks = []
    plain = net.forward

    def forward(*x):
        if not cuda:
            return plain(*x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        saved = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = plain(*x)
        torch.cuda.synchronize()
        forward_peaks.append(torch.cuda.max_memory_allocated() - before)
        # keep the outer peak meaningful: the forward's peak counts toward the phase's peak
        outer = max(saved, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        forward.outer = max(getattr(forward, "outer", 0), outer)
        return out

    net.forward = forward
    res = {"card": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "triton": _triton_version(), "resolution": R, "band_voxels": len(c4),
           "tau_voxels": a.tau}

    def phase(name, fn):
        forward.outer = 0
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
            peak = max(torch.cuda.max_memory_allocated(), forward.outer) - base
            res[f"{name}_peak_gib_above_start"] = peak / 2 ** 30
            res[f"{name}_start_gib"] = base / 2 ** 30
        res[f"{name}_seconds"] = time.perf_counter() - t0
        return out

    with torch.inference_mode():
        signs = phase("sign_grid", lambda: refined_sign_grid(net, c4, sdf, resolution=R))
        res["negative_sign_fraction"] = float((signs < 0).float().mean())
        del signs
        fields = phase("whole_run", lambda: refine_signs_1024(net, c4, sdf, resolution=R))
    res["explicit_voxels"] = int(len(fields[0].coords))
    res["forward_peak_gib_max"] = max(forward_peaks, default=0) / 2 ** 30
    print(json.dumps(res), flush=True)
    write_json(Path(a.out) / f"refiner_memory-{'h200' if 'H200' in res['card'] else dev.type}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
