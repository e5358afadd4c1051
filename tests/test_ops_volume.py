"""Dense-volume ops of the refiners (d3s2.ops.volume): Triton kernels (interpreter on CPU) against the PyTorch
references, and the refiner layers that use them against the release's plain formulas."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error
from d3s2.nn.adaptive_filter import adaptive_filter, adaptive_filter_reference
from d3s2.nn.unet3d import FP32GroupNorm, group_norm_silu, group_norm_silu_parts, group_norm_silu_reference
from d3s2.ops.volume import adaptive_pass, channel_stats, norm_apply, resolve_volume_backend
from d3s2.ops.volume.reference import TAPS

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels on CPU need TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
# shapes: one voxel, sizes not multiples of the kernels' blocks, a batch of two, one channel
SHAPES = [(1, 1, 1, 1, 1), (1, 8, 5, 7, 3), (2, 3, 4, 9, 6), (1, 16, 17, 3, 5)]


def _rand(shape, dtype, seed, scale=3.0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(DEV, dtype)


def _close(a, b, dtype):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-6))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats_match_float64(shape, dtype):
    x = _rand(shape, dtype, 0)
    mean, m2, n = channel_stats(x, backend="triton")
    rm, rq, rn = channel_stats(x, backend="reference")
    assert n == rn == shape[2] * shape[3] * shape[4] and mean.dtype == m2.dtype == torch.float64
    assert torch.allclose(mean, rm, rtol=1e-6, atol=1e-6)
    assert torch.allclose(m2, rq, rtol=1e-5, atol=1e-6)


def test_channel_stats_of_a_large_offset_row_keep_the_variance():
    # mean 1000, spread 1e-2 over more voxels than one block: sums of squares in fp32 would lose the variance
    x = (1000 + 1e-2 * torch.randn(1, 2, 9000, 1, 1, generator=torch.Generator().manual_seed(1))).to(DEV)
    _, m2, n = channel_stats(x, backend="triton")
    _, rq, _ = channel_stats(x, backend="reference")
    assert torch.allclose(m2 / n, rq / n, rtol=1e-3)


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_apply_matches_reference_also_in_place(shape, dtype, act):
    x = _rand(shape, dtype, 1)
    scale, shift = _rand(shape[:2], torch.float64, 2, 1.0, 0.0), _rand(shape[:2], torch.float64, 3, 1.0, 0.0)
    ref = norm_apply(x, scale, shift, act, backend="reference")
    out = norm_apply(x, scale, shift, act, backend="triton")
    _close(out, ref, dtype)
    y = x.clone()
    assert norm_apply(y, scale, shift, act, out=y, backend="triton") is y
    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_adaptive_pass_matches_the_tap_loop(shape, dtype):
    x = _rand(shape, dtype, 4)
    w = F.normalize(_rand((shape[0], 27) + shape[2:], torch.float64, 5), p=1, dim=1).to(dtype)
    out = adaptive_pass(x, w, backend="triton")
    # independent check: the taps written out with torch.roll-free slicing of a zero-padded copy, float64
    d, h, wd = shape[2:]
    pad = F.pad(x.double(), (1, 1, 1, 1, 1, 1))
    want = sum(pad[:, :, i:i + d, j:j + h, k:k + wd] * w[:, t:t + 1].double() for t, (i, j, k) in enumerate(TAPS))
    _close(out, want, dtype)
    _close(adaptive_pass(x, w, backend="reference"), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8, 5, 7, 3), (2, 3, 4, 9, 6), (1, 16, 17, 3, 5)])
def test_group_norm_ops_on_channels_last_volumes(shape, dtype):
    x = _rand(shape, dtype, 8).contiguous(memory_format=torch.channels_last_3d)
    assert not x.is_contiguous()
    mean, m2, n = channel_stats(x, backend="triton")
    rm, rq, _ = channel_stats(x, backend="reference")
    assert torch.allclose(mean, rm, rtol=1e-6, atol=1e-6) and torch.allclose(m2, rq, rtol=1e-5, atol=1e-6)
    scale, shift = _rand(shape[:2], torch.float64, 9, 1.0, 0.0), _rand(shape[:2], torch.float64, 10, 1.0, 0.0)
    ref = norm_apply(x.contiguous(), scale, shift, True, backend="reference")
    out = norm_apply(x, scale, shift, True, backend="triton")
    assert out.stride() == x.stride()
    _close(out, ref, dtype)
    y = x.clone()
    norm_apply(y, scale, shift, True, out=y, backend="triton")
    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layers_take_the_kernels_and_match_the_release_formulas(dtype):
    norm = FP32GroupNorm(4, 16).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
        norm.bias.copy_(torch.linspace(-0.2, 0.3, 16))
    x = _rand((2, 16, 6, 5, 7), dtype, 6)
    with torch.no_grad():
        ref = group_norm_silu_reference(x, norm)
        _close(group_norm_silu(x, norm, backend="triton"), ref, dtype)
        a, b = x[:, :10].contiguous(), x[:, 10:].contiguous()
        parts = group_norm_silu_parts([a, b], norm, backend="triton")
        _close(torch.cat(parts, 1), ref, dtype)
        cl = x.contiguous(memory_format=torch.channels_last_3d)
        _close(group_norm_silu(cl, norm, backend="triton"), ref, dtype)
        raw = _rand((2, 27, 6, 5, 7), dtype, 7)
        want = adaptive_filter_reference(x, raw.clone(), passes=3)
        _close(adaptive_filter(x, raw.clone(), passes=3, backend="triton"), want, dtype)


def test_backend_choice_is_explicit_and_checked():
    x = torch.zeros(1, 2, 3, 3, 3)
    assert resolve_volume_backend("auto", x) == ("triton" if x.is_cuda else "reference")
    assert resolve_volume_backend("auto", x.double()) == "reference"
    assert resolve_volume_backend("auto", x.transpose(2, 3)) == "reference"
    cl = torch.zeros(1, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    assert resolve_volume_backend("auto", cl) == "reference"  # only ops that have channels-last kernels take it
    assert resolve_volume_backend("auto", cl, channels_last=True) == ("triton" if cl.is_cuda else "reference")
    with pytest.raises(D3S2Error, match="unknown volume-op backend"):
        resolve_volume_backend("fast", x)
    with pytest.raises(D3S2Error, match="contiguous"):
        resolve_volume_backend("triton", x.transpose(2, 3))
    with pytest.raises(D3S2Error, match="do not fit"):
        adaptive_pass(x, torch.zeros(1, 26, 3, 3, 3))
    with pytest.raises(D3S2Error, match="scale / shift"):
        norm_apply(x, torch.ones(2), torch.zeros(2))
    with pytest.raises(D3S2Error, match="empty"):
        channel_stats(torch.zeros(1, 2, 0, 3, 3))
