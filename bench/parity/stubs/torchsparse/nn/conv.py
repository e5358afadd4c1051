"""``torchsparse.nn.Conv3d`` stand-in with torchsparse's parameter layout."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from torchsparse.nn import functional as F
from torchsparse.utils import make_ntuple


class Conv3d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=False,
                 transposed=False, generative=False, config=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = make_ntuple(kernel_size, 3)
        self.stride = make_ntuple(stride, 3)
        self.dilation = dilation
        self.padding = make_ntuple(padding, 3)
        self.transposed, self.generative = transposed, generative
        volume = int(np.prod(self.kernel_size))
        shape = (volume, in_channels, out_channels)
        if volume == 1 and self.stride == (1, 1, 1):
            shape = (in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        std = 1 / math.sqrt((out_channels if transposed else in_channels) * volume)
        nn.init.uniform_(self.kernel, -std, std)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -std, std)

    def forward(self, input):
        return F.conv3d(input, self.kernel, self.kernel_size, bias=self.bias, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, transposed=self.transposed,
                        generative=self.generative, training=self.training)
