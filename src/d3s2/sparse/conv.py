"""Sparse 3D convolution as gather-GEMM-scatter over kernel offsets (paper Sec. 3.1, the sparse conv VAE).

``out[p] = bias + sum_k in[stride * p + offset_k] @ kernel[k]`` over the offsets whose input voxel is active.

* stride 1 (submanifold): output voxels = input voxels; kernel 3 is ``F.conv3d(padding=1)`` on the dense grid read only
  at active sites, kernel 1 is a per-voxel linear map.
* stride 2 (down-conv): output voxels = unique parents ``c // 2``. Kernel 2 reads the 8 children ``2p + {0,1}^3``
  (``F.conv3d(kernel 2, stride 2)``; output sites and offsets exactly as torchsparse's Conv3d(k=2, s=2), used by the
  authors' downsampling). Kernel 3 reads ``2p + {-1,0,1}^3`` (``F.conv3d(kernel 3, stride 2, padding 1)``) at the same
  parent sites; torchsparse would also create parents of the dilated support, which we deliberately do not, so
  pooling and strided convolution of one tensor land on one coordinate set.

Weights are ``kernel [K^3, Cin, Cout]`` in torchsparse's offset order (see `d3s2.sparse.neighbors`), so
``kernel[k] == dense_weight[:, :, x+r, y+r, z+r].T`` for offset ``k = (x, y, z)`` with ``r = -min offset``.
torchsparse's 1x1 kernels ``[Cin, Cout]`` load into ``[1, Cin, Cout]`` (see ``SparseConv3d._load_from_state_dict``).

Autograd: a custom Function that saves only the input and the weights (the gathered rows are recomputed in backward),
so activation memory stays ``O(N * C)``. fp16/bf16 products are accumulated into an fp32 buffer.

Backends (``backend=`` of `sparse_conv3d` / `SparseConv3d`): ``"reference"`` is the gather-GEMM-scatter here (the CPU
path and the test oracle); ``"triton"`` the implicit-GEMM kernels of `d3s2.sparse.kernels` (CUDA, or CPU tensors under
Triton's interpreter); ``"auto"`` (default) takes Triton for CUDA tensors when it imports, else the reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.sparse.neighbors import NeighborMap, build_neighbor_map, downsample_coords, kernel_offsets
from d3s2.sparse.scatter import add_rows_
from d3s2.sparse.tensor import SparseTensor, _Cache
from d3s2.triton_support import check_triton_backend, triton_available

__all__ = [
    "SparseConv3d", "sparse_conv3d", "neighbor_map", "downsample", "gather_gemm_scatter",
    "kernel_to_dense_weight", "dense_weight_to_kernel", "dense_padding", "resolve_conv_backend", "CONV_BACKENDS",
]

CONV_BACKENDS = ("auto", "triton", "reference")


def resolve_conv_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (``auto``: Triton on CUDA when it imports)."""
    if backend not in CONV_BACKENDS:
        raise D3S2Error(f"unknown sparse conv backend {backend!r}: use 'auto', 'triton' or 'reference'")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        check_triton_backend(device.type == "cuda", "reference")
    return backend


def kernel_to_dense_weight(kernel: torch.Tensor) -> torch.Tensor:
    """``[K^3, Cin, Cout]`` sparse kernel -> ``[Cout, Cin, k, k, k]`` weight of the equivalent ``F.conv3d``.

    Views and one copy: the offsets (:func:`kernel_offsets`) run over a k^3 grid with z slowest and x fastest for odd
    k^3, x slowest and z fastest otherwise, so the kernel is that grid reshaped (no scatter: this runs in every
    forward of the dense-grid convs)."""
    k = round(kernel.shape[0] ** (1 / 3))
    grid = kernel.reshape(k, k, k, kernel.shape[1], kernel.shape[2])
    if (k**3) % 2 == 1:
        grid = grid.permute(2, 1, 0, 3, 4)  # [z, y, x] -> [x, y, z]
    return grid.permute(4, 3, 0, 1, 2).contiguous()


