import pytest
import torch
import torch.nn.functional as F

from d3s2.sparse import (
    SparseConv3d,
    SparseTensor,
    dense_padding,
    dense_weight_to_kernel,
    kernel_offsets,
    kernel_to_dense_weight,
    neighbor_map,
    sparse_conv3d,
)
from sparse_helpers import random_sparse


def test_kernel_offsets_follow_torchsparse_order():
    # torchsparse get_kernel_offsets: odd volume -> x fastest, z slowest; even -> z fastest; r = arange(-k//2+1, k//2+1)
    o3 = kernel_offsets(3).tolist()
    assert o3[:4] == [[-1, -1, -1], [0, -1, -1], [1, -1, -1], [-1, 0, -1]]
    assert o3[13] == [0, 0, 0] and o3[26] == [1, 1, 1]
    o2 = kernel_offsets(2).tolist()
    assert o2 == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    assert kernel_offsets(1).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kernel_to_dense_weight_places_each_offset(k):
    """The view-based conversion puts kernel row i at the dense position of offset i (checked by a scatter)."""
    kernel = torch.randn(k**3, 4, 5)
    offs = kernel_offsets(k)
    idx = offs - offs.min(dim=0).values
    ref = torch.zeros(k, k, k, 5, 4)
    ref[idx[:, 0], idx[:, 1], idx[:, 2]] = kernel.transpose(1, 2)
    assert torch.equal(kernel_to_dense_weight(kernel), ref.permute(3, 4, 0, 1, 2))


def test_dense_weight_round_trip():
    w = torch.randn(5, 4, 3, 3, 3)
    assert torch.equal(kernel_to_dense_weight(dense_weight_to_kernel(w)), w)
    w2 = torch.randn(5, 4, 2, 2, 2)
    assert torch.equal(kernel_to_dense_weight(dense_weight_to_kernel(w2)), w2)
    k = dense_weight_to_kernel(w)
    # offset (x, y, z) = (1, -1, 0) is index z*9 + y*3 + x with shifted coords (1, 0, 2) -> 1*9 + 0*3 + 2
    assert torch.equal(k[1 * 9 + 0 * 3 + 2], w[:, :, 2, 0, 1].t())


def _dense_ref(x, mask, kernel, bias, k, stride):
    w = kernel_to_dense_weight(kernel.detach())
    dense = x.to_dense()
    if stride > 1:  # parents of the last odd row exist: pad the grid to a multiple of the stride
        extra = (-dense.shape[-1]) % stride
        dense = F.pad(dense, (0, extra) * 3)
        mask = F.pad(mask, (0, extra) * 3)
    ref = F.conv3d(dense, w, bias.detach() if bias is not None else None, stride=stride, padding=dense_padding(k))
    if stride == 1:
        active = mask
    else:
        active = F.max_pool3d(mask[:, None].double(), stride, stride, ceil_mode=True)[:, 0] > 0
    return ref, active


@pytest.mark.parametrize("k,stride", [(3, 1), (1, 1), (2, 2), (3, 2)])
def test_conv_matches_dense_conv3d(k, stride):
    # ragged batch: dense-ish sample, an empty sample, a very sparse one; corners active (grid boundary)
    x, mask = random_sparse([0.5, 0.0, 0.08], 7, 3)
    conv = SparseConv3d(3, 4, kernel_size=k, stride=stride).double()
    y = conv(x)
    ref, active = _dense_ref(x, mask, conv.kernel, conv.bias, k, stride)
    r = ref.shape[-1]
    assert y.resolution == r
    assert y.stride == stride
    assert torch.equal((y.to_dense() != 0).any(1) | _active_sites(y, r), active)  # output sites = active (parents)
    got = y.to_dense()
    assert torch.allclose(got, ref * active[:, None], atol=1e-12)
    assert y.batch_counts[1] == 0


