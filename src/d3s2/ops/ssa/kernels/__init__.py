"""Triton kernels of Spatial Sparse Attention, one file per kernel (paper Sec. 4.1, Algorithm 1)."""
