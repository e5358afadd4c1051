"""SSA vs FlashAttention-2 benchmark (paper Fig. 7): forward and backward time of the whole attention op.

    PYTHONPATH=src python3 bench/ssa.py --out $OUT          # on the device machine (H100)

Token layouts: latent shells of real meshes (bench/data/ssa_shells.npz, made by bench/ssa_data.py), N = 8k..128k.
Config: 32 query heads, 2 KV heads, head dim 32, bf16, one sample. SSA time = compression networks (Eq. 7, with the
intra-block PE) + compression attention + fused scoring/top-k + selection + window + gates, from q / k / v tokens to
the output, excluding the q/k/v/o projections; tokens are already in block order (the DiT keeps them sorted; the
layout is built once per token set and reported separately). Anchor: dense attention through
``F.scaled_dot_product_attention`` with the flash backend (KV heads expanded for GQA), same N, same run.
Backward times are the backward pass alone (autograd.grad with retain_graph). Medians of triton.testing.do_bench
(which flushes L2 between repetitions). Writes ssa-<card>.json (+ a Fig. 7 style PNG when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import triton

from d3s2.nn.ssa import SSAConfig, SpatialSparseAttention
from d3s2.ops.ssa.kernels.compression import compression_attention_triton
from d3s2.ops.ssa.kernels.gates import gated_combine_triton
from d3s2.ops.ssa.kernels.scoring import score_topk_triton
from d3s2.ops.ssa.kernels.selection import selection_attention_triton
from d3s2.ops.ssa.kernels.window import window_attention_triton

HERE = os.path.dirname(os.path.abspath(__file__))
H, HKV, D = 32, 2, 32
CONFIGS = {
    "v1.0": dict(version="v1.0", m_cmp=4, top_k=8),  # release v1.0 at 1024 (top-k 32 at 512: "v1.0-k32")
    "v1.0-k32": dict(version="v1.0", m_cmp=4, top_k=32),
    "v1.1": dict(version="v1.1", m_cmp=8, top_k=8),
}


SMOKE = False  # --smoke: CPU run under TRITON_INTERPRET=1 on tiny token sets, to check the script itself


def ms(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def graph_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (no Python or launch overhead); NaN if it does not capture."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return ms(graph.replay)
    except Exception as exc:  # reported, not fatal
        print("graph capture failed:", repr(exc)[:200], flush=True)
        return float("nan")


def device_name() -> str:
    return "cpu-smoke" if SMOKE else torch.cuda.get_device_name()


def card_slug() -> str:
    name = device_name().lower()
    for k in ("h200", "h100", "a100", "l40", "4090"):
        if k in name:
            return k
    return name.replace(" ", "-")


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def fa2_times(n: int, device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, H, n, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, HKV, n, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, HKV, n, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = H // HKV

    def fwd():
        with sdpa_kernel(SDPBackend.MATH if SMOKE else SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

    out = fwd()
    do = torch.randn_like(out)
    t_f = ms(fwd)
    extra = {}
    if not SMOKE and n <= 32768:
        with torch.no_grad():
            extra["fa2_fwd_graph_ms"] = graph_ms(fwd)
    t_b = ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    return {"fa2_fwd_ms": t_f, "fa2_bwd_ms": t_b, **extra}


def ssa_times(coords: torch.Tensor, cfg_name: str, device) -> dict:
    cfg = SSAConfig(dim=256, num_heads=H, num_kv_heads=HKV, head_dim=D, m_slc=8, m_win=8, backend="triton",
                    **CONFIGS[cfg_name])
    mod = SpatialSparseAttention(cfg).to(device=device, dtype=torch.bfloat16)
    sync = (lambda: None) if SMOKE else torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    layout = mod.make_layout(coords)
    sync()
    layout_ms = (time.perf_counter() - t0) * 1e3
    n = layout.num_tokens
    torch.manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(n, H, D, **bf, requires_grad=True)
    k_tok = torch.randn(n, HKV * D, **bf, requires_grad=True)
    v_tok = torch.randn(n, HKV * D, **bf, requires_grad=True)
    gl = torch.randn(n, 3, **bf, requires_grad=True)
    ins = (q, k_tok, v_tok, gl)
    scale = D ** -0.5
    row: dict = {"N": n, "num_cmp": layout.num_cmp, "num_slc": layout.num_slc, "layout_ms": layout_ms,
                 "top_k": cfg.top_k, "m_cmp": cfg.m_cmp}

    def total():
        return mod.attend(q, k_tok, v_tok, gl, layout, 0)

    out = total()
    do = torch.randn_like(out)
    row["ssa_fwd_ms"] = ms(total)
    if not SMOKE and n <= 32768:  # small token sets are launch-bound: also time the forward replayed from a CUDA graph
        with torch.no_grad():
            row["ssa_fwd_graph_ms"] = graph_ms(total)
    row["ssa_bwd_ms"] = ms(lambda: torch.autograd.grad(out, ins, do, retain_graph=True))

    # per branch
    bf_ms, bb_ms = {}, {}
    def cmp_net():
        return mod.compress(k_tok, v_tok, layout)

    kc, vc = cmp_net()
    bf_ms["cmp_net"] = ms(cmp_net)
    gk, gv = torch.randn_like(kc), torch.randn_like(vc)
    bb_ms["cmp_net"] = ms(lambda: torch.autograd.grad((kc, vc), (k_tok, v_tok), (gk, gv), retain_graph=True))
    kc3 = kc.detach().reshape(-1, HKV, D).contiguous().requires_grad_()
    vc3 = vc.detach().reshape(-1, HKV, D).contiguous().requires_grad_()
    k3 = k_tok.detach().view(n, HKV, D).requires_grad_()
    v3 = v_tok.detach().view(n, HKV, D).requires_grad_()
    o_c, lse = compression_attention_triton(q, kc3, vc3, layout, scale)
    bf_ms["cmp"] = ms(lambda: compression_attention_triton(q, kc3, vc3, layout, scale))
    bb_ms["cmp"] = ms(lambda: torch.autograd.grad(o_c, (q, kc3, vc3), do, retain_graph=True))
    idx, _ = score_topk_triton(q.detach(), kc3.detach(), lse, layout, cfg.top_k, scale)
    bf_ms["topk"] = ms(lambda: score_topk_triton(q.detach(), kc3.detach(), lse, layout, cfg.top_k, scale))
    o_s = selection_attention_triton(q, k3, v3, idx, layout, scale)
    bf_ms["slc"] = ms(lambda: selection_attention_triton(q, k3, v3, idx, layout, scale))
    bb_ms["slc"] = ms(lambda: torch.autograd.grad(o_s, (q, k3, v3), do, retain_graph=True))
    w = layout.window(0)
    o_w = window_attention_triton(q, k3, v3, w, scale)
    bf_ms["win"] = ms(lambda: window_attention_triton(q, k3, v3, w, scale))
    bb_ms["win"] = ms(lambda: torch.autograd.grad(o_w, (q, k3, v3), do, retain_graph=True))
    br = [o_c.detach().requires_grad_(), o_s.detach().requires_grad_(), o_w.detach().requires_grad_()]
    o_g = gated_combine_triton(br, gl)
    bf_ms["gate"] = ms(lambda: gated_combine_triton(br, gl))
    bb_ms["gate"] = ms(lambda: torch.autograd.grad(o_g, (*br, gl), do, retain_graph=True))
    row["branch_fwd_ms"] = bf_ms
    row["branch_bwd_ms"] = bb_ms
    sizes4 = (layout.cmp_offsets[1:] - layout.cmp_offsets[:-1]).float()
    sizes8 = (layout.slc_offsets[1:] - layout.slc_offsets[:-1]).float()
    row["tokens_per_cmp_block"] = float(sizes4.mean())
    row["tokens_per_slc_block"] = float(sizes8.mean())
    row["tokens_per_slc_block_weighted"] = float((sizes8 ** 2).sum() / sizes8.sum())
    return row


SWEEP = {
    # (kernel module, tuning overrides): each variant is timed on the branch it changes, same inputs. Issue 8 run 14:
    # dK/dV tile shapes, warps and pipeline depth of the compression and selection backward.
    "cmp": [("varlen", {}), ("varlen", {"kv_rows": 64, "kv_warps": 8}), ("varlen", {"num_stages": 2}),
            ("varlen", {"num_stages": 1}), ("varlen", {"kv_block_n": 32}),
            ("varlen", {"kv_rows": 256, "kv_block_n": 32, "kv_warps": 8}), ("varlen", {"kv_block_n": 32, "kv_warps": 2}),
            ("varlen", {"kv_rows": 64, "kv_block_n": 32, "kv_warps": 2})],
    "slc": [("selection", {}), ("selection", {"kv_warps": 2}), ("selection", {"num_stages": 2}),
            ("selection", {"kv_rows": 64, "kv_warps": 2})],
}


TUNE = {
    "cmp": [("varlen", {}), ("varlen", {"programs_per_sm": 8}), ("varlen", {"dq_rows": 64, "dq_warps": 4}),
            ("varlen", {"dq_atomic": True}), ("varlen", {"dq_atomic": True, "programs_per_sm": 8}),
            ("varlen", {"dq_atomic": True, "kv_rows": 128, "kv_warps": 8})],
    "slc": [("selection", {}), ("selection", {"kv_block_n": 64, "kv_warps": 4}), ("selection", {"kv_rows": 64}),
            ("selection", {"max_split": 16, "split_budget_bytes": 1 << 30})],
    "topk": [("scoring", {}), ("scoring", {"rows": 128}), ("scoring", {"block_s": 128})],
}


def apply_tuning(tuning: dict) -> None:
    from d3s2.ops.ssa.kernels import scoring, selection, varlen_attention

    mods = {"varlen": varlen_attention, "selection": selection, "scoring": scoring}
    for modname, over in tuning.items():
        mods[modname].TUNING.update(over)


def tune(coords: torch.Tensor, device) -> dict:
    """Pick the fastest tile variant per branch (fwd + bwd) on v1.0 at this N and apply it; returns the choice."""
    rows = sweep(coords, "v1.0", device, table=TUNE)
    choice = {}
    for branch in TUNE:
        ok = [r for r in rows if r["branch"] == branch and "error" not in r]
        best = min(ok, key=lambda r: r["fwd_ms"] + r["bwd_ms"])
        modname = TUNE[branch][0][0]
        choice[modname] = best["variant"]
    apply_tuning(choice)
    return {"choice": choice, "rows": rows}


def sweep(coords: torch.Tensor, cfg_name: str, device, table: dict | None = None) -> list[dict]:
    """Time tile variants of the compression, selection and scoring kernels on one token set."""
    from d3s2.ops.ssa.kernels import scoring, selection, varlen_attention, window

    mods = {"varlen": varlen_attention, "selection": selection, "scoring": scoring, "window": window}
    cfg = SSAConfig(dim=256, num_heads=H, num_kv_heads=HKV, head_dim=D, m_slc=8, m_win=8, backend="triton",
                    **CONFIGS[cfg_name])
    mod = SpatialSparseAttention(cfg).to(device=device, dtype=torch.bfloat16)
    layout = mod.make_layout(coords)
    n, nc = layout.num_tokens, layout.num_cmp
    torch.manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(n, H, D, **bf, requires_grad=True)
    k3 = torch.randn(n, HKV, D, **bf, requires_grad=True)
    v3 = torch.randn(n, HKV, D, **bf, requires_grad=True)
    with torch.no_grad():
        kc = mod.compression_key(k3.view(n, -1), layout).view(-1, HKV, D)
    kc3 = kc.detach().requires_grad_()
    vc3 = torch.randn(nc, HKV, D, **bf, requires_grad=True)
    do = torch.randn(n, H, D, **bf)
    scale = D ** -0.5
    rows = []
    for branch, variants in (table or SWEEP).items():
        for modname, over in variants:
            tun = mods[modname].TUNING
            saved = dict(tun)
            tun.update(over)
            try:
                r = {"config": cfg_name, "N": n, "branch": branch, "variant": over}
                if branch == "cmp":
                    o, lse = compression_attention_triton(q, kc3, vc3, layout, scale)
                    r["fwd_ms"] = ms(lambda: compression_attention_triton(q, kc3, vc3, layout, scale))
                    r["bwd_ms"] = ms(lambda: torch.autograd.grad(o, (q, kc3, vc3), do, retain_graph=True))
                elif branch == "win":
                    w = layout.window(0)
                    o = window_attention_triton(q, k3, v3, w, scale)
                    r["fwd_ms"] = ms(lambda: window_attention_triton(q, k3, v3, w, scale))
                    r["bwd_ms"] = ms(lambda: torch.autograd.grad(o, (q, k3, v3), do, retain_graph=True))
                elif branch == "slc":
                    _, lse = compression_attention_triton(q.detach(), kc, vc3.detach(), layout, scale)
                    idx, _ = score_topk_triton(q.detach(), kc, lse, layout, cfg.top_k, scale)
                    o = selection_attention_triton(q, k3, v3, idx, layout, scale)
                    r["fwd_ms"] = ms(lambda: selection_attention_triton(q, k3, v3, idx, layout, scale))
                    r["bwd_ms"] = ms(lambda: torch.autograd.grad(o, (q, k3, v3), do, retain_graph=True))
                else:
                    _, lse = compression_attention_triton(q.detach(), kc, vc3.detach(), layout, scale)
                    r["fwd_ms"] = ms(lambda: score_topk_triton(q.detach(), kc, lse, layout, cfg.top_k, scale))
                    r["bwd_ms"] = 0.0
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                r["error"] = repr(exc)[:200]
            finally:
                tun.clear()
                tun.update(saved)
            rows.append(r)
            print(f"sweep {cfg_name} N={n} {branch:5s} {json.dumps(over):60s} fwd {r.get('fwd_ms', float('nan')):7.2f} "
                  f"bwd {r.get('bwd_ms', float('nan')):7.2f} {r.get('error', '')}", flush=True)
    return rows


def save(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def plot(doc: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in doc["rows"] if r.get("mesh") == doc.get("plot_mesh", "bunny")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("fwd", "bwd")):
        fa = sorted({(r["N"], r[f"fa2_{kind}_ms"]) for r in rows})
        ax.plot([x / 1024 for x, _ in fa], [y for _, y in fa], "o-", color="k", label="FlashAttention-2 (SDPA flash)")
        for cfg in CONFIGS:
            pts = sorted((r["N"], r[f"ssa_{kind}_ms"], r[f"speedup_{kind}"]) for r in rows if r["config"] == cfg)
            if not pts:
                continue
            ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], "s-", label=f"SSA {cfg}")
            x, y, s = pts[-1]
            ax.annotate(f"{s:.1f}x", (x / 1024, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (k)")
        ax.set_ylabel("ms")
        ax.set_title(f"{'forward' if kind == 'fwd' else 'backward'}, {doc['device']}, bf16, 32q/2kv heads x 32")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    ap.add_argument("--sizes", default="8192,16384,32768,65536,131072")
    ap.add_argument("--meshes", default="bunny,duck,teddy")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new rows after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test of this script (tiny sizes, interpreter)")
    ap.add_argument("--sweep", default="", help="after the table, time tile variants at this N (e.g. 131072)")
    ap.add_argument("--tune", default="", help="before the table, pick tile variants at this N (v1.0, bunny)")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    device = torch.device("cpu" if SMOKE else "cuda")
    t_start = time.time()
    data = np.load(os.path.join(HERE, "data", "ssa_shells.npz"))
    slug = card_slug()
    doc = {"device": device_name(), "card": slug, "torch": torch.__version__,
           "triton": triton.__version__, "commit": git_commit(), "heads": H, "kv_heads": HKV, "head_dim": D,
           "dtype": "bfloat16", "plot_mesh": "bunny", "rows": []}
    path = os.path.join(args.out, f"ssa-{slug}.json")
    os.makedirs(args.out, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.tune:
        n = int(args.tune)
        key = f"bunny_{n}" if not SMOKE else "bunny_8192"
        c3 = torch.from_numpy(data[key].astype(np.int64)[:n]).to(device)
        doc["tuning"] = tune(torch.cat([torch.zeros_like(c3[:, :1]), c3], 1), device)
        with open(os.path.join(args.out, "ssa_tuning.json"), "w") as f:
            json.dump(doc["tuning"]["choice"], f)
        print("tuning:", json.dumps(doc["tuning"]["choice"]), flush=True)
    from d3s2.ops.ssa.kernels import scoring, selection, varlen_attention, window

    doc["tuning_used"] = {"varlen": dict(varlen_attention.TUNING), "selection": dict(selection.TUNING),
                          "scoring": dict(scoring.TUNING), "window": dict(window.TUNING)}
    meshes = args.meshes.split(",")
    print(f"{'config':9s} {'mesh':6s} {'N':>7s} {'ssa f':>8s} {'fa2 f':>8s} {'x f':>6s} {'ssa b':>8s} {'fa2 b':>8s} "
          f"{'x b':>6s}  branches fwd | bwd (ms)", flush=True)
    for n in sizes:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached, skipping N={n}", flush=True)
            break
        fa = fa2_times(n, device)
        for mesh in meshes if n == max(sizes) or n == 32768 else meshes[:1]:
            key = f"{mesh}_{n}" if not SMOKE else f"{mesh}_8192"
            coords3 = torch.from_numpy(data[key].astype(np.int64)[:n]).to(device)
            coords = torch.cat([torch.zeros_like(coords3[:, :1]), coords3], 1)
            for cfg in args.configs.split(","):
                row = {"config": cfg, "mesh": mesh, **ssa_times(coords, cfg, device), **fa}
                row["speedup_fwd"] = row["fa2_fwd_ms"] / row["ssa_fwd_ms"]
                row["speedup_bwd"] = row["fa2_bwd_ms"] / row["ssa_bwd_ms"]
                doc["rows"].append(row)
                save(path, doc)
                bfw = " ".join(f"{k}={v:.2f}" for k, v in row["branch_fwd_ms"].items())
                bbw = " ".join(f"{k}={v:.2f}" for k, v in row["branch_bwd_ms"].items())
                if "ssa_fwd_graph_ms" in row:
                    print(f"{cfg:9s} {mesh:6s} {n:7d} forward replayed from a CUDA graph: SSA "
                          f"{row['ssa_fwd_graph_ms']:.2f} ms, FA2 {row['fa2_fwd_graph_ms']:.2f} ms", flush=True)
                print(f"{cfg:9s} {mesh:6s} {n:7d} {row['ssa_fwd_ms']:8.2f} {row['fa2_fwd_ms']:8.2f} "
                      f"{row['speedup_fwd']:6.1f} {row['ssa_bwd_ms']:8.2f} {row['fa2_bwd_ms']:8.2f} "
                      f"{row['speedup_bwd']:6.1f}  {bfw} | {bbw}  (blk4 {row['tokens_per_cmp_block']:.1f}, "
                      f"blk8 {row['tokens_per_slc_block']:.1f}, layout {row['layout_ms']:.0f} ms)", flush=True)
        if not SMOKE:
            torch.cuda.empty_cache()
    if args.sweep:
        n = int(args.sweep)
        key = f"bunny_{n}" if not SMOKE else "bunny_8192"
        coords3 = torch.from_numpy(data[key].astype(np.int64)[:n]).to(device)
        coords = torch.cat([torch.zeros_like(coords3[:, :1]), coords3], 1)
        doc["sweep"] = sweep(coords, "v1.0", device) + sweep(coords, "v1.1", device)
        save(path, doc)
    png = os.path.join(args.out, f"ssa-{slug}.png")
    print("plot:", png if plot(doc, png) else "matplotlib not available (plot with bench/ssa.py --plot-only here)")
    print(f"total {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":
        with open(sys.argv[2]) as f:
            d = json.load(f)
        print(plot(d, sys.argv[2][:-5] + ".png"))
        sys.exit(0)
    sys.exit(main())
