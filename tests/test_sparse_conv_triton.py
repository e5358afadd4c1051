"""Implicit-GEMM Triton sparse conv vs the gather-GEMM-scatter reference (Triton interpreter on CPU, tiny sizes).

Forward, input gradient, weight gradient and bias gradient for submanifold 3^3 / 1^3, strided down-convs (k2 s2,
k3 s2) and the conv after subdivision, in fp32 and fp16 (bf16 ``tl.dot`` is wrong in the interpreter: bf16 is
checked in the GPU-marked tests), with ragged batches, empty and one-voxel tensors, odd channel counts and row counts
that are not multiples of the tile.
"""

from __future__ import annotations

import os

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.sparse import SparseConv3d, SparseTensor, sparse_conv3d, subdivide
from d3s2.sparse.conv import resolve_conv_backend
from d3s2.sparse.kernels.conv_function import conv_plan, implicit_gemm_conv
from d3s2.sparse.kernels.implicit_gemm import KernelConfig, igemm_wgrad, morton_order
from sparse_helpers import random_sparse

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
interp = pytest.mark.skipif(DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                            reason="Triton kernels on CPU need TRITON_INTERPRET=1")
pytestmark = interp

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    assert torch.isfinite(a).all(), "non-finite values in the Triton result"
    assert torch.isfinite(b).all(), "non-finite values in the reference"
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-6))


def run_both(x: SparseTensor, cin: int, cout: int, k: int, s: int, dtype: torch.dtype, bias: bool = True, seed=0):
    """(triton results, reference results): each (out feats, dX, dW, db). The reference runs in fp32 on the same
    (rounded) inputs, so half-precision errors are the kernel's own."""
    torch.manual_seed(seed)
    conv = SparseConv3d(cin, cout, k, s, bias=bias).to(DEV)
    x = x.to(DEV)
    feats = x.feats.to(dtype)
    res = []
    for backend, dt in (("triton", dtype), ("reference", torch.float32)):
        conv.zero_grad(set_to_none=True)
        f = feats.to(dt).clone().requires_grad_(True)
        conv.backend = backend
        c = conv.to(dt)
        y = c(x.replace(f))
        g = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEV, dt)
        if y.feats.numel():
            (y.feats.float() * g.float()).sum().backward()
        res.append((y, f.grad, c.kernel.grad, c.bias.grad if bias else None))
    return res


def check(x, cin, cout, k, s, dtype, bias=True):
    (yt, dxt, dwt, dbt), (yr, dxr, dwr, dbr) = run_both(x, cin, cout, k, s, dtype, bias)
    tol = TOL[dtype]
    assert torch.equal(yt.coords, yr.coords)
    assert yt.feats.dtype == dtype
    assert rel_err(yt.feats.float(), yr.feats) < tol
    if yr.feats.numel():
        assert rel_err(dxt.float(), dxr) < tol
        assert rel_err(dwt.float(), dwr) < tol
        if bias:
            assert rel_err(dbt.float(), dbr) < tol
    return yt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,s", [(3, 1), (1, 1), (2, 2), (3, 2)])
def test_matches_reference_ragged_batch(k, s, dtype):
    # sample 1 empty, sample 2 tiny: tiles straddle samples; 3 -> 5 channels are not multiples of any tile
    x, _ = random_sparse([0.12, 0.0, 0.04], 6, 3, dtype=torch.float32)
    assert x.num_voxels % 32 != 0
    y = check(x, 3, 5, k, s, dtype)
    assert y.num_voxels > 0


def test_conv_after_subdivide_and_multiple_tiles():
    # children of a sparse parent set (the SS-VAE decoder's dense 2^3 groups); 40 channels = 2 channel tiles each way
    x, _ = random_sparse([0.1], 4, 40, dtype=torch.float32, boundary=False)
    xs = subdivide(x)
    assert 0 < xs.num_voxels <= 64
    check(xs, 40, 40, 3, 1, torch.float32)


def test_no_bias_and_weight_dtype():
    x, _ = random_sparse([0.1], 5, 4, dtype=torch.float32)
    check(x, 4, 6, 3, 1, torch.float32, bias=False)


@pytest.mark.parametrize("k,s", [(3, 1), (2, 2)])
def test_empty_and_single_voxel(k, s):
    for n in (0, 1):
        coords = torch.tensor([[0, 2, 3, 1]], dtype=torch.int32)[:n]
        x = SparseTensor(torch.randn(n, 3), coords, 1, 8)
        (yt, dxt, dwt, dbt), (yr, dxr, dwr, dbr) = run_both(x, 3, 5, k, s, torch.float32)
        assert yt.feats.shape == yr.feats.shape == (n, 5)
        assert rel_err(yt.feats, yr.feats) < 1e-5
        if n:
            assert rel_err(dxt, dxr) < 1e-5 and rel_err(dwt, dwr) < 1e-5
            # one voxel: only the centre offset (or the child offset) has a pair
            assert int((dwt.abs().sum((1, 2)) > 0).sum()) == 1


