"""Spatial Sparse Attention in plain PyTorch without any ``N x N`` tensor: the CPU backend ("blocked").

Computes the same function as :mod:`d3s2.ops.ssa.reference` (paper Sec. 4.1, Eq. 6-8, Algorithm 1) -- same branches,
scaling, Eq. 8 block scores, ``torch.topk`` selection per (query, KV head) shared by the GQA group, gates -- but in the
gather formulation of the Triton kernels, so the work is O(N * (Nc_sample + top_k * block + window)) instead of O(N^2):

* compression: the queries of each sample attend to that sample's compressed tokens (``[chunk, H, Nc_b]``); the same
  probabilities, detached, give the block scores of Eq. 8 and the top-k (never ``[N, Ns]`` over the whole batch);
* selection: the (query, KV head, chosen block) triples are grouped by (block, KV head) into tiles of ``tile`` queries;
  each tile is one small GEMM of its queries' GQA heads against that block's keys (padded to the longest block of its
  chunk; tiles are sorted by block length so padding stays small). Each tile gives a per-block output and log-sum-exp;
  a query's blocks are then merged exactly (softmax over the union of its blocks = LSE-weighted sum of the per-block
  softmaxes);
* window: windows sorted by size and padded per chunk, one batched GEMM per chunk.

Every step is an ordinary differentiable op (index_select, bmm, logsumexp, exp), so autograd gives the backward; no
custom Function. Math runs in float32 (float64 if given float64) like the reference. Peak memory is bounded by
``chunk_elems`` (elements of one logits tensor per chunk) and ``query_chunk`` (queries per selection pass).
"""

from __future__ import annotations

import contextlib
import math

import torch

from d3s2.ops.ssa import reference as ref
from d3s2.ops.ssa.layout import SSALayout

__all__ = ["compression_and_topk", "selection_attention", "window_attention", "ssa_blocked"]

