"""SSA layout (paper Sec. 4.1, Fig. 3) and the masked PyTorch reference: structure invariants, no kernels."""

import math

import numpy as np
import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.ops.ssa import build_ssa_layout
from d3s2.ops.ssa import reference as ref


def mesh_shell_coords(res: int = 10, batch: int = 0) -> torch.Tensor:
    """Coarse surface voxels of a real mesh (pybullet_data duck), [n, 4]."""
    import os

    import pybullet_data
    import trimesh

    mesh = trimesh.load(os.path.join(pybullet_data.getDataPath(), "duck.obj"), force="mesh", process=False)
    v = mesh.vertices - mesh.bounds[0]
    mesh.vertices = v / v.max()
    pts, _ = trimesh.sample.sample_surface(mesh, 4000, seed=0)
    cells = np.unique(np.clip(np.floor(pts * res), 0, res - 1).astype(np.int64), axis=0)
    c = torch.from_numpy(cells)
    return torch.cat([torch.full((c.shape[0], 1), batch), c], 1)


def blob_coords(n: int, extent: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.unique(torch.randint(0, extent, (4 * n, 3), generator=g), dim=0)
    c = c[torch.randperm(c.shape[0], generator=g)[:n]]
    return torch.cat([torch.full((c.shape[0], 1), batch), c], 1)


def ragged(seed=0):
    c = torch.cat([mesh_shell_coords(8, 0), blob_coords(1, 5, 1, seed), blob_coords(37, 11, 2, seed + 1)])
    return c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("m_cmp,m_slc", [(2, 4), (4, 4), (4, 8)])
def test_spatial_layout_blocks_are_3d_cells(m_cmp, m_slc):
    coords = ragged()
    lay = build_ssa_layout(coords, m_cmp=m_cmp, m_slc=m_slc, m_win=4)
    sc = coords[lay.perm] if lay.perm is not None else coords
    assert torch.equal(sc, lay.sorted_coords)
    assert torch.equal(coords[lay.perm][lay.inverse], coords)
    for offs, m in ((lay.cmp_offsets, m_cmp), (lay.slc_offsets, m_slc)):
        key = torch.cat([sc[:, :1], sc[:, 1:] // m], 1)
        for j in range(offs.numel() - 1):
            blk = key[offs[j]:offs[j + 1]]
            assert blk.shape[0] > 0 and bool((blk == blk[0]).all())  # one 3D cell per block, contiguous
        ids = torch.unique(key, dim=0)
        assert ids.shape[0] == offs.numel() - 1  # each cell is exactly one block
    # compression blocks nest inside their selection block, contiguously
    for s in range(lay.num_slc):
        c0, cnt = int(lay.slc_cmp_start[s]), int(lay.slc_cmp_count[s])
        assert int(lay.cmp_offsets[c0]) == int(lay.slc_offsets[s])
        assert int(lay.cmp_offsets[c0 + cnt]) == int(lay.slc_offsets[s + 1])
        assert bool((lay.cmp_slc[c0:c0 + cnt] == s).all())
    assert int(lay.slc_cmp_count.max()) <= lay.cmp_per_slc
    # scan order: a permutation inside each sample's range of selection blocks, by decreasing count
    order = lay.slc_scan_order.long()
    assert torch.equal(torch.sort(order).values, torch.arange(lay.num_slc))
    assert torch.equal(lay.slc_sample[order], lay.slc_sample)
    cnt = lay.slc_cmp_count[order]
    same = lay.slc_sample[1:] == lay.slc_sample[:-1]
    assert bool((cnt[1:][same] <= cnt[:-1][same]).all())
    local = sc[:, 1:] % m_cmp
    assert torch.equal(lay.token_pe_index, (local[:, 0] * m_cmp + local[:, 1]) * m_cmp + local[:, 2])
    # per-token ranges are those of the token's sample
    for t in range(lay.num_tokens):
        b = int(sc[t, 0])
        assert int(lay.token_cmp_lo[t]) == int(lay.sample_cmp_offsets[b])
        assert int(lay.token_slc_hi[t]) == int(lay.sample_slc_offsets[b + 1])


def test_windows_partition_with_and_without_shift():
    coords = ragged(3)
    lay = build_ssa_layout(coords, m_cmp=2, m_slc=4, m_win=4)
    sc = lay.sorted_coords
    assert lay.window(0).perm is None  # m_win == m_slc: the selection blocks are the shift-0 windows
    for shift in (0, 2):
        w = lay.window(shift)
        wc = sc if w.perm is None else sc[w.perm]
        key = torch.cat([wc[:, :1], (wc[:, 1:] + shift) // 4], 1)
        for j in range(w.offsets.numel() - 1):
            blk = key[w.offsets[j]:w.offsets[j + 1]]
            assert bool((blk == blk[0]).all())
        assert torch.unique(key, dim=0).shape[0] == w.offsets.numel() - 1
        assert int(w.offsets[-1]) == lay.num_tokens
        assert bool((w.token_lo <= torch.arange(lay.num_tokens)).all() & (torch.arange(lay.num_tokens) < w.token_hi).all())
    with pytest.raises(D3S2Error):
        lay.window(1)


def test_nsa_layout_is_1d_runs():
    coords = ragged(5)
    lay = build_ssa_layout(coords, m_cmp=2, m_slc=4, m_win=2, mode="nsa")
    sizes = (lay.cmp_offsets[1:] - lay.cmp_offsets[:-1])
    assert int(sizes.max()) <= 8 and int((lay.slc_offsets[1:] - lay.slc_offsets[:-1]).max()) <= 64
    # runs never cross samples
    ts = lay.token_sample
    for offs in (lay.cmp_offsets, lay.slc_offsets, lay.window(0).offsets, lay.window(1).offsets):
        for j in range(offs.numel() - 1):
            assert int(ts[offs[j]]) == int(ts[offs[j + 1] - 1])


def test_layout_errors():
    with pytest.raises(D3S2Error):
        build_ssa_layout(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(D3S2Error):
        build_ssa_layout(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(D3S2Error):
        build_ssa_layout(blob_coords(10, 8, 0, 0), m_cmp=3, m_slc=8)
    with pytest.raises(D3S2Error):
        build_ssa_layout(blob_coords(10, 8, 0, 0), mode="octree")


def _dense_attention(q, k, v, allowed):
    """Naive per-query loop (independent of the reference's chunked einsum)."""
    n, h, d = q.shape
    g = h // k.shape[1]
    out = torch.zeros(n, h, d, dtype=torch.float64)
    for t in range(n):
        for hh in range(h):
            keys = allowed(t, hh // g)
            s = (k[keys, hh // g].double() @ q[t, hh].double()) / math.sqrt(d)
            out[t, hh] = torch.softmax(s, 0) @ v[keys, hh // g].double()
    return out


def test_reference_branches_match_naive_loops():
    torch.manual_seed(0)
    lay = build_ssa_layout(ragged(1), m_cmp=2, m_slc=4, m_win=4)
    n, h, hkv, d = lay.num_tokens, 4, 2, 8
    q, k, v = torch.randn(n, h, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    kc, vc = torch.randn(lay.num_cmp, hkv, d), torch.randn(lay.num_cmp, hkv, d)
    ts, cs = lay.token_sample, lay.cmp_sample
    o, lse = ref.compression_attention(q, kc, vc, lay)
    exp = _dense_attention(q, kc, vc, lambda t, _h: torch.nonzero(cs == ts[t]).flatten())
    torch.testing.assert_close(o.double(), exp, rtol=1e-5, atol=1e-5)
    # Eq. 8: per (query, KV head) the scores are probabilities summed over G heads -> they sum to G over the blocks
    sc = ref.block_scores(q, kc, lse, lay)
    tot = torch.where(torch.isinf(sc), torch.zeros_like(sc), sc).sum(-1)
    torch.testing.assert_close(tot, torch.full_like(tot, h // hkv), rtol=1e-5, atol=1e-5)
    idx = ref.select_topk(sc, 3)
    token_slc = torch.repeat_interleave(torch.arange(lay.num_slc), lay.slc_offsets[1:] - lay.slc_offsets[:-1])
    o_s, _ = ref.selection_attention(q, k, v, idx, lay)
    exp = _dense_attention(q, k, v, lambda t, kv: torch.nonzero(torch.isin(token_slc, idx[t, kv][idx[t, kv] >= 0])).flatten())
    torch.testing.assert_close(o_s.double(), exp, rtol=1e-5, atol=1e-5)
    w = lay.window(2)
    seg = w.token_seg.long()[w.inverse]
    o_w, _ = ref.window_attention(q, k, v, lay, 2)
    exp = _dense_attention(q, k, v, lambda t, _h: torch.nonzero(seg == seg[t]).flatten())
    torch.testing.assert_close(o_w.double(), exp, rtol=1e-5, atol=1e-5)


def test_select_topk_pads_when_k_exceeds_blocks():
    sc = torch.tensor([[[0.5, 0.1, float("-inf")]], [[float("-inf"), float("-inf"), 2.0]]])
    idx = ref.select_topk(sc, 5)
    assert idx.tolist() == [[[0, 1, -1, -1, -1]], [[2, -1, -1, -1, -1]]]
