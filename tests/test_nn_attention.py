import pytest
import torch

from d3s2.nn.attention import MultiHeadCrossAttention, MultiHeadSelfAttention, attention
from d3s2.nn.norms import ChannelLayerNorm3d, LayerNorm32, MultiHeadRMSNorm


def _naive_attention(q, k, v):
    # q [B, L, H, d], k/v [B, S, Hkv, d]; query head h reads kv head h // group.
    group = q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    for h in range(q.shape[2]):
        kh, vh = k[:, :, h // group], v[:, :, h // group]
        s = torch.einsum("bld,bsd->bls", q[:, :, h], kh) / q.shape[-1] ** 0.5
        out[:, :, h] = torch.einsum("bls,bsd->bld", s.softmax(-1), vh)
    return out


def _rms(x, gamma):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * gamma


def test_rms_norm_formula():
    x = torch.randn(2, 5, 4, 8)
    n = MultiHeadRMSNorm(8, 4)
    with torch.no_grad():
        n.gamma.copy_(torch.rand(4, 8) + 0.5)
    assert torch.allclose(n(x), _rms(x, n.gamma), atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,qk_norm", [(4, 4, False), (4, 2, True), (6, 1, True)])
def test_self_attention_matches_naive(heads, kv_heads, qk_norm):
    torch.manual_seed(0)
    c, d = 24, 8
    m = MultiHeadSelfAttention(c, heads, head_dim=d, num_kv_heads=kv_heads, qk_rms_norm=qk_norm)
    if qk_norm:
        with torch.no_grad():
            m.q_rms_norm.gamma.uniform_(0.5, 1.5)
            m.k_rms_norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, c)
    qkv = m.to_qkv(x)
    q = qkv[..., : heads * d].view(2, 7, heads, d)
    k = qkv[..., heads * d : (heads + kv_heads) * d].view(2, 7, kv_heads, d)
    v = qkv[..., (heads + kv_heads) * d :].view(2, 7, kv_heads, d)
    if qk_norm:
        q, k = _rms(q, m.q_rms_norm.gamma), _rms(k, m.k_rms_norm.gamma)
    ref = m.to_out(_naive_attention(q, k, v).reshape(2, 7, heads * d))
    assert torch.allclose(m(x), ref, atol=1e-5)
    names = set(m.state_dict())
    assert {"to_qkv.weight", "to_qkv.bias", "to_out.weight", "to_out.bias"} <= names
    assert ("q_rms_norm.gamma" in names) == qk_norm and ("k_rms_norm.gamma" in names) == qk_norm
    assert m.to_qkv.weight.shape == ((heads + 2 * kv_heads) * d, c)


def test_cross_attention_matches_naive_and_mask():
    torch.manual_seed(1)
    m = MultiHeadCrossAttention(16, 12, num_heads=2, head_dim=8)
    assert set(m.state_dict()) == {f"{n}.{p}" for n in ("to_q", "to_kv", "to_out") for p in ("weight", "bias")}
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 9, 12)
    q = m.to_q(x).view(2, 5, 2, 8)
    k, v = m.to_kv(ctx).view(2, 9, 2, 2, 8).unbind(2)
    ref = m.to_out(_naive_attention(q, k, v).reshape(2, 5, 16))
    assert torch.allclose(m(x, ctx), ref, atol=1e-5)
    # Masked context == truncated context, per sample.
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :9] = True
    out = m(x, ctx, mask)
    assert torch.allclose(out[0], m(x[:1], ctx[:1, :4])[0], atol=1e-5)
    assert torch.allclose(out[1], m(x[1:], ctx[1:])[0], atol=1e-5)


def test_fully_masked_sample_gives_zero_not_nan():
    q = torch.randn(2, 3, 2, 4)
    k = v = torch.randn(2, 5, 2, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = attention(q, k, v, mask)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)
    assert torch.allclose(out[0], attention(q[:1], k[:1], v[:1])[0], atol=1e-6)


def test_layer_norms():
    x = torch.randn(2, 6, 3, 4, 5)
    n = ChannelLayerNorm3d(6)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
        n.bias.uniform_(-1, 1)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 4, 1), (6,), n.weight, n.bias).permute(0, 4, 1, 2, 3)
    assert torch.allclose(n(x), ref, atol=1e-5)
    ln = LayerNorm32(8, elementwise_affine=False)
    xb = torch.randn(4, 8).bfloat16()
    assert ln(xb).dtype == torch.bfloat16 and len(ln.state_dict()) == 0


def test_gqa_native_and_repeat_paths_agree(monkeypatch):
    import d3s2.nn.attention as A

    q, k, v = torch.randn(2, 5, 8, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)
    mask = torch.rand(2, 6) > 0.3
    mask[:, 0] = True
    outs = []
    for native in (True, False):
        monkeypatch.setattr(A, "_SDPA_HAS_GQA", native and A._SDPA_HAS_GQA)
        outs.append(attention(q, k, v, mask))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(attention(q, k, v), _naive_attention(q, k, v), atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
