"""torchsparse.nn stand-in: ``Conv3d`` and ``functional``."""

from torchsparse.nn import functional
from torchsparse.nn.conv import Conv3d

__all__ = ["Conv3d", "functional"]