CHUNK_ELEMS = 1 << 20  # elements of one logits tensor per chunk (4 MiB in fp32: stays in cache across passes)
QUERY_CHUNK = 8192  # queries per selection pass (bounds the per-block partial outputs)
TILE = 32  # (query, KV head) pairs per selection tile
_MASKED = -1e30  # logit bias of padding keys
_EXP_FLOOR = -80.0  # exp(x) for x >= -80 stays a normal fp32 number


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _greedy_chunks(lengths: list[int], cost, budget: int) -> list[tuple[int, int]]:
    """Split items sorted by ascending length into [start, end) chunks whose padded size ``cost(count, longest)``
    stays within budget (at least one item per chunk)."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        end = min(n, start + max(1, budget // max(1, cost(1, lengths[start]))))
        while end - start > 1 and cost(end - start, lengths[end - 1]) > budget:
            end = start + max(1, budget // max(1, cost(1, lengths[end - 1])))
        out.append((start, end))
        start = end
    return out


def _host(layout: SSALayout, name: str) -> list[int]:
    """Offsets read to the host once per layout (chunk boundaries are Python ints)."""
    key = ("blocked_host", name)
    if key not in layout._cache:
        layout._cache[key] = getattr(layout, name).tolist()
    return layout._cache[key]


def _key_bias(valid: torch.Tensor, dt) -> torch.Tensor:
    """0 for real keys, _MASKED for padding, [batch, 1, L] (added by baddbmm; every row keeps >= 1 real key).
    Finite: GEMMs with -inf in the accumulator take a slow path on x86."""
    return torch.zeros(valid.shape, dtype=dt, device=valid.device).masked_fill_(~valid, _MASKED)[:, None, :]


def _exp_rows(s: torch.Tensor):
    """(u, l, m) with u = exp(s - m), l = sum(u), m the detached row max: softmax = u / l, log-sum-exp = m + log(l).

    ``m`` is detached because neither u / l nor m + log(l) depends on it (its gradient is exactly zero); amax + exp is
    several times cheaper on a CPU than softmax / logsumexp / max-with-indices. ``s - m`` is clamped at -80 before the
    exp: below about -87 the fp32 exp underflows into denormals and runs ~50x slower on x86, and the clamp changes a
    weight of < e^-80 relative to the row maximum's 1 (far below fp32 rounding; padding keys get e^-80 ~ 1.8e-35
    instead of 0 and no gradient)."""
    m = s.detach().amax(dim=-1, keepdim=True)
    if torch.is_grad_enabled() and s.requires_grad:
        u = torch.exp((s - m).clamp_min_(_EXP_FLOOR))
    else:  # inference: reuse the logits buffer
        u = s.sub_(m).clamp_min_(_EXP_FLOOR).exp_()
    return u, u.sum(dim=-1, keepdim=True), m


def compression_and_topk(qs, k_cmp, v_cmp, layout: SSALayout, top_k: int | None, need_output: bool = True,
                         chunk_elems: int = CHUNK_ELEMS):
    """Compression attention (Eq. 6, first term) per sample and, if ``top_k``, the Eq. 8 block scores and top-k.

    qs [N, H, D] already multiplied by the softmax scale, k_cmp/v_cmp [Nc, Hkv, D] (block-sorted, the accumulation
    dtype). Returns (o [N, H, D] or None, idx [N, Hkv, top_k] int32 or None): idx lists the chosen selection blocks
    best first, -1 where the sample has fewer than top_k blocks -- the reference's ``select_topk(block_scores(...))``,
    computed on the sample's own blocks only.
    """
    n, h, d = qs.shape
    hkv = k_cmp.shape[1]
    g = h // hkv
    tok_off, cmp_off, slc_off = (_host(layout, a) for a in
                                 ("sample_token_offsets", "sample_cmp_offsets", "sample_slc_offsets"))
    outs, idxs = [], []
    for b in range(len(tok_off) - 1):
        t0, t1 = tok_off[b], tok_off[b + 1]
        if t1 == t0:
            continue
        c0, c1 = cmp_off[b], cmp_off[b + 1]
        s0, s1 = slc_off[b], slc_off[b + 1]
        nc, ns = c1 - c0, s1 - s0
        kb = k_cmp[c0:c1].permute(1, 2, 0)  # [Hkv, D, nc]
        vb = v_cmp[c0:c1].transpose(0, 1)  # [Hkv, nc, D]
        cmp_slc = layout.cmp_slc[c0:c1] - s0
        step = max(1, chunk_elems // max(1, h * nc))
        for a in range(t0, t1, step):
            e = min(t1, a + step)
            qc = qs[a:e].view(e - a, hkv, g, d).transpose(0, 1).reshape(hkv, (e - a) * g, d)
            u, l, _ = _exp_rows(torch.bmm(qc, kb))  # [Hkv, t*G, nc]
            if need_output:
                o = torch.bmm(u, vb) / l
                outs.append(o.view(hkv, e - a, g, d).transpose(0, 1).reshape(e - a, h, d))
            if top_k is not None:
                with torch.no_grad():
                    # Eq. 8: probabilities summed over the GQA group's heads, then over the compression blocks of
                    # each selection block (rows: compression blocks, so index_add adds contiguous rows)
                    rows = hkv * (e - a)
                    pc = torch.bmm(l.reciprocal().view(rows, 1, g), u.view(rows, g, nc))  # sum_g u / l: one read
                    pc = pc.view(rows, nc).t().contiguous()
                    sc = pc.new_zeros(ns, rows).index_add_(0, cmp_slc, pc)
                    kk = min(top_k, ns)
                    idx = torch.topk(sc.t().contiguous(), kk, dim=-1).indices.view(hkv, e - a, kk)
                    idx = idx.transpose(0, 1) + s0  # [t, Hkv, kk], best first
                    if kk < top_k:
                        idx = torch.cat([idx, idx.new_full((e - a, hkv, top_k - kk), -1)], dim=-1)
                    idxs.append(idx.to(torch.int32))
    o = torch.cat(outs) if need_output else None
    idx = torch.cat(idxs) if top_k is not None else None
    return o, idx


def selection_attention(qs, k, v, block_idx, layout: SSALayout, *, tile: int = TILE, chunk_elems: int = CHUNK_ELEMS,
                        query_chunk: int = QUERY_CHUNK):
    """Each (query, KV head) attends to all tokens of its selected blocks (Algorithm 1). qs [N, H, D] pre-scaled,
    k/v [N, Hkv, D], block_idx [N, Hkv, K] int, -1 = none. Returns [N, H, D] (zeros for a query with no block)."""
    n, h, d = qs.shape
    hkv = k.shape[1]
    g = h // hkv
    topk = block_idx.shape[-1]
    slc_off = layout.slc_offsets
    blk_len = slc_off[1:] - slc_off[:-1]
    # rows of (token, KV head): a query row holds its G heads, a key row one head's vector
    qf = qs.reshape(n * hkv, g * d)
    kf = k.reshape(n * hkv, d)
    vf = v.reshape(n * hkv, d)
    outs = []
    for a in range(0, n, query_chunk):
        e = min(n, a + query_chunk)
        outs.append(_selection_chunk(qf, kf, vf, block_idx[a:e].long(), a, blk_len, slc_off, hkv, g, d, topk, tile,
                                     chunk_elems))
    return torch.cat(outs)


def _selection_chunk(qf, kf, vf, bi, t_base, blk_len, slc_off, hkv, g, d, topk, tile, chunk_elems):
    dev, dt = qf.device, qf.dtype
    ns = blk_len.numel()
    nt = bi.shape[0]
    head = torch.arange(hkv, device=dev).view(1, hkv, 1)
    slot_ids = torch.nonzero((bi >= 0).reshape(-1)).squeeze(1)  # flat (token, head, slot) ids of the chosen blocks
    group = (head * ns + bi.clamp_min(0)).reshape(-1).index_select(0, slot_ids)  # (KV head, block) of each pair
    order = torch.sort(group, stable=True).indices
    pair_slot = slot_ids.index_select(0, order)
    pair_group = group.index_select(0, order)
    counts = torch.bincount(pair_group, minlength=hkv * ns)
    pos = torch.arange(pair_group.numel(), device=dev) - (torch.cumsum(counts, 0) - counts).index_select(0, pair_group)
    tiles_per_group = (counts + tile - 1) // tile
    t_start = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    pair_tile = t_start.index_select(0, pair_group) + torch.div(pos, tile, rounding_mode="floor")
    n_tiles = int(tiles_per_group.sum())
    # tile -> (KV head, block) and its query rows (padding rows point at row 0: computed, then dropped)
    tile_group = torch.repeat_interleave(torch.arange(hkv * ns, device=dev), tiles_per_group)
    tile_head = torch.div(tile_group, ns, rounding_mode="floor")
    tile_blk = tile_group - tile_head * ns
    pair_tok = torch.div(pair_slot, hkv * topk, rounding_mode="floor") + t_base
    tile_rows = torch.zeros(n_tiles * tile, dtype=torch.long, device=dev)
    tile_rows[pair_tile * tile + pos % tile] = pair_tok * hkv + tile_head.index_select(0, pair_tile)
    # tiles sorted by block length, so that each chunk pads its keys to a similar length
    tile_len = blk_len.index_select(0, tile_blk)
    len_sorted, tile_order = torch.sort(tile_len, stable=True)
    rank = torch.empty_like(tile_order)
    rank[tile_order] = torch.arange(n_tiles, device=dev)
    lens = len_sorted.tolist()
    lse_parts, o_parts = [], []
    for c0, c1 in _greedy_chunks(lens, lambda cnt, ln: cnt * tile * g * ln, chunk_elems):
        tid = tile_order[c0:c1]
        lpad = lens[c1 - 1]
        qt = qf.index_select(0, tile_rows.view(n_tiles, tile).index_select(0, tid).reshape(-1))
        qt = qt.view(c1 - c0, tile * g, d)
        kpos = torch.arange(lpad, device=dev)
        kvalid = kpos[None, :] < len_sorted[c0:c1, None]  # [tiles, lpad]
        ktok = slc_off.index_select(0, tile_blk.index_select(0, tid))[:, None] + kpos[None, :]
        krow = (torch.where(kvalid, ktok, 0) * hkv + tile_head.index_select(0, tid)[:, None]).reshape(-1)
        kt = kf.index_select(0, krow).view(c1 - c0, lpad, d)
        vt = vf.index_select(0, krow).view(c1 - c0, lpad, d)
        s = torch.baddbmm(_key_bias(kvalid, dt), qt, kt.transpose(1, 2))  # [tiles, tile*G, lpad]
        u, l, m = _exp_rows(s)
        lse_parts.append((m + torch.log(l)).view(-1, g))
        o_parts.append((torch.bmm(u, vt) / l).view(-1, g * d))  # softmax over this block only
    # the softmax over the union of a query's blocks = the per-block softmaxes weighted by exp(lse_j - lse_total)
    n_rows = n_tiles * tile
    rows = rank.index_select(0, pair_tile) * tile + pos % tile  # result row of each pair
    lse_all = torch.cat(lse_parts)
    lse_s = torch.full((nt * hkv * topk, g), float("-inf"), dtype=dt, device=dev)
    lse_s = lse_s.index_put((pair_slot,), lse_all.index_select(0, rows)).view(nt, hkv, topk, g)
    total = torch.logsumexp(lse_s, dim=2, keepdim=True)  # [nt, Hkv, 1, G]
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))  # rows without blocks: unused, no NaN
    w = torch.exp(lse_s - total).view(-1, g)
    # weight of each result row (0 for padding rows), then one row-wise index_add per chunk into (token, KV head)
    w_rows = torch.zeros(n_rows, g, dtype=dt, device=dev).index_put((rows,), w.index_select(0, pair_slot))
    dest = torch.zeros(n_rows, dtype=torch.long, device=dev).index_put((rows,), pair_tok - t_base)
    out = torch.zeros(nt * hkv, g, d, dtype=dt, device=dev)
    r0 = 0
    for o in o_parts:
        r1 = r0 + o.shape[0]
        contrib = o.view(-1, g, d) * w_rows[r0:r1, :, None]
        dst = dest[r0:r1] * hkv + tile_head.index_select(0, tile_order[r0 // tile:r1 // tile]).repeat_interleave(tile)
        out = out.index_add(0, dst, contrib)
        r0 = r1
    return out.view(nt, hkv * g, d)


def window_attention(qs, k, v, layout: SSALayout, shift: int, *, chunk_elems: int = CHUNK_ELEMS):
    """Attention inside the m_win^3 windows (shifted by ``shift``) of block-sorted tensors; qs pre-scaled.
    Returns [N, H, D]."""
    n, h, d = qs.shape
    hkv = k.shape[1]
    g = h // hkv
    dev, dt = qs.device, qs.dtype
    w = layout.window(shift)
    key = ("blocked_windows", shift)
    if key not in layout._cache:
        sizes = w.offsets[1:] - w.offsets[:-1]
        len_sorted, order = torch.sort(sizes, stable=True)
        layout._cache[key] = (order, len_sorted, len_sorted.tolist())
    order, len_sorted, lens = layout._cache[key]
    qf = qs.reshape(n * hkv, g * d)
    kf = k.reshape(n * hkv, d)
    vf = v.reshape(n * hkv, d)
    heads = torch.arange(hkv, device=dev)
    rows_out, ids_out = [], []
    for c0, c1 in _greedy_chunks(lens, lambda cnt, ln: cnt * h * ln * ln, chunk_elems):
        nw, lpad = c1 - c0, lens[c1 - 1]
        kpos = torch.arange(lpad, device=dev)
        valid = kpos[None, :] < len_sorted[c0:c1, None]  # [nw, lpad]
        pos = torch.where(valid, w.offsets.index_select(0, order[c0:c1])[:, None] + kpos[None, :], 0)
        tok = pos if w.perm is None else w.perm.index_select(0, pos.reshape(-1)).view_as(pos)
        # rows (window, KV head, position): gathered straight into the batched-GEMM layout
        rid = (tok[:, None, :] * hkv + heads[None, :, None]).reshape(-1)
        qw = qf.index_select(0, rid).view(nw * hkv, lpad * g, d)
        kw = kf.index_select(0, rid).view(nw * hkv, lpad, d)
        vw = vf.index_select(0, rid).view(nw * hkv, lpad, d)
        bias = _key_bias(valid, dt).repeat_interleave(hkv, dim=0)
        u, l, _ = _exp_rows(torch.baddbmm(bias, qw, kw.transpose(1, 2)))
        o = (torch.bmm(u, vw) / l).view(nw * hkv * lpad, g * d)
        keep = torch.nonzero(valid[:, None, :].expand(nw, hkv, lpad).reshape(-1)).squeeze(1)
        rows_out.append(o.index_select(0, keep))
        ids_out.append(rid.index_select(0, keep))
    rows = torch.cat(rows_out)
    ids = torch.cat(ids_out)
    inv = torch.empty_like(ids)
    inv[ids] = torch.arange(ids.numel(), device=dev)
    return rows.index_select(0, inv).view(n, h, d)


def ssa_blocked(q, k, v, k_cmp, v_cmp, gate_logits, layout: SSALayout, *, top_k: int,
                branches=("cmp", "slc", "win"), window_shift: int = 0, scale=None, return_parts: bool = False,
                chunk_elems: int = CHUNK_ELEMS, tile: int = TILE, query_chunk: int = QUERY_CHUNK):
    """Whole SSA (Eq. 6) on block-sorted q/k/v, the same contract as :func:`reference.ssa_reference`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dt = _acc_dtype(q)
    qs = q.to(dt) * scale  # the scale folded into q once instead of into every logits tensor
    kf, vf = k.to(dt), v.to(dt)
    parts = {}
    if "cmp" in branches or "slc" in branches:
        ctx = contextlib.nullcontext() if "cmp" in branches else torch.no_grad()  # else cmp only feeds the top-k
        with ctx:
            o_cmp, idx = compression_and_topk(qs, k_cmp.to(dt), v_cmp.to(dt), layout,
                                              top_k if "slc" in branches else None, chunk_elems=chunk_elems)
        parts["cmp"] = o_cmp.to(q.dtype)
        if "slc" in branches:
            parts["slc"] = selection_attention(qs, kf, vf, idx, layout, tile=tile, chunk_elems=chunk_elems,
                                               query_chunk=query_chunk).to(q.dtype)
            parts["idx"] = idx
    if "win" in branches:
        parts["win"] = window_attention(qs, kf, vf, layout, window_shift, chunk_elems=chunk_elems).to(q.dtype)
    out = ref.gated_combine([parts[b] for b in branches], gate_logits)
    return (out, parts) if return_parts else out
