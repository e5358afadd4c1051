"""SS-VAE (paper Sec. 3): release parameter names and counts, coordinate sets of encode/decode, losses (Eq. 2-3)."""

import pytest
import torch

from d3s2.config import build_model, load_model_config
from d3s2.errors import D3S2Error
from d3s2.models.ss_vae import SSVAE, SSVAEConfig, load_official_state_dict
from d3s2.models.ss_vae_losses import decoded_targets, kl_divergence, lookup_rows, ss_vae_losses
from d3s2.sparse import SparseTensor


def box_sdf(res: int, half=(0.55, 0.4, 0.3), center=(0.0, 0.0, 0.0), tau_voxels: float = 2.0, batch: int = 0):
    """Analytic sparse SDF of a box (scaled units s / tau), its sharp-edge mask and the dense scaled SDF."""
    r = torch.arange(res)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    p = (g.float() + 0.5) * 2 / res - 1 - torch.tensor(center)
    q = p.abs() - torch.tensor(half)
    s = q.clamp(min=0).norm(dim=1) + q.max(1).values.clamp(max=0)
    tau = tau_voxels * 2 / res
    keep = s.abs() < tau
    coords = torch.cat([torch.full((int(keep.sum()), 1), batch), g[keep]], 1)
    sharp = q[keep].abs().sort(1).values[:, 1] < 1.5 * 2 / res
    dense = torch.zeros(res, res, res)
    dense.view(-1)[:] = s / tau
    return SparseTensor((s[keep] / tau)[:, None], coords, batch + 1, res), sharp, dense


def coord_set(c: torch.Tensor) -> set:
    return set(map(tuple, c.tolist()))


# ---------------------------------------------------------------- release architecture


def test_paper_config_names_and_count():
    m = build_model("ss_vae_v1", device="meta")
    sd = m.state_dict()
    assert all(v.is_meta for v in sd.values())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # names and shapes fixed by official-release.md
    assert shapes["encoder.input_layer1.weight"] == (32, 1)
    assert shapes["encoder.input_layer.weight"] == (512, 512)
    assert shapes["encoder.out_layer.weight"] == (32, 512)
    assert shapes["decoder.input_layer.weight"] == (512, 16)
    assert shapes["decoder.out_layer.weight"] == (1, 32)
    for part in ("encoder", "decoder"):
        for i in range(4):
            assert shapes[f"{part}.blocks.{i}.attn.to_qkv.weight"] == (1536, 512)
            assert shapes[f"{part}.blocks.{i}.attn.to_qkv.bias"] == (1536,)  # qkv bias
            assert shapes[f"{part}.blocks.{i}.attn.to_out.weight"] == (512, 512)
            assert shapes[f"{part}.blocks.{i}.mlp.mlp.0.weight"] == (2048, 512)
            assert shapes[f"{part}.blocks.{i}.mlp.mlp.2.weight"] == (512, 2048)
        assert f"{part}.blocks.4.attn.to_qkv.weight" not in shapes
    assert not any("norm" in k for k in shapes)  # non-affine layer norms carry no parameters
    # torchsparse conv layout [K^3, Cin, Cout] under <module>.conv.kernel
    for i, (ci, co) in enumerate([(32, 64), (64, 128), (128, 512)]):
        pre = f"encoder.downsample.{i}."
        convs = {k: v for k, v in shapes.items() if k.startswith(pre) and k.endswith("conv.kernel")}
        assert sorted(convs.values()) == sorted([(27, ci, co), (27, co, co), (1, ci, co)])
    for i, (ci, co) in enumerate([(512, 128), (128, 64), (64, 32)]):
        pre = f"decoder.upsample.{i}."
        convs = {k: v for k, v in shapes.items() if k.startswith(pre) and k.endswith("conv.kernel")}
        assert sorted(convs.values()) == sorted([(27, ci, co), (27, co, co)])
    # hand count: GN(ci) + conv3(ci,co) + GN(co) + conv3(co,co) + 1x1(ci,co), all with biases
    down = lambda ci, co: 2 * ci + (27 * ci * co + co) + 2 * co + (27 * co * co + co) + (ci * co + co)  # noqa: E731
    up = lambda ci, co: (27 * ci * co + co) + (27 * co * co + co)  # noqa: E731
    block = (512 * 1536 + 1536) + (512 * 512 + 512) + (512 * 2048 + 2048) + (2048 * 512 + 512)
    enc = ((1 * 32 + 32) + down(32, 64) + down(64, 128) + down(128, 512) + (512 * 512 + 512) + 4 * block
           + (512 * 32 + 32))
    dec = (16 * 512 + 512) + 4 * block + up(512, 128) + up(128, 64) + up(64, 32) + (32 * 1 + 1)
    assert sum(p.numel() for p in m.encoder.parameters()) == enc == 22_637_024
    assert sum(p.numel() for p in m.decoder.parameters()) == dec == 15_237_089
    attn = [m.encoder.blocks[i].attn for i in range(4)]
    assert [a.shift for a in attn] == [0, 4, 0, 4] and all(a.window == 8 and a.num_heads == 8 for a in attn)


