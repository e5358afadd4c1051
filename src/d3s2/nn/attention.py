"""Dense multi-head self- and cross-attention over token sequences ``[B, N, C]`` (the DiT blocks, paper Sec. 4).

Parameter names follow the authors' release: self-attention ``to_qkv`` / ``to_out`` with optional qk RMS norm
(``q_rms_norm.gamma``, ``k_rms_norm.gamma``); cross-attention ``to_q`` / ``to_kv`` / ``to_out``.
The attention itself is :func:`torch.nn.functional.scaled_dot_product_attention`, which picks FlashAttention /
cuDNN / memory-efficient kernels on CUDA and a plain implementation on the CPU.

Grouped-query attention (GQA): with ``num_kv_heads < num_heads`` query head ``h`` reads key/value head
``h // (num_heads // num_kv_heads)`` (the convention of SDPA's ``enable_gqa`` and of ``repeat_interleave``).
``to_qkv`` then outputs ``[q (H*d) | k (Hkv*d) | v (Hkv*d)]``, which for ``Hkv == H`` is the usual ``[3, H, d]`` layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.nn.norms import MultiHeadRMSNorm

__all__ = ["attention", "MultiHeadSelfAttention", "MultiHeadCrossAttention"]

# SDPA grew native GQA (no K/V copies) in torch 2.5; older versions get repeat_interleave.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA on ``[B, L, H, d]`` inputs (``k``/``v`` may have fewer heads: GQA); ``key_mask`` ``[B, Lk]`` bool, True = attend.

    A sample whose keys are all masked out gets a zero output rather than NaN.
    """
    h, hkv = q.shape[2], k.shape[2]
    gqa = {}
    if h != hkv:
        if h % hkv:
            raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            k = k.repeat_interleave(h // hkv, dim=2)
            v = v.repeat_interleave(h // hkv, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    mask = None
    empty = None
    if key_mask is not None:
        key_mask = key_mask.to(torch.bool)
        empty = ~key_mask.any(dim=1)
        if bool(empty.any()):
            key_mask = key_mask | empty[:, None]
        mask = key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    out = out.transpose(1, 2)  # [B, Lq, H, d]
    if empty is not None and bool(empty.any()):
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


class MultiHeadSelfAttention(nn.Module):
    """Full self-attention over ``[B, N, C]``; optional qk RMS norm and GQA."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        head_dim = head_dim or channels // num_heads
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.channels, self.num_heads, self.num_kv_heads, self.head_dim = channels, num_heads, num_kv_heads, head_dim
        self.to_qkv = nn.Linear(channels, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_kv_heads)
        self.to_out = nn.Linear(num_heads * head_dim, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, C]``; ``mask`` ``[B, N]`` bool marks real tokens (padded ragged batches)."""
        b, n, _ = x.shape
        d, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.to_qkv(x).split([h * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(b, n, h, d), k.view(b, n, hkv, d), v.view(b, n, hkv, d)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        out = attention(q, k, v, key_mask=mask)
        return self.to_out(out.reshape(b, n, h * d))


class MultiHeadCrossAttention(nn.Module):
    """Queries from ``x`` ``[B, N, C]``, keys/values from ``context`` ``[B, L, C_ctx]`` (image tokens)."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        head_dim = head_dim or channels // num_heads
        self.channels, self.ctx_channels, self.num_heads, self.head_dim = channels, ctx_channels, num_heads, head_dim
        self.to_q = nn.Linear(channels, num_heads * head_dim, bias=qkv_bias)
        self.to_kv = nn.Linear(ctx_channels, 2 * num_heads * head_dim, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(num_heads * head_dim, channels)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``context_mask`` ``[B, L]`` bool marks real context tokens (ragged sparse conditioning, v1.0)."""
        b, n, _ = x.shape
        l = context.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.to_q(x).view(b, n, h, d)
        k, v = self.to_kv(context.to(x.dtype)).view(b, l, 2, h, d).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        out = attention(q, k, v, key_mask=context_mask)
        return self.to_out(out.reshape(b, n, h * d))
