"""Per-kernel GPU time of one SSA forward and backward (torch.profiler), to see where each branch's time goes.

    PYTHONPATH=src python3 bench/ssa_profile.py --out $OUT --n 131072 --configs v1.1,v1.0

Same setup as bench/ssa.py (bunny shell, 32 query heads / 2 KV heads / head dim 32, bf16, random inputs). Prints the
kernels sorted by total CUDA time per pass and writes ssa_profile-<card>.json. Diagnosis only: speed numbers for the
README come from bench/ssa.py (medians over many runs with L2 flushes); these are single profiled passes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ssa as bench  # noqa: E402

from d3s2.nn.ssa import SSAConfig, SpatialSparseAttention  # noqa: E402


def kernel_table(prof, reps: int) -> list[dict]:
    rows = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name.split("(")[0][:70]
        r = rows.setdefault(name, {"kernel": name, "ms": 0.0, "calls": 0})
        r["ms"] += ev.device_time / 1e3 / reps
        r["calls"] += 1
    out = sorted(rows.values(), key=lambda r: -r["ms"])
    for r in out:
        r["calls"] //= reps
    return out


def profile(coords, cfg_name: str, device, reps: int = 3) -> dict:
    cfg = SSAConfig(dim=256, num_heads=bench.H, num_kv_heads=bench.HKV, head_dim=bench.D, m_slc=8, m_win=8,
                    backend="triton", **bench.CONFIGS[cfg_name])
    mod = SpatialSparseAttention(cfg).to(device=device, dtype=torch.bfloat16)
    layout = mod.make_layout(coords)
    n = layout.num_tokens
    torch.manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(n, bench.H, bench.D, **bf, requires_grad=True)
    k = torch.randn(n, bench.HKV * bench.D, **bf, requires_grad=True)
    v = torch.randn(n, bench.HKV * bench.D, **bf, requires_grad=True)
    gl = torch.randn(n, 3, **bf, requires_grad=True)
    out = mod.attend(q, k, v, gl, layout, 0)
    do = torch.randn_like(out)
    torch.autograd.grad(out, (q, k, v, gl), do)
    torch.cuda.synchronize()
    res = {"config": cfg_name, "N": n}
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as pf:
        for _ in range(reps):
            mod.attend(q, k, v, gl, layout, 0)
        torch.cuda.synchronize()
    res["fwd"] = kernel_table(pf, reps)
    outs = [mod.attend(q, k, v, gl, layout, 0) for _ in range(reps)]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as pb:
        for o in outs:
            torch.autograd.grad(o, (q, k, v, gl), do)
        torch.cuda.synchronize()
    res["bwd"] = kernel_table(pb, reps)
    for kind in ("fwd", "bwd"):
        tot = sum(r["ms"] for r in res[kind])
        print(f"== {cfg_name} N={n} {kind}: {tot:.2f} ms of kernels", flush=True)
        for r in res[kind][:14]:
            print(f"   {r['ms']:8.3f} ms  x{r['calls']:<4d} {r['kernel']}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(bench.HERE, "results")))
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--configs", default="v1.1,v1.0")
    ap.add_argument("--mesh", default="bunny")
    args = ap.parse_args()
    device = torch.device("cuda")
    data = np.load(os.path.join(bench.HERE, "data", "ssa_shells.npz"))
    c3 = torch.from_numpy(data[f"{args.mesh}_{args.n}"].astype(np.int64)).to(device)
    coords = torch.cat([torch.zeros_like(c3[:, :1]), c3], 1)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": bench.git_commit(),
           "rows": [profile(coords, c, device) for c in args.configs.split(",")]}
    os.makedirs(args.out, exist_ok=True)
    bench.save(os.path.join(args.out, f"ssa_profile-{bench.card_slug()}.json"), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
