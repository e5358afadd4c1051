"""SS-DiT (paper Sec. 4, 5.2): release configs on the meta device, tiny model forward/backward, layout reuse,
overfitting one sparse latent with the flow-matching loss, Euler sampling on sparse latents."""

import dataclasses

import pytest
import torch

from d3s2.config import MODEL_REGISTRY, build_model, load_model_config
from d3s2.errors import D3S2Error
from d3s2.flow import EulerSampler, FlowConfig, flow_matching_loss
from d3s2.models.ss_dit import SSDiT, SSDiTConfig, load_official_state_dict
from d3s2.nn.embeddings import AbsolutePositionEmbedder
from d3s2.nn.ssa import SpatialSparseAttention
from d3s2.sparse import SparseTensor


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hand_count(version: str, sparse_cond: bool) -> int:
    """Parameter count derived from official-release.md ("SparseDiT"), not from the code."""
    c, inner, kvc, hidden, cin = 1024, 32 * 32, 2 * 32, 4096, 16
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    m_cmp = 4 if version == "v1.0" else 8
    if version == "v1.0":  # GN -> conv3 -> GN -> conv3 (+ pooled skip), for keys and for values
        compression = 2 * kvc + (27 * kvc * kvc + kvc) + 2 * kvc + (27 * kvc * kvc + kvc)
    else:  # 1x1 conv
        compression = kvc * kvc + kvc
    ssa = (lin(c, inner, False) + 2 * lin(c, kvc, False) + lin(inner, c, False)  # proj_q, proj_k, proj_v, proj_o
           + m_cmp**3 * kvc + lin(c, 3, False) + 2 * compression)  # intra_block_pe, gate.0, compression_{key,value}
    block = (lin(c, 6 * c) + 2 * c + ssa  # adaLN_modulation.1, norm2 (affine)
             + lin(c, inner) + lin(1024, 2 * inner) + lin(inner, c)  # cross_attn to_q, to_kv, to_out
             + lin(c, hidden) + lin(hidden, c))  # mlp.mlp.0, mlp.mlp.2
    total = lin(256, c) + lin(c, c) + lin(cin, c) + 24 * block + lin(c, cin)
    return total + (lin(1024, c) if sparse_cond else 0)


@pytest.mark.parametrize("name,version,res", [
    ("ss_dit_v1_0_512", "v1.0", 512), ("ss_dit_v1_0_1024", "v1.0", 1024),
    ("ss_dit_v1_1_512", "v1.1", 512), ("ss_dit_v1_1_1024", "v1.1", 1024),
])
def test_release_configs_names_and_counts(name, version, res):
    assert MODEL_REGISTRY["ss_dit"] == "d3s2.models.ss_dit:SSDiT"
    cfg = load_model_config(name)
    p = cfg.params
    v10 = version == "v1.0"
    assert (p.version, p.sparse_conditioning, p.m_cmp, p.m_slc, p.m_win) == (version, v10, 4 if v10 else 8, 8, 8)
    assert p.top_k == (32 if v10 and res == 512 else 8)
    assert p.pe_factor == (1.0 if res == 512 else 0.5) and p.resolution == res // 8
    recipe = (30, 6.0) if res == 512 else (15, 8.0)
    assert (cfg.sampler.steps, cfg.sampler.shift, cfg.sampler.cfg_scale) == recipe + (7.0,)
    m = build_model(cfg, device="meta")
    assert sum(q.numel() for q in m.parameters()) == _hand_count(version, v10)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["t_embedder.mlp.0.weight"] == (1024, 256) and shapes["t_embedder.mlp.2.weight"] == (1024, 1024)
    assert shapes["input_layer.weight"] == (1024, 16) and shapes["out_layer.weight"] == (16, 1024)
    assert ("cond_proj.weight" in shapes) == v10
    if v10:
        assert shapes["cond_proj.weight"] == (1024, 1024) and shapes["cond_proj.bias"] == (1024,)
    for i in (0, 23):
        b = f"blocks.{i}."
        assert shapes[b + "adaLN_modulation.1.weight"] == (6144, 1024)
        assert shapes[b + "norm2.weight"] == (1024,)
        assert shapes[b + "self_attn.proj_q.weight"] == (1024, 1024)
        assert shapes[b + "self_attn.proj_k.weight"] == (64, 1024) == shapes[b + "self_attn.proj_v.weight"]
        assert shapes[b + "self_attn.proj_o.weight"] == (1024, 1024)
        assert shapes[b + "self_attn.gate.0.weight"] == (3, 1024)
        mc = 4 if v10 else 8
        assert shapes[b + "self_attn.intra_block_pe"] == (mc, mc, mc, 64)
        assert shapes[b + "cross_attn.to_q.weight"] == (1024, 1024)
        assert shapes[b + "cross_attn.to_kv.weight"] == (2048, 1024)
        assert shapes[b + "cross_attn.to_out.weight"] == (1024, 1024)
        assert shapes[b + "mlp.mlp.0.weight"] == (4096, 1024) and shapes[b + "mlp.mlp.2.weight"] == (1024, 4096)
    assert "blocks.24.norm2.weight" not in shapes
    assert not any(k.split(".")[2] in ("norm1", "norm3") for k in shapes if k.startswith("blocks."))  # non-affine
    assert not any("pos_emb" in k for k in shapes)  # APE of sparse coords is computed, not stored


