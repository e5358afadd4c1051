"""One pass of the 512 refiner's adaptive 27-tap filter in one read of the weights and of the input's
neighbourhood (issue 20; reference: ``adaptive_pass_reference``).

Each program takes ``BLOCK`` voxels of one sample and all its channels (a ``[C_PAD, BLOCK]`` float32 accumulator);
for each tap it loads that tap's weight per voxel once and the shifted input of every channel (zero outside the
volume, so no padded copy is built), then writes the sum once in the input's dtype. The release accumulates in its
dtype tap by tap; this rounds once (closer to the exact sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["adaptive_pass_triton"]

BLOCK = 256


@triton.jit
def _adaptive_pass_kernel(X, W, OUT, C, D, H, Wd, C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    n = D * H * Wd
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    vmask = v < n
    z = v // (H * Wd)
    y = (v // Wd) % H
    x = v % Wd
    ch = tl.arange(0, C_PAD)
    cmask = ch < C
    xbase = X + b * C * n + ch.to(tl.int64)[:, None] * n
    wbase = W + b * 27 * n
    acc = tl.zeros((C_PAD, BLOCK), dtype=tl.float32)
    for t in tl.static_range(27):
        dz = t // 9 - 1
        dy = (t // 3) % 3 - 1
        dx = t % 3 - 1
        w = tl.load(wbase + n.to(tl.int64) * t + v, mask=vmask, other=0.0).to(tl.float32)  # 27 n > 2^31 at 436^3
        zz = z + dz
        yy = y + dy
        xx = x + dx
        ok = vmask & (zz >= 0) & (zz < D) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < Wd)
        nb = v + (dz * H + dy) * Wd + dx
        xv = tl.load(xbase + nb[None, :], mask=cmask[:, None] & ok[None, :], other=0.0).to(tl.float32)
        acc += xv * w[None, :]
    optr = OUT + b * C * n + ch.to(tl.int64)[:, None] * n + v[None, :]
    tl.store(optr, acc.to(OUT.dtype.element_ty), mask=cmask[:, None] & vmask[None, :])


def adaptive_pass_triton(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[B, C, D, H, W]`` and normalised ``weights`` ``[B, 27, D, H, W]``, both contiguous; ``out`` must not be
    ``x``."""
    b, c, d, h, w = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(d * h * w, BLOCK), b)
    _adaptive_pass_kernel[grid](x, weights, out, c, d, h, w, C_PAD=max(2, triton.next_power_of_2(c)), BLOCK=BLOCK)
    return out
