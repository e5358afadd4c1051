"""Fused selection-block scoring and top-k (paper Eq. 8; the paper names top-k as its forward bottleneck, Sec. 8).

For a tile of ``BLOCK_T`` queries x the GQA group's ``G`` query heads (one KV head), the kernel recomputes the
compression-attention probabilities ``p = exp(q.k_cmp * scale - lse)`` from q, the compressed keys and the LSE of the
compression forward, sums them over the group's heads and over the compression blocks inside each selection block, and
keeps a running top-k of selection blocks in registers. Nothing of size [heads, N, N_cmp] (or [N, N_slc]) is ever
written to memory.

The compression blocks of selection block ``s`` are ``slc_cmp_start[s] + r`` for ``r < slc_cmp_count[s]`` (contiguous
by the layout's sub-block order). The kernel loops over the slot ``r`` and adds the probabilities per (row, selection
block), visiting a sample's selection blocks by decreasing count (``layout.slc_scan_order``) so that the slots of a
chunk are mostly occupied; with one compression block per selection block (v1.1) there is no slot loop. The group's
head sums come once per chunk, as a reshape-sum or (``head_dot``) a 0/1 dot on the tensor cores. (A one-hot dot that
adds a tile of compression blocks to their selection blocks was slower than the slot loop: bench/NOTES.md, run 9.)

Candidates are packed into int64 keys ``(float_bits(score) << 32) | block`` (scores are >= 0, so the float bit pattern
orders like the value; keys are unique), so a max reduction carries the block index with the score. Each chunk is
merged into the running top-k by rounds of max/min reductions, as many as the chunk has candidates at or above a row's
running k-th best (at most ``K_PAD``; most chunks have none once the top-k has settled, and then cost one compare).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d3s2.ops.ssa.kernels.tiles import group_rows
from d3s2.ops.ssa.kernels.varlen_attention import LOG2E, _prec, tile_config
from d3s2.ops.ssa.layout import SSALayout

__all__ = ["score_topk_triton"]


@triton.jit
def score_topk_kernel(
    Q, KC, LSE, SLC_LO, SLC_HI, SLC_ORDER, SLC_CMP_START, SLC_CMP_COUNT, IDX, SCORE,
    n_q, H, HKV, sq_n, sq_h, sk_n, sk_h,
    scale_log2,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_S: tl.constexpr, NONE: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
    HEAD_DOT: tl.constexpr, ONE_TO_ONE: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    tok, head, row_ok = group_rows(pid, kvh, n_q, BLOCK_T, G, G_PAD)
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok64[:, None] * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + tok64 * H + head, mask=row_ok, other=0.0) * 1.4426950408889634
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n_q
    lo = tl.load(SLC_LO + t, mask=t_ok, other=2147483647)
    hi = tl.load(SLC_HI + t, mask=t_ok, other=0)
    start = tl.min(lo, axis=0)
    end = tl.max(hi, axis=0)
    kk = tl.arange(0, K_PAD)
    # running top-k (unordered); empty slots hold distinct negative sentinels so that "the minimum" is one slot
    top = tl.zeros([BLOCK_T, K_PAD], tl.int64) - 1 - kk[None, :].to(tl.int64)
    # score of each row's k-th best so far (-1 while the top-k has empty slots): only blocks scoring >= it can enter
    thr = tl.full([BLOCK_T], -1.0, tl.float32)
    if HEAD_DOT:
        # sums a token's G head rows with one small dot on the tensor cores instead of a [T, G_PAD, S] reshape-sum
        sel = ((tl.arange(0, BLOCK_T)[:, None] == (tl.arange(0, BLOCK_T * G_PAD)[None, :] // G_PAD))
               .to(tl.float32))
    for s0 in range(start, end, BLOCK_S):
        sb = s0 + tl.arange(0, BLOCK_S)
        smask = sb < end
        if ONE_TO_ONE:
            # one compression block per selection block (v1.1: m_cmp = m_slc), same index
            blk = sb
            kc = tl.load(KC + sb.to(tl.int64)[:, None] * sk_n + kvh * sk_h + d[None, :], mask=smask[:, None],
                         other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision=PREC) * scale_log2
            pa = tl.where(row_ok[:, None] & smask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        else:
            # the sample's selection blocks are scanned by decreasing compression-block count (the layout's
            # slc_scan_order), so the slot loop below, which runs to the fullest block of the chunk, wastes few slots
            # (on mesh shells an 8^3 block holds ~4.5 of its 8 4^3 sub-blocks)
            blk = tl.load(SLC_ORDER + sb, mask=smask, other=0)
            cstart = tl.load(SLC_CMP_START + blk, mask=smask, other=0)
            ccount = tl.load(SLC_CMP_COUNT + blk, mask=smask, other=0)
            pa = tl.zeros([BLOCK_T * G_PAD, BLOCK_S], tl.float32)
            # slot r holds each selection block's r-th compression block; the head sum comes once per chunk
            for slot in range(0, tl.max(ccount, axis=0)):
                cvalid = slot < ccount
                cidx = (cstart + slot).to(tl.int64)
                kc = tl.load(KC + cidx[:, None] * sk_n + kvh * sk_h + d[None, :], mask=cvalid[:, None], other=0.0)
                s = tl.dot(q, tl.trans(kc), input_precision=PREC) * scale_log2
                pa += tl.where(row_ok[:, None] & cvalid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        if HEAD_DOT:
            acc = tl.dot(sel, pa, input_precision=PREC)
        else:
            acc = tl.sum(tl.reshape(pa, (BLOCK_T, G_PAD, BLOCK_S)), axis=1)
        valid = (sb[None, :] >= lo[:, None]) & (sb[None, :] < hi[:, None])
        cand = valid & (acc >= thr[:, None])
        # merge: rounds of "best candidate replaces the worst kept one if better" (max/min reductions only;
        # tl.sort is avoided: it is slow under the interpreter and not needed for a k of 8..32). The tile needs
        # min(K_PAD, most candidates of any row) rounds: K_PAD for the first chunk, mostly none once the top-k
        # settles, and then the chunk costs one compare and two reductions.
        rounds = tl.minimum(tl.max(tl.sum(cand.to(tl.int32), axis=1), axis=0), K_PAD)
        if rounds > 0:
            bits = acc.to(tl.int32, bitcast=True).to(tl.int64)
            key = tl.where(cand, (bits << 32) | blk[None, :].to(tl.int64), NONE)
            for _i in range(0, rounds):
                c = tl.max(key, axis=1)
                tmin = tl.min(top, axis=1)
                take = c > tmin
                top = tl.where((top == tmin[:, None]) & take[:, None], c[:, None], top)
                key = tl.where(key == c[:, None], NONE, key)
            tmin = tl.min(top, axis=1)
            thr = tl.where(tmin >= 0, (tmin >> 32).to(tl.int32).to(tl.float32, bitcast=True), -1.0)
    # order best first
    res = tl.zeros([BLOCK_T, K_PAD], tl.int64) - 1
    for i in tl.static_range(K_PAD):
        mx = tl.max(top, axis=1)
        res = tl.where(kk[None, :] == i, mx[:, None], res)
        top = tl.where(top == mx[:, None], NONE, top)
    top = res
    idx = tl.where(top >= 0, (top & 0xFFFFFFFF).to(tl.int32), -1)
    score = tl.where(top >= 0, (top >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("-inf"))
    out = (t.to(tl.int64)[:, None] * HKV + kvh) * TOPK + kk[None, :]
    omask = t_ok[:, None] & (kk[None, :] < TOPK)
    tl.store(IDX + out, idx, mask=omask)
    tl.store(SCORE + out, score, mask=omask)


# Tile choices (bench/ssa.py sweeps on an H100, bench/NOTES.md runs 6-10). rows: query rows (tokens x padded group
# heads) per tile; block_s: selection blocks per chunk; head_dot: head sums as a tensor-core dot (needs >= 16 tokens
# per tile, so rows is raised to 16 * G_PAD when on). Keys ending in _1 apply when a selection block holds one
# compression block (v1.1).
TUNING = {"rows": 128, "block_s": 32, "num_warps": 4, "head_dot": False, "num_stages": 3, "block_s_1": 64,
          "head_dot_1": True}


def score_topk_triton(q, k_cmp, lse, layout: SSALayout, top_k: int, scale: float):
    """Top-k selection blocks per (query, KV head): (idx [N, Hkv, top_k] int32 best first, -1 = none;
    score [N, Hkv, top_k] float32). Not differentiable (the selection is a discrete choice)."""
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    n, h, d = q.shape
    hkv = k_cmp.shape[1]
    g = h // hkv
    one = layout.cmp_per_slc == 1
    head_dot = bool(TUNING["head_dot_1" if one else "head_dot"])
    g_pad, block_t = tile_config(g, TUNING["rows"])
    if head_dot and block_t < 16:
        g_pad, block_t = tile_config(g, 16 * g_pad)
    k_pad = triton.next_power_of_2(top_k)
    block_s = max(TUNING["block_s_1" if one else "block_s"], k_pad)
    idx = torch.empty(n, hkv, top_k, dtype=torch.int32, device=q.device)
    score = torch.empty(n, hkv, top_k, dtype=torch.float32, device=q.device)
    score_topk_kernel[(triton.cdiv(n, block_t), hkv)](
        q, k_cmp, lse, layout.token_slc_lo, layout.token_slc_hi, layout.slc_scan_order, layout.slc_cmp_start,
        layout.slc_cmp_count, idx, score, n, h, hkv, q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1),
        scale * LOG2E, TOPK=top_k, K_PAD=k_pad, NONE=-(2**62), BLOCK_S=block_s, G=g, G_PAD=g_pad, BLOCK_T=block_t, D=d, PREC=_prec(q),
        HEAD_DOT=head_dot, ONE_TO_ONE=one, num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    return idx, score
