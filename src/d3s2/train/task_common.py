"""Pieces shared by the training tasks (:mod:`d3s2.train.tasks`, :mod:`d3s2.train.tasks_ss_dit`).

* :func:`data_root`: the folder of a split (``data.val_root`` for ``val`` when set, else ``data.root``);
* :func:`items_tau`: the one SDF band ``tau`` all prepared items share (the SS-VAE's input scaling);
* :func:`flow_validation`: the DiT tasks' validation, the flow loss at fixed ``t`` in {0.25, 0.5, 0.75} with fixed
  noise and no condition dropout (comparable across steps), for dense and sparse latents alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.train.config import TrainConfig

__all__ = ["data_root", "items_tau", "flow_validation"]


def data_root(cfg: TrainConfig, split: str) -> str:
    """``data.val_root`` for the ``val`` split when it is set, else ``data.root``."""
    return cfg.data.val_root if split == "val" and cfg.data.val_root else cfg.data.root


def items_tau(items: list[dict], where: str) -> float:
    """The one SDF band ``tau`` all prepared items share (the VAE's input scaling)."""
    taus = {float(it.get("tau", 0.0)) for it in items}
    if len(taus) != 1 or 0.0 in taus:
        raise D3S2Error(f"{where}: items were prepared with different or missing tau {sorted(taus)}; set task_args.tau")
    return taus.pop()


@torch.no_grad()
def flow_validation(module: nn.Module, batch: dict) -> dict[str, float]:
    """Flow loss at fixed t in {0.25, 0.5, 0.75}, fixed noise, no condition dropout (comparable across steps).

    ``module``: a DiT train module with ``flow_cfg`` and ``forward(batch, t=, eps=)``; ``batch["x0"]``: a dense
    latent ``[B, C, ...]`` or a sparse one (``feats``, ``batch_size``)."""
    x0 = batch["x0"]
    sparse = hasattr(x0, "feats")
    f = x0.feats if sparse else x0
    b = int(x0.batch_size) if sparse else x0.shape[0]
    g = torch.Generator(device="cpu").manual_seed(1234)
    eps = torch.randn(f.shape, generator=g).to(f.device)
    saved = module.flow_cfg
    module.flow_cfg = replace(saved, cond_drop_prob=0.0)
    try:
        vals = {}
        for tv in (0.25, 0.5, 0.75):
            t = torch.full((b,), tv, device=f.device)
            vals[f"val_loss_t{int(tv * 100)}"] = float(module(batch, t=t, eps=eps)["loss"])
    finally:
        module.flow_cfg = saved
    vals["val_loss"] = sum(vals.values()) / 3
    return vals
