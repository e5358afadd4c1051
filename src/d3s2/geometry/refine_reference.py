"""Plain dense reproduction of the release's two refiner ``run`` procedures (the test oracle of ``refine.py``).

Release behaviour (``Voxel_RefinerXL.run`` / ``Voxel_RefinerXL_sign.run`` of the authors' ``unet_refiner.py``, called by
their pipeline with marching-cubes level 0.4 at 512 and 0.2 at 1024), written from scratch and parametrised by the
resolution and the patch size so tests can run them at tiny sizes:

- 512 SDF refiner: the sparse SDF densified into ``R^3`` filled with 1 and its decoder features into ``C x R^3`` filled
  with 0; 3 x 3 x 3 patches of ``P^3`` at stride ``S = (R - P) / 2``; each patch through the network; the overlaps of
  ``O = P - S`` voxels blended with ``linspace(0, 1, O)`` along the last axis (rows), then the middle axis (layers),
  then the first axis.
- 1024 sign refiner: the sparse SDF densified into ``R^3`` filled with 1; the sparse voxels mean-pooled by 2 (sum over
  the active children divided by their count + 1, in float64 as the release does); densified into ``(R/2)^3`` filled
  with 1; 3 x 3 x 3 patches of ``P^3`` at stride ``(R/2 - P) / 2``, later patches overwriting earlier ones; sign +1 where
  the network's probability is >= 0.5 else -1; upsampled x2; field ``|sdf| * sign`` with the sparse voxels written
  back with their own values.

Both return the dense field the release hands to skimage's Lewiner marching cubes. They hold every dense grid at once
(the release's memory profile); use ``d3s2.geometry.refine`` outside tests.
"""

from __future__ import annotations

import torch

from d3s2.errors import D3S2Error

__all__ = ["patch_stride", "net_patch", "net_dtype", "refine_sdf_512_reference", "refine_signs_1024_reference"]

STEPS = 3  # patches per axis, as in the release


def net_patch(net, grid: int) -> tuple[int, int]:
    """``(patch, stride)`` of ``net`` on a ``grid^3`` volume; a net whose config states another ``patch_stride`` than
    the release's tiling of that grid is an error."""
    if not isinstance(getattr(net, "patch_size", None), int):
        raise D3S2Error(f"refiner network {type(net).__name__} needs an int attribute patch_size (the release's 192 / "
                        f"256)")
    patch = int(net.patch_size)
    stride = patch_stride(grid, patch)
    cfg = getattr(net, "config", None)
    have = getattr(cfg, "patch_stride", None)
    if isinstance(have, int) and have != stride:
        raise D3S2Error(f"refiner config patch_stride = {have} but the release's tiling of a {grid}^3 grid by patches "
                        f"of {patch} needs {stride}; fix the refiner config or the resolution")
    return patch, stride


def patch_stride(grid: int, patch: int) -> int:
    """The release's stride for 3 patches per axis covering ``grid`` (160 for 512 / 192, 128 for 512 / 256); a clear
    error when ``grid`` and ``patch`` do not tile like the release (``grid = 2 * stride + patch``, overlap
    ``patch - stride`` between 1 and ``stride``)."""
    patch, grid = int(patch), int(grid)
    stride = (grid - patch) // 2
    if patch < 2 or grid - patch <= 0 or (grid - patch) % 2 or not 0 < patch - stride <= stride:
        raise D3S2Error(f"refiner patches of {patch} do not tile a {grid}^3 grid like the release (3 patches per axis "
                        f"at stride (grid - patch) / 2 with an overlap of 1 .. stride voxels, e.g. 192 on 512, "
                        f"256 on 512 for the 1024 sign refiner); fix the refiner's patch_size or the resolution")
    return stride


