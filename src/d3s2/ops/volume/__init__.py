"""Dense-volume ops of the release's refiners (issue 20): GroupNorm statistics and normalisation + SiLU, and one
pass of the adaptive 27-tap filter, with an explicit backend (``"auto"``: Triton for contiguous CUDA tensors, the
PyTorch reference otherwise). References in :mod:`d3s2.ops.volume.reference`, kernels in ``kernels/``."""

from d3s2.ops.volume.api import VOLUME_BACKENDS, adaptive_pass, channel_stats, norm_apply, resolve_volume_backend

__all__ = ["VOLUME_BACKENDS", "adaptive_pass", "channel_stats", "norm_apply", "resolve_volume_backend"]
