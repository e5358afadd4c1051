"""Spatial blockwise selection attention (paper Algorithm 1) with a deterministic backward.

Forward and dQ: one program per (query token, KV head) holds the GQA group's ``G`` query heads as the rows of its tile
(``[G_PAD, D]``, Algorithm 1 step 1) and streams the tokens of its top-k selection blocks, whose start offsets ``C``
come from the layout (tokens are sorted by block, so each block is one contiguous run). ``TUNING["fwd_tokens"] > 1``
groups that many neighbouring tokens per program and streams the union of their blocks once
(:func:`selection_fwd_grouped_kernel`); it is off by default: on random inputs (bench/NOTES.md, run 4) the union is
too large and it was 1.7x slower than the one-token kernel.

dK/dV: one program per (selection block, KV head) walks an inverted index -- the (query) list that selected this
block for this KV head, built with a stable sort, so every sum has one fixed order and there are no atomics on dK/dV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d3s2.ops.ssa.kernels.tiles import (
    dkdv_tile,
    dq_tile,
    finish_softmax,
    group_rows,
    load_grad_rows,
    load_kv,
    softmax_tile,
)
from d3s2.ops.ssa.kernels.varlen_attention import LOG2E, _prec, bwd_delta, tile_config
from d3s2.ops.ssa.layout import SSALayout

__all__ = ["SelectionAttention", "selection_attention_triton", "invert_block_index"]


@triton.jit
def selection_fwd_kernel(
    Q, K, V, IDX, SLC_OFF, O, LSE,
    H, HKV, sq_n, sq_h, sk_n, sk_h, so_n, so_h,
    scale_log2,
    TOPK: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    hh = tl.arange(0, G_PAD)
    row_ok = hh < G
    head = kvh * G + hh
    d = tl.arange(0, D)
    q = tl.load(Q + t * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    ibase = (t * HKV + kvh) * TOPK
    for j in range(TOPK):
        b = tl.load(IDX + ibase + j)
        bs = tl.load(SLC_OFF + tl.maximum(b, 0)).to(tl.int32)
        be = tl.load(SLC_OFF + tl.maximum(b, 0) + 1).to(tl.int32)
        be = tl.where(b >= 0, be, bs)
        for n0 in range(bs, be, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < be
            k, v = load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d)
            m_i, l_i, acc = softmax_tile(q, k, v, cmask[None, :], m_i, l_i, acc, scale_log2, PREC)
    o, lse = finish_softmax(acc, m_i, l_i)
    tl.store(O + t * so_n + head[:, None] * so_h + d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + t * H + head, lse, mask=row_ok)


@triton.jit
def selection_fwd_grouped_kernel(
    Q, K, V, IDX, SLC_OFF, O, LSE,
    n_q, H, HKV, sq_n, sq_h, sk_n, sk_h, so_n, so_h,
    scale_log2,
    TOPK: tl.constexpr, E_PAD: tl.constexpr, T: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """Forward of ``T`` consecutive query tokens x the group's heads per program (``T * G_PAD`` tile rows).

    Neighbouring tokens (same 8^3 block in the layout order) mostly select the same blocks, so the program streams
    the *union* of its tokens' selections once, each block's K/V tile loaded once for all ``T`` tokens; a row only
    sees the blocks its own token selected (the other rows are masked to -inf for that block). Same keys per row as
    :func:`selection_fwd_kernel`, visited in another order (online softmax: equal up to rounding)."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    M: tl.constexpr = T * G_PAD
    K_PAD: tl.constexpr = E_PAD // T
    tok, head, row_ok = group_rows(pid, kvh, n_q, T, G, G_PAD)
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok64[:, None] * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    # each row's own selection list [M, K_PAD] (the rows of one token read the same list; cached loads)
    jj = tl.arange(0, K_PAD)
    row_idx = tl.load(IDX + (tok64[:, None] * HKV + kvh) * TOPK + jj[None, :],
                      mask=(tok < n_q)[:, None] & (jj[None, :] < TOPK), other=-1)
    # the union: entry e = (token e // K_PAD, slot e % K_PAD) is visited if no earlier entry names its block
    e = tl.arange(0, E_PAD)
    e_tok = pid * T + e // K_PAD
    e_slot = e % K_PAD
    e_ok = (e_tok < n_q) & (e_slot < TOPK)
    e_blk = tl.load(IDX + (e_tok.to(tl.int64) * HKV + kvh) * TOPK + e_slot, mask=e_ok, other=-1)
    dup = (e_blk[:, None] == e_blk[None, :]) & (e[None, :] < e[:, None])
    first = (tl.sum(dup.to(tl.int32), axis=1) == 0) & (e_blk >= 0)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for i in range(E_PAD):
        pick = e == i
        b = tl.sum(tl.where(pick, e_blk, 0), axis=0)
        visit = tl.sum(tl.where(pick, first.to(tl.int32), 0), axis=0) > 0
        bs = tl.load(SLC_OFF + tl.maximum(b, 0)).to(tl.int32)
        be = tl.load(SLC_OFF + tl.maximum(b, 0) + 1).to(tl.int32)
        be = tl.where(visit, be, bs)
        mine = tl.sum((row_idx == b).to(tl.int32), axis=1) > 0  # rows whose token selected b
        for n0 in range(bs, be, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < be
            k, v = load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d)
            m_i, l_i, acc = softmax_tile(q, k, v, mine[:, None] & cmask[None, :], m_i, l_i, acc, scale_log2, PREC)
    o, lse = finish_softmax(acc, m_i, l_i)
    tl.store(O + tok64[:, None] * so_n + head[:, None] * so_h + d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + tok64 * H + head, lse, mask=row_ok)


