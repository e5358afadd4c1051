"""Peak bytes of live op outputs during a call, on any device including ``meta`` (no memory, no compute).

``with LiveBytes() as m: f()`` then ``m.peak``: the most bytes held at once by storages created inside the block
(tensors made before it, such as weights and inputs, are not counted, nor are the kernels' own workspaces, e.g.
cuDNN's). On the meta device this gives a full-size patch's activation peak on a machine without a GPU: the figure
the lean paths of d3s2's refiners are designed to lower.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.at = None

    def _drop(self, key: int) -> None:
        self.count[key] -= 1
        if self.count[key] == 0:
            self.live -= self.size.pop(key)
            del self.count[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self.count:
                self.count[key] = 0
                self.size[key] = t.untyped_storage().nbytes()
                self.live += self.size[key]
                if self.live > self.peak:
                    self.peak, self.at = self.live, (str(func), tuple(t.shape))
            self.count[key] += 1
            weakref.finalize(t, self._drop, key)
        return out


def meta_patch_peak(fn, *args) -> int:
    """Peak live bytes of ``fn(*args)`` under ``torch.no_grad`` (see the module docstring)."""
    with torch.no_grad():
        m = LiveBytes()
        with m:
            out = fn(*args)
        del out
    return m.peak
