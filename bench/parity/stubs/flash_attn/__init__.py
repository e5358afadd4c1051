"""Stand-in for flash-attn 2's Python API (see ../README.md): exact softmax attention, fp32 math per segment.

Shapes follow flash-attn: dense ``q [B, L, H, D]``, varlen ``q [T, H, D]`` with ``cu_seqlens`` int32 offsets; keys may
have fewer heads (GQA: query head h reads key head h // (H / H_kv)). ``return_attn_probs=True`` on the varlen call
returns ``(out, lse [H, T_q] float32 natural log, None)`` as flash-attn 2 does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]

_LOGITS = 1 << 28  # logits per chunk (1 GiB in fp32)


def _segment(q, k, v, scale):
    """q [Lq, H, D], k/v [Lk, Hkv, D] -> (out [Lq, H, D] fp32, lse [H, Lq] fp32), query chunks bounded in memory."""
    lq, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    kf = k.float().permute(1, 0, 2)  # [Hkv, Lk, D]
    vf = v.float().permute(1, 0, 2)
    step = max(1, _LOGITS // max(1, h * k.shape[0]))
    outs, lses = [], []
    for s in range(0, lq, step):
        qf = q[s:s + step].float().view(-1, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, -1, d)
        logits = torch.bmm(qf, kf.transpose(1, 2)) * scale  # [Hkv, g * c, Lk]
        lse = torch.logsumexp(logits, -1)
        o = torch.bmm(torch.exp(logits - lse[..., None]), vf)  # [Hkv, g * c, D]
        c = q[s:s + step].shape[0]
        outs.append(o.view(hkv, g, c, d).permute(2, 0, 1, 3).reshape(c, h, d))
        lses.append(lse.view(hkv, g, c).reshape(h, c))
    return torch.cat(outs), torch.cat(lses, 1)


def _varlen(q, k, v, cu_q, cu_k, scale, want_lse):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cq, ck = cu_q.tolist(), cu_k.tolist()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    lengths = [(cq[i + 1] - cq[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]
    # many short segments (windows): batch the segments of one length pair together
    groups: dict[tuple[int, int], list[int]] = {}
    for i, lens in enumerate(lengths):
        groups.setdefault(lens, []).append(i)
    for (lq, lk), segs in groups.items():
        if lq == 0:
            continue
        if len(segs) == 1 or lq * lk > 4096:
            for i in segs:
                o, l = _segment(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], scale)
                out[cq[i]:cq[i + 1]], lse[:, cq[i]:cq[i + 1]] = o, l
            continue
        iq = torch.cat([torch.arange(cq[i], cq[i + 1]) for i in segs]).to(q.device)
        ik = torch.cat([torch.arange(ck[i], ck[i + 1]) for i in segs]).to(q.device)
        o, l = _dense(q[iq].view(len(segs), lq, *q.shape[1:]), k[ik].view(len(segs), lk, *k.shape[1:]),
                      v[ik].view(len(segs), lk, *v.shape[1:]), scale)
        out[iq] = o.reshape(-1, *q.shape[1:])
        lse[:, iq] = l.permute(1, 0, 2).reshape(q.shape[1], -1)
    out = out.to(q.dtype)
    return (out, lse, None) if want_lse else out


def _dense(q, k, v, scale):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> (out fp32 [B, Lq, H, D], lse [B, H, Lq])."""
    b, lq, h, d = q.shape
    g = h // k.shape[2]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(g, 1)
    vf = v.float().transpose(1, 2).repeat_interleave(g, 1)
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, -1)
    o = torch.matmul(torch.exp(logits - lse[..., None]), vf)
    return o.transpose(1, 2), lse


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    if causal or dropout_p:
        raise NotImplementedError("stand-in: non-causal attention without dropout only")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs = [_dense(q[i:i + 64], k[i:i + 64], v[i:i + 64], scale)[0] for i in range(0, q.shape[0], 64)]
    return torch.cat(outs).to(q.dtype)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, return_attn_probs=False, **kwargs):
    if causal or dropout_p:
        raise NotImplementedError("stand-in: non-causal attention without dropout only")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen=None, dropout_p=0.0, softmax_scale=None,
                                     causal=False, return_attn_probs=False, **kwargs):
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False, **kwargs):
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, return_attn_probs)
