"""Sparse 3D shifted-window attention of the SS-VAE blocks: padded reference and Triton varlen path vs a dense
masked-attention ground truth (ragged batches, shifts, single-token windows, empty input)."""

import math

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.nn.window_attention import (
    SparseWindowSelfAttention,
    dense_masked_window_attention,
    sparse_window_attention,
    window_partition_of,
)
from d3s2.sparse import SparseTensor, window_partition


def random_sparse(counts, res=16, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(counts):
        flat = torch.randperm(res**3, generator=g)[:n]
        xyz = torch.stack([flat // res**2, flat // res % res, flat % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords)
    perm = torch.randperm(coords.shape[0], generator=g)  # any row order inside a sample
    coords = coords[perm]
    coords = coords[torch.sort(coords[:, 0], stable=True).indices]
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords, len(counts), res)


@pytest.mark.parametrize("window,shift", [(4, 0), (4, 2), (8, 4), (3, 1)])
@pytest.mark.parametrize("counts", [[150, 37], [1], [60, 0, 5]])
def test_reference_matches_dense_masked(window, shift, counts):
    x = random_sparse(counts)
    n, h, d = x.num_voxels, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    part = window_partition(x.coords, window, shift, batch_size=x.batch_size)
    out = sparse_window_attention(q, k, v, part, backend="reference")
    ref = dense_masked_window_attention(q, k, v, x.coords, window, shift)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    grads_ref = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_windows_really_restrict_attention():
    # two voxels in different windows: each output is its own value; in one window they mix
    coords = torch.tensor([[0, 3, 0, 0], [0, 4, 0, 0]])
    v = torch.tensor([[[1.0]], [[-1.0]]]).expand(2, 1, 16).contiguous()
    q = k = torch.zeros(2, 1, 16)
    apart = sparse_window_attention(q, k, v, window_partition(coords, 4, 0), backend="reference")
    together = sparse_window_attention(q, k, v, window_partition(coords, 4, 2), backend="reference")
    torch.testing.assert_close(apart, v)
    torch.testing.assert_close(together, torch.zeros_like(v))


def test_custom_scale_and_errors():
    x = random_sparse([40])
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(40, 2, 8, generator=g) for _ in range(3))
    part = window_partition(x.coords, 4, 0)
    out = sparse_window_attention(q, k, v, part, scale=0.3, backend="reference")
    ref = dense_masked_window_attention(q * (0.3 * math.sqrt(8)), k, v, x.coords, 4, 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(D3S2Error, match="backend"):
        sparse_window_attention(q, k, v, part, backend="flash")
    with pytest.raises(D3S2Error, match="tokens"):
        sparse_window_attention(q[:5], k[:5], v[:5], part)
    empty = sparse_window_attention(q[:0], k[:0], v[:0], window_partition(x.coords[:0], 4, 0))
    assert empty.shape == (0, 2, 8)


def test_module_on_sparse_tensor_and_partition_cache():
    torch.manual_seed(0)
    x = random_sparse([90, 20], channels=32)
    attn = SparseWindowSelfAttention(32, 2, 16, window=4, shift=2, backend="reference")
    y = attn(x)
    assert torch.equal(y.coords, x.coords) and y.feats.shape == (110, 32)
    qkv = attn.to_qkv(x.feats).view(110, 3, 2, 16)
    ref = dense_masked_window_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], x.coords, 4, 2)
    torch.testing.assert_close(y.feats, attn.to_out(ref.reshape(110, 32)), rtol=1e-5, atol=1e-5)
    assert window_partition_of(x, 4, 2) is window_partition_of(x.replace(x.feats * 2), 4, 2)


def test_triton_varlen_path_matches_reference():
    # Triton's CPU interpreter (set by conftest without a GPU); fp32, tiny sizes
    x = random_sparse([45, 12], res=8)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(x.num_voxels, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    part = window_partition(x.coords, 4, 2, batch_size=2)
    out = sparse_window_attention(q, k, v, part, backend="triton")
    ref = sparse_window_attention(q, k, v, part, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
