"""Stand-in for torchsparse (see ../README.md): the parts the authors' Direct3D-S2 modules use."""

from torchsparse import nn, utils
from torchsparse.tensor import SparseTensor

__all__ = ["SparseTensor", "nn", "utils"]
