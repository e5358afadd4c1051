"""Training data sets over a folder written by `d3s2 prepare` (paper Sec. 3.2-3.3: VAE; Sec. 4 / 5.1: DiT).

* ``SparseSDFDataset``: one mesh's sparse SDF (Eq. 1) with its sharp-voxel mask (Eq. 2) at a resolution drawn from a
  configured set (multi-resolution training, Sec. 3.3). A resolution that was not prepared is derived from the
  nearest higher prepared one by trilinear interpolation (``d3s2.data.multires.resample_sparse_sdf``).
  The training loop draws one resolution per batch (:class:`d3s2.train.sampling.BatchPlan`), as the paper samples one
  per iteration, and asks for ``dataset[(i, R)]``.
* ``ImageLatentDataset``: the DiT's pairs: a sparse latent (``latent_<R>.npz``: ``coords`` int [N, 3], ``feats``
  float [N, C], written by the VAE encoding step) or a sparse SDF, plus one random rendered view and its mask.
* ``collate_sparse_sdf`` / ``collate_image_latent``: batches as ``d3s2.sparse.SparseTensor`` (coords (b, x, y, z)),
  one resolution per batch; the SS-VAE and SS-DiT training tasks use them.

Randomness (resolution, view) is a function of (seed, epoch, index) (:func:`keyed_rng`, also the training batch
order's): reproducible and identical in any DataLoader worker; call ``set_epoch`` each epoch for fresh draws.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from d3s2.data import manifest as mf
from d3s2.errors import D3S2Error


__all__ = ["keyed_rng", "load_items", "SparseSDFDataset", "spatial_crop", "batch_coords", "collate_sparse_sdf",
           "load_rgba", "ImageLatentDataset", "collate_image_latent"]


def keyed_rng(*parts) -> np.random.Generator:
    """A numpy generator seeded by the SHA-1 of ``"p0:p1:..."``: the same draws for the same key in any process."""
    h = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def load_items(root: str | Path) -> list[dict]:
    """Finished items of a prepared folder: its ``manifest.jsonl`` if present, else the ``done`` markers."""
    root = Path(root)
    if not root.is_dir():
        raise D3S2Error(f"{root}: no such folder; give a folder written by `d3s2 prepare`")
    recs = mf.read_jsonl(root / mf.MANIFEST)
    if not recs:
        recs = [dict(r, path=k) for k, r in sorted(mf.collect_done(root).items())]
    for r in recs:
        r["dir"] = str(root / r.get("path", r["item_id"]))
    if not recs:
        raise D3S2Error(
            f"{root}: no prepared items (no manifest.jsonl and no finished item folders); run `d3s2 prepare`"
        )
    return recs


class SparseSDFDataset(torch.utils.data.Dataset):
    """Sparse SDF volumes for SS-VAE training.

    ``dataset[i]`` draws a resolution from ``resolutions``; ``dataset[(i, R)]`` asks for resolution R. Returns a dict:
    ``coords`` int64 [N, 3], ``sdf`` float32 [N, 1], ``sharp`` bool [N], ``resolution``, ``item_id``.

    ``max_voxels``: a volume with more voxels is cropped to a random spatial crop of at most that many (see
    :func:`spatial_crop`): the whole 1024^3 band of a detailed mesh (~18 M voxels) does not fit one 80 GB GPU in a
    training step of the paper-size SS-VAE (bench/results/train_step-vae1024-h100.json), a 4.4 M-voxel crop takes 21 GB.
    """

    def __init__(self, root: str | Path, resolutions: Sequence[int] = (256, 384, 512, 1024), seed: int = 0,
                 max_voxels: int | None = None):
        if max_voxels is not None and max_voxels < 1:
            raise D3S2Error(f"max_voxels must be a positive voxel count or None, got {max_voxels}")
        self.max_voxels = max_voxels
        self.items = load_items(root)
        self.resolutions = tuple(int(r) for r in resolutions)
        if not self.resolutions:
            raise D3S2Error("SparseSDFDataset needs at least one resolution")
        self.items = [it for it in self.items if it.get("sdf")]
        if not self.items:
            raise D3S2Error(f"{root}: no item has a sparse SDF; run `d3s2 prepare` with --resolutions")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def load_sdf(self, index: int, resolution: int):
        """The item's SparseSDF at ``resolution``: the prepared file, else resampled from the nearest higher one."""
        from d3s2.data.multires import resample_sparse_sdf
        from d3s2.data.sparse_sdf import load_sparse_sdf

        item = self.items[index]
        have = {int(r): v["file"] for r, v in item["sdf"].items()}
        if resolution in have:
            return load_sparse_sdf(Path(item["dir"]) / have[resolution])
        higher = sorted(r for r in have if r > resolution)
        src = higher[0] if higher else max(have)
        return resample_sparse_sdf(load_sparse_sdf(Path(item["dir"]) / have[src]), resolution)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, resolution = int(key[0]), int(key[1])
        else:
            index = int(key)
            resolution = int(keyed_rng("res", self.seed, self.epoch, index).choice(self.resolutions))
        sdf = self.load_sdf(index, resolution)
        coords, values, sharp = sdf.coords, sdf.sdf, sdf.sharp
        if self.max_voxels is not None and len(coords) > self.max_voxels:
            keep = spatial_crop(coords, self.max_voxels, keyed_rng(f"crop{resolution}", self.seed, self.epoch, index))
            coords, values, sharp = coords[keep], values[keep], sharp[keep]
        return {
            "coords": torch.from_numpy(coords.astype(np.int64)),
            "sdf": torch.from_numpy(values.astype(np.float32)).unsqueeze(1),
            "sharp": torch.from_numpy(sharp.copy()),
            "resolution": sdf.resolution,
            "item_id": self.items[index]["item_id"],
        }


