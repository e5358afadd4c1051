"""Lean refiner runs (d3s2.geometry.refine) against the plain dense reproduction of the release's runs
(d3s2.geometry.refine_reference), at tiny sizes with the release's patch geometry (3 patches per axis)."""

import numpy as np
import pytest
import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.geometry.lewiner import lewiner_marching_cubes
from d3s2.geometry.marching_cubes import dense_marching_cubes, sparse_marching_cubes
from d3s2.geometry.refine import refine_sdf_512, refine_signs_1024, refined_sdf_grid, refined_sign_grid
from d3s2.geometry.refine_reference import patch_stride, refine_sdf_512_reference, refine_signs_1024_reference


class SDFNet(nn.Module):
    """Stand-in 512 refiner: one zero-padded conv (not translation invariant near the patch border), tanh."""

    def __init__(self, patch: int, channels: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch_size = patch
        self.conv = nn.Conv3d(1 + channels, 1, 3, padding=1)
        w = torch.full((1, 1 + channels, 3, 3, 3), 0.0)
        w[0, 0] = 0.5 / 26
        w[0, 0, 1, 1, 1] = 0.5
        w = w + 0.05 * torch.randn(w.shape, generator=g)
        self.conv.weight.data.copy_(w)
        self.conv.bias.data.fill_(0.02)
        self.calls = 0

    def forward(self, sdf, features):
        self.calls += 1
        x = torch.cat([sdf, features], 1)
        # one sample at a time: CPU convolutions round differently with the batch size, and the lean run batches
        # only the samples holding voxels in a patch; this keeps the comparison exact
        return torch.cat([torch.tanh(self.conv(x[i:i + 1])) for i in range(len(x))])


class SignNet(nn.Module):
    """Stand-in 1024 sign refiner: a zero-padded box filter whose patch border flips the sign of the empty patch."""

    def __init__(self, patch: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch_size = patch
        self.conv = nn.Conv3d(1, 1, 3, padding=1)
        self.conv.weight.data.copy_(1 / 27 + 0.01 * torch.randn(1, 1, 3, 3, 3, generator=g))
        self.conv.bias.data.fill_(-0.8)
        self.calls = 0

    def forward(self, sdf):
        self.calls += 1
        return torch.cat([torch.sigmoid(self.conv(sdf[i:i + 1])) for i in range(len(sdf))])


def sphere(b, R, centre, radius, width=2.0, seed=0):
    """Band voxels of a sphere (clipped to the grid), SDF in voxels / width clamped to [-1, 1]."""
    ax = torch.arange(R)
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    d = (g.double() - torch.tensor(centre, dtype=torch.float64)).norm(dim=1) - radius
    keep = d.abs() < width
    g, d = g[keep], d[keep]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(g), generator=gen)  # the lean path must not rely on sorted input
    g, d = g[perm], d[perm]
    coords = torch.cat([torch.full((len(g), 1), b, dtype=torch.long), g], 1)
    return coords, (d / width).float()


def batch_of(*parts, channels=32, seed=0):
    coords = torch.cat([p[0] for p in parts])
    sdf = torch.cat([p[1] for p in parts])
    feats = torch.randn(len(coords), channels, generator=torch.Generator().manual_seed(seed))
    return coords, sdf, feats


def skimage_mesh(volume, level):
    from skimage import measure
    volume = np.asarray(volume, dtype=np.float32)
    if not volume.min() <= level <= volume.max():
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    v, f, _, _ = measure.marching_cubes(np.asarray(volume, dtype=np.float32), level, method="lewiner")
    return v, f


def assert_same_mesh(va, fa, vb, fb):
    """Same vertex set (within 1e-5 grid units, nearest neighbours both ways) and the same triangles."""
    from scipy.spatial import cKDTree

    va, vb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
    assert len(fa) == len(fb) and len(va) == len(vb)
    if len(va) == 0:
        return
    d_ab, idx = cKDTree(va).query(vb)
    d_ba = cKDTree(vb).query(va)[0]
    assert max(d_ab.max(), d_ba.max()) <= 1e-5
    tri_a = sorted(tuple(sorted(t)) for t in np.asarray(fa).tolist())
    tri_b = sorted(tuple(sorted(t)) for t in idx[np.asarray(fb)].tolist())
    assert tri_a == tri_b


R5, P5 = 40, 16  # 512 stand-in: stride 12, overlap 4
R1, P1 = 48, 10  # 1024 stand-in: signs at 24, stride 7, overlap 3


def test_patch_stride_release_geometry_and_errors():
    assert patch_stride(512, 192) == 160 and patch_stride(512, 256) == 128 and patch_stride(R5, P5) == 12
    for grid, patch in [(30, 10), (512, 100), (512, 513), (41, 16)]:
        with pytest.raises(D3S2Error, match="tile"):
            patch_stride(grid, patch)


def test_sdf_512_lean_equals_reference_and_mesh():
    net = SDFNet(P5)
    # ragged: a large sphere, an empty sample, a small sphere clipped by the grid border inside patch (0, 0, 0) only
    coords, sdf, feats = batch_of(sphere(0, R5, (20, 19, 21), 9.0), sphere(2, R5, (3, 4, 2), 3.5))
    assert int(coords[coords[:, 0] == 2, 1:].max()) < 12 and int(coords[:, 1:].min()) == 0
    ref = refine_sdf_512_reference(net, coords, sdf, feats, resolution=R5, batch_size=3)
    net.calls = 0
    lean = refined_sdf_grid(net, coords, sdf, feats, resolution=R5, batch_size=3)
    assert net.calls == 27 + 1  # sample 0 touches every patch; the empty patch runs once
    torch.testing.assert_close(lean, ref, atol=0, rtol=0)
    # the empty patch's output is not constant (zero padding), so a wrongly reused output would show
    empty = net(torch.ones(1, 1, P5, P5, P5), torch.zeros(1, 32, P5, P5, P5)).detach()
    assert float(empty.max() - empty.min()) > 1e-3
    fields = refine_sdf_512(net, coords, sdf, feats, resolution=R5, batch_size=3)
    assert len(fields) == 3
    for b, f in enumerate(fields):
        r = ref[b, 0]
        torch.testing.assert_close(f.values, r[f.coords[:, 0], f.coords[:, 1], f.coords[:, 2]], atol=1e-6, rtol=0)
        d = f.dense()
        explicit = torch.zeros_like(d, dtype=torch.bool)
        explicit[f.coords[:, 0], f.coords[:, 1], f.coords[:, 2]] = True
        assert torch.equal(d > f.level, r > f.level)
        assert explicit.sum() < r.numel()  # sparse: only around the level crossing
        vr, fr = skimage_mesh(r.numpy(), 0.4)
        assert (len(fr) > 0) == (b != 1)
        vl, fl = lewiner_marching_cubes(**f.mc_kwargs())
        assert_same_mesh(vr, fr, vl.numpy(), fl.numpy())
        vs, fs = sparse_marching_cubes(**f.mc_kwargs("sparse"))  # every straddling cell's corners are explicit
        vd, fd = dense_marching_cubes(r, 0.4)
        assert_same_mesh(vd.numpy(), fd.numpy(), vs.numpy(), fs.numpy())
    # world units are the release's v / R * 2 - 1
    vw, _ = lewiner_marching_cubes(**fields[0].mc_kwargs() | {"world": True})
    vg, _ = lewiner_marching_cubes(**fields[0].mc_kwargs())
    torch.testing.assert_close(vw, vg / R5 * 2 - 1, atol=1e-6, rtol=0)


def test_sdf_512_ragged_batch_of_two_default_batch_size():
    net = SDFNet(P5, seed=1)
    coords, sdf, feats = batch_of(sphere(1, R5, (30, 33, 35), 7.0, seed=1), sphere(0, R5, (8, 9, 30), 5.0), seed=2)
    ref = refine_sdf_512_reference(net, coords, sdf, feats, resolution=R5)
    net.calls = 0
    lean = refined_sdf_grid(net, coords, sdf, feats, resolution=R5)
    assert lean.shape[0] == 2 and 1 < net.calls < 27 + 1  # some patches hold no voxel of either sample
    torch.testing.assert_close(lean, ref, atol=0, rtol=0)


def test_signs_1024_lean_equals_reference_and_mesh():
    net = SignNet(P1)
    coords, sdf, _ = batch_of(sphere(0, R1, (24, 22, 25), 11.0), sphere(2, R1, (46, 47, 44), 5.0),
                              sphere(3, R1, (2, 3, 2), 3.0))
    ref = refine_signs_1024_reference(net, coords, sdf, resolution=R1, batch_size=4)
    net.calls = 0
    signs = refined_sign_grid(net, coords, sdf, resolution=R1, batch_size=4)
    assert net.calls == 27 + 1
    up = signs.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3).float()
    band = torch.zeros_like(up, dtype=torch.bool)
    band[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]] = True
    torch.testing.assert_close(torch.where(band, ref[:, 0], up), ref[:, 0], atol=0, rtol=0)
    fields = refine_signs_1024(net, coords, sdf, resolution=R1, batch_size=4)
    assert len(fields) == 4
    for b, f in enumerate(fields):
        r = ref[b, 0]
        assert torch.equal(f.dense(), r)  # fill_fn is the release's exact field off the band
        vr, fr = skimage_mesh(r.numpy(), 0.2)
        vl, fl = lewiner_marching_cubes(**f.mc_kwargs())
        assert_same_mesh(vr, fr, vl.numpy(), fl.numpy())
    # complete=True: every cell that can make a triangle has its 8 corners, so the sparse (Lorensen) MC of d3s2 gives
    # the dense grid's triangles too
    done = []
    full = refine_signs_1024(net, coords, sdf, resolution=R1, batch_size=4, complete=True,
                             progress=lambda i, n: done.append((i, n)))
    assert done == [(i, 27) for i in range(1, 28)]
    for b in (0, 2):
        assert torch.equal(full[b].dense(), ref[b, 0]) and len(full[b].coords) > len(fields[b].coords)
        vs, fs = sparse_marching_cubes(**full[b].mc_kwargs("sparse"))
        vd, fd = dense_marching_cubes(ref[b, 0], 0.2)
        assert_same_mesh(vd.numpy(), fd.numpy(), vs.numpy(), fs.numpy())
        assert len(fs) > 0
    # the empty sample's field is pure signs: its surfaces come from the empty patch's border alone
    assert len(fields[1].values) > 0 and set(fields[1].values.tolist()) <= {1.0, -1.0}