def test_1024_config_same_weights_layout():
    a = build_model("ss_vae_v1", device="meta")
    b = build_model("ss_vae_v1_1024", device="meta")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert load_model_config("ss_vae_v1").params.latent_resolution == 64
    assert load_model_config("ss_vae_v1_1024").params.latent_resolution == 128


def test_config_errors():
    with pytest.raises(D3S2Error, match="decoder_channels"):
        SSVAEConfig(encoder_channels=[32, 64, 128, 512], decoder_channels=[64, 32])
    with pytest.raises(D3S2Error, match="divisible"):
        SSVAEConfig(resolution=100)
    with pytest.raises(D3S2Error, match="GroupNorm"):
        SSVAEConfig(encoder_channels=[30, 64, 128, 512])


# ---------------------------------------------------------------- encode / decode


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("ss_vae_tiny").eval()


def _batch(res: int = 32):
    a, _, _ = box_sdf(res)
    b, _, _ = box_sdf(res, half=(0.3, 0.5, 0.2), center=(0.2, -0.1, 0.1))
    return SparseTensor.cat([a, b]), a, b


@pytest.mark.parametrize("res", [32, 40])  # multi-resolution training (Sec. 3.3): any multiple of 8
def test_coordinate_sets(tiny, res):
    x, a, b = _batch(res)
    with torch.no_grad():
        z, mean, logvar = tiny.encode(x, sample_posterior=False)
        dec = tiny.decode(z)
    lat = x.coords.clone()
    lat[:, 1:] //= 8
    assert coord_set(z.coords) == coord_set(lat)
    assert z.num_voxels == len(coord_set(lat)) and z.num_channels == 8
    assert mean.shape == logvar.shape == (z.num_voxels, 8) and torch.equal(z.feats, mean)
    off = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    children = (z.coords[:, None, 1:] * 8 + off[None]).reshape(-1, 3)
    expected = torch.cat([z.coords[:, :1].repeat_interleave(512, 0), children], 1)
    assert coord_set(dec.coords) == coord_set(expected) and dec.num_voxels == expected.shape[0]
    assert coord_set(x.coords) <= coord_set(dec.coords)
    assert dec.num_channels == 1 and bool((dec.feats.abs() <= 1).all())
    assert dec.resolution == res and z.resolution == res // 8


def test_batch_samples_independent(tiny):
    x, a, b = _batch()
    with torch.no_grad():
        dec = tiny(x, sample_posterior=False).decoded
        da = tiny(a, sample_posterior=False).decoded
        db = tiny(b, sample_posterior=False).decoded
    parts = dec.split()
    for got, ref in ((parts[0], da), (parts[1], db)):
        assert torch.equal(got.coords, ref.coords)
        torch.testing.assert_close(got.feats, ref.feats, rtol=1e-4, atol=1e-5)


