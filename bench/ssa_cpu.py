"""CPU cost of Spatial Sparse Attention: the blocked backend vs the masked dense reference, alone and inside the demo
SS-DiT (src/d3s2/configs/demo_ss_dit.yaml: 5 blocks, 192 channels, 6 heads / 2 KV heads x 32, v1.1, m_cmp 4,
m_slc 8, m_win 8, top-k 8).

Tokens: the surface cells of pybullet_data's duck on an R^3 grid, R chosen so that the shell has about the requested
number of tokens (~6k is the demo's 64^3 latent of a small object). Random weights (the cost does not depend on
them, except through which blocks the top-k picks). Per size and thread count: one SS-DiT forward (no grad, layout
built beforehand as in sampling; median of ``--repeats``), the time spent inside its SSA layers, and the three
branches of one SSA call on random q/k/v of the layer's shape. The reference runs only up to ``--reference-max``
tokens (it is O(N^2) in time and memory); at that size the two backends' SS-DiT outputs are compared.

    python bench/ssa_cpu.py                       # writes bench/results/ssa_cpu-<host>.json
    python bench/ssa_cpu.py --sizes 6000 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import numpy as np
import torch


def shell_coords(target: int, mesh: str = "duck.obj") -> torch.Tensor:
    """[N, 4] (batch 0, x, y, z): surface cells of a pybullet_data mesh on the grid whose shell is closest to target."""
    import pybullet_data
    import trimesh

    m = trimesh.load(os.path.join(pybullet_data.getDataPath(), mesh), force="mesh", process=False)
    v = m.vertices - m.bounds[0]
    m.vertices = v / v.max()
    pts, _ = trimesh.sample.sample_surface(m, 600000, seed=0)
    best = None
    lo, hi = 8, 512
    while lo <= hi:
        res = (lo + hi) // 2
        cells = np.unique(np.clip(np.floor(pts * res), 0, res - 1).astype(np.int64), axis=0)
        if best is None or abs(len(cells) - target) < abs(len(best) - target):
            best = cells
        if len(cells) < target:
            lo = res + 1
        else:
            hi = res - 1
    c = torch.from_numpy(best)
    return torch.cat([torch.zeros(c.shape[0], 1, dtype=torch.long), c], 1)


def git_commit() -> str:
    """Read from .git without running git (helpers may not run git commands)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".git")
    try:
        head = open(os.path.join(root, "HEAD")).read().strip()
        if head.startswith("ref: "):
            return open(os.path.join(root, head[5:])).read().strip()
        return head
    except OSError:
        return "unknown"


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


class SSATimer:
    """Wall time spent inside the SpatialSparseAttention modules (projections, compression nets, attention)."""

    def __init__(self, model):
        from d3s2.nn.ssa import SpatialSparseAttention

        self.total, self._t0 = 0.0, None
        for mod in model.modules():
            if isinstance(mod, SpatialSparseAttention):
                mod.register_forward_pre_hook(self._pre)
                mod.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t0


def set_backend(model, backend: str):
    from d3s2.nn.ssa import SpatialSparseAttention

    for mod in model.modules():
        if isinstance(mod, SpatialSparseAttention):
            mod.with_backend(backend)


