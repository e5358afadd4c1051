"""Training data sets over a prepared folder: SparseSDFDataset (multi-resolution), ImageLatentDataset, collates."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pybullet_data = pytest.importorskip("pybullet_data")
pytest.importorskip("trimesh")
pytest.importorskip("igl")

from d3s2.data.datasets import (  # noqa: E402
    ImageLatentDataset,
    SparseSDFDataset,
    collate_image_latent,
    collate_sparse_sdf,
)
from d3s2.data.multires import resample_sparse_sdf  # noqa: E402
from d3s2.data.prepare import PrepareConfig, run_prepare  # noqa: E402
from d3s2.data.sparse_sdf import load_sparse_sdf  # noqa: E402
from d3s2.errors import D3S2Error  # noqa: E402
from d3s2.sparse import SparseTensor  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    src = Path(pybullet_data.getDataPath())
    (root / "m").mkdir()
    shutil.copy(src / "duck_vhacd.obj", root / "m" / "a.obj")
    shutil.copy(src / "cube.obj", root / "m" / "b.obj")
    out = root / "out"
    s = run_prepare(
        root / "m",
        out,
        PrepareConfig(resolutions=(64,), views=3, image_size=24, supersample=1, tau=1 / 16),
        progress=False,
    )
    assert s.done == 2
    return out


def test_sparse_sdf_dataset_multires(prepared):
    ds = SparseSDFDataset(prepared, resolutions=(32, 64), seed=1)
    assert len(ds) == 2
    direct = ds[(0, 64)]
    item = ds.items[0]
    ref = load_sparse_sdf(Path(item["dir"]) / "sdf_64.npz")
    assert direct["resolution"] == 64 and direct["coords"].dtype == torch.int64
    np.testing.assert_array_equal(direct["coords"].numpy(), ref.coords.astype(np.int64))
    np.testing.assert_array_equal(direct["sdf"][:, 0].numpy(), ref.sdf.astype(np.float32))
    np.testing.assert_array_equal(direct["sharp"].numpy(), ref.sharp)
    assert direct["sharp"].any()

    low = ds[(0, 32)]  # not prepared: derived from 64 by trilinear resampling (Sec. 3.3)
    exp = resample_sparse_sdf(ref, 32)
    assert low["resolution"] == 32 and len(low["coords"]) == len(exp) > 0
    assert int(low["coords"].max()) < 32
    np.testing.assert_array_equal(low["sdf"][:, 0].numpy(), exp.sdf.astype(np.float32))

    # random resolution per index: from the set, reproducible, changes with the epoch
    draws = [ds[i % 2]["resolution"] for i in range(12)]
    assert set(draws) <= {32, 64}
    again = SparseSDFDataset(prepared, resolutions=(32, 64), seed=1)
    assert [again[i % 2]["resolution"] for i in range(12)] == draws


def test_batch_sampler_and_collate(prepared):
    from d3s2.train.sampling import BatchPlan  # the training loop's batch order: one resolution per batch

    ds = SparseSDFDataset(prepared, resolutions=(32, 64))
    plan = BatchPlan(len(ds), seed=0, resolutions=(32, 64))
    seen = set()
    for _ in range(6):
        keys = plan.next(2)
        batch = collate_sparse_sdf([ds[(i, keys.resolution)] for i in keys.indices])
        x = batch["sdf"]
        assert isinstance(x, SparseTensor)
        r = batch["resolution"]
        seen.add(r)
        parts = [
            ds[(ds.items.index(next(it for it in ds.items if it["item_id"] == i)), r)] for i in batch["item_ids"]
        ]
        assert x.batch_size == 2 and x.resolution == r
        assert x.feats.shape == (sum(len(p["sdf"]) for p in parts), 1)
        assert batch["sharp"].shape == (x.feats.shape[0],)
        off = 0
        for b, p in enumerate(parts):  # rows in batch order, sample b's rows carry batch index b
            n = len(p["sdf"])
            assert (x.coords[off : off + n, 0] == b).all()
            np.testing.assert_array_equal(x.coords[off : off + n, 1:].numpy(), p["coords"].numpy())
            np.testing.assert_array_equal(x.feats[off : off + n].numpy(), p["sdf"].numpy())
            np.testing.assert_array_equal(batch["sharp"][off : off + n].numpy(), p["sharp"].numpy())
            off += n
    assert seen == {32, 64}
    with pytest.raises(D3S2Error, match="mixes resolutions"):
        collate_sparse_sdf([ds[(0, 32)], ds[(1, 64)]])


def test_image_latent_dataset(prepared):
    rng = np.random.default_rng(0)
    ds_sdf = ImageLatentDataset(prepared, resolution=64, source="sdf", seed=3)
    assert len(ds_sdf) == 2
    s = ds_sdf[0]
    assert s["image"].shape == (3, 24, 24) and s["mask"].shape == (1, 24, 24)
    assert 0 < s["mask"].mean() < 1 and set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    assert float(s["image"][:, s["mask"][0] == 0].abs().max()) == 0.0  # straight RGB: zero outside the object
    assert s["feats"].shape == (len(s["coords"]), 1) and 0 <= s["view"] < 3
    assert s["camera"]["file"].endswith(f"{s['view']:03d}.png")
    views = set()
    for epoch in range(12):
        ds_sdf.set_epoch(epoch)
        views.add(ds_sdf[0]["view"])
    assert len(views) > 1  # fresh views across epochs
    ds_sdf.set_epoch(0)

    white = ImageLatentDataset(prepared, resolution=64, source="sdf", seed=3, background=1.0)[0]
    assert torch.allclose(white["image"][:, s["mask"][0] == 0], torch.ones(1))

    for it in ds_sdf.items:  # latents as the VAE encoder would write them
        n = int(rng.integers(5, 20))
        np.savez(Path(it["dir"]) / "latent_16.npz", coords=rng.integers(0, 16, (n, 3)), feats=rng.normal(size=(n, 8)))
    ds = ImageLatentDataset(prepared, resolution=16, source="latent")
    batch = collate_image_latent([ds[0], ds[1]])
    x = batch["x"]
    assert isinstance(x, SparseTensor) and x.batch_size == 2 and x.feats.shape[1] == 8
    assert x.feats.shape[0] == len(ds[0]["coords"]) + len(ds[1]["coords"])
    assert batch["image"].shape == (2, 3, 24, 24) and batch["mask"].shape == (2, 1, 24, 24)
    assert batch["resolution"] == 16 and x.resolution is None  # latents: the R / 8 grid is not the batch resolution
    assert collate_image_latent([ds_sdf[0], ds_sdf[1]], sdf=True)["x"].resolution == 64
    with pytest.raises(D3S2Error, match="no item"):
        ImageLatentDataset(prepared, resolution=128, source="latent")


def test_spatial_crop_keeps_whole_cells_within_budget():
    from d3s2.data.datasets import spatial_crop

    g = np.random.default_rng(0)
    # a thick spherical shell on a 96^3 grid: ~60k voxels
    p = np.argwhere(np.ones((96, 96, 96), bool))
    r = np.linalg.norm(p - 47.5, axis=1)
    coords = p[(r > 30) & (r < 33)]
    for budget in (500, 5000, 20000):
        keep = spatial_crop(coords, budget, np.random.default_rng(budget))
        assert 0 < len(keep) <= budget and len(np.unique(keep)) == len(keep)
        cells = coords // 8
        kept = {tuple(c) for c in cells[keep]}
        inside = np.array([tuple(c) in kept for c in cells])
        assert inside.sum() == len(keep)  # a kept cell keeps all of its voxels
        span = cells[keep].max(0) - cells[keep].min(0)
        assert (span <= 2 * int(np.ceil((budget / 64) ** (1 / 2))) + 2).all()  # one compact piece, not scattered
    a = spatial_crop(coords, 5000, np.random.default_rng(1))
    b = spatial_crop(coords, 5000, np.random.default_rng(2))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, spatial_crop(coords, 5000, np.random.default_rng(1)))
    one_cell = spatial_crop(coords, 1, g)  # below one cell: that cell, whole
    assert len(np.unique(coords[one_cell] // 8, axis=0)) == 1


def test_sparse_sdf_dataset_max_voxels_crops(prepared):
    full = SparseSDFDataset(prepared, resolutions=(64,), seed=0)[(0, 64)]
    n = len(full["coords"])
    ds = SparseSDFDataset(prepared, resolutions=(64,), seed=0, max_voxels=n // 3)
    a = ds[(0, 64)]
    assert 0 < len(a["coords"]) <= n // 3
    # the crop is a subset with its own values and sharp flags
    key = {tuple(c): i for i, c in enumerate(full["coords"].tolist())}
    rows = torch.tensor([key[tuple(c)] for c in a["coords"].tolist()])
    assert torch.equal(a["sdf"], full["sdf"][rows]) and torch.equal(a["sharp"], full["sharp"][rows])
    assert torch.equal(ds[(0, 64)]["coords"], a["coords"])  # reproducible
    ds.set_epoch(1)
    assert not torch.equal(ds[(0, 64)]["coords"], a["coords"])  # a fresh crop each epoch
    assert len(SparseSDFDataset(prepared, resolutions=(64,), max_voxels=10 * n)[(0, 64)]["coords"]) == n
    with pytest.raises(D3S2Error, match="max_voxels"):
        SparseSDFDataset(prepared, resolutions=(64,), max_voxels=0)
