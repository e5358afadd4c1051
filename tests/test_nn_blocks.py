import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d3s2.nn.attention import MultiHeadSelfAttention
from d3s2.nn.blocks import FeedForward, ModulatedTransformerCrossBlock, RaggedRows, pad_rows, unpad_rows


class RaggedTokens:
    """Minimal stand-in for d3s2.sparse.SparseTensor: rows sorted by sample, offsets [B+1], replace()."""

    def __init__(self, feats, batch_offsets):
        self.feats, self.batch_offsets = feats, batch_offsets

    def replace(self, feats):
        return RaggedTokens(feats, self.batch_offsets)


class PerSampleAttention(nn.Module):
    """Plays the role of SSA: a self-attention that takes the sparse object (here dense attention per sample)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        padded, mask = pad_rows(x.feats, x.batch_offsets)
        return x.replace(unpad_rows(self.attn(padded, mask), mask))


def _block(**kw):
    torch.manual_seed(0)
    b = ModulatedTransformerCrossBlock(32, 12, num_heads=4, head_dim=8, qk_rms_norm=True, **kw)
    for p in b.parameters():  # non-trivial modulation and affine norm (init would make the block an identity)
        nn.init.normal_(p, std=0.2)
    return b


def test_block_parameter_names():
    names = set(_block().state_dict())
    expected = {
        "norm2.weight", "norm2.bias",
        "self_attn.to_qkv.weight", "self_attn.to_qkv.bias", "self_attn.to_out.weight", "self_attn.to_out.bias",
        "self_attn.q_rms_norm.gamma", "self_attn.k_rms_norm.gamma",
        "cross_attn.to_q.weight", "cross_attn.to_q.bias", "cross_attn.to_kv.weight", "cross_attn.to_kv.bias",
        "cross_attn.to_out.weight", "cross_attn.to_out.bias",
        "mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    }  # fmt: skip
    assert names == expected
    b = _block()
    assert b.adaLN_modulation[1].weight.shape == (6 * 32, 32)
    assert b.mlp.mlp[0].weight.shape == (128, 32)


def test_block_matches_formula():
    b = _block()
    x, t, ctx = torch.randn(2, 10, 32), torch.randn(2, 32), torch.randn(2, 6, 12)
    sm, cm, gm, sf, cf, gf = (m[:, None] for m in b.adaLN_modulation[1](F.silu(t)).chunk(6, dim=1))
    ln = lambda z: F.layer_norm(z, (32,), eps=1e-6)  # noqa: E731
    h = x + gm * b.self_attn(ln(x) * (1 + cm) + sm)
    h = h + b.cross_attn(F.layer_norm(h, (32,), b.norm2.weight, b.norm2.bias, eps=1e-6), ctx)
    mlp = b.mlp.mlp[2](F.gelu(b.mlp.mlp[0](ln(h) * (1 + cf) + sf), approximate="tanh"))
    ref = h + gf * mlp
    assert torch.allclose(b(x, t, ctx), ref, atol=1e-5)


def test_block_sparse_path_matches_dense_per_sample():
    b = _block()
    dense_attn = b.self_attn
    b_sparse = _block(self_attn=PerSampleAttention(dense_attn))
    b_sparse.load_state_dict({k.replace("self_attn.attn.", "self_attn."): v for k, v in b.state_dict().items()}, strict=False)
    b_sparse.self_attn.attn = dense_attn
    counts = [5, 1, 0, 9]
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)))
    feats = torch.randn(sum(counts), 32)
    t, ctx = torch.randn(4, 32), torch.randn(4, 6, 12)
    out = b_sparse(RaggedTokens(feats, offsets), t, ctx)
    assert isinstance(out, RaggedTokens) and out.feats.shape == feats.shape
    for i, n in enumerate(counts):
        if n == 0:
            continue
        s = slice(int(offsets[i]), int(offsets[i + 1]))
        ref = b(feats[s][None], t[i : i + 1], ctx[i : i + 1])[0]
        assert torch.allclose(out.feats[s], ref, atol=1e-5), i


class RowsAttention(nn.Module):
    """Plays the role of SSA's calling convention: features [N, C] plus a keyword argument (the layout)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, feats, layout):
        padded, mask = pad_rows(feats, layout)
        return unpad_rows(self.attn(padded, mask), mask)


