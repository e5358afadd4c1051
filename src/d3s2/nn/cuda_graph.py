"""Replay a fixed-shape model call as a CUDA graph (the sparse stages' sampling loop).

Inside a sparse stage the token set never changes, so every sampling step launches the same ~1-2 thousand kernels
(24 blocks of SSA, cross-attention and MLP) on tensors of the same shapes. At the 512 stage's ~10k tokens per sample
the GPU finishes those kernels faster than Python can launch them; a captured graph launches them all at once.

:class:`GraphedCall` wraps ``fn(*tensors) -> tensor``: the first call runs eagerly (it fills the caches the forward
needs -- SSA layout, pad indices, Triton compilation -- and its result is used), the second captures the graph
and replays it, later calls copy their inputs into the captured buffers and replay. If capture fails (some op in the
forward is not capturable) the wrapper warns once and stays eager: same results, no speed-up.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

__all__ = ["GraphedCall"]

log = logging.getLogger(__name__)


class GraphedCall:
    """``fn(*inputs) -> tensor`` on CUDA tensors of fixed shapes, replayed from a CUDA graph after the first call."""

    def __init__(self, fn: Callable[..., torch.Tensor], enabled: bool = True) -> None:
        self.fn = fn
        self.enabled = enabled
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[torch.Tensor, ...] = ()
        self.static_out: torch.Tensor | None = None
        self.failed: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static_in = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_out = self.fn(*self.static_in)
        except Exception as e:  # an op that cannot be captured: stay eager (results are identical either way)
            self.failed = f"{type(e).__name__}: {e}"
            self.static_in, self.static_out = (), None
            torch.cuda.synchronize()
            log.warning("CUDA graph capture failed, sampling without graphs: %s", self.failed)
            return
        self.graph = graph

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        usable = self.enabled and self.failed is None and all(t.is_cuda for t in inputs)
        if not usable or self.calls == 1:
            return self.fn(*inputs)
        if self.graph is None:
            self._capture(inputs)
            if self.graph is None:
                return self.fn(*inputs)
        if any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(inputs, self.static_in)):
            raise ValueError("GraphedCall: input shapes changed after capture; make a new GraphedCall per token set")
        for dst, src in zip(self.static_in, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.static_out.clone()