def spatial_crop(coords: np.ndarray, max_voxels: int, rng: np.random.Generator, block: int = 8) -> np.ndarray:
    """Indices of a spatial crop of at most ``max_voxels`` voxels (one ``block``^3 cell is always kept whole): the whole
    ``block``^3 cells (the SS-VAE's 8x downsampling unit, so every latent cell of the crop sees all its voxels) within
    the largest Chebyshev radius around a random voxel's cell that stays within the budget. A cube of the surface
    band keeps the real local structure, which dropping random voxels would thin out."""
    cells = coords.astype(np.int64) // block
    centre = cells[rng.integers(len(cells))]
    dist = np.abs(cells - centre).max(axis=1)
    counts = np.bincount(dist)
    fits = np.nonzero(np.cumsum(counts) <= max_voxels)[0]
    radius = int(fits[-1]) if len(fits) else 0
    return np.nonzero(dist <= radius)[0]


def batch_coords(coords: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample coordinates ``[N_b, 3]`` -> one ``[sum N_b, 4]`` int32 tensor with the batch index first."""
    return torch.cat(
        [
            torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), c.to(torch.int32)], dim=1)
            for b, c in enumerate(coords)
        ]
    )


def collate_sparse_sdf(batch: list[dict]) -> dict:
    """``{"sdf": SparseTensor [N, 1] (batch, x, y, z), "sharp": bool [N] (same rows), "resolution", "item_ids"}``."""
    from d3s2.sparse import SparseTensor

    res = {b["resolution"] for b in batch}
    if len(res) != 1:
        raise D3S2Error(f"a batch mixes resolutions {sorted(res)}: draw one per batch (d3s2.train.sampling.BatchPlan)")
    resolution = res.pop()
    coords = batch_coords([b["coords"] for b in batch])
    x = SparseTensor(torch.cat([b["sdf"] for b in batch]), coords, batch_size=len(batch), resolution=resolution)
    return {
        "sdf": x,
        "sharp": torch.cat([b["sharp"] for b in batch]),
        "resolution": resolution,
        "item_ids": [b["item_id"] for b in batch],
    }


def load_rgba(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA PNG -> (rgb float [3, H, W] in [0, 1], mask float [1, H, W] = alpha)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return t[:3], t[3:4]


class ImageLatentDataset(torch.utils.data.Dataset):
    """DiT training pairs: sparse latent (or sparse SDF) + one random render and its mask.

    ``source="latent"`` reads ``<item>/latent_<resolution>.npz`` (``coords``, ``feats``); ``source="sdf"`` reads the
    prepared ``sdf_<resolution>.npz`` (feats = SDF [N, 1]). ``background``: None keeps the straight RGB (zero where
    alpha is 0); a float or 3 floats composites the render onto that colour. Returns ``coords`` int64 [N, 3],
    ``feats`` float32 [N, C], ``image`` [3, H, W], ``mask`` [1, H, W], ``view``, ``camera`` (its cameras.json entry),
    ``resolution``.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        source: str = "latent",
        background: float | Sequence[float] | None = None,
        seed: int = 0,
    ):
        if source not in ("latent", "sdf"):
            raise D3S2Error(f"ImageLatentDataset source must be 'latent' or 'sdf', got {source!r}")
        self.resolution, self.source, self.seed, self.epoch = int(resolution), source, seed, 0
        self.background = (
            None if background is None else torch.as_tensor(background, dtype=torch.float32).reshape(-1, 1, 1)
        )
        items = []
        for it in load_items(root):
            if not it.get("views"):
                continue
            geo = Path(it["dir"]) / (
                f"latent_{self.resolution}.npz" if source == "latent" else f"sdf_{self.resolution}.npz"
            )
            if geo.is_file():
                items.append(dict(it, geometry=str(geo)))
        if not items:
            raise D3S2Error(
                f"{root}: no item has both renders and {source} files at resolution {self.resolution} "
                + ("(encode the SDFs with the VAE first)" if source == "latent" else "(run d3s2 prepare at it)")
            )
        self.items = items

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _geometry(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source == "sdf":
            from d3s2.data.sparse_sdf import load_sparse_sdf

            s = load_sparse_sdf(item["geometry"])
            return torch.from_numpy(s.coords.astype(np.int64)), torch.from_numpy(s.sdf.astype(np.float32))[:, None]
        try:
            with np.load(item["geometry"]) as z:
                coords, feats = z["coords"].astype(np.int64), z["feats"].astype(np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise D3S2Error(
                f"{item['geometry']}: not a latent file with 'coords' and 'feats' ({exc}); re-encode it"
            ) from exc
        return torch.from_numpy(coords), torch.from_numpy(feats.reshape(len(coords), -1))

    def __getitem__(self, index: int) -> dict:
        item = self.items[int(index)]
        cams = json.loads((Path(item["dir"]) / item.get("cameras", "cameras.json")).read_text())["views"]
        view = int(keyed_rng("view", self.seed, self.epoch, int(index)).integers(len(cams)))
        image, mask = load_rgba(Path(item["dir"]) / cams[view]["file"])
        if self.background is not None:
            image = image * mask + self.background * (1.0 - mask)
        coords, feats = self._geometry(item)
        return {
            "coords": coords,
            "feats": feats,
            "image": image,
            "mask": mask,
            "view": view,
            "camera": cams[view],
            "resolution": self.resolution,
            "item_id": item["item_id"],
        }


def collate_image_latent(batch: list[dict], sdf: bool = False) -> dict:
    """``{"x": SparseTensor (latents or SDF), "image": [B, 3, H, W], "mask": [B, 1, H, W], "resolution", "item_ids"}``.

    ``sdf``: the features are SDF voxels at the batch resolution (``x.resolution`` set; else latents on the R / 8 grid,
    resolution unset). One resolution per batch."""
    from d3s2.sparse import SparseTensor

    res = {i["resolution"] for i in batch}
    if len(res) != 1:
        raise D3S2Error(f"a batch mixes resolutions {sorted(res)}")
    r = res.pop()
    x = SparseTensor(torch.cat([i["feats"] for i in batch]), batch_coords([i["coords"] for i in batch]),
                     batch_size=len(batch), resolution=r if sdf else None)
    return {"x": x, "image": torch.stack([i["image"] for i in batch]), "mask": torch.stack([i["mask"] for i in batch]),
            "resolution": r, "item_ids": [i["item_id"] for i in batch]}
