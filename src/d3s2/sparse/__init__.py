"""Sparse voxel tensors and the ops the VAE and DiT stand on (paper Sec. 3.1, 4.1)."""

from d3s2.sparse.serialize import BlockLayout, WindowPartition, serialize_blocks, window_partition

__all__ = ["BlockLayout", "WindowPartition", "serialize_blocks", "window_partition"]
