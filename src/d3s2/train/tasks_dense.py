"""The structure stage's training tasks (paper Sec. 5.2: "an extra DiT to predict the indices" of the sparse voxels).

* ``dense_vae``: an occupancy VAE on ``occ_res``^3 grids, the blocks of the prepared sparse SDFs that hold a band voxel;
* ``dense_dit``: a rectified-flow DiT (Sec. 4.3, Eq. 10-11) on the latents of that VAE, frozen, conditioned on one
  rendered view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.train.config import TrainConfig
from d3s2.train.image_encoders import ENCODER_TASK_ARGS, encoder_input
from d3s2.train.task_base import Task, model_config_from, model_config_of, register_task
from d3s2.train.task_common import ImageDiTTask, ImageViewDataset, data_root, surface_scores

__all__ = ["occupancy_from_coords", "DenseVAETrainModule", "DenseVAETask", "DenseDiTTrainModule", "DenseDiTTask"]


# ---------------------------------------------------------------------------------------------------------------------
# Structure stage: dense occupancy VAE (Sec. 5.2, "an extra DiT to predict the indices")


def occupancy_from_coords(coords: torch.Tensor, resolution: int, occ_res: int) -> torch.Tensor:
    """Voxel coords [N, 3] at ``resolution`` -> uint8 occupancy [occ_res]^3 of the blocks ``coords // (R/occ_res)``."""
    if resolution % occ_res:
        raise D3S2Error(f"SDF resolution {resolution} is not a multiple of the occupancy resolution {occ_res}")
    occ = torch.zeros((occ_res,) * 3, dtype=torch.uint8)
    c = (coords.long() // (resolution // occ_res)).clamp_(0, occ_res - 1)
    occ[c[:, 0], c[:, 1], c[:, 2]] = 1
    return occ


class _OccupancyDataset(torch.utils.data.Dataset):
    def __init__(self, root: str, occ_res: int, seed: int) -> None:
        from d3s2.data.datasets import SparseSDFDataset

        self.sdf = SparseSDFDataset(root, resolutions=(occ_res,), seed=seed)
        self.occ_res = occ_res

    def __len__(self) -> int:
        return len(self.sdf)

    def __getitem__(self, key) -> dict:
        index, resolution, _epoch = key
        it = self.sdf[(index, resolution)]
        return {"occ": occupancy_from_coords(it["coords"], it["resolution"], self.occ_res), "item_id": it["item_id"]}


def _collate_occ(items: list[dict]) -> dict:
    return {"occ": torch.stack([i["occ"] for i in items]), "item_ids": [i["item_id"] for i in items]}


class DenseVAETrainModule(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.vae.loss(batch["occ"])
        return {"loss": out["loss"], "bce": out["bce"].detach(), "kl": out["kl"].detach()}


def _occupied_points(occ: torch.Tensor) -> torch.Tensor:
    r = occ.shape[-1]
    return -1.0 + (torch.nonzero(occ).float() + 0.5) * (2.0 / r)


def _subsample(points: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``n`` of ``points``, drawn without replacement (all of them when there are no more)."""
    return points[torch.randperm(len(points), generator=generator)[:n].to(points.device)] if len(points) > n else points


@register_task("dense_vae")
class DenseVAETask(Task):
    """Occupancy VAE on ``occ_res``^3 grids (64^3; tiny 32^3) from the prepared sparse SDFs.

    The multi-resolution draw (Sec. 3.3) picks the SDF resolution of each batch from ``data.resolutions``; occupancy is
    the set of blocks ``coords // (R / occ_res)`` holding a band voxel. ``occ_res`` defaults to the model's resolution.
    Validation decodes the posterior mean and reports Chamfer distance / F-score between occupied voxel centres
    (``d3s2.geometry.metrics``; units of the [-1, 1] cube, F-score threshold ``fscore_voxels`` voxels of ``occ_res``).
    """

    task_args = {"fscore_voxels": 1.0, "val_points": 4096}

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.model_cfg = model_config_of(cfg.model, "dense_vae", self.name)
        self.occ_res = self.model_cfg.params.resolution

    def build_module(self) -> nn.Module:
        from d3s2.config import build_model

        return DenseVAETrainModule(build_model(self.model_cfg))

    def build_dataset(self, split: str = "train"):
        root = data_root(self.cfg, split)
        return _OccupancyDataset(root, self.occ_res, self.cfg.seed)

    def collate(self, items):
        return _collate_occ(items)

    def batch_stats(self, batch):
        return {"samples": float(batch["occ"].shape[0]), "tokens": float(batch["occ"].numel())}

    @torch.no_grad()
    def validate(self, module: nn.Module, batch: dict) -> dict[str, float]:
        vae = module.vae
        occ = batch["occ"]
        z, _, _ = vae.encode(occ, sample=False)
        logits = vae.decode(z)
        bce = float(F.binary_cross_entropy_with_logits(logits.float()[:, 0], occ.float()))
        pred = logits[:, 0] >= 0  # sigmoid >= 0.5
        pairs, ious = [], []
        g = torch.Generator().manual_seed(0)
        for b in range(occ.shape[0]):
            gt, pr = occ[b].bool(), pred[b]
            ious.append(float((gt & pr).sum()) / max(1.0, float((gt | pr).sum())))
            p, q = _occupied_points(pr), _occupied_points(gt)
            if len(p) == 0:  # nothing predicted: F-score 0, no Chamfer distance
                pairs.append(None)
                continue
            n = self.args["val_points"]
            pairs.append((_subsample(p, n, g), _subsample(q, n, g)))
        scores = surface_scores(pairs, self.args["fscore_voxels"] * 2.0 / self.occ_res)
        return {"val_bce": bce, "val_fscore": scores.pop("val_fscore"), "val_iou": sum(ious) / len(ious), **scores}


# ---------------------------------------------------------------------------------------------------------------------
# Structure stage: dense DiT (rectified flow, Sec. 4.3) on latents of a frozen dense VAE, image-conditioned


class DenseDiTTrainModule(nn.Module):
    """Dense DiT (+ the trainable image encoder, or ``batch["cond_tokens"]`` of a frozen one)."""

    def __init__(self, dit: nn.Module, encoder: nn.Module | None, flow_cfg, image_size: int) -> None:
        super().__init__()
        self.dit, self.encoder, self.flow_cfg, self.image_size = dit, encoder, flow_cfg, image_size

    def forward(self, batch: dict, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        from d3s2.flow.rectified import flow_matching_loss

        if self.encoder is not None:
            cond = self.encoder(encoder_input(batch["image"], batch["mask"], self.image_size))
        else:
            cond = batch["cond_tokens"]
        out = flow_matching_loss(self.dit, batch["x0"], cond, self.flow_cfg, generator=generator, t=t, eps=eps)
        return {"loss": out["loss"], "t_mean": out["t"].mean().detach()}


class _ImageOccupancyDataset(ImageViewDataset):
    """(occupancy of the prepared SDF at the batch resolution, one random view) per item."""

    def __init__(self, root: str, occ_res: int, seed: int) -> None:
        super().__init__(root, "sdf", seed, "dense_dit", need_sdf=True)
        self.occ_res = occ_res

    def __getitem__(self, key) -> dict:
        it = super().__getitem__(key)
        return {"occ": occupancy_from_coords(it["coords"], it["resolution"], self.occ_res), "image": it["image"],
                "mask": it["mask"], "item_id": it["item_id"]}


@register_task("dense_dit")
class DenseDiTTask(ImageDiTTask):
    """Rectified-flow DiT (Eq. 10-11) on the posterior means of a frozen dense VAE, conditioned on one rendered view.

    ``task_args``: ``vae`` (its model config), ``vae_checkpoint`` (a ``.safetensors`` file, a ``step_*`` folder or a
    checkpoint dir of a ``dense_vae`` run; EMA weights preferred), ``latent_scale`` (multiplies the latents),
    ``image_encoder`` + ``image_encoder_params`` / ``image_encoder_checkpoint`` / ``dinov2_weights`` (the same choice
    as the SS-DiT task, :mod:`d3s2.train.image_encoders`: the pipeline has one encoder for both stages). The flow
    settings come from the model file's ``flow:`` section.
    """

    task_args = {"vae": None, "vae_checkpoint": None, "latent_scale": 1.0, **ENCODER_TASK_ARGS}

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        from d3s2.config import build_model
        from d3s2.train.checkpoint import load_weights

        self.model_cfg = model_config_of(cfg.model, "dense_dit", self.name)
        if not self.args["vae"] or not self.args["vae_checkpoint"]:
            raise D3S2Error(
                "task dense_dit needs task_args.vae (model config) and task_args.vae_checkpoint (trained weights)"
            )
        vae_cfg = model_config_from(self.args["vae"], "task_args.vae")
        self.vae = build_model(vae_cfg)
        sd = load_weights(self.args["vae_checkpoint"], prefix="vae.")
        from d3s2.models.dense_vae import load_official_state_dict

        load_official_state_dict(self.vae, sd, key_map={})
        self.vae.to(device).eval().requires_grad_(False)
        self.occ_res = vae_cfg.params.resolution
        p = self.model_cfg.params
        if vae_cfg.params.latent_channels != p.in_channels or vae_cfg.params.latent_resolution != p.resolution:
            raise D3S2Error(
                f"the VAE latent ({vae_cfg.params.latent_channels} x {vae_cfg.params.latent_resolution}^3) does not "
                f"match the DiT input ({p.in_channels} x {p.resolution}^3)"
            )
        self.setup_flow_and_encoder(device)

    def build_module(self) -> nn.Module:
        dit, encoder = self.build_dit()
        return DenseDiTTrainModule(dit, encoder, self.flow_cfg, self.enc_cfg.image_size)

    def build_dataset(self, split: str = "train"):
        root = data_root(self.cfg, split)
        return _ImageOccupancyDataset(root, self.occ_res, self.cfg.seed)

    def collate(self, items):
        out = _collate_occ(items)
        out["image"] = torch.stack([i["image"] for i in items])
        out["mask"] = torch.stack([i["mask"] for i in items])
        return out

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        _, mean, _ = self.vae.encode(batch["occ"], sample=False)
        batch["x0"] = mean.float() * self.args["latent_scale"]
        if self.frozen_encoder is not None:
            batch["cond_tokens"] = self.frozen_encoder(
                encoder_input(batch["image"], batch["mask"], self.enc_cfg.image_size))
        return batch

    def batch_stats(self, batch):
        x0 = batch["x0"]
        return {"samples": float(x0.shape[0]), "tokens": float(x0.shape[0] * x0[0, 0].numel())}
