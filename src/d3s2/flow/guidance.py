"""Classifier-free guidance in ONE model call for sparse latents (paper Sec. 4.3 inference; the release's CFG rule).

The sparse latent is stacked twice (samples ``b..2b-1`` get the unconditional tokens) and
``v = v_u + guidance_scale * (v_c - v_u)``. At the 512 stage's ~10k tokens the SSA kernels are launch-bound, so one
call on 2N tokens costs far less than two calls on N; the stacked tensor keeps one coordinate cache, so the SSA layout
is built once for all steps, and the call can be replayed from a CUDA graph
(:class:`d3s2.nn.cuda_graph.GraphedCall`): the token set is fixed within a stage.

``combine_dtype``: the dtype of the guidance combination (the release computes it in the model's fp16); None: float32.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from d3s2.nn.cuda_graph import GraphedCall

__all__ = ["BatchedSparseGuidance"]


class BatchedSparseGuidance:
    """Wraps ``model(x, t, cond, **kwargs)`` for a fixed sparse latent ``x``: calling it with ``(x', t, cond)`` (``x'``
    on ``x``'s coordinates) returns the guided velocity on them."""

    def __init__(self, model: Callable, x: Any, cond: torch.Tensor, uncond: torch.Tensor,
                 guidance_scale: float, kwargs: dict | None = None, cuda_graphs: bool = False,
                 combine_dtype: torch.dtype | None = None):
        from d3s2.sparse import SparseTensor

        b = int(x.batch_size)
        shifted = x.coords.clone()
        shifted[:, 0] += b
        self.model, self.guidance_scale, self.n = model, float(guidance_scale), x.num_voxels
        self.combine_dtype = combine_dtype or torch.float32
        self.x2 = SparseTensor(torch.cat([x.feats, x.feats]), torch.cat([x.coords, shifted]), batch_size=2 * b,
                               resolution=x.resolution, stride=x.stride)
        self.cond2 = torch.cat([cond, uncond])
        self.kwargs = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in (kwargs or {}).items()}
        self.call = GraphedCall(self._run, enabled=cuda_graphs)

    def _run(self, feats2: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        out = self.model(self.x2.replace(feats2), t2, self.cond2, **self.kwargs)
        return out.feats if hasattr(out, "feats") else out

    def __call__(self, x, t, cond=None, **kwargs):
        f = x.feats
        v = self.call(torch.cat([f, f]), torch.cat([t, t])).to(self.combine_dtype)
        v_c, v_u = v[: self.n], v[self.n:]
        return x.replace(v_u + self.guidance_scale * (v_c - v_u))
