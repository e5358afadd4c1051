"""Gated combination of the SSA branches (paper Eq. 6): ``o = sum_b sigmoid(logit_b) * o_b``, one gate per token and
branch (the gate Linear itself stays in the module). One pass over the branch outputs forward and one backward; the
backward returns the branch gradients and the gate-logit gradients (row sums, no atomics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["GatedCombine", "gated_combine_triton"]


@triton.jit
def gate_fwd_kernel(O0, O1, O2, GL, OUT, n, C, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    g0 = tl.sigmoid(tl.load(GL + rows64 * NB + 0, mask=rmask, other=0.0).to(tl.float32))
    if NB > 1:
        g1 = tl.sigmoid(tl.load(GL + rows64 * NB + 1, mask=rmask, other=0.0).to(tl.float32))
    if NB > 2:
        g2 = tl.sigmoid(tl.load(GL + rows64 * NB + 2, mask=rmask, other=0.0).to(tl.float32))
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols[None, :] < C)
        off = rows64[:, None] * C + cols[None, :]
        acc = g0[:, None] * tl.load(O0 + off, mask=m, other=0.0).to(tl.float32)
        if NB > 1:
            acc += g1[:, None] * tl.load(O1 + off, mask=m, other=0.0).to(tl.float32)
        if NB > 2:
            acc += g2[:, None] * tl.load(O2 + off, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + off, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def gate_bwd_kernel(O0, O1, O2, GL, DOUT, D0, D1, D2, DGL, n, C, NB: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    g0 = tl.sigmoid(tl.load(GL + rows64 * NB + 0, mask=rmask, other=0.0).to(tl.float32))
    s0 = tl.zeros([BLOCK_R], tl.float32)
    if NB > 1:
        g1 = tl.sigmoid(tl.load(GL + rows64 * NB + 1, mask=rmask, other=0.0).to(tl.float32))
        s1 = tl.zeros([BLOCK_R], tl.float32)
    if NB > 2:
        g2 = tl.sigmoid(tl.load(GL + rows64 * NB + 2, mask=rmask, other=0.0).to(tl.float32))
        s2 = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols[None, :] < C)
        off = rows64[:, None] * C + cols[None, :]
        dout = tl.load(DOUT + off, mask=m, other=0.0).to(tl.float32)
        s0 += tl.sum(dout * tl.load(O0 + off, mask=m, other=0.0).to(tl.float32), axis=1)
        tl.store(D0 + off, (g0[:, None] * dout).to(D0.dtype.element_ty), mask=m)
        if NB > 1:
            s1 += tl.sum(dout * tl.load(O1 + off, mask=m, other=0.0).to(tl.float32), axis=1)
            tl.store(D1 + off, (g1[:, None] * dout).to(D1.dtype.element_ty), mask=m)
        if NB > 2:
            s2 += tl.sum(dout * tl.load(O2 + off, mask=m, other=0.0).to(tl.float32), axis=1)
            tl.store(D2 + off, (g2[:, None] * dout).to(D2.dtype.element_ty), mask=m)
    tl.store(DGL + rows64 * NB + 0, s0 * g0 * (1.0 - g0), mask=rmask)
    if NB > 1:
        tl.store(DGL + rows64 * NB + 1, s1 * g1 * (1.0 - g1), mask=rmask)
    if NB > 2:
        tl.store(DGL + rows64 * NB + 2, s2 * g2 * (1.0 - g2), mask=rmask)


_BR, _BC = 16, 128


class GatedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_logits, *branches):
        nb = len(branches)
        if not 1 <= nb <= 3:
            raise ValueError("1 to 3 branches")
        br = [b.contiguous() for b in branches]
        n = br[0].shape[0]
        c = br[0].numel() // max(n, 1)
        gl = gate_logits.contiguous()
        out = torch.empty_like(br[0])
        pads = br + [br[0]] * (3 - nb)
        gate_fwd_kernel[(triton.cdiv(n, _BR),)](pads[0], pads[1], pads[2], gl, out, n, c, NB=nb, BLOCK_R=_BR,
                                                BLOCK_C=_BC)
        ctx.save_for_backward(gl, *br)
        return out

    @staticmethod
    def backward(ctx, dout):
        gl, *br = ctx.saved_tensors
        nb = len(br)
        n = br[0].shape[0]
        c = br[0].numel() // max(n, 1)
        dout = dout.contiguous()
        grads = [torch.empty_like(b) for b in br]
        dgl = torch.empty(gl.shape, dtype=torch.float32, device=gl.device)
        pb = br + [br[0]] * (3 - nb)
        pg = grads + [grads[0]] * (3 - nb)
        gate_bwd_kernel[(triton.cdiv(n, _BR),)](pb[0], pb[1], pb[2], gl, dout, pg[0], pg[1], pg[2], dgl, n, c, NB=nb,
                                                BLOCK_R=_BR, BLOCK_C=_BC)
        return (dgl.to(gl.dtype), *grads)


def gated_combine_triton(branches: list[torch.Tensor], gate_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 6 for branch outputs [N, H, D] (or [N, C]) and gate logits [N, len(branches)]."""
    return GatedCombine.apply(gate_logits, *branches)