def _tiny(**kw) -> SSDiT:
    return SSDiT(dataclasses.replace(load_model_config("ss_dit_tiny").params, **kw))


def _shell_latent(batch: int = 2, channels: int = 8, seed: int = 0) -> SparseTensor:
    """Latent coordinates of a real shape: surface cells of the pybullet duck at 12^3 (ragged per sample)."""
    import os

    import numpy as np
    import pybullet_data
    import trimesh

    mesh = trimesh.load(os.path.join(pybullet_data.getDataPath(), "duck.obj"), force="mesh", process=False)
    v = mesh.vertices - mesh.bounds[0]
    mesh.vertices = v / v.max()
    pts, _ = trimesh.sample.sample_surface(mesh, 3000, seed=seed)
    rows = []
    for b in range(batch):
        res = 12 - 3 * b  # ragged: a smaller grid for the second sample
        cells = torch.from_numpy(np.unique(np.clip(np.floor(pts * res), 0, res - 1).astype(np.int64), axis=0))
        rows.append(torch.cat([torch.full((cells.shape[0], 1), b), cells], 1))
    coords = torch.cat(rows)
    g = torch.Generator().manual_seed(seed)
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords)


def _randomize(m: SSDiT) -> SSDiT:
    """Non-zero adaLN / output weights so that every block contributes (the DiT init zeroes them)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_tiny_forward_backward_real_layout(one_thread):
    torch.manual_seed(0)
    m = _randomize(_tiny())
    x = _shell_latent()
    assert x.batch_counts.tolist()[0] != x.batch_counts.tolist()[1]
    cond = torch.randn(2, 5, 16)
    x = x.replace(x.feats.requires_grad_(True))
    y = m(x, torch.tensor([900.0, 100.0]), cond)
    assert y.feats.shape == (x.num_voxels, 8) and torch.isfinite(y.feats).all()
    assert torch.equal(y.coords, x.coords)
    y.feats.square().sum().backward()
    assert torch.isfinite(x.feats.grad).all() and x.feats.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # samples are independent: sample 1 alone gives the same velocities
    off = x.batch_offsets.tolist()
    x1 = SparseTensor(x.feats.detach()[off[1]:], torch.cat([x.coords[off[1]:, :1] * 0, x.coords[off[1]:, 1:]], 1))
    y1 = m(x1, torch.tensor([100.0]), cond[1:])
    torch.testing.assert_close(y1.feats, y.feats.detach()[off[1]:], rtol=1e-4, atol=1e-5)


def test_token_order_is_callers_and_shift_on_odd_blocks(one_thread):
    torch.manual_seed(0)
    m = _randomize(_tiny()).eval()
    x = _shell_latent(batch=1)
    cond, t = torch.randn(1, 4, 16), torch.tensor([300.0])
    y = m(x, t, cond).feats
    perm = torch.randperm(x.num_voxels)
    yp = m(SparseTensor(x.feats[perm], x.coords[perm]), t, cond).feats
    torch.testing.assert_close(yp, y[perm], rtol=1e-4, atol=1e-5)
    # window shift matters (odd blocks use it): with shift 0 the output changes
    m0 = _tiny(window_shift=0)
    m0.load_state_dict(m.state_dict())
    assert not torch.allclose(m0.eval()(x, t, cond).feats, y, atol=1e-4)


def test_layout_built_once_and_reused_by_sampling(one_thread, monkeypatch):
    torch.manual_seed(0)
    m = _randomize(_tiny()).eval()
    calls = []
    real = SpatialSparseAttention.make_layout

    def counting(self, coords, batch_size=None):
        calls.append(coords.shape[0])
        return real(self, coords, batch_size=batch_size)

    monkeypatch.setattr(SpatialSparseAttention, "make_layout", counting)
    x = _shell_latent()
    cond = torch.randn(2, 5, 16)
    m(x, torch.tensor([10.0, 10.0]), cond)
    assert len(calls) == 1  # one layout for all blocks
    m(x.replace(x.feats * 2), torch.tensor([10.0, 10.0]), cond)
    assert len(calls) == 1  # cached with the coordinates
    out = EulerSampler(steps=4, cfg_scale=3.0, shift=3.0)(m, x, cond)
    assert len(calls) == 1  # 8 model calls (CFG), no new layout
    assert out.feats.shape == x.feats.shape and torch.isfinite(out.feats).all()
    lay = m.make_layout(x.coords)  # explicit layout
    assert len(calls) == 2
    fresh = SparseTensor(x.feats.clone(), x.coords.clone())
    torch.testing.assert_close(m(fresh, torch.tensor([10.0, 10.0]), cond, layout=lay).feats,
                               m(x, torch.tensor([10.0, 10.0]), cond).feats)
    assert len(calls) == 2


def test_gradient_checkpointing_matches(one_thread):
    torch.manual_seed(0)
    m = _randomize(_tiny())
    x, cond, t = _shell_latent(), torch.randn(2, 5, 16), torch.tensor([700.0, 50.0])
    m(x, t, cond).feats.sum().backward()
    g0 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    assert all(b.use_checkpoint for b in m.blocks)
    m(x, t, cond).feats.sum().backward()
    for a, b in zip(g0, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sparse_conditioning_model_uses_cond_proj_and_ape(one_thread):
    torch.manual_seed(0)
    m = _randomize(_tiny(version="v1.0", sparse_conditioning=True, ssa_norm_groups=4)).eval()
    assert tuple(m.cond_proj.weight.shape) == (32, 16)
    tokens, coords = torch.randn(1, 6, 16), torch.randint(0, 37, (1, 6, 3))
    ctx = m.embed_condition(tokens, coords)
    ape = AbsolutePositionEmbedder(16)(coords[0])
    torch.testing.assert_close(ctx[0], (tokens[0] + ape) @ m.cond_proj.weight.t() + m.cond_proj.bias)
    x = _shell_latent(batch=1)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    y = m(x, torch.tensor([400.0]), tokens, cond_mask=mask, cond_coords=coords).feats
    junk = tokens.clone()
    junk[:, 4:] = 100.0  # masked-out padding must not matter
    torch.testing.assert_close(m(x, torch.tensor([400.0]), junk, cond_mask=mask, cond_coords=coords).feats, y)
    with pytest.raises(D3S2Error, match="cond_coords"):
        m(x, torch.tensor([400.0]), tokens)
    after = _tiny(version="v1.0", sparse_conditioning=True, cond_pe_after_proj=True)
    after.load_state_dict(m.state_dict())
    want = tokens[0] @ m.cond_proj.weight.t() + m.cond_proj.bias + AbsolutePositionEmbedder(32)(coords[0])
    torch.testing.assert_close(after.embed_condition(tokens, coords)[0], want)


@pytest.mark.parametrize("mode", ["nsa", "full"])
def test_ablation_modes_run(mode, one_thread):
    torch.manual_seed(0)
    m = _randomize(_tiny(ssa_mode=mode))
    x = _shell_latent()
    y = m(x, torch.tensor([500.0, 20.0]), torch.randn(2, 3, 16))
    assert y.feats.shape == (x.num_voxels, 8) and torch.isfinite(y.feats).all()
    y.feats.sum().backward()
    assert m.input_layer.weight.grad.abs().sum() > 0


def test_errors_and_official_loader():
    m = _tiny()
    x = _shell_latent(batch=1)
    with pytest.raises(D3S2Error, match="features"):
        m(x.replace(torch.randn(x.num_voxels, 3)), torch.tensor([1.0]), torch.randn(1, 2, 16))
    with pytest.raises(D3S2Error, match="cond"):
        m(x, torch.tensor([1.0]), torch.randn(1, 2, 7))
    with pytest.raises(D3S2Error, match="SparseTensor"):
        m(torch.randn(5, 8), torch.tensor([1.0]), torch.randn(1, 2, 16))
    with pytest.raises(D3S2Error, match="window_shift"):
        SSDiTConfig(window_shift=8)
    sd = {k: v.clone() + 1 for k, v in m.state_dict().items()}
    m2 = _tiny()
    load_official_state_dict(m2, sd)
    assert torch.equal(m2.out_layer.bias, sd["out_layer.bias"])
    sd.pop("out_layer.bias")
    with pytest.raises(D3S2Error, match="missing"):
        load_official_state_dict(m2, sd)


@pytest.mark.slow
def test_tiny_overfits_one_sparse_latent_and_samples_it(one_thread):
    torch.manual_seed(0)
    m = _tiny()
    g = torch.Generator().manual_seed(1)
    c = torch.unique(torch.randint(0, 7, (60, 3), generator=g), dim=0)[:32]
    bsz = 8  # copies of one latent: a batch of flow samples per step
    coords = torch.cat([torch.cat([torch.full((c.shape[0], 1), b), c], 1) for b in range(bsz)])
    x0 = torch.randn(c.shape[0], 8, generator=g)
    x = SparseTensor(x0.repeat(bsz, 1), coords)
    cond = torch.randn(1, 5, 16).expand(bsz, -1, -1)
    flow = FlowConfig(cond_drop_prob=0.0)

    def eval_loss():
        with torch.no_grad():
            return flow_matching_loss(m, x, cond, flow, generator=torch.Generator().manual_seed(123))["loss"].item()

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(250):
        loss = flow_matching_loss(m, x, cond, flow, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 10, (before, after)
    m.eval()
    one = SparseTensor(torch.randn(c.shape[0], 8, generator=torch.Generator().manual_seed(5)),
                       torch.cat([torch.zeros(c.shape[0], 1, dtype=c.dtype), c], 1))
    sample = EulerSampler(steps=20, cfg_scale=1.0)(m, one, cond[:1])
    err = (sample.feats - x0).pow(2).mean().item()
    assert err < 0.2 * x0.var().item()
