"""Plain PyTorch Spatial Sparse Attention with explicit masks: the ground truth for every kernel test (paper Sec. 4.1).

All tensors are in the layout's block-sorted token order: q [N, H, D], k/v [N, Hkv, D], compressed k/v [Nc, Hkv, D].
Query head ``h`` uses KV head ``h // G`` (GQA, G = H / Hkv). Math runs in float32 (or float64 if given float64).
Queries are processed in chunks so that the masks stay ``[chunk, ..., N]`` rather than ``[N, N]``; this is still
O(N^2) work and meant for small inputs and tests.
"""

from __future__ import annotations

import math

import torch

from d3s2.ops.ssa.layout import SSALayout

__all__ = [
    "masked_attention",
    "compression_attention",
    "block_scores",
    "select_topk",
    "selection_attention",
    "window_attention",
    "gated_combine",
    "ssa_reference",
]

_CHUNK = 1024


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_attention(q, k, v, mask_fn, scale: float | None = None):
    """o[t, h] = softmax_j(q[t,h].k[j,h//G] * scale, j allowed by mask) v[j]; returns (o, lse) with lse [N, H] natural log.

    mask_fn(t0, t1) -> bool mask [t1 - t0, Hkv or 1, Nk] of allowed keys for queries t0..t1.
    """
    n, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = _acc_dtype(q)
    kf, vf = k.to(dt), v.to(dt)
    outs, lses = [], []
    for t0 in range(0, n, _CHUNK):
        t1 = min(n, t0 + _CHUNK)
        qf = q[t0:t1].to(dt).view(t1 - t0, hkv, g, d)
        s = torch.einsum("tkgd,nkd->tkgn", qf, kf) * scale
        m = mask_fn(t0, t1)[:, :, None, :]
        s = s.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        o = torch.einsum("tkgn,nkd->tkgd", p, vf)
        outs.append(o.reshape(t1 - t0, h, d))
        lses.append(lse.reshape(t1 - t0, h))
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


def compression_attention(q, k_cmp, v_cmp, layout: SSALayout, scale=None):
    """Each query attends to all compressed tokens of its sample (Eq. 6, first term). Returns (o, lse)."""
    ts = layout.token_sample.long()
    cs = layout.cmp_sample.long()
    return masked_attention(q, k_cmp, v_cmp, lambda a, b: (ts[a:b, None] == cs[None, :])[:, None, :], scale)


def block_scores(q, k_cmp, lse_cmp, layout: SSALayout, scale=None):
    """Selection-block scores (Eq. 8): compression attention probabilities summed over the GQA group's query heads and
    over the compression blocks inside each selection block. Returns [N, Hkv, Ns] float, -inf for blocks of other samples.
    """
    n, h, d = q.shape
    hkv = k_cmp.shape[1]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = _acc_dtype(q)
    ts = layout.token_sample.long()
    cs = layout.cmp_sample.long()
    ss = layout.slc_sample.long()
    ns = layout.num_slc
    out = []
    for t0 in range(0, n, _CHUNK):
        t1 = min(n, t0 + _CHUNK)
        qf = q[t0:t1].to(dt).view(t1 - t0, hkv, g, d)
        s = torch.einsum("tkgd,nkd->tkgn", qf, k_cmp.to(dt)) * scale
        p = torch.exp(s - lse_cmp[t0:t1].to(dt).view(t1 - t0, hkv, g, 1))
        p = p.masked_fill(~(ts[t0:t1, None] == cs[None, :])[:, None, None, :], 0.0)
        pc = p.sum(2)  # [t, hkv, Nc]
        sc = torch.zeros(t1 - t0, hkv, ns, dtype=dt, device=q.device)
        sc.index_add_(2, layout.cmp_slc, pc)
        sc = sc.masked_fill(~(ts[t0:t1, None] == ss[None, :])[:, None, :], float("-inf"))
        out.append(sc)
    return torch.cat(out)


def select_topk(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k selection blocks per (query, KV head), best first; -1 where fewer than top_k blocks exist."""
    k = min(top_k, scores.shape[-1])
    val, idx = torch.topk(scores, k, dim=-1)
    idx = idx.masked_fill(torch.isinf(val), -1)
    if k < top_k:
        pad = idx.new_full((*idx.shape[:-1], top_k - k), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx.to(torch.int32)


def selection_attention(q, k, v, block_idx, layout: SSALayout, scale=None):
    """Each (query, KV head) attends to all tokens of its selected blocks (Algorithm 1). Returns (o, lse)."""
    ns = layout.num_slc
    n = q.shape[0]
    token_slc = torch.repeat_interleave(torch.arange(ns, device=q.device), layout.slc_offsets[1:] - layout.slc_offsets[:-1])
    bi = block_idx.long()

    def mask(a, b):
        sel = torch.zeros(b - a, bi.shape[1], ns + 1, dtype=torch.bool, device=q.device)
        sel.scatter_(2, torch.where(bi[a:b] < 0, ns, bi[a:b]), True)
        return sel[:, :, :ns][:, :, token_slc]

    del n
    return masked_attention(q, k, v, mask, scale)


def window_attention(q, k, v, layout: SSALayout, shift: int = 0, scale=None):
    """Attention inside the m_win^3 windows (optionally shifted by ``shift``); inputs in block-sorted order."""
    w = layout.window(shift)
    seg_w = w.token_seg.long()  # window id of each windowed token
    if w.inverse is not None:
        seg = seg_w[w.inverse]  # window id of each block-sorted token
    else:
        seg = seg_w
    return masked_attention(q, k, v, lambda a, b: (seg[a:b, None] == seg[None, :])[:, None, :], scale)


def gated_combine(branches: list[torch.Tensor], gate_logits: torch.Tensor | None) -> torch.Tensor:
    """Eq. 6: o = sum_b sigmoid(gate_b) * o_b (gate_logits [N, n_branches]; None = plain sum)."""
    out = None
    for i, o in enumerate(branches):
        term = o.float() if gate_logits is None else torch.sigmoid(gate_logits[:, i].float())[:, None, None] * o.float()
        out = term if out is None else out + term
    return out.to(branches[0].dtype)


def ssa_reference(q, k, v, k_cmp, v_cmp, gate_logits, layout: SSALayout, *, top_k: int, branches=("cmp", "slc", "win"),
                  window_shift: int = 0, scale=None, return_parts: bool = False):
    """Whole SSA (Eq. 6) on block-sorted q/k/v; gate_logits [N, len(branches)] in branch order or None."""
    parts = {}
    if "cmp" in branches or "slc" in branches:
        o_cmp, lse_cmp = compression_attention(q, k_cmp, v_cmp, layout, scale)
        parts["cmp"] = o_cmp
        if "slc" in branches:
            idx = select_topk(block_scores(q, k_cmp, lse_cmp, layout, scale), top_k)
            parts["slc"] = selection_attention(q, k, v, idx, layout, scale)[0]
            parts["idx"] = idx
    if "win" in branches:
        parts["win"] = window_attention(q, k, v, layout, window_shift, scale)[0]
    out = gated_combine([parts[b] for b in branches], gate_logits)
    return (out, parts) if return_parts else out
