"""GroupNorm of the refiners' UNet in two bandwidth-bound passes over a contiguous ``[B, C, N]`` volume (issue 20).

``channel_stats_triton``: each program reads one block of one (sample, channel) row in its own dtype and writes the
block's float32 mean and sum of squared deviations (two-pass within the block, in registers); the blocks are then
combined in float64 with Chan et al.'s pairwise formula (exact for the block means, no cancellation of large sums).
Both also take channels-last 3-D volumes (``[B, D, H, W, C]`` in memory: the layout cuDNN's fp16 3-D convolutions
run in natively, so a UNet kept in it skips two layout transposes per convolution).
``norm_apply_triton``: ``y = x * scale + shift`` in float32 per (sample, channel), cast to ``x``'s dtype, then SiLU on
that value (as the release: ``silu(norm(x.float()).to(dtype))``); may write in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d3s2.errors import D3S2Error

__all__ = ["channel_stats_triton", "norm_apply_triton", "is_channels_last"]

STATS_BLOCK = 4096
APPLY_BLOCK = 2048
# block indices run on grid axis 0 (up to 2^31 - 1 programs); axis 1 (rows or samples) stops at 65535
MAX_ROWS = 65535


@triton.jit
def _stats_kernel(X, MEAN, M2, N, NBLK, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    tl.store(MEAN + row * NBLK + blk, mean)
    tl.store(M2 + row * NBLK + blk, tl.sum(d * d, axis=0))


@triton.jit
def _stats_cl_kernel(X, MEAN, M2, N, C, NBLK, C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # channels-last [B, N, C]: a [BLOCK, C_PAD] tile of voxels x channels per program
    b = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    v = blk * BLOCK + tl.arange(0, BLOCK)
    ch = tl.arange(0, C_PAD)
    mask = (v < N)[:, None] & (ch < C)[None, :]
    x = tl.load(X + b * N * C + v.to(tl.int64)[:, None] * C + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    d = tl.where(mask, x - mean[None, :], 0.0)
    row = b * C + ch
    tl.store(MEAN + row * NBLK + blk, mean, mask=ch < C)
    tl.store(M2 + row * NBLK + blk, tl.sum(d * d, axis=0), mask=ch < C)


@triton.jit
def _apply_cl_kernel(X, OUT, SCALE, SHIFT, NC, C, ACT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n * C passes 2^31 at 256^3 x 128
    mask = offs < NC
    x = tl.load(X + b * NC + offs, mask=mask, other=0.0)
    row = b * C + offs % C
    s = tl.load(SCALE + row, mask=mask, other=0.0)
    t = tl.load(SHIFT + row, mask=mask, other=0.0)
    y = (x.to(tl.float32) * s + t).to(x.dtype)
    if ACT:
        yf = y.to(tl.float32)
        y = (yf / (1.0 + tl.exp(-yf))).to(x.dtype)
    tl.store(OUT + b * NC + offs, y, mask=mask)


@triton.jit
def _apply_kernel(X, OUT, SCALE, SHIFT, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * N + offs, mask=mask, other=0.0)
    s = tl.load(SCALE + row)
    b = tl.load(SHIFT + row)
    y = (x.to(tl.float32) * s + b).to(x.dtype)
    if ACT:
        yf = y.to(tl.float32)
        y = (yf / (1.0 + tl.exp(-yf))).to(x.dtype)
    tl.store(OUT + row * N + offs, y, mask=mask)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 5-D tensor laid out ``[B, D, H, W, C]`` in memory (``torch.channels_last_3d``) and not also plain
    contiguous (one channel is both: it takes the plain kernels)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _check_rows(b: int, c: int) -> None:
    if b * c > MAX_ROWS:
        raise D3S2Error(f"the volume kernels take at most {MAX_ROWS} samples x channels, got {b} x {c}; use "
                        "backend='reference'")


def channel_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (sample, channel) mean and sum of squared deviations (float64 ``[B, C]``) and the count of ``x``
    ``[B, C, ...]`` (contiguous, or channels-last 3-D)."""
    b, c = x.shape[:2]
    _check_rows(b, c)
    n = x.numel() // max(1, b * c)
    rows = b * c
    block = STATS_BLOCK
    if is_channels_last(x):
        c_pad = triton.next_power_of_2(c)
        block = max(16, STATS_BLOCK // c_pad)
        nblk = triton.cdiv(n, block)
        means = torch.empty(rows, nblk, dtype=torch.float32, device=x.device)
        m2s = torch.empty_like(means)
        _stats_cl_kernel[(nblk, b)](x, means, m2s, n, c, nblk, C_PAD=c_pad, BLOCK=block)
    else:
        nblk = triton.cdiv(n, block)
        means = torch.empty(rows, nblk, dtype=torch.float32, device=x.device)
        m2s = torch.empty_like(means)
        _stats_kernel[(nblk, rows)](x, means, m2s, n, nblk, BLOCK=block)
    # built on the device: writing a Python number into a CUDA tensor is a host copy that waits for the stream
    counts = (n - torch.arange(nblk, dtype=torch.float64, device=x.device) * block).clamp_(max=block)
    bm = means.double()
    mean = (bm * counts).sum(1) / n
    m2 = m2s.double().sum(1) + ((bm - mean[:, None]).square() * counts).sum(1)
    return mean.reshape(b, c), m2.reshape(b, c), n


def norm_apply_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: bool,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * scale + shift`` (``[B, C]`` each, float32 arithmetic) in ``x.dtype``, SiLU when ``act``; ``out`` may
    be ``x``."""
    b, c = x.shape[:2]
    _check_rows(b, c)
    n = x.numel() // max(1, b * c)
    if out is None:
        out = torch.empty_like(x)  # same layout as x
    s = scale.reshape(-1).to(torch.float32).contiguous()
    t = shift.reshape(-1).to(torch.float32).contiguous()
    if is_channels_last(x):
        _apply_cl_kernel[(triton.cdiv(n * c, APPLY_BLOCK), b)](x, out, s, t, n * c, c, ACT=bool(act),
                                                              BLOCK=APPLY_BLOCK)
    else:
        _apply_kernel[(triton.cdiv(n, APPLY_BLOCK), b * c)](x, out, s, t, n, ACT=bool(act), BLOCK=APPLY_BLOCK)
    return out
