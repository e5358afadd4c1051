"""One guided SS-DiT sampling step (paper-size v1.1, random weights) eager vs CUDA graph, and where its time goes.

    PYTHONPATH=src python3 bench/dit_forward.py --out $OUT        # device tool (GPU)

For each stage (512: ~11k tokens per sample, 1024: ~46k; a real latent shell from bench/data/ssa_shells.npz), the
classifier-free-guidance batch of the pipeline (the sample twice) runs through
:class:`d3s2.flow.guidance.BatchedSparseGuidance` (what ``sample_euler`` uses with ``batch_cfg``) with and without
CUDA-graph replay: median ms per step (CUDA events), the relative difference of the two outputs, and the top CUDA
kernels of one eager step (torch.profiler). Writes ``dit_forward-<card>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_step import batch_latent, shell_coords  # noqa: E402


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def time_steps(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def main() -> None:
    from d3s2.config import load_model_config
    from d3s2.flow.guidance import BatchedSparseGuidance
    from d3s2.models.ss_dit import SSDiT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    ap.add_argument("--stages", nargs="+", default=["512:ss_dit_v1_1_512:11000", "1024:ss_dit_v1_1_1024:45904"])
    ap.add_argument("--mesh", default="bunny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"bench": "dit_forward", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "commit": commit(), "stages": []}
    for spec in args.stages:
        name, cfg_name, tokens = spec.split(":")
        params = load_model_config(cfg_name).params
        model = SSDiT(params).to(dev, torch.bfloat16).eval()
        with torch.no_grad():
            for p in model.parameters():  # non-zero adaLN / output: every block does real work
                p.add_(0.02 * torch.randn_like(p))
        x = batch_latent(shell_coords([args.mesh], int(tokens)), params.in_channels, dev, 0)
        cond = torch.randn(1, 1374, params.cond_channels, device=dev)
        t = torch.full((1,), 500.0, device=dev)
        row = {"stage": name, "config": cfg_name, "tokens_per_sample": x.num_voxels, "batch": 2}
        outs = {}
        with torch.no_grad():
            for graphs in (False, True):
                g = BatchedSparseGuidance(model, x, cond, torch.zeros_like(cond), 7.0, {}, cuda_graphs=graphs)
                g(x, t, cond)  # eager first call (layout, caches, compilation)
                g(x, t, cond)  # graphs: capture + replay
                torch.cuda.synchronize()
                ms = time_steps(lambda: g(x, t, cond), args.steps)
                outs[graphs] = g(x, t, cond).feats.float()
                row["graph" if graphs else "eager"] = {"median_ms": statistics.median(ms), "all_ms": ms,
                                                       "captured": g.call.captured, "capture_error": g.call.failed}
                if not graphs:
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        g(x, t, cond)
                        torch.cuda.synchronize()
                    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or
                           getattr(e, "self_device_time_total", 0) > 0]
                    evs.sort(key=lambda e: -getattr(e, "self_device_time_total", 0))
                    row["top_kernels"] = [{"name": e.key[:120], "ms": e.self_device_time_total / 1e3,
                                           "calls": e.count} for e in evs[:args.top]]
                    row["gpu_ms_profiled"] = sum(getattr(e, "self_device_time_total", 0)
                                                 for e in prof.key_averages()) / 1e3
        ref = outs[False]
        row["graph_vs_eager_rel"] = float((outs[True] - ref).norm() / ref.norm())
        row["speedup"] = row["eager"]["median_ms"] / row["graph"]["median_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        for k in row["top_kernels"][:12]:
            print(f"  {k['ms']:8.2f} ms  x{k['calls']:<5d} {k['name']}", flush=True)
        res["stages"].append(row)
        del model
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    card = res["card"].split()[1].lower() if len(res["card"].split()) > 1 else "gpu"
    path = os.path.join(args.out, f"dit_forward-{card}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
