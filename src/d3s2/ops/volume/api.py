"""The dense-volume ops behind one backend argument (see the package docstring)."""

from __future__ import annotations

import torch

from d3s2.errors import D3S2Error
from d3s2.ops.volume.reference import adaptive_pass_reference, channel_stats_reference, norm_apply_reference
from d3s2.triton_support import check_triton_backend, triton_available

__all__ = ["VOLUME_BACKENDS", "resolve_volume_backend", "channel_stats", "norm_apply", "adaptive_pass"]

VOLUME_BACKENDS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_volume_backend(backend: str, *tensors: torch.Tensor, channels_last: bool = False) -> str:
    """``"triton"`` or ``"reference"`` for these tensors. ``auto``: Triton when they are contiguous CUDA tensors of
    a kernel dtype (fp16 / bf16 / fp32) and Triton imports, else the reference (float64, CPU, strided views).
    ``channels_last``: the op also has kernels for channels-last 3-D tensors (the GroupNorm ops do)."""
    if backend not in VOLUME_BACKENDS:
        raise D3S2Error(f"unknown volume-op backend {backend!r}: use 'auto', 'triton' or 'reference'")
    fits = all(t.dtype in _KERNEL_DTYPES and (t.is_contiguous() or (
        channels_last and t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))) for t in tensors)
    if backend == "auto":
        return "triton" if fits and all(t.is_cuda for t in tensors) and triton_available() else "reference"
    if backend == "triton":
        check_triton_backend(all(t.is_cuda for t in tensors), "reference")
        if not fits:
            raise D3S2Error("backend='triton' volume ops take contiguous fp16 / bf16 / fp32 tensors; use 'auto'")
    return backend


def channel_stats(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (sample, channel) mean and sum of squared deviations (float64 ``[B, C]``) and the voxel count of ``x``
    ``[B, C, ...]``: what a GroupNorm over any grouping of the channels needs."""
    if x.dim() < 3:
        raise D3S2Error(f"channel_stats needs [B, C, ...] with spatial axes, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise D3S2Error(f"channel_stats got an empty volume {tuple(x.shape)}")
    if resolve_volume_backend(backend, x, channels_last=True) == "triton":
        from d3s2.ops.volume.kernels.group_norm import channel_stats_triton

        return channel_stats_triton(x)
    return channel_stats_reference(x)


def norm_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: bool = True,
               out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x * scale + shift`` per (sample, channel) (``[B, C]``; float32 arithmetic) written in ``x.dtype``, then
    SiLU when ``act``. ``out`` (may be ``x``): where to write."""
    if scale.shape != x.shape[:2] or shift.shape != x.shape[:2]:
        raise D3S2Error(f"norm_apply: scale / shift must be {tuple(x.shape[:2])}, got {tuple(scale.shape)} and "
                        f"{tuple(shift.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise D3S2Error(f"norm_apply: out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    same_layout = out is None or out.stride() == x.stride()
    if x.numel() and same_layout and resolve_volume_backend(backend, x, *([out] if out is not None else []),
                                                            channels_last=True) == "triton":
        from d3s2.ops.volume.kernels.group_norm import norm_apply_triton

        return norm_apply_triton(x, scale, shift, act, out)
    return norm_apply_reference(x, scale, shift, act, out)


def adaptive_pass(x: torch.Tensor, weights: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """One pass of the adaptive 27-tap filter (``adaptive_pass_reference``): ``x`` ``[B, C, D, H, W]``, normalised
    ``weights`` ``[B, 27, D, H, W]``; a new tensor in ``x.dtype``."""
    if x.dim() != 5 or weights.dim() != 5 or weights.shape[1] != 27 or weights.shape[0] != x.shape[0] \
            or weights.shape[2:] != x.shape[2:]:
        raise D3S2Error(f"adaptive_pass: weights {tuple(weights.shape)} do not fit the input {tuple(x.shape)} "
                        "(need [B, C, D, H, W] and [B, 27, D, H, W])")
    if weights.dtype != x.dtype:
        raise D3S2Error(f"adaptive_pass: weights dtype {weights.dtype} differs from the input's {x.dtype}")
    if x.numel() and resolve_volume_backend(backend, x, weights) == "triton":
        from d3s2.ops.volume.kernels.adaptive_filter import adaptive_pass_triton

        return adaptive_pass_triton(x, weights)
    return adaptive_pass_reference(x, weights)
