"""Spatial Sparse Attention (paper Sec. 4.1): layout, PyTorch reference, Triton kernels and the functional op.

Kernels are imported lazily by :func:`spatial_sparse_attention` so that importing this package never needs Triton.
"""

from d3s2.ops.ssa.api import BRANCHES, mean_pool_blocks, resolve_backend, spatial_sparse_attention
from d3s2.ops.ssa.layout import SSALayout, WindowLayout, build_ssa_layout

__all__ = [
    "BRANCHES", "SSALayout", "WindowLayout", "build_ssa_layout", "mean_pool_blocks", "resolve_backend",
    "spatial_sparse_attention",
]
