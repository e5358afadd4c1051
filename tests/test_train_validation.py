import torch

from d3s2.train.tasks_ss_vae import surface_samples


def sphere_band(r: int, radius: float, band_voxels: float = 2.0):
    g = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    p = -1.0 + (g.double() + 0.5) * (2.0 / r)
    s = p.norm(dim=1) - radius
    keep = s.abs() < band_voxels * 2.0 / r
    return g[keep], s[keep].float()


def test_surface_samples_lie_on_the_level_set():
    r, radius = 32, 0.6
    coords, sdf = sphere_band(r, radius)
    pts = surface_samples(coords, sdf, r, 2000, torch.Generator().manual_seed(0))
    assert pts.shape == (2000, 3)
    # marching cubes on a linear-interpolated sphere: within a small fraction of a voxel of the true surface
    assert (pts.double().norm(dim=1) - radius).abs().max() < 0.25 * 2.0 / r
    # area weighting covers the whole sphere, not one patch
    assert (pts[:, 0] > 0.3).any() and (pts[:, 0] < -0.3).any() and (pts[:, 2] > 0.3).any() and (pts[:, 2] < -0.3).any()


def test_surface_samples_empty_without_a_surface():
    coords, sdf = sphere_band(16, 0.5)
    pts = surface_samples(coords, sdf.abs() + 0.1, 16, 100, torch.Generator().manual_seed(0))
    assert pts.shape == (0, 3)
