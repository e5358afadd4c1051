"""GPU correctness check of the SSA Triton kernels at realistic sizes (bf16 kernels vs the fp32 PyTorch reference).

Runs on the device machine (no mesh packages there: token layouts come from bench/data/ssa_shells.npz):

    PYTHONPATH=src python3 bench/ssa_check.py --out $OUT

Every check prints ``name rel_err limit PASS/FAIL``; errors are ||a - b|| / ||b|| against the reference computed in
fp32 from the same (bf16-rounded) inputs. The selection check feeds the kernel's own top-k to the reference; the top-k
check compares the score mass of the kernel's choice with the reference's best choice. Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from d3s2.ops.ssa import build_ssa_layout, spatial_sparse_attention
from d3s2.ops.ssa import reference as ref
from d3s2.ops.ssa.kernels.compression import compression_attention_triton
from d3s2.ops.ssa.kernels.gates import gated_combine_triton
from d3s2.ops.ssa.kernels.scoring import score_topk_triton
from d3s2.ops.ssa.kernels.selection import selection_attention_triton
from d3s2.ops.ssa.kernels.window import window_attention_triton

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS: list[dict] = []


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name: str, err: float, limit: float) -> bool:
    ok = math.isfinite(err) and err <= limit
    RESULTS.append({"check": name, "rel_err": err, "limit": limit, "pass": ok})
    print(f"{name:58s} {err:.3e}  (<= {limit:.0e})  {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def load_coords(key: str, device) -> torch.Tensor:
    data = np.load(os.path.join(HERE, "data", "ssa_shells.npz"))
    return torch.from_numpy(data[key].astype(np.int64)).to(device)


def ragged_coords(device, n_each: int) -> torch.Tensor:
    """Two real shells (bunny, teddy) of n_each tokens + a one-token sample: a ragged batch of 3."""
    a = load_coords("bunny_8192", device)[:n_each]
    b = load_coords("teddy_8192", device)[:n_each]
    one = torch.tensor([[2, 5, 5, 5]], device=device)
    return torch.cat([torch.cat([torch.zeros_like(a[:, :1]), a], 1), torch.cat([torch.ones_like(b[:, :1]), b], 1), one])


def ref_grads(q, k, v, do, mask_fn, scale):
    """Reference gradients of masked attention, chunk by chunk (autograd per chunk keeps memory bounded)."""
    kl = k.detach().float().requires_grad_()
    vl = v.detach().float().requires_grad_()
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    step = 512
    for t0 in range(0, q.shape[0], step):
        t1 = min(q.shape[0], t0 + step)
        qc = q[t0:t1].detach().float().requires_grad_()
        o, _ = ref.masked_attention(qc, kl, vl, lambda a, b: mask_fn(t0 + a, t0 + b), scale)
        o.backward(do[t0:t1].float())
        dq[t0:t1] = qc.grad
    return dq, kl.grad, vl.grad


def branch_masks(layout, idx=None, shift=0):
    ts, cs = layout.token_sample.long(), layout.cmp_sample.long()
    masks = {"cmp": lambda a, b: (ts[a:b, None] == cs[None, :])[:, None, :]}
    if idx is not None:
        ns = layout.num_slc
        token_slc = torch.repeat_interleave(torch.arange(ns, device=idx.device),
                                            layout.slc_offsets[1:] - layout.slc_offsets[:-1])
        bi = idx.long()

        def slc(a, b):
            sel = torch.zeros(b - a, bi.shape[1], ns + 1, dtype=torch.bool, device=idx.device)
            sel.scatter_(2, torch.where(bi[a:b] < 0, ns, bi[a:b]), True)
            return sel[:, :, :ns][:, :, token_slc]

        masks["slc"] = slc
    w = layout.window(shift)
    seg = w.token_seg.long() if w.inverse is None else w.token_seg.long()[w.inverse]
    masks["win"] = lambda a, b: (seg[a:b, None] == seg[None, :])[:, None, :]
    return masks


def run_branch_checks(tag, coords, h, hkv, d, m_cmp, top_k, dtype, device, lim=1e-2):
    ok = True
    torch.manual_seed(0)
    layout = build_ssa_layout(coords, m_cmp=m_cmp, m_slc=8, m_win=8)
    n, nc = layout.num_tokens, layout.num_cmp
    scale = d ** -0.5
    q = torch.randn(n, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype, requires_grad=True)
    # compressed keys as mean-pooled keys plus noise: realistic, peaked block scores
    kc = (ref_mean(k.detach(), layout) + 0.3 * torch.randn(nc, hkv, d, device=device)).to(dtype).requires_grad_()
    vc = torch.randn(nc, hkv, d, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(n, h, d, device=device, dtype=dtype)
    pre = f"{tag} N={n} H={h}/{hkv} D={d} m_cmp={m_cmp} k={top_k} {str(dtype)[6:]}"
    masks = branch_masks(layout)

    # compression
    o, lse = compression_attention_triton(q, kc, vc, layout, scale)
    with torch.no_grad():
        ro, rlse = ref.masked_attention(q.float(), kc.float(), vc.float(), masks["cmp"], scale)
    ok &= check(f"{pre} cmp fwd o", rel(o, ro), lim)
    ok &= check(f"{pre} cmp fwd lse", rel(lse, rlse), lim)
    g = torch.autograd.grad(o, (q, kc, vc), do)
    rg = ref_grads(q, kc, vc, do, masks["cmp"], scale)
    for nm, a, b in zip(("dq", "dk", "dv"), g, rg):
        ok &= check(f"{pre} cmp bwd {nm}", rel(a, b), lim)

    # scoring + top-k (scores from the kernel's own LSE, as in the op)
    idx, sc = score_topk_triton(q.detach(), kc.detach(), lse, layout, top_k, scale)
    with torch.no_grad():
        rs = ref.block_scores(q.float(), kc.float(), lse, layout, scale)  # [N, Hkv, Ns]
        best = torch.topk(rs, min(top_k, rs.shape[-1]), dim=-1).values
        best = torch.where(torch.isinf(best), torch.zeros_like(best), best).sum(-1)
        chosen = torch.gather(rs, 2, idx.long().clamp_min(0))
        chosen = torch.where((idx < 0) | torch.isinf(chosen), torch.zeros_like(chosen), chosen).sum(-1)
        deficit = ((best - chosen) / best.clamp_min(1e-30))
        n_valid = (idx >= 0).sum(-1)
        n_expect = torch.minimum(torch.full_like(n_valid, top_k),
                                 (layout.token_slc_hi - layout.token_slc_lo).long()[:, None].expand_as(n_valid))
        uniq = all(len(set(r.tolist()) - {-1}) == int((r >= 0).sum()) for r in idx.view(-1, top_k)[:2000].cpu())
    ok &= check(f"{pre} topk score-mass deficit (mean)", float(deficit.mean()), lim)
    ok &= check(f"{pre} topk score-mass deficit (p99.9)", float(deficit.flatten().float().quantile(0.999)), 5e-2)
    ok &= check(f"{pre} topk kernel score vs ref (sum)", rel(torch.where(idx >= 0, sc, 0).sum(-1), chosen), lim)
    ok &= check(f"{pre} topk count = min(k, blocks) & unique", 0.0 if bool((n_valid == n_expect).all()) and uniq else 1.0,
                0.0)

    # selection with the kernel's indices
    masks = branch_masks(layout, idx)
    o = selection_attention_triton(q, k, v, idx, layout, scale)
    with torch.no_grad():
        ro, _ = ref.masked_attention(q.float(), k.float(), v.float(), masks["slc"], scale)
    ok &= check(f"{pre} slc fwd o", rel(o, ro), lim)
    g = torch.autograd.grad(o, (q, k, v), do)
    rg = ref_grads(q, k, v, do, masks["slc"], scale)
    for nm, a, b in zip(("dq", "dk", "dv"), g, rg):
        ok &= check(f"{pre} slc bwd {nm}", rel(a, b), lim)
    g2 = torch.autograd.grad(selection_attention_triton(q, k, v, idx, layout, scale), (q, k, v), do)
    ok &= check(f"{pre} slc bwd deterministic (bitwise)",
                0.0 if all(torch.equal(a, b) for a, b in zip(g, g2)) else 1.0, 0.0)

    # windows, shift 0 and m/2
    for shift in (0, 4):
        w = layout.window(shift)
        masks = branch_masks(layout, shift=shift)
        if w.perm is None:
            o = window_attention_triton(q, k, v, w, scale)
        else:
            p = w.perm
            o = window_attention_triton(q[p], k[p], v[p], w, scale)[w.inverse]
        with torch.no_grad():
            ro, _ = ref.masked_attention(q.float(), k.float(), v.float(), masks["win"], scale)
        ok &= check(f"{pre} win{shift} fwd o", rel(o, ro), lim)
        g = torch.autograd.grad(o, (q, k, v), do)
        rg = ref_grads(q, k, v, do, masks["win"], scale)
        for nm, a, b in zip(("dq", "dk", "dv"), g, rg):
            ok &= check(f"{pre} win{shift} bwd {nm}", rel(a, b), lim)

    # gates
    br = [torch.randn(n, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    gl = torch.randn(n, 3, device=device, dtype=dtype, requires_grad=True)
    o = gated_combine_triton(br, gl)
    brf = [b.detach().float().requires_grad_() for b in br]
    glf = gl.detach().float().requires_grad_()
    ro = ref.gated_combine(brf, glf)
    ok &= check(f"{pre} gates fwd", rel(o, ro), lim)
    g = torch.autograd.grad(o, (*br, gl), do)
    rg = torch.autograd.grad(ro, (*brf, glf), do.float())
    for i, (a, b) in enumerate(zip(g, rg)):
        ok &= check(f"{pre} gates bwd {i}", rel(a, b), lim)
    return ok


def ref_mean(x, layout):
    from d3s2.ops.ssa import mean_pool_blocks

    return mean_pool_blocks(x.float(), layout)


def run_full_op_check(device, n_each=1024):
    """Whole op (fp32 kernels, exact products) vs reference, forward and every gradient."""
    ok = True
    torch.manual_seed(1)
    coords = ragged_coords(device, n_each)
    layout = build_ssa_layout(coords[torch.randperm(coords.shape[0], device=device)], m_cmp=4, m_slc=8, m_win=8)
    n, h, hkv, d = layout.num_tokens, 32, 2, 32
    ins = [torch.randn(n, h, d, device=device), torch.randn(n, hkv, d, device=device), torch.randn(n, hkv, d, device=device),
           torch.randn(layout.num_cmp, hkv, d, device=device), torch.randn(layout.num_cmp, hkv, d, device=device),
           torch.randn(n, 3, device=device)]
    ins = [t.requires_grad_() for t in ins]
    do = torch.randn(n, h, d, device=device)
    outs = {}
    for be in ("triton", "reference"):
        o = spatial_sparse_attention(ins[0], ins[1], ins[2], layout, k_cmp=ins[3], v_cmp=ins[4], gate_logits=ins[5],
                                     top_k=8, window_shift=4, backend=be)
        outs[be] = (o, torch.autograd.grad(o, ins, do))
    ok &= check(f"full op fp32 N={n} fwd", rel(outs["triton"][0], outs["reference"][0]), 1e-4)
    for nm, a, b in zip(("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgate"), outs["triton"][1], outs["reference"][1]):
        ok &= check(f"full op fp32 N={n} bwd {nm}", rel(a, b), 1e-4)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--n-each", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: smoke test under TRITON_INTERPRET=1 with a tiny --n-each")
    ap.add_argument("--tuning", default="", help="JSON of kernel tile overrides (written by bench/ssa.py --tune)")
    args = ap.parse_args()
    if args.tuning and os.path.exists(args.tuning):
        from d3s2.ops.ssa.kernels import scoring, selection, varlen_attention

        mods = {"varlen": varlen_attention, "selection": selection, "scoring": scoring}
        with open(args.tuning) as f:
            for modname, over in json.load(f).items():
                mods[modname].TUNING.update(over)
        print("tuning:", open(args.tuning).read(), flush=True)
    device = torch.device(args.device)
    t0 = time.time()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} triton {__import__('triton').__version__} {name}", flush=True)
    ok = True
    coords = ragged_coords(device, args.n_each)
    ok &= run_branch_checks("v1.0", coords, 32, 2, 32, 4, 8, torch.bfloat16, device)
    ok &= run_branch_checks("v1.1", coords, 32, 2, 32, 8, 8, torch.bfloat16, device)
    ok &= run_branch_checks("v1.0-k32", coords, 32, 2, 32, 4, 32, torch.bfloat16, device)
    ok &= run_branch_checks("d64", ragged_coords(device, args.n_each // 2), 16, 1, 64, 4, 8, torch.float16, device)
    ok &= run_full_op_check(device, min(1024, args.n_each))
    print(f"checks: {sum(r['pass'] for r in RESULTS)}/{len(RESULTS)} passed in {time.time() - t0:.0f}s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ssa_check.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "results": RESULTS}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