def net_dtype(net: torch.nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype the release computes in: the network's (fp16 on CUDA in the release). A ``dtype`` attribute wins:
    a mixed-precision net (fp32 GroupNorm parameters) states its compute dtype there; else the first parameter's."""
    dt = getattr(net, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    for p in net.parameters():
        return p.dtype
    return fallback


def _batch_size(coords: torch.Tensor, batch_size: int | None) -> int:
    if batch_size is not None:
        return int(batch_size)
    return int(coords[:, 0].max()) + 1 if len(coords) else 0


def _blend_axis(parts: list[torch.Tensor], axis: int, grid: int, stride: int, weights: torch.Tensor) -> torch.Tensor:
    """The release's joining of 3 overlapping patches along ``axis`` (unique parts copied, overlaps blended)."""
    a, b, c = parts
    patch = a.shape[axis]
    ov = patch - stride
    shape = list(a.shape)
    shape[axis] = grid
    out = torch.full(shape, 2.0, dtype=a.dtype, device=a.device)  # every voxel is overwritten below
    wshape = [1] * a.ndim
    wshape[axis] = ov
    w = weights.reshape(wshape)

    def sl(t, lo, hi):
        return t.narrow(axis, lo, hi - lo)

    sl(out, 0, stride).copy_(sl(a, 0, stride))
    sl(out, patch, 2 * stride).copy_(sl(b, ov, stride))
    sl(out, stride + patch, grid).copy_(sl(c, ov, patch))
    sl(out, stride, patch).copy_(sl(a, stride, patch) * (1 - w) + sl(b, 0, ov) * w)
    sl(out, 2 * stride, stride + patch).copy_(sl(b, stride, patch) * (1 - w) + sl(c, 0, ov) * w)
    return out


@torch.no_grad()
def refine_sdf_512_reference(net, coords: torch.Tensor, sdf: torch.Tensor, features: torch.Tensor, *,
                             resolution: int = 512, batch_size: int | None = None) -> torch.Tensor:
    """Dense refined SDF ``[B, 1, R, R, R]`` (net dtype) of the release's 512 refiner run; see the module docstring."""
    patch, stride = net_patch(net, resolution)
    dtype = net_dtype(net, sdf.dtype)
    dev = sdf.device
    B, R = _batch_size(coords, batch_size), resolution
    c = coords.long()
    sdfs = torch.ones(B, 1, R, R, R, dtype=dtype, device=dev)
    sdfs[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = sdf.reshape(-1).to(dtype)
    feats = torch.zeros(B, features.shape[1], R, R, R, dtype=dtype, device=dev)
    feats[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = features.to(dtype)
    patches = []
    for i in range(STEPS):
        for j in range(STEPS):
            for k in range(STEPS):
                win = (slice(None), slice(None), slice(stride * i, stride * i + patch),
                       slice(stride * j, stride * j + patch), slice(stride * k, stride * k + patch))
                patches.append(net(sdfs[win], feats[win]))
    w = torch.linspace(0, 1, steps=patch - stride, device=dev, dtype=dtype)
    lines = [_blend_axis(patches[3 * n:3 * n + 3], 4, R, stride, w) for n in range(9)]
    layers = [_blend_axis(lines[3 * n:3 * n + 3], 3, R, stride, w) for n in range(3)]
    return _blend_axis(layers, 2, R, stride, w)


@torch.no_grad()
def refine_signs_1024_reference(net, coords: torch.Tensor, sdf: torch.Tensor, *, resolution: int = 1024,
                                batch_size: int | None = None) -> torch.Tensor:
    """Dense signed field ``[B, 1, R, R, R]`` of the release's 1024 sign refiner run; see the module docstring."""
    if resolution % 2:
        raise D3S2Error(f"the sign refiner pools by 2: resolution must be even, got {resolution}")
    H = resolution // 2
    patch, stride = net_patch(net, H)
    dtype = net_dtype(net, sdf.dtype)
    dev = sdf.device
    B, R = _batch_size(coords, batch_size), resolution
    c = coords.long()
    vals = sdf.reshape(-1).to(dtype)
    dense = torch.ones(B, 1, R, R, R, dtype=dtype, device=dev)
    dense[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = vals
    # mean over the active children, the count plus one as divisor (the release's scatter_reduce includes its zero)
    sums = torch.zeros(B, H, H, H, dtype=torch.float64, device=dev)
    cnt = torch.zeros(B, H, H, H, dtype=torch.float64, device=dev)
    p = (c[:, 0], c[:, 1] // 2, c[:, 2] // 2, c[:, 3] // 2)
    sums.index_put_(p, vals.double(), accumulate=True)
    cnt.index_put_(p, torch.ones_like(vals, dtype=torch.float64), accumulate=True)
    pooled = torch.where(cnt > 0, (sums / (cnt + 1)).to(dtype), torch.ones((), dtype=dtype, device=dev))
    pooled = pooled.unsqueeze(1)
    signs = torch.ones(B, 1, H, H, H, dtype=dtype, device=dev)
    for i in range(STEPS):
        for j in range(STEPS):
            for k in range(STEPS):
                win = (slice(None), slice(None), slice(stride * i, stride * i + patch),
                       slice(stride * j, stride * j + patch), slice(stride * k, stride * k + patch))
                prob = net(pooled[win])
                signs[win] = torch.where(prob >= 0.5, 1.0, -1.0).to(dtype)
    up = signs.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    field = dense.abs() * up
    field[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = dense[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]]
    return field