def _active_sites(y, r):
    m = torch.zeros(y.batch_size, r, r, r, dtype=torch.bool)
    c = y.coords.long()
    m[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = True
    return m


def test_strided_conv_and_pool_share_parents():
    from d3s2.sparse import sparse_mean_pool

    x, _ = random_sparse([0.3, 0.2], 6, 2)
    a = SparseConv3d(2, 3, 2, 2).double()(x)
    b = sparse_mean_pool(x)
    assert a._cache is b._cache and torch.equal(a.coords, b.coords)


@pytest.mark.parametrize("k,stride", [(3, 1), (1, 1), (2, 2), (3, 2)])
def test_conv_gradcheck(k, stride):
    x, _ = random_sparse([0.3, 0.0, 0.2], 4, 2, generator=torch.Generator().manual_seed(1))
    kernel = torch.randn(k**3, 2, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    feats = x.feats.clone().requires_grad_(True)

    def f(feats, kernel, bias):
        return sparse_conv3d(x.replace(feats), kernel, bias, k, stride).feats

    assert torch.autograd.gradcheck(f, (feats, kernel, bias), fast_mode=True)
    if stride == 2:  # full Jacobians where cheap (few outputs)
        assert torch.autograd.gradcheck(f, (feats, kernel, bias))


def test_conv_gradients_match_dense():
    x, mask = random_sparse([0.4, 0.2], 5, 2)
    conv = SparseConv3d(2, 3).double()
    feats = x.feats.clone().requires_grad_(True)
    y = conv(x.replace(feats))
    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    dense_in = x.to_dense().requires_grad_(True)
    w = kernel_to_dense_weight(conv.kernel.detach()).requires_grad_(True)
    ref = F.conv3d(dense_in, w, conv.bias.detach(), padding=1)
    gd = y.replace(g).to_dense()
    (ref * gd).sum().backward()
    c = x.coords.long()
    assert torch.allclose(feats.grad, dense_in.grad[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]])
    assert torch.allclose(conv.kernel.grad, dense_weight_to_kernel(w.grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,stride", [(3, 1), (2, 2)])
def test_conv_half_precision_close_to_fp32(dtype, k, stride):
    x, _ = random_sparse([0.4, 0.3], 8, 16, dtype=torch.float32)
    conv = SparseConv3d(16, 16, k, stride)
    ref = conv(x).feats
    feats = x.feats.to(dtype).requires_grad_(True)
    out = conv.to(dtype)(x.replace(feats))
    assert out.dtype == dtype
    assert torch.isfinite(out.feats.float()).all()
    rel = (out.feats.float() - ref).norm() / ref.norm()
    assert rel < 1e-2
    out.feats.float().square().sum().backward()
    assert torch.isfinite(feats.grad.float()).all() and torch.isfinite(conv.kernel.grad.float()).all()


def test_conv_mixed_dtype_weights_follow_features():
    x, _ = random_sparse([0.3], 6, 4, dtype=torch.bfloat16)
    conv = SparseConv3d(4, 4)  # fp32 parameters
    y = conv(x)
    assert y.dtype == torch.bfloat16
    y.feats.float().sum().backward()
    assert conv.kernel.grad.dtype == torch.float32


def test_neighbour_map_pairs_are_correct():
    x, _ = random_sparse([0.3, 0.3], 6, 1)
    nmap, _ = neighbor_map(x, 3)
    offs = kernel_offsets(3)
    c = x.coords.long()
    total = 0
    for k in range(27):
        if k == nmap.identity_offset:
            continue
        i, o = nmap.pairs(k)
        assert torch.equal(c[i, 0], c[o, 0])
        assert torch.equal(c[i, 1:] - c[o, 1:], offs[k].expand(i.numel(), 3))
        total += i.numel()
    # every neighbour found: count pairs by brute force
    d = (c[:, None, 1:] - c[None, :, 1:]).abs().amax(-1)
    same_b = c[:, None, 0] == c[None, :, 0]
    assert total == int(((d == 1) & same_b).sum())


def test_torchsparse_1x1_kernel_loads():
    conv = SparseConv3d(3, 5, kernel_size=1)
    w = torch.randn(3, 5)
    conv.load_state_dict({"kernel": w, "bias": torch.zeros(5)})
    assert torch.equal(conv.kernel[0], w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_conv_cuda_matches_cpu(dtype):
    x, _ = random_sparse([0.3, 0.0, 0.2], 9, 8, dtype=torch.float32)
    for k, stride in [(3, 1), (2, 2), (3, 2)]:
        conv = SparseConv3d(8, 8, k, stride)
        ref = conv(x)
        feats = x.feats.cuda().to(dtype).requires_grad_(True)
        xc = x.to("cuda").replace(feats)
        out = conv.cuda().to(dtype)(xc)
        assert torch.equal(out.coords.cpu(), ref.coords)
        rel = (out.feats.float().cpu() - ref.feats).norm() / ref.feats.norm()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2)
        out.feats.float().sum().backward()
        assert torch.isfinite(feats.grad.float()).all()
        conv.cpu().float()
