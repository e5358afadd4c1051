"""Training tasks: one small adapter per stage, one trainer for all (issue 5).

A task turns a :class:`~d3s2.train.config.TrainConfig` into

* ``build_module()``: the trainable *train module*, an ``nn.Module`` whose ``forward(batch)`` returns
  ``{"loss": scalar, <term>: scalar, ...}`` (so DDP / FSDP wrap one module and see the whole loss in ``forward``);
* ``build_dataset(split)``: a map-style data set indexed by keys ``(item_index, resolution, epoch)``, and ``collate``;
* ``prepare_batch(batch)``: on-device work outside the trainable graph (e.g. encoding with a frozen VAE);
* ``batch_stats(batch)``: ``{"samples": B, "tokens": N}`` for throughput;
* ``validate(module, batch)``: metrics of a validation batch (optional).

Registration hook (for ``ss_vae`` / ``ss_dit`` and any later stage)::

    from d3s2.train.tasks import Task, register_task

    @register_task("ss_dit")
    class SparseDiTTask(Task):
        ...

or, without importing that module here, add a lazily imported ``"module:Class"`` string:
``TASK_REGISTRY["ss_dit"] = "d3s2.train.ss_dit_task:SparseDiTTask"``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.config import MODEL_REGISTRY, ModelFileConfig, from_dict, load_model_config, model_class
from d3s2.errors import D3S2Error
from d3s2.train.config import TrainConfig
from d3s2.train.image_encoders import ENCODER_TASK_ARGS, encoder_input, setup_image_encoder, trainable_encoder
from d3s2.train.task_common import data_root, flow_validation, items_tau

__all__ = ["Task", "TASK_REGISTRY", "register_task", "build_task", "model_config_from", "DenseVAETask", "DenseDiTTask",
           "SSVAETask"]

TASK_REGISTRY: dict[str, Any] = {}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        TASK_REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def build_task(cfg: TrainConfig, device: torch.device) -> "Task":
    entry = TASK_REGISTRY.get(cfg.task)
    if entry is None:
        raise D3S2Error(f"unknown task '{cfg.task}' (known: {', '.join(sorted(TASK_REGISTRY))})")
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = getattr(importlib.import_module(module), cls)
    return entry(cfg, device)


def model_config_from(spec: Any, where: str = "model") -> ModelFileConfig:
    """A model config name / path, or an inline mapping ``{model: name, params: {...}, flow: {...}}``."""
    if isinstance(spec, str):
        return load_model_config(spec)
    if not isinstance(spec, dict) or "model" not in spec:
        raise D3S2Error(
            f"{where}: give a model config name (e.g. dense_vae_tiny) or a mapping with 'model:' and 'params:'"
        )
    from d3s2.flow.rectified import FlowConfig
    from d3s2.flow.sampler import SamplerConfig

    unknown = set(spec) - {"model", "params", "flow", "sampler"}
    if unknown:
        raise D3S2Error(f"{where}: unknown key '{sorted(unknown)[0]}' (valid: flow, model, params, sampler)")
    name = spec["model"]
    if name not in MODEL_REGISTRY:
        raise D3S2Error(f"{where}: unknown model '{name}' (known: {', '.join(sorted(MODEL_REGISTRY))})")
    mcls = model_class(name)
    return ModelFileConfig(
        model=name,
        params=from_dict(mcls.config_class, spec.get("params"), f"{where}.params"),
        flow=from_dict(FlowConfig, spec["flow"], f"{where}.flow") if "flow" in spec else None,
        sampler=from_dict(SamplerConfig, spec["sampler"], f"{where}.sampler") if "sampler" in spec else None,
    )


def _check_args(args: dict, allowed: dict[str, Any], task: str) -> dict:
    unknown = set(args) - set(allowed)
    if unknown:
        raise D3S2Error(
            f"task_args: unknown key '{sorted(unknown)[0]}' for task {task} (valid: {', '.join(sorted(allowed))})"
        )
    return {**allowed, **args}


class Task:
    name = "task"
    task_args: dict[str, Any] = {}
    # validate() only calls the train module's forward (FSDP2 gathers parameters in forward hooks only)
    validate_under_fsdp = False

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.args = _check_args(cfg.task_args, type(self).task_args, self.name)

    def build_module(self) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, split: str = "train") -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        return torch.utils.data.default_collate(items)

    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def batch_stats(self, batch: dict) -> dict[str, float]:
        return {"samples": float(len(batch.get("item_ids", [])))}

    def validate(self, module: nn.Module, batch: dict) -> dict[str, float]:
        out = module(batch)
        return {f"val_{k}": float(v) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


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
        self.model_cfg = model_config_from(cfg.model)
        if self.model_cfg.model != "dense_vae":
            raise D3S2Error(f"task dense_vae needs a dense_vae model config, got '{self.model_cfg.model}'")
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
        from d3s2.geometry.metrics import chamfer_distance, f_score

        vae = module.vae
        occ = batch["occ"]
        z, _, _ = vae.encode(occ, sample=False)
        logits = vae.decode(z)
        bce = float(F.binary_cross_entropy_with_logits(logits.float()[:, 0], occ.float()))
        pred = logits[:, 0] >= 0  # sigmoid >= 0.5
        cds, fss, ious = [], [], []
        thr = self.args["fscore_voxels"] * 2.0 / self.occ_res
        g = torch.Generator().manual_seed(0)
        for b in range(occ.shape[0]):
            gt, pr = occ[b].bool(), pred[b]
            ious.append(float((gt & pr).sum()) / max(1.0, float((gt | pr).sum())))
            p, q = _occupied_points(pr), _occupied_points(gt)
            if len(p) == 0:  # nothing predicted: F-score 0, no Chamfer distance
                fss.append(0.0)
                continue
            n = self.args["val_points"]
            p = p[torch.randperm(len(p), generator=g)[:n].to(p.device)] if len(p) > n else p
            q = q[torch.randperm(len(q), generator=g)[:n].to(q.device)] if len(q) > n else q
            cds.append(float(chamfer_distance(p, q)))
            fss.append(float(f_score(p, q, thr)))
        out = {"val_bce": bce, "val_fscore": sum(fss) / len(fss), "val_iou": sum(ious) / len(ious)}
        if cds:
            out["val_chamfer"] = sum(cds) / len(cds)
        return out


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
class DenseDiTTask(Task):
    """Rectified-flow DiT (Eq. 10-11) on the posterior means of a frozen dense VAE, conditioned on one rendered view.

    ``task_args``: ``vae`` (its model config), ``vae_checkpoint`` (a ``.safetensors`` file, a ``step_*`` folder or a
    checkpoint dir of a ``dense_vae`` run; EMA weights preferred), ``latent_scale`` (multiplies the latents),
    ``image_encoder`` + ``image_encoder_params`` / ``image_encoder_checkpoint`` / ``dinov2_weights`` (the same choice
    as the SS-DiT task, :mod:`d3s2.train.image_encoders`: the pipeline has one encoder for both stages). The flow
    settings come from the model file's ``flow:`` section.
    """

    task_args = {"vae": None, "vae_checkpoint": None, "latent_scale": 1.0, **ENCODER_TASK_ARGS}
    validate_under_fsdp = True

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        from d3s2.config import build_model
        from d3s2.flow.rectified import FlowConfig
        from d3s2.train.checkpoint import load_weights

        self.model_cfg = model_config_from(cfg.model)
        if self.model_cfg.model != "dense_dit":
            raise D3S2Error(f"task dense_dit needs a dense_dit model config, got '{self.model_cfg.model}'")
        self.flow_cfg = self.model_cfg.flow or FlowConfig()
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
        choice = setup_image_encoder(self.args, p.cond_channels, device, "dense_dit")
        self.enc_cfg, self.frozen_encoder = choice.config, choice.frozen

    def build_module(self) -> nn.Module:
        from d3s2.config import build_model

        dit = build_model(self.model_cfg)
        encoder = trainable_encoder(self.enc_cfg) if self.frozen_encoder is None else None
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

    def validate(self, module: nn.Module, batch: dict) -> dict[str, float]:
        return flow_validation(module, batch)


# ---------------------------------------------------------------------------------------------------------------------
# SS-VAE (Sec. 3, Eq. 2-3) with multi-resolution batches (Sec. 3.3)


class _SparseSDFKeys(torch.utils.data.Dataset):
    def __init__(self, root: str, resolutions, seed: int, max_voxels: int | None = None) -> None:
        from d3s2.data.datasets import SparseSDFDataset

        self.sdf = SparseSDFDataset(root, resolutions=resolutions or (512,), seed=seed, max_voxels=max_voxels)
        self.tau = items_tau(self.sdf.items, root)

    def __len__(self) -> int:
        return len(self.sdf)

    def __getitem__(self, key) -> dict:
        index, resolution, epoch = key
        self.sdf.set_epoch(epoch)  # fresh crops each epoch, the same in any worker
        return self.sdf[(index, resolution)]


class SSVAETrainModule(nn.Module):
    def __init__(self, vae: nn.Module, tau: float) -> None:
        super().__init__()
        self.vae, self.tau = vae, tau

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.vae.loss(batch["sdf"], sharp=batch["sharp"], tau=self.tau)
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}


@register_task("ss_vae")
class SSVAETask(Task):
    """SS-VAE on prepared sparse SDFs: one resolution per batch from ``data.resolutions`` (multi-resolution, Sec. 3.3)
    or the phase's; losses L_in, L_ext, L_sharp, KL (Eq. 2-3, weights in the model config).

    ``task_args.tau``: the SDF band of the data (default: the ``tau`` the items were prepared with). Validation decodes
    the posterior mean, extracts meshes from the decoded and the input sparse SDF (sparse marching cubes at level 0)
    and compares ``val_points`` area-weighted surface samples of each: Chamfer distance / F-score (threshold
    ``fscore_voxels`` voxels) in the [-1, 1] cube; plus the mean absolute SDF error on the input voxels (scaled units).
    A sample whose decoded SDF has no surface scores F = 0.
    """

    task_args = {"tau": None, "fscore_voxels": 1.0, "val_points": 8192}

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.model_cfg = model_config_from(cfg.model)
        if self.model_cfg.model != "ss_vae":
            raise D3S2Error(f"task ss_vae needs an ss_vae model config, got '{self.model_cfg.model}'")
        self._tau = self.args["tau"]

    def build_dataset(self, split: str = "train"):
        root = data_root(self.cfg, split)
        crop = self.cfg.data.max_voxels if split == "train" else None  # validate whole shapes
        ds = _SparseSDFKeys(root, self.cfg.data.resolutions, self.cfg.seed, crop)
        if self._tau is None:
            self._tau = ds.tau
        return ds

    def build_module(self) -> nn.Module:
        from d3s2.config import build_model

        if self._tau is None:  # the trainer builds the module first: read tau from the data
            self.build_dataset("train")
        return SSVAETrainModule(build_model(self.model_cfg), float(self._tau))

    def collate(self, items):
        from d3s2.data.datasets import collate_sparse_sdf

        return collate_sparse_sdf(items)

    def to_device(self, batch: dict) -> dict:
        out = dict(batch)
        out["sdf"] = batch["sdf"].to(self.device)
        out["sharp"] = batch["sharp"].to(self.device)
        return out

    def batch_stats(self, batch):
        x = batch["sdf"]
        return {"samples": float(x.batch_size), "tokens": float(x.num_voxels)}

    @torch.no_grad()
    def validate(self, module: nn.Module, batch: dict) -> dict[str, float]:
        from d3s2.geometry.metrics import chamfer_distance, f_score
        from d3s2.models.ss_vae_losses import lookup_rows, scale_sdf

        vae, tau = module.vae, module.tau
        x = batch["sdf"]
        x = x.replace(scale_sdf(x.feats.float(), tau))
        z, _, _ = vae.encode(x, sample_posterior=False)
        dec = vae.decode(z)
        rows = lookup_rows(x.coords, dec.coords)
        hit = rows >= 0
        err = (dec.feats.float()[rows[hit], 0] - x.feats[hit, 0]).abs()
        l1 = float(err.mean()) if err.numel() else float("nan")
        r = int(x.resolution or self.cfg.data.resolutions[-1])
        thr = self.args["fscore_voxels"] * 2.0 / r
        g = torch.Generator().manual_seed(0)
        cds, fss = [], []
        for b in range(int(x.batch_size)):
            def pts(t) -> torch.Tensor:
                sel = t.coords[:, 0] == b
                return surface_samples(t.coords[sel, 1:], t.feats[sel, 0], r, self.args["val_points"], g)

            p, q = pts(dec), pts(x)
            if len(p) and len(q):
                cds.append(float(chamfer_distance(p, q)))
                fss.append(float(f_score(p, q, thr)))
            else:
                fss.append(0.0)
        out = {"val_sdf_l1": l1, "val_fscore": sum(fss) / len(fss)}
        if cds:
            out["val_chamfer"] = sum(cds) / len(cds)
        return out


def surface_samples(coords: torch.Tensor, sdf: torch.Tensor, resolution: int, n: int, generator: torch.Generator):
    """``n`` area-weighted points on the level-0 surface of a sparse SDF (sparse marching cubes, [-1, 1] units);
    an empty tensor when the SDF has no surface."""
    from d3s2.geometry.marching_cubes import sparse_marching_cubes

    v, f = sparse_marching_cubes(coords.cpu(), sdf.float().cpu(), resolution, level=0.0, world=True)
    if len(f) == 0:
        return torch.zeros(0, 3)
    tri = v.double()[f]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=1)
    if float(area.sum()) <= 0:
        return torch.zeros(0, 3)
    face = torch.multinomial(area, n, replacement=True, generator=generator)
    uv = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    flip = uv.sum(1) > 1
    uv[flip] = 1 - uv[flip]
    t = tri[face]
    return (t[:, 0] + uv[:, :1] * (t[:, 1] - t[:, 0]) + uv[:, 1:] * (t[:, 2] - t[:, 0])).float()


# SS-DiT (Sec. 4): imported on first use
TASK_REGISTRY["ss_dit"] = "d3s2.train.tasks_ss_dit:SSDiTTask"
