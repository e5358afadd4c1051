"""Spatial Sparse Attention as one functional op (paper Sec. 4.1, Eq. 6-8) with an explicit backend choice.

``spatial_sparse_attention(q, k, v, layout, ...)`` runs the compression, selection and window branches and the gated
combination. ``backend="auto"`` takes the Triton kernels for CUDA tensors and the blocked PyTorch backend
(:mod:`d3s2.ops.ssa.blocked`: same function, gather formulation, no ``N x N`` tensor) otherwise; "triton" forces the
kernels (on CPU tensors that needs Triton's interpreter, ``TRITON_INTERPRET=1`` set before import); "blocked" forces
the blocked backend (any device); "reference" forces the masked dense PyTorch reference (the test oracle, O(N^2)).
Nothing is read from the environment here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from d3s2.errors import D3S2Error
from d3s2.ops.ssa import reference as ref
from d3s2.ops.ssa.layout import SSALayout
from d3s2.sparse.pool import check_pool_divisor
from d3s2.triton_support import check_triton_backend

__all__ = ["spatial_sparse_attention", "mean_pool_blocks", "resolve_backend", "BRANCHES"]

BRANCHES = ("cmp", "slc", "win")
BACKENDS = ("auto", "triton", "blocked", "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "blocked"
    if backend not in BACKENDS:
        raise D3S2Error(f"unknown SSA backend {backend!r}: use 'auto', 'triton', 'blocked' or 'reference'")
    if backend == "triton":
        check_triton_backend(device.type == "cuda", "blocked")
    return backend


def mean_pool_blocks(x_sorted: torch.Tensor, layout: SSALayout, divisor: str = "count") -> torch.Tensor:
    """Mean of block-sorted rows over each compression block -> [Nc, ...] (parameter-free compression).
    ``divisor="count_plus_one"`` divides by n + 1 as the release does (see :mod:`d3s2.sparse.pool`)."""
    nc = layout.num_cmp
    flat = x_sorted.reshape(x_sorted.shape[0], -1).float()
    out = torch.zeros(nc, flat.shape[1], dtype=torch.float32, device=x_sorted.device)
    out.index_add_(0, layout.token_cmp, flat)
    extra = 1 if check_pool_divisor(divisor) == "count_plus_one" else 0
    key = ("cmp_inv_count", str(x_sorted.device), extra)
    if key not in layout._cache:  # once per layout, not per call
        counts = (layout.cmp_offsets[1:] - layout.cmp_offsets[:-1]).to(torch.float32)[:, None]
        layout._cache[key] = 1.0 / (counts + extra)
    return (out * layout._cache[key]).to(x_sorted.dtype).view(nc, *x_sorted.shape[1:])


def _check(q, k, v, layout: SSALayout, branches):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise D3S2Error(f"q must be [N, H, D] and k, v [N, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n, h, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or h % k.shape[1]:
        raise D3S2Error(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (same N and D; H a multiple of Hkv)")
    if n != layout.num_tokens:
        raise D3S2Error(f"q has {n} tokens but the SSA layout was built for {layout.num_tokens}")
    if d & (d - 1) or d < 16:
        raise D3S2Error(f"head dim must be a power of two >= 16 for the SSA kernels, got {d}")
    bad = [b for b in branches if b not in BRANCHES]
    if bad or not branches:
        raise D3S2Error(f"SSA branches must be a non-empty subset of {BRANCHES}, got {tuple(branches)}")


def spatial_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SSALayout,
    *,
    k_cmp: torch.Tensor | None = None,
    v_cmp: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    top_k: int = 16,
    branches: Sequence[str] = BRANCHES,
    window_shift: int = 0,
    scale: float | None = None,
    backend: str = "auto",
    inputs_sorted: bool = False,
    return_parts: bool = False,
):
    """SSA output [N, H, D] (Eq. 6).

    q [N, H, D], k/v [N, Hkv, D]: in the caller's token order (the layout's ``perm`` sorts them) unless
    ``inputs_sorted``. k_cmp/v_cmp [Nc, Hkv, D]: compressed keys/values in the layout's compression-block order (the
    module computes them with its sparse 3D convolutions, Eq. 7); default = mean over each compression block.
    gate_logits [N, len(branches)] (pre-sigmoid) in the caller's order, branch order as ``branches``; None = plain sum.
    The selection branch always needs the compression scores, so with "slc" the compression attention runs even
    when "cmp" is not an output branch.
    """
    branches = tuple(branches)
    _check(q, k, v, layout, branches)
    be = resolve_backend(backend, q.device)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not inputs_sorted:
        q, k, v = layout.to_sorted(q), layout.to_sorted(k), layout.to_sorted(v)
        if gate_logits is not None:
            gate_logits = layout.to_sorted(gate_logits)
    need_cmp = "cmp" in branches or "slc" in branches
    if need_cmp and (k_cmp is None) != (v_cmp is None):
        raise D3S2Error("give both k_cmp and v_cmp, or neither (mean pooling)")
    if need_cmp and k_cmp is None:
        k_cmp, v_cmp = mean_pool_blocks(k, layout), mean_pool_blocks(v, layout)
    if gate_logits is not None and gate_logits.shape != (q.shape[0], len(branches)):
        raise D3S2Error(f"gate_logits must be [N, {len(branches)}], got {tuple(gate_logits.shape)}")

    parts: dict[str, torch.Tensor] = {}
    if be == "blocked":
        from d3s2.ops.ssa.blocked import ssa_blocked

        out, parts = ssa_blocked(q, k, v, k_cmp, v_cmp, gate_logits, layout, top_k=top_k, branches=branches,
                                 window_shift=window_shift, scale=scale, return_parts=True)
    elif be == "reference":
        out, parts = ref.ssa_reference(q, k, v, k_cmp, v_cmp, gate_logits, layout, top_k=top_k, branches=branches,
                                       window_shift=window_shift, scale=scale, return_parts=True)
    else:
        from d3s2.ops.ssa.kernels.compression import compression_attention_triton
        from d3s2.ops.ssa.kernels.gates import gated_combine_triton
        from d3s2.ops.ssa.kernels.scoring import score_topk_triton
        from d3s2.ops.ssa.kernels.selection import selection_attention_triton
        from d3s2.ops.ssa.kernels.window import window_attention_triton

        if need_cmp:
            o_cmp, lse = compression_attention_triton(q, k_cmp, v_cmp, layout, scale)
            parts["cmp"] = o_cmp
            if "slc" in branches:
                with torch.no_grad():
                    idx, _ = score_topk_triton(q.detach(), k_cmp.detach(), lse, layout, top_k, scale)
                parts["idx"] = idx
                parts["slc"] = selection_attention_triton(q, k, v, idx, layout, scale)
        if "win" in branches:
            w = layout.window(window_shift)
            if w.perm is None:
                parts["win"] = window_attention_triton(q, k, v, w, scale)
            else:
                ow = window_attention_triton(q.index_select(0, w.perm), k.index_select(0, w.perm),
                                             v.index_select(0, w.perm), w, scale)
                parts["win"] = ow.index_select(0, w.inverse)
        outs = [parts[b] for b in branches]
        if gate_logits is None:
            out = outs[0]
            for o in outs[1:]:
                out = out + o
        else:
            out = gated_combine_triton(outs, gate_logits)
    if not inputs_sorted:
        out = layout.from_sorted(out)
    return (out, parts) if return_parts else out
