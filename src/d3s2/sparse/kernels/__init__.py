"""Triton kernels of the sparse ops (implicit-GEMM sparse convolution); the PyTorch references live beside the ops
in `d3s2.sparse` and stay the CPU path and the test oracle."""
