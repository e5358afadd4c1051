"""Tile pieces shared by the SSA kernels (``@triton.jit`` helpers, inlined by Triton into each kernel).

* :func:`group_rows`: the ``[T tokens x G_PAD query heads]`` rows of a GQA tile (one KV head's query group);
* :func:`load_kv`: one ``[BLOCK_N, D]`` key tile and value tile of a KV head;
* :func:`softmax_tile` / :func:`finish_softmax`: one key tile of the online-softmax forward (FlashAttention-2, in
  base 2) and its normalisation into output and log-sum-exp (natural log);
* :func:`dq_tile`: one key tile of the dQ backward, probabilities recomputed from the saved log-sum-exp.
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