def test_posterior_sampling(tiny):
    x, _, _ = _batch()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        z1, mean, logvar = tiny.encode(x, generator=g1)
        z2, _, _ = tiny.encode(x, generator=g2)
    assert torch.equal(z1.feats, z2.feats) and not torch.allclose(z1.feats, mean)


def test_bf16_autocast_close_to_fp32(tiny):
    x, _, _ = _batch()
    with torch.no_grad():
        ref = tiny(x, sample_posterior=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x, sample_posterior=False)
    assert torch.equal(ref.decoded.coords, low.decoded.coords)
    assert torch.isfinite(low.decoded.feats.float()).all()
    torch.testing.assert_close(low.mean.float(), ref.mean, rtol=0.05, atol=0.05)
    torch.testing.assert_close(low.decoded.feats.float(), ref.decoded.feats, rtol=0.05, atol=0.05)


def test_official_state_dict_roundtrip():
    torch.manual_seed(1)
    src = build_model("ss_vae_tiny").eval()
    sd = {k: (v[0] if k.endswith("skip_connection.conv.kernel") else v) for k, v in src.state_dict().items()}
    assert sd["encoder.downsample.0.skip_connection.conv.kernel"].dim() == 2  # torchsparse stores 1x1 as [Cin, Cout]
    torch.manual_seed(2)
    dst = build_model("ss_vae_tiny").eval()
    load_official_state_dict(dst, sd)
    x, _, _ = _batch()
    with torch.no_grad():
        got = dst(x, sample_posterior=False).decoded.feats
        torch.testing.assert_close(got, src(x, sample_posterior=False).decoded.feats)
    sd.pop("decoder.out_layer.bias")
    with pytest.raises(D3S2Error, match="missing"):
        load_official_state_dict(dst, sd)


def test_empty_input_clear_error(tiny):
    with pytest.raises(D3S2Error, match="no voxels"):
        tiny.encode(SparseTensor(torch.zeros(0, 1), torch.zeros(0, 4, dtype=torch.int32), 1, 32))


# ---------------------------------------------------------------- losses


def test_lookup_rows():
    torch.manual_seed(0)
    ref = torch.unique(torch.randint(0, 6, (80, 4)), dim=0)
    ref = ref[torch.randperm(ref.shape[0])]
    query = torch.randint(0, 7, (200, 4))
    got = lookup_rows(query, ref).tolist()
    table = {tuple(c): i for i, c in enumerate(ref.tolist())}
    assert got == [table.get(tuple(c), -1) for c in query.tolist()]


def test_extra_voxel_targets_have_true_sign(tiny):
    x, _, dense = box_sdf(32, tau_voxels=1.0)  # thinnest band for which the flood fill is exact
    with torch.no_grad():
        dec = tiny(x, sample_posterior=False).decoded
    value, in_rows = decoded_targets(dec, x)
    is_in = in_rows >= 0
    assert int(is_in.sum()) == x.num_voxels and bool((~is_in).any())
    torch.testing.assert_close(value[is_in], x.feats[in_rows[is_in], 0])
    c = dec.coords.long()
    truth = dense[c[:, 1], c[:, 2], c[:, 3]]
    assert bool((value[~is_in].abs() == 1).all())
    assert torch.equal(value[~is_in], torch.where(truth[~is_in] >= 0, 1.0, -1.0))
    # a wider ground-truth set supplies the values of extra voxels it covers
    wide, _, _ = box_sdf(32, tau_voxels=3.0)
    wide = wide.replace(wide.feats * 3.0)  # same physical SDF expressed in units of the narrow tau
    value2, _ = decoded_targets(dec, x, target=wide)
    covered = (lookup_rows(dec.coords, wide.coords) >= 0) & ~is_in
    assert bool(covered.any())
    torch.testing.assert_close(value2[covered], truth[covered])


