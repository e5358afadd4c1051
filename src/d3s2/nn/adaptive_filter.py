"""Per-voxel adaptive 3x3x3 filters of the release's 512 SDF refiner (``model_refiner.ckpt``).

A small conv net predicts 27 weights per voxel; they are L1-normalised over the 27 taps (``F.normalize(p=1)``, eps
1e-12) and the same filter is applied three times to every channel of the input, zero-padded by one voxel. Tap
``t = 9 i + 3 j + k`` reads the neighbour at offset ``(i - 1, j - 1, k - 1)`` in (D, H, W), as the authors' loop does.

:func:`adaptive_filter_reference` is that loop in plain PyTorch (each tap a full-size product and a full-size sum);
:func:`adaptive_filter` accumulates the taps in place into one output per pass (``addcmul_``) and normalises the
weights in place, so a pass holds the padded input, the output and the weights only. Autograd on: the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d3s2.ops.volume import adaptive_pass, resolve_volume_backend

__all__ = ["TAPS", "normalize_taps", "adaptive_filter", "adaptive_filter_reference"]

TAPS = [(i, j, k) for i in range(3) for j in range(3) for k in range(3)]


def normalize_taps(weights: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``F.normalize(weights, p=1, dim=1)``; ``in_place``: divide ``weights`` itself."""
    if not in_place:
        return F.normalize(weights, p=1, dim=1)
    norm = torch.linalg.vector_norm(weights, 1, dim=1, keepdim=True).clamp_min_(1e-12)
    return weights.div_(norm)


def adaptive_filter_reference(x: torch.Tensor, raw_weights: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """The release's filter: ``raw_weights`` [B, 27, D, H, W] (before normalisation) applied ``passes`` times to
    ``x`` [B, C, D, H, W]."""
    w = F.normalize(raw_weights, p=1, dim=1)
    d, h, wd = x.shape[2:]
    for _ in range(passes):
        padded = F.pad(x, (1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(x)
        for t, (i, j, k) in enumerate(TAPS):
            out = out + padded[:, :, i:i + d, j:j + h, k:k + wd] * w[:, t:t + 1]
        x = out
    return x


def adaptive_filter(x: torch.Tensor, raw_weights: torch.Tensor, passes: int = 3, backend: str = "auto") -> torch.Tensor:
    """:func:`adaptive_filter_reference` with in-place accumulation (and in-place normalisation of ``raw_weights``,
    which the caller must not reuse) when autograd is off; each pass one Triton kernel
    (:func:`d3s2.ops.volume.adaptive_pass`) where ``backend`` resolves to it."""
    if raw_weights.shape[1] != len(TAPS) or raw_weights.shape[0] != x.shape[0] or raw_weights.shape[2:] != x.shape[2:]:
        raise ValueError(f"adaptive filter weights {tuple(raw_weights.shape)} do not fit the input {tuple(x.shape)}")
    if torch.is_grad_enabled():
        return adaptive_filter_reference(x, raw_weights, passes)
    w = normalize_taps(raw_weights, in_place=True)
    if x.numel() and w.dtype == x.dtype and resolve_volume_backend(backend, x, w) == "triton":
        for _ in range(passes):
            x = adaptive_pass(x, w, backend="triton")
        return x
    d, h, wd = x.shape[2:]
    for _ in range(passes):
        padded = F.pad(x, (1, 1, 1, 1, 1, 1))
        del x
        out = torch.zeros_like(padded[:, :, 1:-1, 1:-1, 1:-1], memory_format=torch.contiguous_format)
        for t, (i, j, k) in enumerate(TAPS):
            out.addcmul_(padded[:, :, i:i + d, j:j + h, k:k + wd], w[:, t:t + 1])
        del padded
        x = out
    return x