def test_bad_inputs_clear_errors():
    net = SDFNet(P5)
    coords, sdf, feats = batch_of(sphere(0, R5, (20, 20, 20), 5.0))
    with pytest.raises(D3S2Error, match=r"\[N, 4\]"):
        refined_sdf_grid(net, coords[:, 1:], sdf, feats, resolution=R5)
    bad = coords.clone()
    bad[0, 1] = R5
    with pytest.raises(D3S2Error, match="lie in"):
        refined_sdf_grid(net, bad, sdf, feats, resolution=R5)
    with pytest.raises(D3S2Error, match="NaN"):
        refined_sdf_grid(net, coords, torch.full_like(sdf, float("nan")), feats, resolution=R5)
    with pytest.raises(D3S2Error, match="tile"):
        refined_sdf_grid(SDFNet(15), coords, sdf, feats, resolution=R5)
    cfg_net = SDFNet(P5)
    cfg_net.config = type("Cfg", (), {"patch_stride": 10})()
    with pytest.raises(D3S2Error, match="patch_stride = 10"):
        refined_sdf_grid(cfg_net, coords, sdf, feats, resolution=R5)
    with pytest.raises(D3S2Error, match="duplicate"):
        refined_sdf_grid(net, torch.cat([coords[:3], coords[:1]]), sdf[:4], feats[:4], resolution=R5)
    with pytest.raises(D3S2Error, match="duplicate"):
        refine_signs_1024(SignNet(P1), torch.cat([coords[:3], coords[:1]]), sdf[:4], resolution=R1)
    with pytest.raises(D3S2Error, match="batch_size"):
        refined_sdf_grid(net, coords, sdf, feats, resolution=R5, batch_size=0)