def test_losses_zero_for_perfect_prediction_and_weights(tiny):
    x, sharp, _ = box_sdf(32)
    with torch.no_grad():
        dec = tiny(x, sample_posterior=False).decoded
    value, _ = decoded_targets(dec, x)
    zero = torch.zeros(3, 4)
    perfect = ss_vae_losses(dec.replace(value[:, None]), x, zero, zero, tiny.config.loss_weights(), sharp=sharp)
    for k in ("in", "ext", "sharp", "kl", "total"):
        assert float(perfect[k]) == 0.0, k
    wrong = dec.replace(value[:, None] + 0.5)
    lw = tiny.config.loss_weights()
    out = ss_vae_losses(wrong, x, zero + 1.0, zero, lw, sharp=sharp)
    torch.testing.assert_close(out["in"], torch.tensor(0.25))
    torch.testing.assert_close(out["ext"], torch.tensor(0.25))
    torch.testing.assert_close(out["sharp"], torch.tensor(0.25))
    torch.testing.assert_close(out["kl"], torch.tensor(0.5))
    assert float(out["total"]) == pytest.approx(0.25 * (lw.in_ + lw.ext + lw.sharp) + 0.5 * lw.kl, rel=1e-6)
    assert (lw.in_, lw.ext, lw.sharp, lw.kl) == (1.0, 0.1, 1.0, 1e-3)
    # KL of N(mu, sigma^2) against N(0, 1), element mean
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    expected = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).mean()
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)


def test_learned_pruning_teacher_forced_and_trainable():
    cfg = load_model_config("ss_vae_tiny").params
    cfg.prune_children = True
    torch.manual_seed(0)
    m = SSVAE(cfg).train()
    x, sharp, _ = box_sdf(32)
    out = m(x)
    assert len(out.prune_logits) == 3 and [t.shape[1] for t in out.prune_targets] == [8, 8, 8]
    assert coord_set(out.decoded.coords) == coord_set(x.coords)  # last level keeps exactly the target voxels
    losses = m.training_losses(x, sharp=sharp)
    assert float(losses["prune"].detach()) > 0 and float(losses["ext"].detach()) == 0.0
    losses["total"].backward()
    assert m.decoder.upsample[0].prune.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        dec = m(x, sample_posterior=False).decoded  # inference: children kept by their logits
    assert dec.num_voxels <= 8**3 * m.encode(x, False)[0].num_voxels


def test_gradient_checkpointing_same_gradients():
    cfg = load_model_config("ss_vae_tiny").params
    x, sharp, _ = box_sdf(32)
    grads = []
    for ckpt in (False, True):
        cfg.use_checkpoint = ckpt
        torch.manual_seed(0)
        m = SSVAE(cfg).train()
        loss = m.training_losses(x, sharp=sharp, generator=torch.Generator().manual_seed(0))["total"]
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert m.encoder.blocks[0].use_checkpoint
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_sharp_mask_length_checked(tiny):
    x, sharp, _ = box_sdf(32)
    with pytest.raises(D3S2Error, match="sharp mask"):
        tiny.training_losses(x, sharp=sharp[:-1])


def test_loss_entry_point_scales_dataset_units(tiny):
    x, sharp, _ = box_sdf(32)  # scaled units, tau = 2 voxels = 0.125
    raw = x.replace(x.feats * 0.125)  # dataset units
    a = tiny.loss(raw, sharp=sharp, tau=0.125, generator=torch.Generator().manual_seed(0))
    b = tiny.training_losses(x, sharp=sharp, generator=torch.Generator().manual_seed(0))
    assert set(a) == {"loss", "in", "ext", "sharp", "kl"}
    torch.testing.assert_close(a["loss"], b["total"])
    torch.testing.assert_close(a["in"], b["in"])
