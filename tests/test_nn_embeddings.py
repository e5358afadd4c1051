import math

import pytest
import torch

from d3s2.nn.embeddings import AbsolutePositionEmbedder, TimestepEmbedder, grid_coords, timestep_embedding


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (3, 256)
    # t = 0: cos half is 1, sin half is 0 (would be swapped if the order were [sin, cos]).
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    for i in (0, 1, 77, 127):
        f = 10000.0 ** (-i / 128)
        assert emb[1, i].item() == pytest.approx(math.cos(3.0 * f), abs=1e-5)
        assert emb[1, 128 + i].item() == pytest.approx(math.sin(3.0 * f), abs=1e-5)
        assert emb[2, i].item() == pytest.approx(math.cos(999.0 * f), abs=1e-3)


def test_timestep_embedder_names_and_shapes():
    m = TimestepEmbedder(96)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"mlp.0.weight": (96, 256), "mlp.0.bias": (96,), "mlp.2.weight": (96, 96), "mlp.2.bias": (96,)}
    assert isinstance(m.mlp[1], torch.nn.SiLU)
    out = m(torch.tensor([1.0, 500.0]))
    expected = m.mlp[2](torch.nn.functional.silu(m.mlp[0](timestep_embedding(torch.tensor([1.0, 500.0]), 256))))
    assert torch.allclose(out, expected)


def _ape_by_hand(coords, channels, factor):
    fd = channels // 3 // 2
    out = torch.zeros(coords.shape[0], channels)
    for n in range(coords.shape[0]):
        col = 0
        for axis in range(3):
            x = float(coords[n, axis]) * factor
            for i in range(fd):
                out[n, col + i] = math.sin(x / 10000 ** (i / fd))
                out[n, col + fd + i] = math.cos(x / 10000 ** (i / fd))
            col += 2 * fd
    return out


@pytest.mark.parametrize("channels,factor", [(1024, 1.0), (100, 0.5), (64, 1.0)])
def test_ape_matches_formula(channels, factor):
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [63, 5, 17], [127, 127, 0]])
    ape = AbsolutePositionEmbedder(channels, 3, factor=factor)
    got = ape(coords)
    assert got.shape == (4, channels)
    assert torch.allclose(got, _ape_by_hand(coords, channels, factor), atol=1e-4)
    if channels % 6:
        assert torch.all(got[:, 6 * (channels // 6):] == 0)  # zero padding at the end
    assert "freqs" not in ape.state_dict()


def test_ape_factor_scales_coordinates():
    coords = torch.randint(0, 128, (20, 3))
    a = AbsolutePositionEmbedder(192, factor=0.5)(coords)
    b = AbsolutePositionEmbedder(192, factor=1.0)(coords.float() * 0.5)
    assert torch.allclose(a, b, atol=1e-5)


def test_grid_coords_raster_order():
    g = grid_coords(3)
    assert g.shape == (27, 3)
    assert g[1].tolist() == [0, 0, 1] and g[3].tolist() == [0, 1, 0] and g[9].tolist() == [1, 0, 0]
