"""Tile pieces shared by the SSA kernels (``@triton.jit`` helpers, inlined by Triton into each kernel).

* :func:`group_rows`: the ``[T tokens x G_PAD query heads]`` rows of a GQA tile (one KV head's query group);
* :func:`load_kv`: one ``[BLOCK_N, D]`` key tile and value tile of a KV head;
* :func:`softmax_tile` / :func:`finish_softmax`: one key tile of the online-softmax forward (FlashAttention-2, in
  base 2) and its normalisation into output and log-sum-exp (natural log);
* :func:`load_grad_rows`: a query tile's q, dO, base-2 log-sum-exp and delta = rowsum(dO * O) for the backward;
* :func:`dq_tile` / :func:`dkdv_tile`: one (query tile, key tile) pair of the dQ / the dK-dV backward, probabilities
  recomputed from the saved log-sum-exp.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_rows(pid, kvh, n_q, T: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr):
    """(token int32 [M], query head [M], real row [M]) of program ``pid``'s ``M = T * G_PAD`` tile rows."""
    r = tl.arange(0, T * G_PAD)
    tok = pid * T + r // G_PAD
    hh = r % G_PAD
    return tok, kvh * G + hh, (tok < n_q) & (hh < G)


@triton.jit
def load_kv(K, V, cols, cmask, kvh, sk_n, sk_h, d):
    """Key and value rows ``cols`` of KV head ``kvh`` (zeros where ``cmask`` is off); int64 offsets."""
    off = cols.to(tl.int64)[:, None] * sk_n + kvh * sk_h + d[None, :]
    k = tl.load(K + off, mask=cmask[:, None], other=0.0)
    v = tl.load(V + off, mask=cmask[:, None], other=0.0)
    return k, v


@triton.jit
def softmax_tile(q, k, v, valid, m_i, l_i, acc, scale_log2, PREC: tl.constexpr):
    """Fold one key tile into the running (max, sum, output) of each row; ``valid`` [M, BLOCK_N] masks keys per row.
    Rows with no valid key so far keep a finite exponent (max -inf is replaced by 0 for the subtraction)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """(output [M, D] fp32, natural log-sum-exp [M]); rows that saw no key give 0 and -inf."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    return o, lse


@triton.jit
def dq_tile(q, do, k, v, valid, lse2, delta, dq, scale_log2, PREC: tl.constexpr):
    """Add one key tile's ``dS @ K`` to ``dq`` (unscaled); ``lse2`` is the forward's log-sum-exp in base 2."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def load_grad_rows(Q, DO, LSE, DELTA, tok64, head, row_ok, sq_n, sq_h, sdo_n, sdo_h, H, d):
    """(q [M, D], dO [M, D], log-sum-exp in base 2 [M], delta [M]) of the rows (token ``tok64``, query ``head``)."""
    q = tl.load(Q + tok64[:, None] * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + tok64[:, None] * sdo_n + head[:, None] * sdo_h + d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + tok64 * H + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + tok64 * H + head, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def dkdv_tile(q, do, k, v, valid, lse2, delta, dk, dv, scale_log2, PREC: tl.constexpr):
    """Add one query tile's ``dS^T @ Q`` and ``P^T @ dO`` to the key tile's (unscaled) dK, dV; also returns dS in the
    input dtype (the fused backward turns it into dQ). (Computing the transposed scores K Q^T instead, as the
    FlashAttention-2 backward does, measured 3-17% slower here: bench/NOTES.md, run 8.)"""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    return dk, dv, ds
