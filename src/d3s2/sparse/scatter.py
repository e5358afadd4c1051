"""Row scatter-add used by the sparse ops.

``out[idx[i]] += src[i]`` for row indices. On CUDA ``index_add_`` is the fast path; on CPU ``index_add_`` on 2D tensors
parallelises poorly (it stalls badly when the cores are shared), while ``scatter_add_`` with an expanded index is a
tight vectorised loop, so we pick per device. Both are differentiable in their out-of-place forms.
"""

from __future__ import annotations

import torch

__all__ = ["add_rows_", "add_rows"]


def add_rows_(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """In place: ``out[idx[i]] += src[i]``."""
    if out.is_cuda:
        return out.index_add_(0, idx, src)
    return out.scatter_add_(0, idx.view(-1, *([1] * (src.dim() - 1))).expand_as(src), src)


def add_rows(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out of place (autograd-friendly) ``out[idx[i]] += src[i]``."""
    if out.is_cuda:
        return out.index_add(0, idx, src)
    return out.scatter_add(0, idx.view(-1, *([1] * (src.dim() - 1))).expand_as(src), src)
