"""Uniform access to dense latents (plain tensors ``[B, ...]``) and sparse latents (``.feats`` + ``.replace``)."""

from __future__ import annotations

from typing import Any

import torch

from d3s2.nn.blocks import rows_batch_index

__all__ = ["is_sparse", "feats_of", "replace_feats", "batch_size_of", "per_element_t"]


def is_sparse(x: Any) -> bool:
    return not isinstance(x, torch.Tensor) and hasattr(x, "feats")


def feats_of(x: Any) -> torch.Tensor:
    return x.feats if is_sparse(x) else x


def replace_feats(x: Any, feats: torch.Tensor) -> Any:
    return x.replace(feats) if is_sparse(x) else feats


def batch_size_of(x: Any) -> int:
    if not is_sparse(x):
        return x.shape[0]
    if getattr(x, "batch_size", None) is not None:
        return int(x.batch_size)
    return int(x.batch_offsets.numel() - 1)


def per_element_t(t: torch.Tensor, x: Any) -> torch.Tensor:
    """Broadcast per-sample ``t`` ``[B]`` against the features of ``x`` (dense: ``[B, 1, ...]``; sparse: ``[N, 1]``)."""
    f = feats_of(x)
    t = t.to(device=f.device, dtype=f.dtype)
    if is_sparse(x):
        return t[rows_batch_index(x.batch_offsets.to(f.device))][:, None]
    return t.view(-1, *([1] * (f.ndim - 1)))