def dense_weight_to_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, k, k, k]`` ``F.conv3d`` weight -> ``[K^3, Cin, Cout]`` sparse kernel."""
    k = weight.shape[2]
    offs = kernel_offsets(k, device=weight.device)
    idx = offs - offs.min(dim=0).values
    return weight.permute(2, 3, 4, 1, 0)[idx[:, 0], idx[:, 1], idx[:, 2]].contiguous()


def dense_padding(kernel_size: int) -> int:
    """``F.conv3d`` padding that reproduces our offsets: ``-min offset``."""
    return -((-kernel_size) // 2 + 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _GatherGemmScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, weight, bias, nmap: NeighborMap):
        acc = _acc_dtype(feats.dtype)
        out = torch.zeros(nmap.num_out, weight.shape[2], dtype=acc, device=feats.device)
        for k in range(nmap.kernel_volume):
            if k == nmap.identity_offset:
                out += (feats @ weight[k]).to(acc)
            elif nmap.counts[k]:
                i, o = nmap.pairs(k)
                add_rows_(out, o, (feats.index_select(0, i) @ weight[k]).to(acc))
        if bias is not None:
            out += bias.to(acc)
        ctx.save_for_backward(feats, weight)
        ctx.nmap = nmap
        ctx.has_bias = bias is not None
        return out.to(feats.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        nmap: NeighborMap = ctx.nmap
        g = grad_out.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(feats.dtype)
        grad_x = torch.zeros(feats.shape, dtype=acc, device=feats.device) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for k in range(nmap.kernel_volume):
            if k == nmap.identity_offset:
                if need_x:
                    grad_x += (g @ weight[k].t()).to(acc)
                if need_w:
                    grad_w[k] = feats.t() @ g
            elif nmap.counts[k]:
                i, o = nmap.pairs(k)
                gk = g.index_select(0, o)
                if need_x:
                    add_rows_(grad_x, i, (gk @ weight[k].t()).to(acc))
                if need_w:
                    grad_w[k] = feats.index_select(0, i).t() @ gk
        grad_b = g.to(acc).sum(0).to(grad_out.dtype) if (need_b and ctx.has_bias) else None
        return (grad_x.to(feats.dtype) if need_x else None), grad_w, grad_b, None


def gather_gemm_scatter(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        nmap: NeighborMap) -> torch.Tensor:
    """Apply a neighbour map: ``out [num_out, Cout]`` from ``feats [num_in, Cin]`` and ``weight [K, Cin, Cout]``."""
    if weight.dim() != 3 or weight.shape[0] != nmap.kernel_volume or weight.shape[1] != feats.shape[1]:
        raise D3S2Error(f"conv weight {tuple(weight.shape)} does not fit {nmap.kernel_volume} offsets and "
                        f"{feats.shape[1]} input channels")
    weight = weight.to(feats.dtype)
    bias = bias.to(feats.dtype) if bias is not None else None
    return _GatherGemmScatter.apply(feats, weight, bias, nmap)


def downsample(x: SparseTensor, factor: int = 2) -> tuple[SparseTensor, torch.Tensor]:
    """Parent voxels of ``x`` (features empty ``[P, 0]``) and every row's parent row; memoised per coordinate set so
    that pooling and strided convs of one tensor share the output coordinates and their neighbour maps."""
    def build():
        coords, parent = downsample_coords(x.coords, x.batch_size, x.extent, factor)
        res = -(-x.resolution // factor) if x.resolution is not None else None
        return coords, parent, _Cache(), res
    coords, parent, cache, res = x._memo(("down", factor), build)
    out = SparseTensor(coords.new_zeros(coords.shape[0], 0, dtype=x.dtype), coords, x.batch_size, res,
                       x.stride * factor, _cache=cache)
    return out, parent


def neighbor_map(x: SparseTensor, kernel_size: int, stride: int = 1) -> tuple[NeighborMap, SparseTensor]:
    """The (memoised) neighbour map of a conv on ``x`` and its output coordinates (an empty-feature SparseTensor)."""
    if stride == 1:
        nmap = x._memo(("submanifold", kernel_size),
                       lambda: build_neighbor_map(x.key_index(_pad(kernel_size)), x.coords, kernel_size, 1, True))
        return nmap, x
    out, _ = downsample(x, stride)
    nmap = x._memo(("strided", kernel_size, stride),
                   lambda: build_neighbor_map(x.key_index(_pad(kernel_size)), out.coords, kernel_size, stride))
    return nmap, out


def _pad(kernel_size: int) -> int:
    return max(1, kernel_size // 2)


def sparse_conv3d(x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  kernel_size: int | None = None, stride: int = 1, backend: str = "auto") -> SparseTensor:
    """Functional sparse conv; ``weight [K^3, Cin, Cout]`` (``kernel_size`` inferred from K when omitted);
    ``backend`` "auto" | "triton" | "reference" (see the module docstring)."""
    if kernel_size is None:
        kernel_size = round(weight.shape[0] ** (1 / 3))
    if kernel_size**3 != weight.shape[0]:
        raise D3S2Error(f"conv weight has {weight.shape[0]} offsets, expected kernel_size^3 = {kernel_size**3}")
    if stride < 1:
        raise D3S2Error(f"stride must be a positive integer, got {stride}")
    if resolve_conv_backend(backend, x.device) == "triton":
        from d3s2.sparse.kernels.conv_function import conv_plan, implicit_gemm_conv

        out = x if stride == 1 else downsample(x, stride)[0]
        plan = conv_plan(x, out, kernel_size, stride)
        return out.replace(implicit_gemm_conv(x.feats, weight, bias, plan))
    nmap, out = neighbor_map(x, kernel_size, stride)
    feats = gather_gemm_scatter(x.feats, weight, bias, nmap)
    return out.replace(feats)


class SparseConv3d(nn.Module):
    """Sparse 3D convolution; see the module docstring for stride/kernel semantics and the weight layout.

    Parameters ``kernel [K^3, Cin, Cout]`` and ``bias [Cout]``: wrap it as ``.conv`` to get torchsparse-style
    checkpoint keys ``<module>.conv.kernel`` / ``<module>.conv.bias``. ``backend`` ("auto" | "triton" |
    "reference", a plain attribute that may be changed later) picks the implementation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if kernel_size < 1 or stride < 1:
            raise D3S2Error(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        if backend not in CONV_BACKENDS:
            raise D3S2Error(f"unknown sparse conv backend {backend!r}: use 'auto', 'triton' or 'reference'")
        self.backend = backend
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.kernel = nn.Parameter(torch.empty(kernel_size**3, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # same fan-in uniform as torch.nn.Conv3d / torchsparse
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**3)
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.in_channels:
            raise D3S2Error(f"SparseConv3d expects {self.in_channels} input channels, got {x.num_channels}")
        return sparse_conv3d(x, self.kernel, self.bias, self.kernel_size, self.stride, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "kernel"
        w = state_dict.get(key)
        if w is not None and w.dim() == 2 and self.kernel_size == 1:  # torchsparse stores 1x1 kernels as [Cin, Cout]
            state_dict[key] = w.unsqueeze(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}")
