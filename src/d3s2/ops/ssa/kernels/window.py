"""Sparse 3D window attention (paper Sec. 4.1, "Sparse 3D Window"): each token attends to the active tokens of its
``m_win^3`` window (optionally shifted by ``m_win/2``). Windows are varlen segments of the layout's window order;
Triton forward and deterministic backward through the shared segment-attention kernels."""

from __future__ import annotations

import torch

from d3s2.ops.ssa.kernels.varlen_attention import varlen_bwd, varlen_fwd
from d3s2.ops.ssa.layout import WindowLayout

__all__ = ["WindowAttention", "window_attention_triton", "TUNING"]

# Overrides of the segment kernels' settings (varlen_attention.TUNING) for windows: short segments (~100-500 tokens)
# instead of the compression branch's long ones. Few 64-key tiles lie inside one window, so the one-segment test of
# the dK/dV kernel costs more than it saves there (bench/NOTES.md, run 12). Plain data, never read from the
# environment.
TUNING: dict = {"skip_ranges": False}


class WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, win: WindowLayout, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = varlen_fwd(q, k, v, win.token_lo, win.token_hi, scale, TUNING)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.win, ctx.scale = win, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        w = ctx.win
        dq, dk, dv = varlen_bwd(q, k, v, o, lse, do, w.token_lo, w.token_hi, w.token_lo, w.token_hi, ctx.scale,
                                TUNING)
        return dq, dk, dv, None, None


def window_attention_triton(q, k, v, win: WindowLayout, scale: float):
    """Window attention for q/k/v given in the window order of ``win`` (gather with ``win.perm`` first if not None)."""
    return WindowAttention.apply(q, k, v, win, scale)
