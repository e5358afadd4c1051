import pytest
import torch

from d3s2.config import build_model, load_model_config
from d3s2.errors import D3S2Error
from d3s2.models.dense_vae import (
    DenseShapeVAE,
    DenseShapeVAEConfig,
    ResBlock3d,
    load_official_state_dict,
    occupancy_to_coords,
    pixel_shuffle_3d,
)


@pytest.fixture
def one_thread():
    """Tiny training loops: one intra-op thread is faster, and far faster on a busy 2-core machine (no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hand_count(cin, cout, latent, enc, enc_res, enc_mid, dec, dec_res, dec_mid):
    """Parameter count from the architecture description (official-release.md), not from the code."""
    conv = lambda i, o, k: i * o * k**3 + o  # noqa: E731
    ln = lambda c: 2 * c  # noqa: E731
    res = lambda c: 2 * ln(c) + 2 * conv(c, c, 3)  # noqa: E731
    n = conv(cin, enc[0], 3)
    for i, c in enumerate(enc):
        n += enc_res * res(c) + (conv(c, enc[i + 1], 2) if i < len(enc) - 1 else 0)
    n += enc_mid * res(enc[-1]) + ln(enc[-1]) + conv(enc[-1], 2 * latent, 3)
    n += conv(latent, dec[0], 3) + dec_mid * res(dec[0])
    for i, c in enumerate(dec):
        n += dec_res * res(c) + (conv(c, 8 * dec[i + 1], 3) if i < len(dec) - 1 else 0)
    return n + ln(dec[-1]) + conv(dec[-1], cout, 3)


def test_paper_config_count_names_and_shapes_on_meta():
    cfg = load_model_config("dense_vae_v1")
    assert cfg.params == DenseShapeVAEConfig()
    m = build_model(cfg, device="meta")
    assert sum(p.numel() for p in m.parameters()) == _hand_count(1, 1, 8, [32, 128, 512], 2, 2, [512, 128, 64], 4, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["encoder.input_layer.weight"] == (32, 1, 3, 3, 3)
    assert shapes["encoder.blocks.2.conv.weight"] == (128, 32, 2, 2, 2)  # after 2 res blocks at level 0
    assert shapes["encoder.out_layer.2.weight"] == (16, 512, 3, 3, 3)  # mean + logvar
    assert shapes["decoder.blocks.4.conv.weight"] == (128 * 8, 512, 3, 3, 3)  # up-sampling after 4 res blocks
    assert shapes["decoder.out_layer.2.weight"] == (1, 64, 3, 3, 3)
    assert len([k for k in shapes if k.startswith("decoder.middle_block.") and k.endswith("conv1.weight")]) == 4
    assert not any("skip_connection" in k for k in shapes)  # channels only change in down/up-sampling layers
    z, mean, logvar = m.encode(torch.zeros(1, 1, 64, 64, 64, device="meta"))
    assert z.shape == mean.shape == logvar.shape == (1, 8, 16, 16, 16)
    assert m.decode(z).shape == (1, 1, 64, 64, 64)


def test_pixel_shuffle_3d_layout():
    x = torch.arange(2 * 8 * 2 * 3 * 1, dtype=torch.float32).view(1, 16, 2, 3, 1)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 4, 6, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    ch = c * 8 + i * 4 + j * 2 + k
                    assert torch.equal(y[0, c, i::2, j::2, k::2], x[0, ch])


def test_resblock_is_identity_at_init():
    b = ResBlock3d(6)
    x = torch.randn(1, 6, 4, 4, 4)
    assert torch.equal(b(x), x)
    assert torch.all(b.conv2.weight == 0)


def test_tiny_config_forward_backward_at_32(one_thread):
    vae = build_model("dense_vae_tiny")
    occ = (torch.rand(1, 32, 32, 32) > 0.7).float()
    out = vae.loss(occ)
    out["loss"].backward()
    assert out["logits"].shape == (1, 1, 32, 32, 32)
    assert vae.encode(occ)[0].shape == (1, 4, 8, 8, 8)
    assert all(p.grad is not None for p in vae.parameters())


def _shape(r):
    c = (r - 1) / 2
    x, y, z = torch.meshgrid(*[torch.arange(r, dtype=torch.float32)] * 3, indexing="ij")
    torus = ((x - c) ** 2 + (y - c) ** 2).sqrt().sub(r * 0.28).square() + (z - c) ** 2 < (r * 0.13) ** 2
    box = ((x - r * 0.2).abs() < r * 0.1) & ((y - r * 0.6).abs() < r * 0.15) & ((z - r * 0.3).abs() < r * 0.12)
    return (torus | box).float()[None, None]


@pytest.mark.slow
def test_tiny_vae_overfits_one_occupancy(one_thread):
    torch.manual_seed(0)
    vae = build_model("dense_vae_tiny")  # 32^3 occupancy -> 4 x 8^3 latent
    occ = _shape(32)
    assert 0.05 < occ.mean() < 0.5
    with torch.no_grad():
        before = vae.loss(occ, sample=False)["bce"].item()
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-3, weight_decay=0.0)
    after = before
    for step in range(150):  # typically reaches 10x in ~60 steps
        loss = vae.loss(occ)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                after = vae.loss(occ, sample=False)["bce"].item()
            if after < before / 10:
                break
    assert after < before / 10, (before, after)


def test_occupancy_to_coords_threshold():
    logits = torch.full((2, 1, 4, 4, 4), -10.0)
    logits[0, 0, 1, 2, 3] = torch.logit(torch.tensor(0.11))
    logits[1, 0, 0, 0, 1] = torch.logit(torch.tensor(0.09))
    logits[1, 0, 3, 3, 3] = 5.0
    assert occupancy_to_coords(logits).tolist() == [[0, 1, 2, 3], [1, 3, 3, 3]]


def test_bad_input_and_checkpoint_errors():
    vae = build_model("dense_vae_tiny")
    with pytest.raises(D3S2Error, match="expects occupancy"):
        vae.encode(torch.zeros(1, 1, 16, 16, 16))
    sd = vae.state_dict()
    bad = dict(sd)
    bad["encoder.input_layer.weight"] = torch.zeros(3, 3)
    with pytest.raises(D3S2Error, match="does not match"):
        load_official_state_dict(vae, bad)
    del bad["encoder.input_layer.weight"]
    with pytest.raises(D3S2Error, match="1 missing"):
        load_official_state_dict(vae, bad)
    load_official_state_dict(vae, sd)
    with pytest.raises(D3S2Error, match="not divisible"):
        DenseShapeVAEConfig(resolution=30)