@triton.jit
def selection_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, SLC_OFF, DQ,
    H, HKV, sq_n, sq_h, sk_n, sk_h, sdo_n, sdo_h,
    scale, scale_log2,
    TOPK: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    hh = tl.arange(0, G_PAD)
    row_ok = hh < G
    head = kvh * G + hh
    d = tl.arange(0, D)
    q = tl.load(Q + t * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + t * sdo_n + head[:, None] * sdo_h + d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + t * H + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + t * H + head, mask=row_ok, other=0.0)
    dq = tl.zeros([G_PAD, D], tl.float32)
    ibase = (t * HKV + kvh) * TOPK
    for j in range(TOPK):
        b = tl.load(IDX + ibase + j)
        bs = tl.load(SLC_OFF + tl.maximum(b, 0)).to(tl.int32)
        be = tl.load(SLC_OFF + tl.maximum(b, 0) + 1).to(tl.int32)
        be = tl.where(b >= 0, be, bs)
        for n0 in range(bs, be, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < be
            k, v = load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d)
            dq = dq_tile(q, do, k, v, cmask[None, :] & row_ok[:, None], lse2, delta, dq, scale_log2, PREC)
    dq = dq * scale
    tl.store(DQ + t * sq_n + head[:, None] * sq_h + d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def selection_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, SLC_OFF, LIST_OFF, LIST_TOK, ORDER, DK, DV,
    H, NS, sq_n, sq_h, sk_n, sk_h, sdo_n, sdo_h, sdk_s, sdk_n, sdk_h,
    scale, scale_log2, SPLIT,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    # programs take (KV head, block) items longest query list first, so the long lists do not form the tail
    item = tl.load(ORDER + tl.program_id(0))
    kvh = item // NS
    blk = item - kvh * NS
    M: tl.constexpr = BLOCK_T * G_PAD
    bs = tl.load(SLC_OFF + blk).to(tl.int32)
    be = tl.load(SLC_OFF + blk + 1).to(tl.int32)
    ls = tl.load(LIST_OFF + kvh * NS + blk).to(tl.int32)
    le = tl.load(LIST_OFF + kvh * NS + blk + 1).to(tl.int32)
    # popular blocks have long query lists: split each list over program_id(1) (fp32 partials, fixed-order sum)
    split = tl.program_id(1)
    span = tl.cdiv(tl.cdiv(le - ls, SPLIT), BLOCK_T) * BLOCK_T
    ls = ls + split * span
    le = tl.minimum(le, ls + span)
    d = tl.arange(0, D)
    r = tl.arange(0, M)
    hh = r % G_PAD
    head = kvh * G + hh
    for n0 in range(bs, be, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < be
        cols64 = cols.to(tl.int64)
        k, v = load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for l0 in range(ls, le, BLOCK_T):
            li = l0 + r // G_PAD
            lok = li < le
            row_ok = lok & (hh < G)
            tok = tl.load(LIST_TOK + li, mask=lok, other=0).to(tl.int64)
            q, do, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, tok, head, row_ok, sq_n, sq_h, sdo_n, sdo_h, H, d)
            dk, dv, _ = dkdv_tile(q, do, k, v, row_ok[:, None] & cmask[None, :], lse2, delta, dk, dv, scale_log2,
                                  PREC)
        dk = dk * scale
        out = split.to(tl.int64) * sdk_s + cols64[:, None] * sdk_n + kvh * sdk_h + d[None, :]
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=cmask[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cmask[:, None])


def invert_block_index(block_idx: torch.Tensor, num_slc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted selection index: for (KV head h, block b), the query tokens that selected b are
    ``list_tok[list_off[h * Ns + b] : list_off[h * Ns + b + 1]]``, in increasing token order (stable sort), so the
    dK/dV sums have one fixed order. Built with sort + searchsorted (no host synchronisation)."""
    n, hkv, topk = block_idx.shape
    b = block_idx.long()
    head = torch.arange(hkv, device=b.device).view(1, hkv, 1)
    key = torch.where(b >= 0, head * num_slc + b, hkv * num_slc).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    list_tok = torch.div(order, hkv * topk, rounding_mode="floor").to(torch.int32)
    list_off = torch.searchsorted(sorted_key, torch.arange(hkv * num_slc + 1, device=b.device))
    return list_off, list_tok


# Tile sizes, the fastest of the bench/ssa.py sweeps on an H100 (bench/NOTES.md, runs 6-9): the forward and dQ
# programs hold one token's 16 query heads (16 rows), so one warp and short key tiles keep more of them resident.
TUNING = {"fwd_tokens": 1, "fwd_block_n": 16, "fwd_warps": 1, "fwd_stages": 2, "dq_block_n": 16, "dq_warps": 1,
          "kv_rows": 128, "kv_block_n": 64, "kv_warps": 4, "max_split": 8, "split_budget_bytes": 512 << 20,
          "num_stages": 3}


def _list_split(k: torch.Tensor) -> int:
    """How many ways to split each block's query list: up to max_split, within a budget for the fp32 partials."""
    per_split = 2 * k.numel() * 4
    return max(1, min(TUNING["max_split"], TUNING["split_budget_bytes"] // max(per_split, 1)))


class SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, layout: SSALayout, scale: float):
        q, k, v, block_idx = q.contiguous(), k.contiguous(), v.contiguous(), block_idx.contiguous()
        n, h, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        g_pad = max(16, triton.next_power_of_2(g))
        o = torch.empty_like(q)
        lse = torch.empty(n, h, dtype=torch.float32, device=q.device)
        topk = block_idx.shape[-1]
        t = TUNING["fwd_tokens"]
        if t <= 1:
            selection_fwd_kernel[(n, hkv)](
                q, k, v, block_idx, layout.slc_offsets, o, lse, h, hkv, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), o.stride(0), o.stride(1), scale * LOG2E, TOPK=topk, G=g, G_PAD=g_pad,
                BLOCK_N=TUNING["fwd_block_n"], D=d, PREC=_prec(q), num_warps=TUNING["fwd_warps"],
                num_stages=TUNING["fwd_stages"],
            )
        else:
            t = triton.next_power_of_2(t)
            selection_fwd_grouped_kernel[(triton.cdiv(n, t), hkv)](
                q, k, v, block_idx, layout.slc_offsets, o, lse, n, h, hkv, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), o.stride(0), o.stride(1), scale * LOG2E, TOPK=topk,
                E_PAD=t * triton.next_power_of_2(topk), T=t, G=g, G_PAD=g_pad, BLOCK_N=TUNING["fwd_block_n"], D=d,
                PREC=_prec(q), num_warps=TUNING["fwd_warps"], num_stages=TUNING["fwd_stages"],
            )
        ctx.save_for_backward(q, k, v, block_idx, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, block_idx, o, lse = ctx.saved_tensors
        lay, scale = ctx.layout, ctx.scale
        do = do.contiguous()
        n, h, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        topk = block_idx.shape[-1]
        delta = bwd_delta(o, do)
        dq = torch.empty_like(q)
        g_pad = max(16, triton.next_power_of_2(g))
        selection_bwd_dq_kernel[(n, hkv)](
            q, k, v, do, lse, delta, block_idx, lay.slc_offsets, dq, h, hkv, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), do.stride(0), do.stride(1), scale, scale * LOG2E, TOPK=topk, G=g, G_PAD=g_pad,
            BLOCK_N=TUNING["dq_block_n"], D=d, PREC=_prec(q), num_warps=TUNING["dq_warps"],
            num_stages=TUNING["num_stages"],
        )
        list_off, list_tok = invert_block_index(block_idx, lay.num_slc)
        split = _list_split(k)
        if split == 1:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            sdk = (0, dk.stride(0), dk.stride(1))
        else:
            dk = torch.empty(split, *k.shape, dtype=torch.float32, device=k.device)
            dv = torch.empty_like(dk)
            sdk = (dk.stride(0), dk.stride(1), dk.stride(2))
        g_pad2, block_t = tile_config(g, TUNING["kv_rows"])
        lens = list_off[1:] - list_off[:-1]
        order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
        selection_bwd_dkdv_kernel[(lay.num_slc * hkv, split)](
            q, k, v, do, lse, delta, lay.slc_offsets, list_off, list_tok, order, dk, dv, h, lay.num_slc, q.stride(0),
            q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1), *sdk, scale, scale * LOG2E, split,
            G=g, G_PAD=g_pad2, BLOCK_T=block_t, BLOCK_N=TUNING["kv_block_n"], D=d, PREC=_prec(q),
            num_warps=TUNING["kv_warps"], num_stages=TUNING["num_stages"],
        )
        if split > 1:
            dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        return dq, dk, dv, None, None, None


def selection_attention_triton(q, k, v, block_idx, layout: SSALayout, scale: float):
    """Selection attention over block-sorted q/k/v with block_idx [N, Hkv, top_k] (-1 = none)."""
    return SelectionAttention.apply(q, k, v, block_idx, layout, scale)