def test_no_voxels_at_all():
    net, sign = SDFNet(P5), SignNet(P1)
    c, s, f = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0), torch.zeros(0, 32)
    assert refine_sdf_512(net, c, s, f, resolution=R5) == [] and refine_signs_1024(sign, c, s, resolution=R1) == []
    net.calls = sign.calls = 0
    (a,) = refine_sdf_512(net, c, s, f, resolution=R5, batch_size=1)
    (b,) = refine_signs_1024(sign, c, s, resolution=R1, batch_size=1)
    assert net.calls == 1 and sign.calls == 1  # only the empty patch runs
    torch.testing.assert_close(a.dense() > 0.4, refine_sdf_512_reference(net, c, s, f, resolution=R5,
                                                                        batch_size=1)[0, 0] > 0.4, atol=0, rtol=0)
    assert torch.equal(b.dense(), refine_signs_1024_reference(sign, c, s, resolution=R1, batch_size=1)[0, 0])


def test_sdf_512_half_precision_mesh_matches_skimage_on_the_fp16_grid():
    net = SDFNet(P5, seed=3).half()
    coords, sdf, feats = batch_of(sphere(0, R5, (19, 21, 20), 10.0))
    ref = refine_sdf_512_reference(net, coords, sdf, feats, resolution=R5)
    assert ref.dtype == torch.float16
    (f,) = refine_sdf_512(net, coords, sdf, feats, resolution=R5)
    assert f.values.dtype == torch.float16
    torch.testing.assert_close(f.values, ref[0, 0][f.coords[:, 0], f.coords[:, 1], f.coords[:, 2]], atol=0, rtol=0)
    vr, fr = skimage_mesh(ref[0, 0].numpy(), 0.4)  # the release hands skimage its fp16 grid
    vl, fl = lewiner_marching_cubes(**f.mc_kwargs())
    assert len(fr) > 0
    assert_same_mesh(vr, fr, vl.numpy(), fl.numpy())


