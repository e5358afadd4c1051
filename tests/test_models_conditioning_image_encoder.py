"""DINOv2 ViT-L/14-reg image conditioner (paper Sec. 5.2): official / timm key names, strict loading, positional
embedding resize, output shape, missing-weights error, tiny trainable variant."""

import re

import pytest
import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error
from d3s2.models import image_encoder as ie
from d3s2.models.image_encoder import (DINOv2Encoder, ImageEncoderConfig, convert_dinov2_state_dict,
                                       interpolate_pos_embed, load_dinov2_weights)


def _official_shapes(c=1024, depth=24, grid=37, regs=4, patch=14, hidden=4096):
    """Key names and shapes of the official dinov2_vitl14_reg checkpoint (DINOv2 hub, block_chunks=0)."""
    s = {"cls_token": (1, 1, c), "pos_embed": (1, 1 + grid * grid, c), "register_tokens": (1, regs, c),
         "mask_token": (1, c), "patch_embed.proj.weight": (c, 3, patch, patch), "patch_embed.proj.bias": (c,),
         "norm.weight": (c,), "norm.bias": (c,)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (c,), b + "norm1.bias": (c,), b + "attn.qkv.weight": (3 * c, c),
                  b + "attn.qkv.bias": (3 * c,), b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
                  b + "ls1.gamma": (c,), b + "norm2.weight": (c,), b + "norm2.bias": (c,),
                  b + "mlp.fc1.weight": (hidden, c), b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (c, hidden),
                  b + "mlp.fc2.bias": (c,), b + "ls2.gamma": (c,)})
    return s


def _to_timm(sd):
    """The timm conversion of a DINOv2-reg checkpoint (reg_token, CLS position folded in, patch-only pos_embed)."""
    out = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    out["reg_token"] = sd["register_tokens"]
    out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    out["pos_embed"] = sd["pos_embed"][:, 1:]
    return out


def test_vit_l_names_shapes_and_strict_load_on_meta():
    with torch.device("meta"):
        m = DINOv2Encoder()
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == _official_shapes()
    sd = {k: torch.empty(v, device="meta") for k, v in _official_shapes().items()}
    m.load_state_dict(convert_dinov2_state_dict(sd), strict=True)
    timm_sd = {k: torch.empty(v, device="meta") for k, v in _official_shapes().items()
               if k not in ("mask_token", "register_tokens")}
    timm_sd["reg_token"] = torch.empty(1, 4, 1024, device="meta")
    timm_sd["pos_embed"] = torch.empty(1, 37 * 37, 1024, device="meta")
    timm_sd["head.weight"] = torch.empty(0, device="meta")  # num_classes=0 heads are dropped
    conv = convert_dinov2_state_dict(timm_sd)
    assert {k: tuple(v.shape) for k, v in conv.items()} == _official_shapes()
    out = m(torch.empty(2, 4, 518, 518, device="meta"))
    assert tuple(out.shape) == (2, 1374, 1024)
    assert ImageEncoderConfig().num_tokens == 1374


def test_official_and_timm_files_load_and_agree(tmp_path):
    torch.manual_seed(0)
    cfg = ImageEncoderConfig.tiny()
    src = DINOv2Encoder(cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    img = torch.rand(2, 4, 56, 56)
    ref = src(img)
    torch.save(sd, tmp_path / "official.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _to_timm(sd).items()}, str(tmp_path / "timm.safetensors"))
    a = DINOv2Encoder(cfg, weights=tmp_path / "official.pth")
    b = DINOv2Encoder(cfg, weights=tmp_path / "timm.safetensors")
    torch.testing.assert_close(a(img), ref)
    torch.testing.assert_close(b(img), ref, rtol=1e-5, atol=1e-5)
    assert ref.shape == (2, cfg.num_tokens, 32)
    # output is a non-affine layer norm of the pre-norm tokens
    torch.testing.assert_close(ref.mean(-1), torch.zeros(2, cfg.num_tokens), atol=1e-5, rtol=0)
    # the mask channel does not change the tokens; ImageNet normalisation does matter
    img2 = img.clone()
    img2[:, 3] = 1 - img2[:, 3]
    torch.testing.assert_close(src(img2), ref)
    assert DINOv2Encoder.split_mask(img).shape == (2, 56, 56)
    # a checkpoint of the wrong size is a clear error
    with pytest.raises(D3S2Error, match="shapes|missing"):
        DINOv2Encoder(ImageEncoderConfig.tiny(embed_dim=16), weights=tmp_path / "official.pth")


def test_pos_embed_interpolation_matches_direct_reference():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 4 * 4, 6)
    assert interpolate_pos_embed(pe, 4, 4) is pe
    out = interpolate_pos_embed(pe, 6, 6)
    assert out.shape == (1, 37, 6) and torch.equal(out[:, 0], pe[:, 0])
    # direct reference: resize each channel's 4x4 image separately (channels-first), bicubic, antialiased
    for ch in range(6):
        img = pe[0, 1:, ch].reshape(1, 1, 4, 4)
        want = F.interpolate(img, size=(6, 6), mode="bicubic", antialias=True, align_corners=False).reshape(36)
        torch.testing.assert_close(out[0, 1:, ch], want)
    # row-major patch order: a function of the column only stays a function of the column
    col = torch.arange(4.0).repeat(4)[:, None].expand(16, 2)
    pe2 = torch.cat([torch.zeros(1, 2), col]).unsqueeze(0)
    g = interpolate_pos_embed(pe2, 8, 8)[0, 1:, 0].reshape(8, 8)
    assert torch.allclose(g, g[:1].expand(8, 8)) and g[0, -1] > g[0, 0]
    # and the model uses it for other image sizes
    m = DINOv2Encoder(ImageEncoderConfig.tiny())
    assert m(torch.rand(1, 3, 84, 84)).shape == (1, 1 + 4 + 36, 32)


def test_missing_weights_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ie, "find_dinov2_weights", lambda: None)
    with pytest.raises(D3S2Error, match=re.escape(ie.OFFICIAL_FILENAME)):
        DINOv2Encoder(ImageEncoderConfig.tiny(), load_weights=True)
    with pytest.raises(D3S2Error, match="nothere.pth"):
        load_dinov2_weights(DINOv2Encoder(ImageEncoderConfig.tiny()), tmp_path / "nothere.pth")
    with pytest.raises(D3S2Error, match="multiple of the patch"):
        DINOv2Encoder(ImageEncoderConfig.tiny())(torch.rand(1, 3, 50, 56))


def test_tiny_encoder_trains():
    torch.manual_seed(0)
    m = DINOv2Encoder(ImageEncoderConfig.tiny())
    img = torch.rand(2, 3, 56, 56)
    target = torch.randn(2, 21, 32)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = (m(img) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
