"""Pieces shared by the training tasks (:mod:`d3s2.train.tasks_dense`, :mod:`d3s2.train.tasks_ss_vae`,
:mod:`d3s2.train.tasks_ss_dit`).

* :func:`data_root`: the folder of a split (``data.val_root`` for ``val`` when set, else ``data.root``);
* :func:`items_tau`: the one SDF band ``tau`` all prepared items share (the SS-VAE's input scaling);
* :func:`flow_validation`: the DiT tasks' validation, the flow loss at fixed ``t`` in {0.25, 0.5, 0.75} with fixed
  noise and no condition dropout (comparable across steps), for dense and sparse latents alike;
* :func:`surface_scores`: the VAE tasks' validation, mean Chamfer distance and F-score of decoded against input
  surfaces (:mod:`d3s2.geometry.metrics`);
* :class:`ImageViewDataset`: the image-conditioned tasks' data, one item's sparse geometry and one rendered view;
* :class:`ImageDiTTask`: the base of the image-conditioned DiT tasks (flow settings, image encoder, validation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.train.config import TrainConfig
from d3s2.train.image_encoders import setup_image_encoder, trainable_encoder
from d3s2.train.task_base import Task

__all__ = ["data_root", "items_tau", "flow_validation", "surface_scores", "ImageViewDataset",
           "ImageDiTTask"]


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


def surface_scores(pairs: list, threshold: float) -> dict[str, float]:
    """``{"val_fscore", "val_chamfer"}``: the means over ``pairs`` of (decoded, input) surface point sets of the
    F-score at ``threshold`` and the Chamfer distance; a pair given as ``None`` (no decoded surface) scores F = 0 and
    has no Chamfer distance, which is left out when no pair has one."""
    from d3s2.geometry.metrics import chamfer_distance, f_score

    cds, fss = [], []
    for pair in pairs:
        if pair is None:
            fss.append(0.0)
            continue
        p, q = pair
        cds.append(float(chamfer_distance(p, q)))
        fss.append(float(f_score(p, q, threshold)))
    out = {"val_fscore": sum(fss) / len(fss)}
    if cds:
        out["val_chamfer"] = sum(cds) / len(cds)
    return out


class ImageViewDataset(torch.utils.data.Dataset):
    """Keys ``(item_index, resolution, epoch)`` -> one item's sparse geometry (``source``: SDF or latent) at that
    resolution and a rendered view; the view is a function of (seed, epoch, index), reproducible in any worker. Shared
    by the image-conditioned tasks (dense_dit, ss_dit). ``need_sdf``: keep only items that have sparse SDFs."""

    def __init__(self, root: str, source: str, seed: int, task: str, need_sdf: bool = False) -> None:
        from d3s2.data.datasets import load_items

        self.root, self.source, self.seed, self.task = root, source, seed, task
        self.items = [it for it in load_items(root) if it.get("views") and (it.get("sdf") or not need_sdf)]
        if not self.items:
            what = "both renders and sparse SDFs" if need_sdf else "renders"
            raise D3S2Error(f"{root}: no item has {what}; run `d3s2 prepare` with --views")
        self._by_res: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _dataset(self, resolution: int):
        from d3s2.data.datasets import ImageLatentDataset

        if resolution not in self._by_res:
            ds = ImageLatentDataset(self.root, resolution, source=self.source, seed=self.seed)
            self._by_res[resolution] = (ds, {it["item_id"]: j for j, it in enumerate(ds.items)})
        return self._by_res[resolution]

    def __getitem__(self, key) -> dict:
        index, resolution, epoch = key
        if resolution is None:
            raise D3S2Error(f"task {self.task} needs a resolution per batch: set phases[].resolution or "
                            "data.resolutions")
        ds, rows = self._dataset(int(resolution))
        item_id = self.items[index]["item_id"]
        j = rows.get(item_id)
        if j is None:
            what = f"latent_{resolution}.npz (run d3s2 encode-latents)" if self.source == "latent" else \
                f"sdf_{resolution}.npz (prepare that resolution or change phases)"
            raise D3S2Error(f"item {item_id} has no {what}")
        ds.epoch = int(epoch)
        it = ds[j]
        return {"coords": it["coords"], "feats": it["feats"], "image": it["image"], "mask": it["mask"],
                "resolution": int(resolution), "item_id": item_id}


class ImageDiTTask(Task):
    """What the image-conditioned DiT tasks (``dense_dit``, ``ss_dit``) share: the flow settings of the model file, the
    one image encoder choice of :mod:`d3s2.train.image_encoders`, the DiT built with its trainable encoder, and the
    flow validation. A subclass sets ``model_cfg`` and then calls :meth:`setup_flow_and_encoder`."""

    validate_under_fsdp = True

    def setup_flow_and_encoder(self, device: torch.device) -> None:
        from d3s2.flow.rectified import FlowConfig

        self.flow_cfg = self.model_cfg.flow or FlowConfig()
        choice = setup_image_encoder(self.args, self.model_cfg.params.cond_channels, device, self.name)
        self.enc_cfg, self.frozen_encoder = choice.config, choice.frozen

    def build_dit(self) -> tuple[nn.Module, nn.Module | None]:
        """The DiT and the image encoder trained with it (None when the encoder is frozen), built in that order."""
        from d3s2.config import build_model

        dit = build_model(self.model_cfg)
        encoder = trainable_encoder(self.enc_cfg) if self.frozen_encoder is None else None
        return dit, encoder

    def validate(self, module: nn.Module, batch: dict) -> dict[str, float]:
        return flow_validation(module, batch)
