"""The tiny SS-VAE overfits one prepared mesh's sparse SDF (paper Eq. 2-3 losses fall >= 10x) on the CPU."""

import pytest
import numpy as np
import torch
import trimesh

from d3s2.config import build_model
from d3s2.data.mesh_io import NormalizeTransform
from d3s2.data.sdf import mesh_to_sparse_sdf
from d3s2.models.ss_vae_losses import lookup_rows, scale_sdf
from d3s2.sparse import SparseTensor


def prepared_box(res: int = 32, tau_voxels: float = 2.0):
    """A box mesh through the data pipeline (d3s2.data.sdf.mesh_to_sparse_sdf, Eq. 1 band + sharp-edge mask), kept at
    its size (identity transform) so the band stays small; SDF converted to the VAE's units s / tau."""
    tau = tau_voxels * 2 / res
    mesh = trimesh.creation.box(extents=(1.1, 0.8, 0.6))
    sdf = mesh_to_sparse_sdf(mesh, res, tau=tau, transform=NormalizeTransform(1.0))
    coords = torch.from_numpy(sdf.coords.astype(np.int64))
    feats = scale_sdf(torch.from_numpy(sdf.sdf.astype(np.float32)), sdf.tau)[:, None]
    x = SparseTensor(feats, torch.cat([torch.zeros(coords.shape[0], 1, dtype=torch.long), coords], 1), 1, res)
    return x, torch.from_numpy(sdf.sharp)


@pytest.mark.slow
def test_tiny_vae_overfits_one_shape():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, sharp = prepared_box()
        assert int(sharp.sum()) > 0
        model = build_model("ss_vae_tiny").train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        history = []
        for _ in range(120):
            losses = model.training_losses(x, sharp=sharp, generator=g)
            opt.zero_grad()
            losses["total"].backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
        first = history[0]["total"]
        last = sum(h["total"] for h in history[-5:]) / 5
        assert all(torch.isfinite(torch.tensor(h["total"])) for h in history)
        assert last <= first / 10, (first, last)
        for term in ("in", "ext", "sharp"):
            assert history[-1][term] < history[0][term] / 5, term
        model.eval()
        with torch.no_grad():
            dec = model(x, sample_posterior=False).decoded
        # the reconstruction gets the inside/outside of the confidently signed input voxels right

        rows = lookup_rows(x.coords, dec.coords)
        assert bool((rows >= 0).all())
        pred, true = dec.feats[rows, 0], x.feats[:, 0]
        confident = true.abs() > 0.5
        agree = (torch.sign(pred[confident]) == torch.sign(true[confident])).float().mean()
        assert float(agree) > 0.95
    finally:
        torch.set_num_threads(threads)
