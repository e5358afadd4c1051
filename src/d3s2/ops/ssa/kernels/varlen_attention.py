"""Segment (varlen) attention with GQA-grouped tiles: forward (+LSE) and deterministic backward (Triton).

Shared by the compression branch (queries attend to the compressed tokens of their sample) and the sparse 3D window
branch (queries attend to the tokens of their window), paper Sec. 4.1 / Eq. 6. Query row ``t`` attends to key rows
``[kv_lo[t], kv_hi[t])``; key row ``j`` is attended by query rows ``[q_lo[j], q_hi[j])`` (the same relation seen from
the key side, used by the dK/dV kernel, which loops over queries and needs no atomics).

Tiles are ``[BLOCK_T tokens x G_PAD query heads]`` flattened into ``M = BLOCK_T * G_PAD`` rows against one KV head's
``[BLOCK_N, D]`` key tile: a GQA group's query heads share each K/V load. A tile may straddle two segments; per-row
range masks keep that exact and loop over the union of the rows' ranges.
"""

from __future__ import annotations

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

LOG2E = 1.4426950408889634


@triton.jit
def varlen_fwd_kernel(
    Q, K, V, O, LSE, KV_LO, KV_HI,
    n_q, H, sq_n, sq_h, sk_n, sk_h, so_n, so_h,
    scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    M: tl.constexpr = BLOCK_T * G_PAD
    tok, head, row_ok = group_rows(pid, kvh, n_q, BLOCK_T, G, G_PAD)
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok64[:, None] * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    lo = tl.load(KV_LO + tok, mask=tok < n_q, other=2147483647)
    hi = tl.load(KV_HI + tok, mask=tok < n_q, other=0)
    start = tl.min(lo, axis=0)
    end = tl.max(hi, axis=0)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k, v = load_kv(K, V, cols, cols < end, kvh, sk_n, sk_h, d)
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        m_i, l_i, acc = softmax_tile(q, k, v, valid, m_i, l_i, acc, scale_log2, PREC)
    o, lse = finish_softmax(acc, m_i, l_i)
    tl.store(O + tok64[:, None] * so_n + head[:, None] * so_h + d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + tok64 * H + head, lse, mask=row_ok)


@triton.jit
def varlen_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LO, KV_HI,
    n_q, H, sq_n, sq_h, sk_n, sk_h, sdo_n, sdo_h,
    scale, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    M: tl.constexpr = BLOCK_T * G_PAD
    tok, head, row_ok = group_rows(pid, kvh, n_q, BLOCK_T, G, G_PAD)
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, D)
    q, do, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, tok64, head, row_ok, sq_n, sq_h, sdo_n, sdo_h, H, d)
    lo = tl.load(KV_LO + tok, mask=tok < n_q, other=2147483647)
    hi = tl.load(KV_HI + tok, mask=tok < n_q, other=0)
    start = tl.min(lo, axis=0)
    end = tl.max(hi, axis=0)
    dq = tl.zeros([M, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k, v = load_kv(K, V, cols, cols < end, kvh, sk_n, sk_h, d)
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & row_ok[:, None]
        dq = dq_tile(q, do, k, v, valid, lse2, delta, dq, scale_log2, PREC)
    dq = dq * scale
    tl.store(DQ + tok64[:, None] * sq_n + head[:, None] * sq_h + d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def varlen_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_LO, KV_HI, Q_LO, Q_HI,
    n_q, n_k, H, sq_n, sq_h, sk_n, sk_h, sdo_n, sdo_h, sdk_s, sdk_n, sdk_h,
    scale, scale_log2, SPLIT,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr, SKIP_RANGES: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    M: tl.constexpr = BLOCK_T * G_PAD
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_k
    cols64 = cols.to(tl.int64)
    d = tl.arange(0, D)
    k, v = load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d)
    qlo = tl.load(Q_LO + cols, mask=cmask, other=2147483647)
    qhi = tl.load(Q_HI + cols, mask=cmask, other=0)
    start = tl.min(qlo, axis=0)
    end = tl.max(qhi, axis=0)
    # all keys of the tile in one segment (one sample's compression blocks, one window): every query of the range
    # attends every key, so the per-row range loads and compares are skipped (the relation is symmetric)
    one_seg = (tl.max(tl.where(cmask, qlo, start), axis=0) == start) & (tl.min(tl.where(cmask, qhi, end), axis=0)
                                                                       == end) & SKIP_RANGES
    # split the query range over program_id(2): partial dK/dV go to their own slice, summed later in a fixed order
    split = tl.program_id(2)
    span = tl.cdiv(tl.cdiv(tl.maximum(end - start, 0), SPLIT), BLOCK_T) * BLOCK_T
    start = start + split * span
    end = tl.minimum(end, start + span)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    r = tl.arange(0, M)
    hh = r % G_PAD
    head = kvh * G + hh
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + r // G_PAD
        row_ok = (tok < end) & (hh < G)
        tok64 = tok.to(tl.int64)
        q, do, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, tok64, head, row_ok, sq_n, sq_h, sdo_n, sdo_h, H, d)
        if one_seg:
            valid = row_ok[:, None] & cmask[None, :]
        else:
            lo = tl.load(KV_LO + tok, mask=tok < end, other=2147483647)
            hi = tl.load(KV_HI + tok, mask=tok < end, other=0)
            valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & row_ok[:, None] & cmask[None, :]
        dk, dv, _ = dkdv_tile(q, do, k, v, valid, lse2, delta, dk, dv, scale_log2, PREC)
    dk = dk * scale
    out = split.to(tl.int64) * sdk_s + cols64[:, None] * sdk_n + kvh * sdk_h + d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=cmask[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cmask[:, None])


@triton.jit
def varlen_bwd_fused_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQACC, KV_LO, KV_HI, Q_LO, Q_HI,
    n_q, n_k, H, sq_n, sq_h, sk_n, sk_h, sdo_n, sdo_h, sdk_s, sdk_n, sdk_h,
    scale, scale_log2, SPLIT,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    """FA2-style backward: one pass computes dK/dV for a key tile and adds dQ contributions with fp32 atomics into
    DQACC ([n_q, H, D], zeroed). 5 matmuls per tile pair instead of 7; dQ is then NOT bitwise deterministic."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    M: tl.constexpr = BLOCK_T * G_PAD
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_k
    cols64 = cols.to(tl.int64)
    d = tl.arange(0, D)
    k, v = load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d)
    qlo = tl.load(Q_LO + cols, mask=cmask, other=2147483647)
    qhi = tl.load(Q_HI + cols, mask=cmask, other=0)
    start = tl.min(qlo, axis=0)
    end = tl.max(qhi, axis=0)
    split = tl.program_id(2)
    span = tl.cdiv(tl.cdiv(tl.maximum(end - start, 0), SPLIT), BLOCK_T) * BLOCK_T
    start = start + split * span
    end = tl.minimum(end, start + span)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    r = tl.arange(0, M)
    hh = r % G_PAD
    head = kvh * G + hh
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + r // G_PAD
        row_ok = (tok < end) & (hh < G)
        tok64 = tok.to(tl.int64)
        q, do, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, tok64, head, row_ok, sq_n, sq_h, sdo_n, sdo_h, H, d)
        lo = tl.load(KV_LO + tok, mask=tok < end, other=2147483647)
        hi = tl.load(KV_HI + tok, mask=tok < end, other=0)
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & row_ok[:, None] & cmask[None, :]
        dk, dv, dsl = dkdv_tile(q, do, k, v, valid, lse2, delta, dk, dv, scale_log2, PREC)
        dq = tl.dot(dsl, k, input_precision=PREC) * scale
        tl.atomic_add(DQACC + (tok64[:, None] * H + head[:, None]) * D + d[None, :], dq, mask=row_ok[:, None])
    dk = dk * scale
    out = split.to(tl.int64) * sdk_s + cols64[:, None] * sdk_n + kvh * sdk_h + d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=cmask[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cmask[:, None])


@triton.jit
def bwd_delta_kernel(O, DO, DELTA, n_rows, D: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) over rows of contiguous [n_rows, D] views (the FlashAttention-2 backward's
    preprocessing): one read of each operand, fp32 products."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    ok = r < n_rows
    off = r[:, None] * D + d[None, :]
    o = tl.load(O + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, axis=1), mask=ok)


# ----------------------------------------------------------------------------------------------------------------------
# launchers

import torch  # noqa: E402


# Tile sizes: the winners of the `bench/ssa.py` sweeps at 131072 tokens on an H100 (bench/NOTES.md, runs 3 and 6-10).
# Plain data, never read from the environment.
TUNING = {"fwd_rows": 128, "fwd_block_n": 64, "fwd_warps": 4, "dq_rows": 128, "dq_warps": 8, "kv_rows": 128,
          "kv_block_n": 64, "kv_warps": 4, "dq_block_n": 64, "max_split": 32, "programs_per_sm": 16,
          # True: one fused backward pass with fp32 atomic dQ (5 matmuls instead of 7, dQ not bitwise reproducible)
          "dq_atomic": False, "num_stages": 3,
          # dK/dV: key tiles inside one segment skip the per-query range masks
          "skip_ranges": True}


def tile_config(group: int, rows: int = 128) -> tuple[int, int]:
    """(G_PAD, BLOCK_T): query heads padded to a power of two, tokens per tile so that a tile has ``rows`` rows
    (at least 16, the smallest tl.dot)."""
    g_pad = triton.next_power_of_2(group)
    block_t = max(1, max(rows, 16) // g_pad)
    return g_pad, block_t


def _prec(x: torch.Tensor) -> str:
    """fp32 inputs (interpreter tests, fp32 checks) get exact products; half types use the tensor cores."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def bwd_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) in fp32, shape o.shape[:-1] (replaces ``(do.float() * o.float()).sum(-1)``, whose fp32
    temporaries cost ~1 ms per branch at 128k tokens)."""
    o, do = o.contiguous(), do.contiguous()
    d = o.shape[-1]
    n_rows = o.numel() // d
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    if n_rows == 0:
        return delta
    block = max(16, 4096 // d)
    bwd_delta_kernel[(triton.cdiv(n_rows, block),)](o, do, delta, n_rows, D=d, BLOCK=block, num_warps=4)
    return delta


def varlen_fwd(q, k, v, kv_lo, kv_hi, scale: float, tuning: dict | None = None):
    """(o, lse) of segment attention; ``tuning`` overrides entries of :data:`TUNING` (the window branch has its own)."""
    tun = TUNING if not tuning else {**TUNING, **tuning}
    n_q, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    g_pad, block_t = tile_config(g, tun["fwd_rows"])
    block_n, num_warps = tun["fwd_block_n"], tun["fwd_warps"]
    o = torch.empty_like(q)
    lse = torch.empty(n_q, h, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n_q, block_t), hkv)
    varlen_fwd_kernel[grid](
        q, k, v, o, lse, kv_lo, kv_hi, n_q, h, q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0),
        o.stride(1), scale * LOG2E, G=g, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_N=block_n, D=d, PREC=_prec(q),
        num_warps=num_warps, num_stages=tun["num_stages"],
    )
    return o, lse


def varlen_bwd(q, k, v, o, lse, do, kv_lo, kv_hi, q_lo, q_hi, scale: float, tuning: dict | None = None):
    """(dq, dk, dv): dQ per query tile, dK/dV per key tile (query loop split when key tiles are few), no atomics."""
    tun = TUNING if not tuning else {**TUNING, **tuning}
    n_q, h, d = q.shape
    n_k, hkv = k.shape[0], k.shape[1]
    g = h // hkv
    do = do.contiguous()
    delta = bwd_delta(o, do)
    if tun["dq_atomic"]:
        return _varlen_bwd_fused(q, k, v, do, lse, delta, kv_lo, kv_hi, q_lo, q_hi, scale, tun)
    dq = torch.empty_like(q)
    g_pad, block_t = tile_config(g, tun["dq_rows"])
    varlen_bwd_dq_kernel[(triton.cdiv(n_q, block_t), hkv)](
        q, k, v, do, lse, delta, dq, kv_lo, kv_hi, n_q, h, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        do.stride(0), do.stride(1), scale, scale * LOG2E, G=g, G_PAD=g_pad, BLOCK_T=block_t,
        BLOCK_N=tun["dq_block_n"], D=d, PREC=_prec(q), num_warps=tun["dq_warps"],
        num_stages=tun["num_stages"],
    )
    g_pad, block_t = tile_config(g, tun["kv_rows"])
    block_n = tun["kv_block_n"]
    n_prog = triton.cdiv(n_k, block_n) * hkv
    split = max(1, min(tun["max_split"], triton.cdiv(tun["programs_per_sm"] * num_sms(q.device), n_prog)))
    if split == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:  # few key tiles (compression tokens): split the query loop, fp32 partials, deterministic sum below
        dk = torch.empty(split, *k.shape, dtype=torch.float32, device=k.device)
        dv = torch.empty_like(dk)
    sdk = (dk.stride(0), dk.stride(1), dk.stride(2)) if split > 1 else (0, dk.stride(0), dk.stride(1))
    varlen_bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), hkv, split)](
        q, k, v, do, lse, delta, dk, dv, kv_lo, kv_hi, q_lo, q_hi, n_q, n_k, h, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), do.stride(0), do.stride(1), *sdk, scale, scale * LOG2E, split, G=g, G_PAD=g_pad,
        BLOCK_T=block_t, BLOCK_N=block_n, D=d, PREC=_prec(q), SKIP_RANGES=bool(tun["skip_ranges"]),
        num_warps=tun["kv_warps"], num_stages=tun["num_stages"],
    )
    if split > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dq, dk, dv


def _varlen_bwd_fused(q, k, v, do, lse, delta, kv_lo, kv_hi, q_lo, q_hi, scale, tun):
    n_q, h, d = q.shape
    n_k, hkv = k.shape[0], k.shape[1]
    g_pad, block_t = tile_config(h // hkv, tun["kv_rows"])
    block_n = tun["kv_block_n"]
    n_prog = triton.cdiv(n_k, block_n) * hkv
    split = max(1, min(tun["max_split"], triton.cdiv(tun["programs_per_sm"] * num_sms(q.device), n_prog)))
    dqacc = torch.zeros(n_q, h, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(split, *k.shape, dtype=torch.float32, device=k.device)
    dv = torch.empty_like(dk)
    varlen_bwd_fused_kernel[(triton.cdiv(n_k, block_n), hkv, split)](
        q, k, v, do, lse, delta, dk, dv, dqacc, kv_lo, kv_hi, q_lo, q_hi, n_q, n_k, h, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dk.stride(2), scale,
        scale * LOG2E, split, G=h // hkv, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_N=block_n, D=d, PREC=_prec(q),
        num_warps=tun["kv_warps"],
    )
    return dqacc.to(q.dtype), dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessor count (4 on CPU, so that interpreter tests exercise the split paths)."""
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]