def test_nan_stays_on_its_neighbours():
    x, _ = random_sparse([0.15], 6, 4, dtype=torch.float32)
    feats = x.feats.clone()
    feats[7, 2] = float("nan")
    conv = SparseConv3d(4, 4, 3).to(DEV)
    xn = x.replace(feats).to(DEV)
    with torch.no_grad():
        yt = sparse_conv3d(xn, conv.kernel, conv.bias, backend="triton").feats
        yr = sparse_conv3d(xn, conv.kernel, conv.bias, backend="reference").feats
    bad_t, bad_r = torch.isnan(yt).any(1), torch.isnan(yr).any(1)
    assert bad_r.any() and torch.equal(bad_t, bad_r)  # masked (missing) neighbours never read the NaN row
    assert rel_err(yt[~bad_t], yr[~bad_r]) < 1e-5


def test_plan_cached_and_shared():
    x, _ = random_sparse([0.1], 5, 3, dtype=torch.float32)
    x = x.to(DEV)
    out = x
    p1 = conv_plan(x, out, 3, 1)
    assert conv_plan(x.replace(torch.randn(x.num_voxels, 8, device=DEV)), out, 3, 1) is p1
    assert p1.table.dtype == torch.int32 and p1.table.shape == (27, x.num_voxels)
    # the centre offset of a submanifold conv maps every row to itself
    assert torch.equal(p1.table[13].long(), p1.order.long())
    # pair count equals the reference neighbour map's
    from d3s2.sparse import neighbor_map

    nmap, _ = neighbor_map(x, 3)
    assert p1.num_pairs == nmap.num_pairs


@pytest.mark.parametrize("trans_load", [True, False])
def test_wgrad_split_is_deterministic_and_exact(trans_load):
    x, _ = random_sparse([0.5], 6, 6, dtype=torch.float32)
    x = x.to(DEV)
    plan = conv_plan(x, x, 3, 1)
    pin, pout, ptr = plan.pairs()
    g = torch.randn(x.num_voxels, 7, device=DEV)
    one = igemm_wgrad(x.feats, g, pin, pout, ptr, 27)
    many_cfg = KernelConfig(wg_block_m=16, wg_block_ci=16, wg_block_co=16, wg_warps=1, wg_stages=1,
                            wg_programs_per_sm=64, block_m=32, block_n=16, block_k=16, num_warps=1, num_stages=1,
                            wg_trans_load=trans_load)
    many = igemm_wgrad(x.feats, g, pin, pout, ptr, 27, many_cfg)
    again = igemm_wgrad(x.feats, g, pin, pout, ptr, 27, many_cfg)
    assert torch.equal(many, again)
    assert int((ptr[1:] - ptr[:-1]).max()) > 4 * 16  # so the split path really runs with several slices
    ref = torch.zeros(27, 6, 7, dtype=torch.float64)
    b = ptr.tolist()
    for k in range(27):
        i, o = pin[b[k]:b[k + 1]].long().cpu(), pout[b[k]:b[k + 1]].long().cpu()
        ref[k] = x.feats.cpu().double()[i].t() @ g.cpu().double()[o]
    assert rel_err(one.cpu(), ref) < 1e-5 and rel_err(many.cpu(), ref) < 1e-5


def test_morton_order_is_a_local_permutation():
    c = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(64, 1, dtype=torch.long), c], 1)[torch.randperm(64)]
    o = morton_order(coords, 4)
    assert torch.equal(torch.sort(o).values, torch.arange(64))
    # every aligned run of 8 rows is one 2^3 cube
    cubes = (coords[o, 1:] // 2).view(8, 8, 3)
    assert (cubes == cubes[:, :1]).all()
    # batch is the most significant key
    coords2 = torch.cat([coords, coords + torch.tensor([1, 0, 0, 0])])
    assert (coords2[morton_order(coords2, 4), 0].diff() >= 0).all()


def test_backend_selection():
    assert resolve_conv_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_conv_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(D3S2Error):
        resolve_conv_backend("fast", torch.device("cpu"))
    with pytest.raises(D3S2Error):
        SparseConv3d(3, 3, backend="cuda")
    with pytest.raises(D3S2Error):
        x, _ = random_sparse([0.1], 4, 3, dtype=torch.float32)
        implicit_gemm_conv(x.feats, torch.randn(27, 4, 3), None, conv_plan(x, x, 3, 1))


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_auto_is_triton_and_bf16_matches():
    assert resolve_conv_backend("auto", torch.device("cuda")) == "triton"
    x, _ = random_sparse([0.05, 0.02], 48, 64, dtype=torch.float32)
    for k, s in ((3, 1), (1, 1), (2, 2), (3, 2)):
        for dt in (torch.bfloat16, torch.float16):
            check(x, 64, 96, k, s, dt)
    check(subdivide(x), 64, 32, 3, 1, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_int64_row_offsets():
    # N * C > 2^31 elements: a 1x1 conv is a plain GEMM, so the last rows are easy to check exactly
    n, c = (2**31) // 128 + 4099, 128
    coords = torch.zeros(n, 4, dtype=torch.int32, device="cuda")
    r = torch.arange(n, device="cuda")
    coords[:, 1], coords[:, 2], coords[:, 3] = r // (2048 * 2048), (r // 2048) % 2048, r % 2048
    x = SparseTensor(torch.randn(n, c, device="cuda", dtype=torch.bfloat16), coords, 1, 2048)
    w = torch.randn(1, c, c, device="cuda", dtype=torch.bfloat16) / c**0.5
    with torch.no_grad():
        y = sparse_conv3d(x, w, None, backend="triton").feats
    tail = slice(n - 3000, n)
    ref = x.feats[tail].float() @ w[0].float()
    assert rel_err(y[tail].float(), ref) < 2e-2
