"""SpatialSparseAttention module: release parameter names/shapes, v1.0 / v1.1, ablation modes (Sec. 6.1)."""

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.nn.ssa import SSAConfig, SpatialSparseAttention, pack_tokens, unpack_tokens

from test_ssa_layout import blob_coords, mesh_shell_coords

SMALL = dict(dim=32, num_heads=4, num_kv_heads=2, head_dim=16, norm_groups=4)


def coords():
    c = torch.cat([mesh_shell_coords(7, 0), blob_coords(1, 5, 1, 0), blob_coords(30, 12, 2, 1)])
    return c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_parameter_names_and_shapes_match_release(version):
    cfg = SSAConfig.v1_0() if version == "v1.0" else SSAConfig.v1_1()
    m = SpatialSparseAttention(cfg)
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert sd["proj_q.weight"] == (1024, 1024)
    assert sd["proj_k.weight"] == (64, 1024) and sd["proj_v.weight"] == (64, 1024)
    assert sd["proj_o.weight"] == (1024, 1024)
    mc = 4 if version == "v1.0" else 8
    assert sd["intra_block_pe"] == (mc, mc, mc, 64)
    assert sd["gate.0.weight"] == (3, 1024)
    assert not any(k.endswith("bias") and k.startswith(("proj_", "gate")) for k in sd)
    assert any(k.startswith("compression_key.") and k.endswith(".conv.kernel") for k in sd)
    assert any(k.startswith("compression_value.") for k in sd)
    if version == "v1.0":
        assert sd["compression_key.conv1.conv.kernel"] == (27, 64, 64)
        assert cfg.top_k == 8 and SSAConfig.v1_0(resolution=512).top_k == 32
    else:
        assert sd["compression_key.conv.conv.kernel"] == (1, 64, 64)


@pytest.mark.parametrize("cfg", [
    SSAConfig.v1_0(**SMALL, resolution=512),
    SSAConfig.v1_1(**SMALL),
    SSAConfig.v1_1(**SMALL, branches=("win",)),
    SSAConfig.v1_1(**SMALL, branches=("cmp", "win")),
    SSAConfig.v1_0(**SMALL, branches=("cmp", "slc")),
    SSAConfig.v1_1(**SMALL, mode="nsa", m_cmp=2, m_slc=4, m_win=2),
    SSAConfig(**SMALL, mode="full"),
    SSAConfig(**SMALL, mode="full", full_pack=2),
], ids=["v1.0", "v1.1", "win", "cmp+win", "cmp+slc", "nsa", "full", "full-pack2"])
def test_forward_backward_reference(cfg):
    torch.manual_seed(0)
    m = SpatialSparseAttention(cfg)
    c = coords()
    lay = m.make_layout(c)
    x = torch.randn(c.shape[0], cfg.dim, requires_grad=True)
    y = m(x, lay)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    uses_cmp = cfg.mode != "full" and ("cmp" in cfg.branches or "slc" in cfg.branches)
    for name, p in m.named_parameters():
        if name.startswith(("compression_", "intra_block_pe")) and not uses_cmp:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if cfg.mode == "nsa":
        return  # NSA blocks are runs of the token order: order matters by design
    # token order is the caller's: permuting the input permutes the output
    perm = torch.randperm(c.shape[0])
    lay2 = m.make_layout(c[perm])
    torch.testing.assert_close(m(x.detach()[perm], lay2), y.detach()[perm], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_triton_backend_matches_reference_v1_0():
    torch.manual_seed(1)
    m = SpatialSparseAttention(SSAConfig.v1_0(**SMALL, top_k=3))
    c = coords()
    lay = m.make_layout(c)
    x = torch.randn(c.shape[0], SMALL["dim"])
    outs = []
    for be in ("reference", "triton"):
        m.with_backend(be)
        xi = x.clone().requires_grad_()
        y = m(xi, lay, window_shift=4)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, m.compression_key.conv1.conv.kernel.grad.clone()))
        m.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_block_conv_dense_path_equals_sparse_conv():
    """The compression conv3 runs as a dense conv on the coarse block grid; it must equal d3s2.sparse's conv."""
    import d3s2.nn.ssa as mod

    m = SpatialSparseAttention(SSAConfig.v1_0(**SMALL)).double()
    lay = m.make_layout(coords())
    for convs in ([m.compression_key.conv1], [m.compression_key.conv1, m.compression_value.conv2]):
        feats = torch.randn(lay.num_cmp, 32 * len(convs), dtype=torch.float64)
        dense = mod._block_conv3(convs, feats, lay)
        old = mod._DENSE_LIMIT
        mod._DENSE_LIMIT = 0
        try:
            sparse = mod._block_conv3(convs, feats, lay)
        finally:
            mod._DENSE_LIMIT = old
        torch.testing.assert_close(dense, sparse, rtol=1e-10, atol=1e-10)


def test_v1_0_key_and_value_compression_in_one_pass():
    """The layer runs its key and value compression networks together (channels side by side, grouped convs,
    GroupNorm over both nets' groups); the result must equal running each network alone, gradients included."""
    from d3s2.nn.ssa import compress_v10

    torch.manual_seed(2)
    m = SpatialSparseAttention(SSAConfig.v1_0(**SMALL)).double()
    with torch.no_grad():  # distinct affine parameters, so that a swapped or shared slice would show
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lay = m.make_layout(coords())
    k = torch.randn(lay.num_tokens, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(lay.num_tokens, 32, dtype=torch.float64, requires_grad=True)
    both = compress_v10((m.compression_key, m.compression_value), torch.cat([k, v], 1), lay)
    alone = torch.cat([m.compression_key(k, lay), m.compression_value(v, lay)], 1)
    torch.testing.assert_close(both, alone, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(both)
    ga = torch.autograd.grad(both, (k, v, m.compression_value.norm2.weight), g)
    gb = torch.autograd.grad(alone, (k, v, m.compression_value.norm2.weight), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_pack_unpack_roundtrip():
    c = coords()
    x = torch.randn(c.shape[0], 3, 5)
    packed, parents, slot = pack_tokens(x, c, 2)
    assert packed.shape == (parents.shape[0], 8, 3, 5)
    assert torch.equal(unpack_tokens(packed, slot), x)
    assert torch.equal(parents, torch.unique(torch.cat([c[:, :1], c[:, 1:] // 2], 1), dim=0))


def test_config_errors():
    with pytest.raises(D3S2Error):
        SpatialSparseAttention(SSAConfig(**SMALL, mode="sparse"))
    with pytest.raises(D3S2Error):
        SpatialSparseAttention(SSAConfig(**{**SMALL, "num_kv_heads": 3}))
    with pytest.raises(D3S2Error):
        SpatialSparseAttention(SSAConfig(**SMALL, branches=("slc", "local")))
    m = SpatialSparseAttention(SSAConfig.v1_1(**SMALL))
    with pytest.raises(D3S2Error):
        m(torch.randn(5, 7), m.make_layout(coords()))