def branch_times(layout, cfg, repeats: int) -> dict:
    """One SSA call's branches (blocked backend) on random q/k/v of the demo layer's shape."""
    from d3s2.ops.ssa import blocked, mean_pool_blocks

    n = layout.num_tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, cfg.num_heads, cfg.head_dim, generator=g) * cfg.head_dim ** -0.5
    k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=g)
    kc, vc = mean_pool_blocks(k, layout), mean_pool_blocks(v, layout)
    res = {}
    with torch.no_grad():
        (_, idx), t = timed(lambda: blocked.compression_and_topk(q, kc, vc, layout, cfg.top_k), repeats)
        res["cmp_and_topk_s"] = statistics.median(t)
        _, t = timed(lambda: blocked.selection_attention(q, k, v, idx, layout), repeats)
        res["slc_s"] = statistics.median(t)
        for shift in (0, cfg.window_shift):
            _, t = timed(lambda: blocked.window_attention(q, k, v, layout, shift), repeats)
            res[f"win_shift{shift}_s"] = statistics.median(t)
    blk = (layout.slc_offsets[1:] - layout.slc_offsets[:-1]).double()
    res["selected_tokens_per_query_head"] = float(blk[idx.long().clamp_min(0)].sum(-1).mean())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 6000, 20000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reference-max", type=int, default=2500, help="largest token count to run the reference at")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cond-tokens", type=int, default=69, help="image tokens (demo encoder: 8x8 + cls + 4 reg)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from d3s2.config import build_model, load_model_config
    from d3s2.sparse import SparseTensor

    host = socket.gethostname().split(".")[0] or "cpu"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ssa_cpu-{host}.json")
    cfg = load_model_config("demo_ss_dit")
    p = cfg.params
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # the DiT init zeroes the output and modulation layers: give every weight a random value
        for prm in model.parameters():
            prm.normal_(0.0, 0.05 if prm.dim() > 1 else 0.02)
    ssa_timer = SSATimer(model)
    result = {
        "bench": "ssa_cpu",
        "args": vars(args),
        "machine": {
            "device": "cpu", "host": host, "cpus": os.cpu_count(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__, "commit": git_commit(),
            "loadavg_start": os.getloadavg(),
        },
        "model": {"config": "demo_ss_dit", "version": p.version, "blocks": p.num_blocks, "channels": p.model_channels,
                  "heads": p.num_heads, "kv_heads": p.num_kv_heads, "head_dim": p.head_dim, "m_cmp": p.m_cmp,
                  "m_slc": p.m_slc, "m_win": p.m_win, "top_k": p.top_k,
                  "weights": "random normal (std 0.05 matrices, 0.02 vectors)"},
        "cases": [],
    }
    for target in args.sizes:
        coords = shell_coords(target)
        g = torch.Generator().manual_seed(1)
        x = SparseTensor(torch.randn(coords.shape[0], p.in_channels, generator=g), coords)
        cond = torch.randn(1, args.cond_tokens, p.cond_channels, generator=g)
        t = torch.tensor([500.0])
        t0 = time.perf_counter()
        layout = model.layout_for(x)
        layout_s = time.perf_counter() - t0
        case = {"target_tokens": target, "tokens": layout.num_tokens, "grid": int(coords[:, 1:].max()) + 1,
                "cmp_blocks": layout.num_cmp, "slc_blocks": layout.num_slc,
                "max_slc_block_tokens": layout.max_slc_tokens, "layout_build_s": layout_s, "runs": []}
        outputs = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            backends = ["blocked"] + (["reference"] if layout.num_tokens <= args.reference_max else [])
            for be in backends:
                set_backend(model, be)
                reps = args.repeats if be == "blocked" else 1  # the reference is slow: one timed run, no warm-up
                with torch.no_grad():
                    if be == "blocked":
                        model(x, t, cond, layout=layout)  # warm-up (lazy caches)
                    ssa_timer.total = 0.0
                    y, times = timed(lambda: model(x, t, cond, layout=layout), reps)
                run = {"backend": be, "threads": threads, "forward_median_s": statistics.median(times),
                       "forward_all_s": times, "ssa_layers_s_per_forward": ssa_timer.total / reps,
                       "loadavg": os.getloadavg()}
                if be == "blocked":
                    run["sampling_estimate_s"] = 50 * run["forward_median_s"]  # 25 steps x 2 (CFG)
                    run["branches_one_layer"] = branch_times(layout, p, args.repeats)
                outputs[be] = y.feats
                case["runs"].append(run)
                print(json.dumps({"tokens": layout.num_tokens, **{k: v for k, v in run.items()
                                                                  if k not in ("forward_all_s",)}}), flush=True)
        if "reference" in outputs:
            a, b = outputs["blocked"].double(), outputs["reference"].double()
            case["blocked_vs_reference_rel_err"] = float((a - b).norm() / b.norm())
        result["cases"].append(case)
    result["machine"]["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
