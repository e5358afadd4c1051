"""The ``ss_vae`` training task: the SS-VAE (paper Sec. 3, Eq. 2-3) on prepared sparse SDFs, one resolution per batch
(multi-resolution training, Sec. 3.3), validated on the surfaces of the decoded SDFs (:func:`surface_samples`)."""

from __future__ import annotations

import torch
from torch import nn

from d3s2.train.config import TrainConfig
from d3s2.train.task_base import Task, model_config_of, register_task
from d3s2.train.task_common import data_root, items_tau, surface_scores

__all__ = ["SSVAETrainModule", "SSVAETask", "surface_samples"]


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
        self.model_cfg = model_config_of(cfg.model, "ss_vae", self.name)
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
        g = torch.Generator().manual_seed(0)
        pairs = []
        for b in range(int(x.batch_size)):
            def pts(t) -> torch.Tensor:
                sel = t.coords[:, 0] == b
                return surface_samples(t.coords[sel, 1:], t.feats[sel, 0], r, self.args["val_points"], g)

            p, q = pts(dec), pts(x)
            pairs.append((p, q) if len(p) and len(q) else None)
        return {"val_sdf_l1": l1, **surface_scores(pairs, self.args["fscore_voxels"] * 2.0 / r)}


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
