"""Sparse conditioning (paper Sec. 4.2, Eq. 9): token selection against a hand-made mask, padding, model use."""

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.models.conditioning import (dense_condition, image_condition, pad_condition, patch_mask,
                                      select_sparse_tokens, sparse_condition)


def test_patch_mask_is_14px_maxpool():
    mask = torch.zeros(1, 518, 518)
    mask[0, 14 * 3 + 13, 14 * 5] = 1.0  # one pixel, last row of patch row 3, first column of patch column 5
    mask[0, 300:330, 100:101] = 0.5
    pm = patch_mask(mask)
    assert pm.shape == (1, 37, 37)
    expected = torch.zeros(37, 37, dtype=torch.bool)
    expected[3, 5] = True
    expected[300 // 14: 329 // 14 + 1, 100 // 14] = True
    assert torch.equal(pm[0], expected)
    assert torch.equal(patch_mask(mask[:, None]), pm)
    with pytest.raises(D3S2Error):
        patch_mask(torch.zeros(1, 2, 8, 8))


def test_selection_matches_hand_made_mask():
    g, c = 4, 6
    tokens = torch.randn(2, 5 + g * g, c)
    pm = torch.zeros(2, g, g, dtype=torch.bool)
    pm[0, 1, 2] = True  # row 1, column 2 -> token 5 + 1*4 + 2 = 11, coords (w=2, h=1)
    pm[0, 3, 0] = True  # row 3, column 0 -> token 5 + 12 = 17, coords (w=0, h=3)
    feats, coords = select_sparse_tokens(tokens, pm)  # sample 1: background only -> prefix tokens alone
    assert coords.tolist() == (
        [[0, 0, 0, 1]] * 5 + [[0, 2, 1, 0], [0, 0, 3, 0]] + [[1, 0, 0, 1]] * 5
    )
    assert torch.equal(feats, torch.cat([tokens[0, :5], tokens[0, [11, 17]], tokens[1, :5]]))

    cond = pad_condition(feats, coords, 2)
    assert cond.tokens.shape == (2, 7, c) and cond.mask.tolist() == [[True] * 7, [True] * 5 + [False] * 2]
    assert torch.equal(cond.tokens[1, 5:], torch.zeros(2, c))
    assert cond.coords[0, 5].tolist() == [2, 1, 0] and cond.coords[1, 4].tolist() == [0, 0, 1]
    assert set(cond.model_kwargs()) == {"cond_mask", "cond_coords"}


def test_sparse_condition_from_image_mask_full_size():
    tokens = torch.randn(1, 1374, 8)
    mask = torch.zeros(1, 1, 518, 518)
    mask[..., 140:280, 70:84] = 1.0  # patch rows 10..19, column 5
    cond = sparse_condition(tokens, mask)
    assert cond.tokens.shape == (1, 5 + 10, 8)
    rows = [5 + r * 37 + 5 for r in range(10, 20)]
    assert torch.equal(cond.tokens[0, 5:], tokens[0, rows])
    assert cond.coords[0, 5:].tolist() == [[5, r, 0] for r in range(10, 20)]
    assert torch.equal(dense_condition(tokens), tokens)


def test_bad_token_count():
    with pytest.raises(D3S2Error, match="square"):
        select_sparse_tokens(torch.randn(1, 5 + 15, 4), torch.zeros(1, 4, 4))


def test_image_condition_with_tiny_encoder_feeds_v1_0_model():
    import dataclasses

    from d3s2.config import load_model_config
    from d3s2.flow import EulerSampler
    from d3s2.models.image_encoder import DINOv2Encoder, ImageEncoderConfig
    from d3s2.models.ss_dit import SSDiT
    from d3s2.sparse import SparseTensor

    torch.manual_seed(0)
    enc = DINOv2Encoder(ImageEncoderConfig.tiny(embed_dim=16))  # 56 px -> 4 x 4 patches, 16-channel tokens
    image = torch.rand(2, 4, 56, 56)
    image[:, 3] = 0
    image[0, 3, 14:28, 30:40] = 1  # sample 0: patch row 1, column 2 (pixels 30..39)
    image[1, 3, 0:5, 0:5] = 1  # sample 1: patch (0, 0)
    cond = image_condition(enc, image, sparse=True)
    assert cond.mask.sum(1).tolist() == [5 + 1, 5 + 1]
    assert cond.coords[0, 5].tolist() == [2, 1, 0] and cond.coords[1, 5].tolist() == [0, 0, 0]
    tokens = enc(image)
    assert torch.equal(cond.tokens[0, 5], tokens[0, 5 + 1 * 4 + 2])
    assert torch.equal(image_condition(enc, image, sparse=False), tokens)
    with pytest.raises(D3S2Error, match="mask"):
        image_condition(enc, image[:, :3], sparse=True)

    cfg = dataclasses.replace(load_model_config("ss_dit_tiny").params, version="v1.0", sparse_conditioning=True)
    model = SSDiT(cfg).eval()
    c = torch.unique(torch.randint(0, 8, (40, 3)), dim=0)
    coords = torch.cat([torch.cat([torch.full((c.shape[0], 1), b), c], 1) for b in range(2)])
    noise = SparseTensor(torch.randn(coords.shape[0], 8), coords)
    with torch.no_grad():
        out = EulerSampler(steps=3, cfg_scale=7.0, shift=3.0)(model, noise, cond.tokens, **cond.model_kwargs())
    assert out.feats.shape == noise.feats.shape and torch.isfinite(out.feats).all()
