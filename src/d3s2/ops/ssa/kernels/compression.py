"""Compression attention (paper Eq. 6, first term): every query attends to all compressed key/value tokens of its
sample; forward returns the output and the log-sum-exp that the block scoring (Eq. 8) reuses. Triton forward and
deterministic backward through the shared segment-attention kernels."""

from __future__ import annotations

import torch

from d3s2.ops.ssa.kernels.varlen_attention import varlen_bwd, varlen_fwd
from d3s2.ops.ssa.layout import SSALayout

__all__ = ["CompressionAttention", "compression_attention_triton"]


class CompressionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, layout: SSALayout, scale: float):
        q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
        o, lse = varlen_fwd(q, k_cmp, v_cmp, layout.token_cmp_lo, layout.token_cmp_hi, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        lay = ctx.layout
        dq, dk, dv = varlen_bwd(q, k_cmp, v_cmp, o, lse, do, lay.token_cmp_lo, lay.token_cmp_hi, lay.cmp_token_lo,
                                lay.cmp_token_hi, ctx.scale)
        return dq, dk, dv, None, None


def compression_attention_triton(q, k_cmp, v_cmp, layout: SSALayout, scale: float):
    """(o [N, H, D], lse [N, H] float32) for block-sorted q and compressed k/v in layout order."""
    return CompressionAttention.apply(q, k_cmp, v_cmp, layout, scale)