class StripedSignNet(nn.Module):
    """Signs that change in most 512 cells (position-dependent stripes): the worst case of the off-band corners."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch_size = patch

    def forward(self, sdf):
        ax = torch.arange(sdf.shape[-1], dtype=sdf.dtype)
        x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
        return torch.sigmoid(4 * torch.sin(1.3 * x + 0.7 * y + 2.1 * z) + sdf)


@pytest.mark.parametrize("complete", [False, True])
def test_signs_1024_explicit_voxels_when_signs_change_everywhere(complete):
    net = StripedSignNet(P1)
    coords, sdf, _ = batch_of(sphere(0, R1, (24, 22, 25), 11.0))
    ref = refine_signs_1024_reference(net, coords, sdf, resolution=R1, batch_size=1)[0, 0]
    (f,) = refine_signs_1024(net, coords, sdf, resolution=R1, batch_size=1, complete=complete)
    assert torch.equal(f.dense(), ref)
    # brute force: the band, plus the corners 2m + {0,1,2}^3 of every 512 cell m whose 8 signs differ
    pos = refined_sign_grid(net, coords, sdf, resolution=R1, batch_size=1)[0] > 0
    H = R1 // 2
    cube = torch.stack([pos[a:a + H - 1, b:b + H - 1, c:c + H - 1] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    m = torch.nonzero(cube.any(0) & ~cube.all(0))
    d = torch.tensor([[a, b, c] for a in (0, 1, 2) for b in (0, 1, 2) for c in (0, 1, 2)])
    want = {tuple(v) for v in (2 * m[:, None] + d[None]).reshape(-1, 3).tolist()}
    band = coords[:, 1:]
    want |= {tuple(v) for v in band.tolist()}
    if complete:
        nb = (band[:, None] + (d - 1)[None]).reshape(-1, 3)
        want |= {tuple(v) for v in nb[((nb >= 0) & (nb < R1)).all(1)].tolist()}
    got = [tuple(v) for v in f.coords.tolist()]
    assert len(m) > 1000 and len(got) == len(set(got)) and set(got) == want
    keys = (f.coords[:, 0] * R1 + f.coords[:, 1]) * R1 + f.coords[:, 2]
    assert bool((keys[1:] > keys[:-1]).all())
    vr, fr = skimage_mesh(ref.numpy(), 0.2)
    vl, fl = lewiner_marching_cubes(**f.mc_kwargs())
    assert_same_mesh(vr, fr, vl.numpy(), fl.numpy())