def test_block_ragged_rows_with_attn_kwargs_and_real_sparse_tensor():
    b = _block()
    rows_block = _block(self_attn=RowsAttention(b.self_attn))
    rows_block.load_state_dict(b.state_dict(), strict=False)
    counts = [3, 7]
    offsets = torch.tensor([0, 3, 10])
    feats, t, ctx = torch.randn(10, 32), torch.randn(2, 32), torch.randn(2, 6, 12)
    out = rows_block(feats, t, ctx, batch_offsets=offsets, attn_kwargs={"layout": offsets})
    for i in range(2):
        s = slice(int(offsets[i]), int(offsets[i + 1]))
        assert torch.allclose(out[s], b(feats[s][None], t[i : i + 1], ctx[i : i + 1])[0], atol=1e-5)
    sparse = pytest.importorskip("d3s2.sparse")
    if not hasattr(sparse, "SparseTensor"):
        pytest.skip("d3s2.sparse.SparseTensor not available yet")
    coords = torch.cat([torch.tensor([[0, 0, 0, i] for i in range(3)]), torch.tensor([[1, 0, i, 0] for i in range(7)])])
    x = sparse.SparseTensor(feats, coords.int(), batch_size=2)
    out_sparse = _block(self_attn=PerSampleAttention(b.self_attn))
    out_sparse.load_state_dict({k: v for k, v in b.state_dict().items() if not k.startswith("self_attn.")}, strict=False)
    y = out_sparse(x, t, ctx)
    assert torch.equal(y.coords, x.coords)
    assert torch.allclose(y.feats, out, atol=1e-5)


def test_pad_unpad_roundtrip():
    offsets = torch.tensor([0, 3, 3, 7])
    feats = torch.arange(14.0).view(7, 2)
    padded, mask = pad_rows(feats, offsets)
    assert padded.shape == (3, 4, 2) and mask.sum(1).tolist() == [3, 0, 4]
    assert torch.equal(padded[2, :4], feats[3:7]) and torch.all(padded[1] == 0)
    assert torch.equal(unpad_rows(padded, mask), feats)


@pytest.mark.parametrize("offsets", [[0, 3, 3, 7], [0, 4, 8], [0, 5]])
def test_ragged_rows_match_pad_rows(offsets):
    """RaggedRows (sizes read once, no per-call host sync) pads and unpads like pad_rows / unpad_rows, ragged or not."""
    off = torch.tensor(offsets)
    feats = torch.randn(offsets[-1], 3)
    rows = RaggedRows(off)
    padded, mask = rows.pad(feats)
    ref_padded, ref_mask = pad_rows(feats, off)
    assert torch.equal(padded, ref_padded)
    assert rows.uniform == (mask is None) and (mask is None or torch.equal(mask, ref_mask))
    assert torch.equal(rows.unpad(padded * 2), unpad_rows(ref_padded * 2, ref_mask))


def test_block_with_ragged_rows_equals_offsets():
    b = _block()
    feats, t, ctx = torch.randn(10, 32), torch.randn(2, 32), torch.randn(2, 6, 12)
    rb = _block(self_attn=RowsAttention(b.self_attn))
    rb.load_state_dict(b.state_dict(), strict=False)
    offsets = torch.tensor([0, 3, 10])
    ref = rb(feats, t, ctx, batch_offsets=offsets, attn_kwargs={"layout": offsets})
    out = rb(feats, t, ctx, batch_offsets=RaggedRows(offsets), attn_kwargs={"layout": offsets})
    assert torch.allclose(out, ref, atol=1e-6)


def test_gradient_checkpointing_same_gradients():
    x, t, ctx = torch.randn(2, 10, 32), torch.randn(2, 32), torch.randn(2, 6, 12)
    grads = []
    for ckpt in (False, True):
        b = _block(use_checkpoint=ckpt)
        b.train()
        b(x, t, ctx).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_feedforward_gelu_tanh():
    ff = FeedForward(8, 2.0)
    x = torch.randn(3, 8)
    assert torch.allclose(ff(x), ff.mlp[2](F.gelu(ff.mlp[0](x), approximate="tanh")))
    assert not torch.allclose(ff(x), ff.mlp[2](F.gelu(ff.mlp[0](x))), atol=1e-7)


def test_default_self_attention_is_dense_module():
    assert isinstance(_block().self_attn, MultiHeadSelfAttention)
