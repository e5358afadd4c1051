"""Sparse 3D (shifted) window self-attention over the active voxels of a sparse tensor (paper Sec. 3.1: the SS-VAE
"utilises shifted window attention to capture local contextual information between the valid voxels").

Voxels are grouped into non-overlapping ``window^3`` cubes, shifted by ``shift`` voxels along every axis
(window index ``(x + shift) // window``, :func:`d3s2.sparse.window_partition`); every voxel attends to the active voxels
of its own window only (no positional term inside attention: the models add an absolute position embedding).

Backends (chosen explicitly, never from the environment):

- ``"reference"``: windows padded to the longest one, ``[W, L_max, H, D]``, then SDPA with a key mask
  (:func:`d3s2.nn.attention.attention`). Plain PyTorch, any device and dtype.
- ``"triton"``: the varlen segment-attention kernel of the SSA window branch (``d3s2.ops.ssa.kernels.window``): each
  token's keys are the ``[lo, hi)`` row range of its window; no padding. Needs a power-of-two head dim >= 16.
- ``"auto"``: Triton on CUDA tensors when the head dim fits, the reference otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.nn.attention import attention
from d3s2.sparse.serialize import WindowPartition, window_partition
from d3s2.sparse.tensor import SparseTensor

__all__ = ["sparse_window_attention", "window_partition_of", "SparseWindowSelfAttention", "resolve_window_backend"]


def resolve_window_backend(backend: str, device: torch.device, head_dim: int) -> str:
    if backend not in ("auto", "triton", "reference"):
        raise D3S2Error(f"unknown window-attention backend {backend!r}: use 'auto', 'triton' or 'reference'")
    if backend == "auto":
        fits = head_dim >= 16 and head_dim & (head_dim - 1) == 0
        return "triton" if device.type == "cuda" and fits else "reference"
    return backend


def window_partition_of(x: SparseTensor, window: int, shift: int) -> WindowPartition:
    """The (memoised per coordinate set) window partition of a sparse tensor's voxels."""
    return x._memo(("window_partition", window, shift),
                   lambda: window_partition(x.coords, window, shift, batch_size=x.batch_size))


def _padded_index(part: WindowPartition):
    """Row of every windowed token in a ``[W * L_max]`` padded buffer, and ``L_max``."""
    off = part.offsets
    sizes = off[1:] - off[:-1]
    l_max = int(sizes.max()) if sizes.numel() else 0
    n = int(off[-1])
    win = torch.repeat_interleave(torch.arange(sizes.numel(), device=off.device), sizes)
    pos = torch.arange(n, device=off.device) - off[win]
    return win * l_max + pos, l_max


def _reference(q, k, v, part: WindowPartition, scale: float) -> torch.Tensor:
    n, h, d = q.shape
    w = part.num_windows
    idx, l_max = _padded_index(part)

    def pad(t):
        buf = t.new_zeros(w * l_max, *t.shape[1:])
        return buf.index_copy(0, idx, t.index_select(0, part.perm)).view(w, l_max, *t.shape[1:])

    mask = torch.zeros(w * l_max, dtype=torch.bool, device=q.device)
    mask[idx] = True
    mask = mask.view(w, l_max)
    # SDPA's default scale is 1/sqrt(d): fold a different scale into q
    qs = q if math.isclose(scale, 1.0 / math.sqrt(d)) else q * (scale * math.sqrt(d))
    out = attention(pad(qs), pad(k), pad(v), key_mask=mask).reshape(w * l_max, h, d)
    return out.index_select(0, idx).index_select(0, part.inverse)


def _triton(q, k, v, part: WindowPartition, scale: float) -> torch.Tensor:
    from d3s2.ops.ssa.kernels.window import window_attention_triton
    from d3s2.ops.ssa.layout import WindowLayout

    off = part.offsets
    sizes = off[1:] - off[:-1]
    seg = torch.repeat_interleave(torch.arange(sizes.numel(), device=off.device), sizes)
    win = WindowLayout(perm=None, inverse=None, offsets=off, token_lo=off[seg].to(torch.int32),
                       token_hi=off[seg + 1].to(torch.int32), token_seg=seg.to(torch.int32),
                       max_window_tokens=int(sizes.max()) if sizes.numel() else 0)
    qs, ks, vs = (t.index_select(0, part.perm).contiguous() for t in (q, k, v))
    return window_attention_triton(qs, ks, vs, win, scale).index_select(0, part.inverse)


def sparse_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    part: WindowPartition,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Window attention ``[N, H, D]`` of rows ``q``, ``k``, ``v`` ``[N, H, D]`` grouped by ``part`` (any row order)."""
    if q.dim() != 3 or q.shape != k.shape or k.shape != v.shape:
        raise D3S2Error(f"window attention needs q, k, v of one shape [N, H, D], got "
                        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != part.perm.numel():
        raise D3S2Error(f"{q.shape[0]} tokens but the window partition covers {part.perm.numel()}")
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if q.shape[0] == 0:
        return q.clone()
    be = resolve_window_backend(backend, q.device, d)
    return _triton(q, k, v, part, scale) if be == "triton" else _reference(q, k, v, part, scale)


class SparseWindowSelfAttention(nn.Module):
    """Multi-head self-attention inside (shifted) 3D windows on a :class:`SparseTensor` (``to_qkv`` with bias,
    ``to_out``: the parameter names of the authors' sparse VAE blocks)."""

    def __init__(self, channels: int, num_heads: int, head_dim: int | None = None, window: int = 8, shift: int = 0,
                 qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        head_dim = head_dim or channels // num_heads
        if not (0 <= shift < window):
            raise D3S2Error(f"window shift must be in [0, window), got shift={shift}, window={window}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, head_dim
        self.window, self.shift, self.backend = window, shift, backend
        self.to_qkv = nn.Linear(channels, 3 * num_heads * head_dim, bias=qkv_bias)
        self.to_out = nn.Linear(num_heads * head_dim, channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        n = x.num_voxels
        qkv = self.to_qkv(x.feats).view(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=1)
        part = window_partition_of(x, self.window, self.shift)
        out = sparse_window_attention(q, k, v, part, backend=self.backend)
        return x.replace(self.to_out(out.reshape(n, self.num_heads * self.head_dim)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}, shift={self.shift}"


def dense_masked_window_attention(q, k, v, coords: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """O(N^2) ground truth for tests: full attention with a mask "same sample and same shifted window"."""
    c = coords.to(torch.int64).clone()
    c[:, 1:] = torch.div(c[:, 1:] + shift, window, rounding_mode="floor")
    allowed = (c[:, None, :] == c[None, :, :]).all(-1)  # [N, N]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, D]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[None, None])
    return out[0].transpose(0, 1)
