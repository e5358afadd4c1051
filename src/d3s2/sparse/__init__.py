"""Sparse voxel tensors and the ops the VAE and DiT stand on (paper Sec. 3.1, 4.1).

Plain PyTorch: neighbour maps from sorted packed coordinate keys, convolution as gather-GEMM-scatter over kernel
offsets (torchsparse weight layout), per-sample norms, pooling/subdivision, block serialization for attention.
"""

from d3s2.sparse.conv import (
    SparseConv3d,
    dense_padding,
    dense_weight_to_kernel,
    downsample,
    gather_gemm_scatter,
    kernel_to_dense_weight,
    neighbor_map,
    sparse_conv3d,
)
from d3s2.sparse.layers import SparseGELU, SparseLinear, SparseSiLU
from d3s2.sparse.neighbors import KeyIndex, NeighborMap, build_key_index, build_neighbor_map, kernel_offsets
from d3s2.sparse.norm import SparseGroupNorm, SparseLayerNorm, sparse_group_norm
from d3s2.sparse.pool import SparseMeanPool, sparse_mean_pool
from d3s2.sparse.serialize import BlockLayout, WindowPartition, pack_keys, serialize_blocks, window_partition
from d3s2.sparse.subdivide import SparseSubdivide, child_offsets, subdivide
from d3s2.sparse.tensor import SparseTensor

__all__ = [
    "SparseTensor",
    "SparseConv3d", "sparse_conv3d", "neighbor_map", "downsample", "gather_gemm_scatter",
    "kernel_to_dense_weight", "dense_weight_to_kernel", "dense_padding",
    "SparseLinear", "SparseSiLU", "SparseGELU",
    "SparseGroupNorm", "SparseLayerNorm", "sparse_group_norm",
    "SparseMeanPool", "sparse_mean_pool",
    "SparseSubdivide", "subdivide", "child_offsets",
    "KeyIndex", "NeighborMap", "build_key_index", "build_neighbor_map", "kernel_offsets",
    "BlockLayout", "WindowPartition", "pack_keys", "serialize_blocks", "window_partition",
]
