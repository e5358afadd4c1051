"""Sparse convolution on the implicit-GEMM Triton kernels: neighbour-table plans and the autograd Function
(paper Sec. 3.1; the SS-VAE's submanifold, strided and after-subdivision convolutions).

`conv_plan` builds the ``[K^3, N_out]`` neighbour table straight from the input's cached sorted key index (one
``searchsorted`` per offset, no (in, out) pair lists in the forward pass) and memoises it in the input
SparseTensor's coordinate cache, so every layer and every call on the same coordinates reuses it; the pair lists
that the weight gradient needs are derived from the table on the first backward and cached on the plan.
Same semantics as the reference: output voxel ``p`` reads input voxel ``stride * p + offset_k``; submanifold when
stride is 1 (outputs = inputs), else outputs = the unique parents ``c // stride`` (shared with pooling).
"""

from __future__ import annotations

import torch

from d3s2.errors import D3S2Error
from d3s2.sparse.kernels.implicit_gemm import ConvPlan, KernelConfig, igemm_forward, igemm_wgrad, morton_order
from d3s2.sparse.neighbors import kernel_offsets
from d3s2.sparse.tensor import SparseTensor

__all__ = ["conv_plan", "implicit_gemm_conv"]

_CHUNK_ELEMENTS = 1 << 24  # offsets x queries looked up at once (bounds the searchsorted temporaries)


def _build_plan(x: SparseTensor, out: SparseTensor, kernel_size: int, stride: int, locality: bool = True) -> ConvPlan:
    """``locality=False`` keeps the caller's row order (only for the benchmark's ablation of the Morton order)."""
    pad = max(1, kernel_size // 2)
    index = x.key_index(pad)
    dev = x.coords.device
    offsets = kernel_offsets(kernel_size, device=dev)
    if int(offsets.abs().max()) > pad:
        raise D3S2Error(f"kernel_size {kernel_size} is not supported by the implicit-GEMM path")
    if x.num_voxels >= 2**31 or out.num_voxels >= 2**31:
        raise D3S2Error("the implicit-GEMM path indexes rows in int32: split tensors above 2^31 voxels")
    num_out = out.num_voxels
    order = morton_order(out.coords, out.extent) if locality else torch.arange(num_out, device=dev)
    q = out.coords.to(torch.int64)[order]
    if stride != 1:
        q = torch.cat([q[:, :1], q[:, 1:] * stride], dim=1)
    qkeys = index.pack(q)
    deltas = index.pack_delta(offsets)
    kv = offsets.shape[0]
    table = torch.empty(kv, num_out, dtype=torch.int32, device=dev)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(num_out, 1))
    for s in range(0, kv, per_chunk):
        e = min(kv, s + per_chunk)
        table[s:e] = index.lookup(qkeys[None, :] + deltas[s:e, None]).to(torch.int32)
    symmetric = stride == 1 and kernel_size % 2 == 1
    in_order = None if symmetric else (morton_order(x.coords, x.extent) if locality
                                       else torch.arange(x.num_voxels, device=dev))
    return ConvPlan(table=table, order=order.to(torch.int32), num_in=x.num_voxels, num_out=num_out,
                    symmetric=symmetric, in_order=in_order)


def conv_plan(x: SparseTensor, out: SparseTensor, kernel_size: int, stride: int = 1) -> ConvPlan:
    """The memoised implicit-GEMM plan of a conv on ``x`` whose output coordinates are ``out``'s."""
    return x._memo(("igemm_plan", kernel_size, stride), lambda: _build_plan(x, out, kernel_size, stride))


class _ImplicitGemmConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, weight, bias, plan: ConvPlan, config):
        out = igemm_forward(feats, weight, bias, plan.table, plan.order, plan.num_out, config)
        ctx.save_for_backward(feats, weight)
        ctx.plan, ctx.config, ctx.has_bias = plan, config, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        plan: ConvPlan = ctx.plan
        g = grad_out.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            table_t, order_t, flip = plan.transposed()
            wt = (weight.flip(0) if flip else weight).transpose(1, 2).contiguous()
            grad_x = igemm_forward(g, wt, None, table_t, order_t, plan.num_in, ctx.config)
        if need_w:
            pin, pout, ptr = plan.pairs()
            grad_w = igemm_wgrad(feats, g, pin, pout, ptr, plan.kernel_volume, ctx.config,
                                 plan.max_pairs).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g.to(torch.float32).sum(0).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None


def implicit_gemm_conv(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: ConvPlan,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """``out [num_out, Cout]`` of the planned conv; differentiable in ``feats``, ``weight`` and ``bias``."""
    if weight.dim() != 3 or weight.shape[0] != plan.kernel_volume or weight.shape[1] != feats.shape[1]:
        raise D3S2Error(f"conv weight {tuple(weight.shape)} does not fit {plan.kernel_volume} offsets and "
                        f"{feats.shape[1]} input channels")
    if feats.shape[0] != plan.num_in:
        raise D3S2Error(f"conv input has {feats.shape[0]} rows but the plan was built for {plan.num_in}")
    weight = weight.to(feats.dtype)
    bias = bias.to(feats.dtype) if bias is not None else None
    return _ImplicitGemmConv.apply(feats.contiguous(), weight, bias, plan, config)
