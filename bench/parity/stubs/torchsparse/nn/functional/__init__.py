"""``torchsparse.nn.functional.conv3d`` stand-in: the submanifold (stride 1) convolution only."""

from __future__ import annotations

import torch

from torchsparse.tensor import SparseTensor
from torchsparse.utils import make_ntuple

__all__ = ["conv3d", "kernel_offsets"]


def kernel_offsets(kernel_size, dilation=1, device=None) -> torch.Tensor:
    """[K^3, 3] offsets in torchsparse's order: x fastest for odd kernel volumes."""
    ks = make_ntuple(kernel_size, 3)
    if any(k % 2 == 0 for k in ks):
        raise NotImplementedError("the stand-in implements odd kernels only (the authors' modules use 1 and 3)")
    ranges = [torch.arange(-(k // 2), k // 2 + 1) * dilation for k in ks]
    z, y, x = torch.meshgrid(ranges[2], ranges[1], ranges[0], indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], 1).to(device)


def _keys(c: torch.Tensor, lo: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
    s = c - lo
    return ((s[:, 0] * ext[1] + s[:, 1]) * ext[2] + s[:, 2]) * ext[3] + s[:, 3]


def conv3d(input: SparseTensor, weight: torch.Tensor, kernel_size, bias=None, stride=1, padding=0, dilation=1,
           transposed=False, generative=False, config=None, training=False) -> SparseTensor:
    if make_ntuple(stride, 3) != (1, 1, 1) or transposed or generative:
        raise NotImplementedError("the stand-in implements stride-1 submanifold convolutions only")
    x, c = input.feats, input.coords.long()
    offsets = kernel_offsets(kernel_size, dilation if isinstance(dilation, int) else dilation[0], c.device)
    w = weight if weight.dim() == 3 else weight.unsqueeze(0)
    if w.shape[0] != offsets.shape[0]:
        raise ValueError(f"kernel has {w.shape[0]} offsets, kernel size {kernel_size} needs {offsets.shape[0]}")
    pad = offsets.abs().max()
    lo = torch.cat([c[:, :1].min(0).values, c[:, 1:].min(0).values - pad])
    ext = torch.cat([c[:, :1].max(0).values, c[:, 1:].max(0).values + pad]) - lo + 1
    keys = _keys(c, lo, ext)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    # fp32 accumulation over every tap and input channel, one rounding to the input dtype (implicit GEMM)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float32, device=x.device)
    for k in range(offsets.shape[0]):
        q = c.clone()
        q[:, 1:] += offsets[k]
        qk = _keys(q, lo, ext)
        pos = torch.searchsorted(sorted_keys, qk).clamp_max_(len(keys) - 1)
        hit = sorted_keys[pos] == qk
        rows = torch.nonzero(hit).squeeze(1)
        if rows.numel():
            out.index_add_(0, rows, x[order[pos[rows]]].float() @ w[k].float())
    if bias is not None:
        out += bias.float()
    return SparseTensor(out.to(x.dtype), input.coords, stride=input.stride, spatial_range=input.spatial_range)
