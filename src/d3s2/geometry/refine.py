"""The release's two refiner runs, lean: the same fields as ``refine_reference`` without its dense feature grid
(``32 x 512^3``) or any dense ``1024^3`` tensor (issue 20; release behaviour of ``Voxel_RefinerXL.run`` /
``Voxel_RefinerXL_sign.run``, see ``refine_reference`` for the procedure).

How: the sparse voxels are bucketed by patch once (a voxel lies in up to 8 of the 27 overlapping patches); each patch
is densified on its own from its voxels. A patch holding no voxel of a sample feeds the network the constant empty
patch (SDF 1, features 0), so the network runs on it once and its output is reused (results are those of running every
patch). The 512 blending streams patch -> row -> layer -> grid with the release's arithmetic (bit-identical), into one
dense ``R^3`` result; the 1024 signs go into one dense ``(R/2)^3`` int8 grid.

What leaves is sparse, a ``RefinedField`` per sample: explicit voxels wherever marching cubes can make a triangle,
plus a bit-packed side map for the rest. ``lewiner_marching_cubes(**field.mc_kwargs())`` then gives skimage Lewiner's
triangles on the release's dense field:
- 1024: the release's field outside the band is ``|1| * sign``, so ``fill_fn`` returns the exact values from the
  packed 512 sign bits; explicit voxels are the band (own values) and the corners of every cell whose signs differ.
- 512: explicit voxels are the corners of every cell straddling the level (``min <= level <= max``); elsewhere only the
  side of the level matters (a cell whose corners lie on one side makes no triangle), so ``fill_fn`` returns
  ``level + 1`` above and ``level - 1`` below. Values of absent voxels are therefore not the release's there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from d3s2.errors import D3S2Error
from d3s2.geometry.refine_reference import STEPS, net_dtype, net_patch

__all__ = ["RefinedField", "SideBits", "field_from_grid", "refine_sdf_512", "refine_signs_1024", "refined_sdf_grid",
           "refined_sign_grid", "LEVEL_512", "LEVEL_1024"]

LEVEL_512 = 0.4  # the release's pipeline: mc_threshold * 2 with its default 0.2
LEVEL_1024 = 0.2
_CORNERS = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])


class SideBits:
    """A boolean ``[R, R, R]`` grid packed 8 voxels a byte (16 MB at 512): which side of the level a voxel is on."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        flat = mask.reshape(-1)
        pad = (-len(flat)) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        bits = (2 ** torch.arange(8, device=mask.device)).to(torch.uint8)
        self.bits = (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)

    def to(self, device) -> "SideBits":
        out = object.__new__(SideBits)
        out.shape, out.bits = self.shape, self.bits.to(device)
        return out

    def __getitem__(self, coords: torch.Tensor) -> torch.Tensor:
        """Bool ``[N]`` for int ``[N, 3]`` coordinates."""
        c = coords.to(self.bits.device).long()
        idx = (c[:, 0] * self.shape[1] + c[:, 1]) * self.shape[2] + c[:, 2]
        return ((self.bits[idx >> 3] >> (idx & 7).to(torch.uint8)) & 1).bool()


@dataclass
class RefinedField:
    """One sample's refined field, sparse: ``coords`` int64 ``[N, 3]`` (sorted, unique) with ``values`` ``[N]``;
    absent voxels take ``fill_fn(coords)``. ``scale``: the side map's voxel size in grid voxels (2 at 1024: the
    signs are those of the 512 grid); ``fill_above`` / ``fill_below``: the values absent voxels take on each side."""

    coords: torch.Tensor
    values: torch.Tensor
    resolution: int
    level: float
    side: SideBits
    scale: int
    fill_above: float
    fill_below: float

    def fill_fn(self, coords: torch.Tensor) -> torch.Tensor:
        above = self.side[torch.div(coords.long(), self.scale, rounding_mode="floor")]
        hi = torch.tensor(self.fill_above, dtype=self.values.dtype, device=above.device)
        lo = torch.tensor(self.fill_below, dtype=self.values.dtype, device=above.device)
        return torch.where(above, hi, lo).to(coords.device)

    def mc_kwargs(self, kind: str = "lewiner") -> dict:
        """Keyword arguments of ``d3s2.geometry.lewiner.lewiner_marching_cubes`` giving the release's mesh (grid
        units, or with ``world=True`` the release's ``v / R * 2 - 1``: ``world_offset=0.0``); ``kind="sparse"``: of
        ``d3s2.geometry.marching_cubes.sparse_marching_cubes`` (Lorensen's tables, cells whose 8 corners are explicit:
        complete at 512 and with ``refine_signs_1024(complete=True)``; grid units, world ``v / R * 2 - 1`` by hand)."""
        if kind == "sparse":
            return dict(coords=self.coords, values=self.values, resolution=self.resolution, level=self.level)
        if kind != "lewiner":
            raise D3S2Error(f"mc_kwargs kind must be 'lewiner' or 'sparse', not {kind!r}")
        return dict(coords=self.coords, values=self.values, resolution=self.resolution, level=self.level,
                    fill_fn=self.fill_fn, world_offset=0.0)

    def to(self, device) -> "RefinedField":
        return RefinedField(self.coords.to(device), self.values.to(device), self.resolution, self.level,
                            self.side.to(device), self.scale, self.fill_above, self.fill_below)

    def dense(self) -> torch.Tensor:
        """The whole ``R^3`` field (for tests and small grids only)."""
        R = self.resolution
        axes = torch.arange(R, device=self.coords.device)
        allc = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), -1).reshape(-1, 3)
        out = self.fill_fn(allc).reshape(R, R, R).to(self.values.dtype)
        out[self.coords[:, 0], self.coords[:, 1], self.coords[:, 2]] = self.values
        return out


def _check_inputs(coords: torch.Tensor, sdf: torch.Tensor, resolution: int, features: torch.Tensor | None = None):
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise D3S2Error(f"refiner coords must be [N, 4] (batch, x, y, z), got shape {tuple(coords.shape)}")
    if sdf.reshape(-1).shape[0] != len(coords):
        raise D3S2Error(f"refiner got {len(coords)} coordinates but {sdf.numel()} SDF values")
    if features is not None and (features.ndim != 2 or len(features) != len(coords)):
        raise D3S2Error(f"refiner features must be [N, C] for N = {len(coords)} voxels, got {tuple(features.shape)}")
    if len(coords):
        if int(coords[:, 1:].min()) < 0 or int(coords[:, 1:].max()) >= resolution or int(coords[:, 0].min()) < 0:
            raise D3S2Error(f"refiner voxel coordinates must lie in [0, {resolution}) with batch indices >= 0")
        if not bool(torch.isfinite(sdf).all()):
            raise D3S2Error("refiner got NaN/inf SDF values; fix the decoder output first")


def _keys(coords: torch.Tensor, R: int) -> torch.Tensor:
    c = coords.long()
    return ((c[:, 0] * R + c[:, 1]) * R + c[:, 2]) * R + c[:, 3]


def _sorted_unique(coords: torch.Tensor, R: int) -> torch.Tensor:
    """Order of ``coords`` by (batch, x, y, z); a clear error on duplicates (the release's scatter would keep an
    arbitrary one)."""
    keys = _keys(coords, R)
    keys, order = torch.sort(keys)
    if len(keys) > 1 and bool((keys[1:] == keys[:-1]).any()):
        raise D3S2Error("refiner got duplicate voxel coordinates; merge them first")
    return order


class _Buckets:
    """The voxels of each (sample, patch): a voxel at ``x`` lies in patch ``p`` of an axis when
    ``p * stride <= x < p * stride + patch`` (one or two patches per axis)."""

    def __init__(self, coords: torch.Tensor, batch: int, patch: int, stride: int):
        c = coords.long()
        dev = c.device
        rows, ids = [], []
        for d in _CORNERS.tolist():
            p = torch.div(c[:, 1:], stride, rounding_mode="floor").clamp_max_(STEPS - 1) - torch.tensor(d, device=dev)
            ok = ((p >= 0) & (c[:, 1:] < p * stride + patch)).all(1)
            rows.append(torch.nonzero(ok).squeeze(1))
            pp = p[ok]
            ids.append((c[ok, 0] * STEPS + pp[:, 0]) * STEPS * STEPS + pp[:, 1] * STEPS + pp[:, 2])
        rows, ids = torch.cat(rows), torch.cat(ids)
        ids, order = torch.sort(ids, stable=True)
        self.rows = rows[order]
        n = batch * STEPS ** 3
        counts = torch.bincount(ids, minlength=n).cpu()
        self.ends = torch.cumsum(counts, 0).tolist()
        self.starts = [0] + self.ends[:-1]

    def get(self, b: int, pid: int) -> torch.Tensor:
        k = b * STEPS ** 3 + pid
        return self.rows[self.starts[k]:self.ends[k]]


class _AxisStitch:
    """Writes 3 overlapping patches pushed in order along ``axis`` of ``dest`` with the release's blending:
    unique parts copied, an overlap ``a * (1 - w) + b * w`` (same arithmetic, so bit-identical to it)."""

    def __init__(self, dest: torch.Tensor, axis: int, patch: int, stride: int, weights: torch.Tensor):
        self.dest, self.axis, self.patch, self.stride, self.k, self.tail = dest, axis, patch, stride, 0, None
        shape = [1] * dest.ndim
        shape[axis] = patch - stride
        self.w = weights.reshape(shape)

    def _sl(self, t, lo, hi):
        return t.narrow(self.axis, lo, hi - lo)

    def push(self, part: torch.Tensor) -> None:
        S, P, k = self.stride, self.patch, self.k
        O = P - S
        if k == 0:
            self._sl(self.dest, 0, S).copy_(self._sl(part, 0, S))
        else:
            lo = k * S
            self._sl(self.dest, lo, lo + O).copy_(self.tail * (1 - self.w) + self._sl(part, 0, O) * self.w)
            hi = S if k < STEPS - 1 else P
            self._sl(self.dest, lo + O, lo + hi).copy_(self._sl(part, O, hi))
        self.tail = self._sl(part, S, P).clone() if k < STEPS - 1 else None
        self.k += 1


def _window(i: int, j: int, k: int, stride: int) -> torch.Tensor:
    return torch.tensor([i * stride, j * stride, k * stride])


def _run_patches(net, B: int, buckets: _Buckets, make_input, empty_input, progress):
    """Yields ``(i, j, k, out [B, ...])`` in the release's patch order; samples without voxels in a patch share the
    network's output on the empty patch, computed once."""
    empty = None
    pid = 0
    for i in range(STEPS):
        for j in range(STEPS):
            for k in range(STEPS):
                live = [b for b in range(B) if len(buckets.get(b, pid))]
                outs: list = [None] * B
                if live:
                    inputs = make_input(live, [buckets.get(b, pid) for b in live], (i, j, k))
                    res = net(*inputs)
                    for n, b in enumerate(live):
                        outs[b] = res[n:n + 1]
                    del res, inputs
                if len(live) < B:
                    if empty is None:
                        empty = net(*empty_input())
                    for b in range(B):
                        if outs[b] is None:
                            outs[b] = empty
                yield i, j, k, torch.cat(outs) if B > 1 else outs[0]
                pid += 1
                if progress is not None:
                    progress(pid, STEPS ** 3)


def _batch(coords: torch.Tensor, batch_size: int | None) -> int:
    if batch_size is not None:
        if len(coords) and int(coords[:, 0].max()) >= batch_size:
            raise D3S2Error(f"refiner coords hold batch index {int(coords[:, 0].max())} >= batch_size {batch_size}")
        return int(batch_size)
    return int(coords[:, 0].max()) + 1 if len(coords) else 0


@torch.inference_mode()
def refined_sdf_grid(net, coords: torch.Tensor, sdf: torch.Tensor, features: torch.Tensor, *, resolution: int = 512,
                     batch_size: int | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The release's refined 512 SDF, dense ``[B, 1, R, R, R]`` in the net's dtype, built patch by patch (no dense
    feature grid). ``net(sdf [b,1,P,P,P], features [b,C,P,P,P]) -> [b,1,P,P,P]`` with ``net.patch_size``."""
    _check_inputs(coords, sdf, resolution, features)
    patch, S = net_patch(net, resolution)
    dtype, dev, R = net_dtype(net, sdf.dtype), sdf.device, resolution
    B = _batch(coords, batch_size)
    C = features.shape[1]
    c = coords.long().to(dev)
    sdf = sdf.reshape(-1).to(dtype)
    features = features.to(dtype)
    _sorted_unique(c, R)
    buckets = _Buckets(c, B, patch, S)

    def make_input(live, rows, ijk):
        o = _window(*ijk, S).to(dev)
        s = torch.ones(len(live), 1, patch, patch, patch, dtype=dtype, device=dev)
        f = torch.zeros(len(live), C, patch, patch, patch, dtype=dtype, device=dev)
        for n, r in enumerate(rows):
            loc = c[r, 1:] - o
            s[n, 0][loc[:, 0], loc[:, 1], loc[:, 2]] = sdf[r]
            f[n][:, loc[:, 0], loc[:, 1], loc[:, 2]] = features[r].T
        return s, f

    def empty_input():
        return (torch.ones(1, 1, patch, patch, patch, dtype=dtype, device=dev),
                torch.zeros(1, C, patch, patch, patch, dtype=dtype, device=dev))

    w = torch.linspace(0, 1, steps=patch - S, device=dev, dtype=dtype)
    out = torch.empty(B, 1, R, R, R, dtype=dtype, device=dev)
    if B == 0:
        return out
    grid = _AxisStitch(out, 2, patch, S, w)
    layer = line = rows = lines = None
    for i, j, k, o in _run_patches(net, B, buckets, make_input, empty_input, progress):
        if k == 0:
            line = torch.empty(B, 1, patch, patch, R, dtype=dtype, device=dev)
            rows = _AxisStitch(line, 4, patch, S, w)
            if j == 0:
                layer = torch.empty(B, 1, patch, R, R, dtype=dtype, device=dev)
                lines = _AxisStitch(layer, 3, patch, S, w)
        rows.push(o.to(dtype))
        if k == STEPS - 1:
            lines.push(line)
            if j == STEPS - 1:
                grid.push(layer)
    return out


def _level_below(level: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value <= ``level``: for ``dtype`` data ``v > t`` is exactly ``v > level`` (skimage
    compares the float32 copy of the release's fp16 grid with the level; a plain fp16 comparison would round it)."""
    t = torch.tensor(level, dtype=torch.float64).to(dtype)
    if float(t) > level:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


def _cell_corners_mask(cells: torch.Tensor) -> torch.Tensor:
    """Bool ``[R]^3`` of the voxels that are corners of the marked cells ``[R-1]^3``."""
    R = cells.shape[0] + 1
    vox = torch.zeros(R, R, R, dtype=torch.bool, device=cells.device)
    for a, b, c in _CORNERS.tolist():
        vox[a:a + R - 1, b:b + R - 1, c:c + R - 1] |= cells
    return vox


def _straddling_cells(field: torch.Tensor, level: float) -> torch.Tensor:
    """Bool ``[R-1]^3``: cells with ``min(corners) <= level <= max(corners)`` (a superset of those with triangles;
    ``level`` from ``_level_below``)."""
    R = field.shape[0]
    lo = hi = None
    for a, b, c in _CORNERS.tolist():
        v = field[a:a + R - 1, b:b + R - 1, c:c + R - 1]
        lo = v.clone() if lo is None else torch.minimum(lo, v)
        hi = v.clone() if hi is None else torch.maximum(hi, v)
    return (lo <= level) & (hi >= level)


def refine_sdf_512(net, coords: torch.Tensor, sdf: torch.Tensor, features: torch.Tensor, *, resolution: int = 512,
                   level: float = LEVEL_512, batch_size: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[RefinedField]:
    """The release's 512 refiner run, lean (module docstring): coords ``[N, 4]`` (batch, x, y, z), sdf ``[N]``,
    features ``[N, C]`` (the decoder's last features); one ``RefinedField`` per sample (``batch_size`` samples,
    default max batch index + 1), on the input's device."""
    grid = refined_sdf_grid(net, coords, sdf, features, resolution=resolution, batch_size=batch_size,
                            progress=progress)
    return [field_from_grid(grid[b, 0], level) for b in range(grid.shape[0])]


@torch.inference_mode()
def field_from_grid(grid: torch.Tensor, level: float) -> RefinedField:
    """The lean ``RefinedField`` of a dense ``[R, R, R]`` field for marching cubes at ``level``: explicit voxels at
    the corners of every cell straddling the level, the side of every other voxel (the 512 refiner's output form;
    also how the parity harness meshes the release's own dense grid with d3s2's sparse marching cubes)."""
    t = _level_below(float(level), grid.dtype)
    vox = _cell_corners_mask(_straddling_cells(grid, t))
    pts = torch.nonzero(vox)
    return RefinedField(pts, grid[vox], grid.shape[0], float(level), SideBits(grid > t), 1,
                        float(level) + 1.0, float(level) - 1.0)


@torch.inference_mode()
def refined_sign_grid(net, coords: torch.Tensor, sdf: torch.Tensor, *, resolution: int = 1024,
                      batch_size: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The release's 1024 signs at ``R/2``: int8 ``[B, R/2, R/2, R/2]`` of +1 / -1, patch by patch from the sparse
    pooled voxels. ``net(sdf [b,1,P,P,P]) -> probability [b,1,P,P,P]`` with ``net.patch_size``."""
    _check_inputs(coords, sdf, resolution)
    if resolution % 2:
        raise D3S2Error(f"the sign refiner pools by 2: resolution must be even, got {resolution}")
    H = resolution // 2
    patch, S = net_patch(net, H)
    dtype, dev = net_dtype(net, sdf.dtype), sdf.device
    B = _batch(coords, batch_size)
    c = coords.long().to(dev)
    vals = sdf.reshape(-1).to(dtype)
    # the release's pooling: float64 sums over the active children / (count + 1), then the net's dtype
    parent = torch.cat([c[:, :1], torch.div(c[:, 1:], 2, rounding_mode="floor")], 1)
    pk, inv = torch.unique(_keys(parent, H), return_inverse=True)
    sums = torch.zeros(len(pk), dtype=torch.float64, device=dev).index_add_(0, inv, vals.double())
    cnt = torch.bincount(inv, minlength=len(pk)).double()
    pooled = (sums / (cnt + 1)).to(dtype)
    pc = torch.stack([pk // H ** 3, (pk // H ** 2) % H, (pk // H) % H, pk % H], 1)
    del parent, inv, sums, cnt
    buckets = _Buckets(pc, B, patch, S)

    def make_input(live, rows, ijk):
        o = _window(*ijk, S).to(dev)
        s = torch.ones(len(live), 1, patch, patch, patch, dtype=dtype, device=dev)
        for n, r in enumerate(rows):
            loc = pc[r, 1:] - o
            s[n, 0][loc[:, 0], loc[:, 1], loc[:, 2]] = pooled[r]
        return (s,)

    def empty_input():
        return (torch.ones(1, 1, patch, patch, patch, dtype=dtype, device=dev),)

    signs = torch.ones(B, H, H, H, dtype=torch.int8, device=dev)
    if B == 0:
        return signs
    for i, j, k, o in _run_patches(net, B, buckets, make_input, empty_input, progress):
        signs[:, i * S:i * S + patch, j * S:j * S + patch, k * S:k * S + patch] = torch.where(
            o[:, 0] >= 0.5, 1, -1).to(torch.int8)
    return signs


_CHUNK = 1 << 24  # rows per fill-value look-up (bounds its int64 temporaries)


def _flat_keys(c: torch.Tensor, R: int) -> torch.Tensor:
    """int64 ``(x * R + y) * R + z`` of ``[N, 3]`` coordinates of any integer dtype."""
    k = c[:, 0].long() * (R * R)
    return k.add_(c[:, 1].long() * R).add_(c[:, 2])


def _explicit_off_band(mixed: torch.Tensor, band: torch.Tensor, R: int, corner: torch.Tensor | None) -> torch.Tensor:
    """1024 voxels made explicit besides the band: the corners ``2m + {0,1,2}^3`` of every mixed 512 cell ``m``
    (``complete``: also the band's 26-neighbours, ``corner`` = {0,1,2}^3), minus the band voxels; int32 ``[E, 3]``
    sorted per parity class. Built on one 512^3 bool grid per parity class of ``v = 2a + p`` (``p = 1``: only
    ``m = a``; ``p = 0``: ``m = a`` or ``a - 1`` along that axis), never a ``[cells, 27, 3]`` list: a sign field that
    changes in many cells (10M) made that 6 GB plus its sort."""
    H = R // 2
    M = torch.zeros(H, H, H, dtype=torch.bool, device=mixed.device)
    M[:H - 1, :H - 1, :H - 1] = mixed
    par = torch.remainder(band, 2)
    cls = par[:, 0] * 4 + par[:, 1] * 2 + par[:, 2]
    half = torch.div(band, 2, rounding_mode="floor")
    if corner is not None:
        nb = (band[:, None, :] + (corner - 1)[None]).reshape(-1, 3)
        nb = nb[((nb >= 0) & (nb < R)).all(1)]
        npar = torch.remainder(nb, 2)
        ncls, nhalf = npar[:, 0] * 4 + npar[:, 1] * 2 + npar[:, 2], torch.div(nb, 2, rounding_mode="floor")
        del nb, npar
    out = []
    for p in range(8):
        px = ((p >> 2) & 1, (p >> 1) & 1, p & 1)
        g = M
        for ax in range(3):
            if px[ax] == 0:  # v = 2a: the cells a and a - 1 along this axis
                h = g.clone()
                h.narrow(ax, 1, H - 1).logical_or_(g.narrow(ax, 0, H - 1))
                g = h
        if g is M:
            g = M.clone()
        if corner is not None:
            hn = nhalf[ncls == p]
            g[hn[:, 0], hn[:, 1], hn[:, 2]] = True
        hb = half[cls == p]
        g[hb[:, 0], hb[:, 1], hb[:, 2]] = False
        a = torch.nonzero(g).to(torch.int32)  # coordinates < 2^31: half the memory of nonzero's int64
        del g
        out.append(a.mul_(2).add_(torch.tensor(px, device=a.device, dtype=torch.int32)))
        del a
    del M
    return torch.cat(out)


def refine_signs_1024(net, coords: torch.Tensor, sdf: torch.Tensor, *, resolution: int = 1024,
                      level: float = LEVEL_1024, batch_size: int | None = None, complete: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> list[RefinedField]:
    """The release's 1024 sign refiner run, lean (module docstring): coords ``[N, 4]``, sdf ``[N]``; one
    ``RefinedField`` per sample whose ``fill_fn`` gives the release's exact values off the band. ``complete``: also
    make the band's 26-neighbours explicit, so every cell that can hold a triangle has its 8 corners (what
    ``sparse_marching_cubes`` needs; about 3x the voxels); Lewiner through ``mc_kwargs()`` does not need it."""
    signs = refined_sign_grid(net, coords, sdf, resolution=resolution, batch_size=batch_size, progress=progress)
    dtype = net_dtype(net, sdf.dtype)
    c = coords.long().to(sdf.device)
    vals = sdf.reshape(-1).to(dtype)
    order = _sorted_unique(c, resolution)
    c, vals = c[order], vals[order]
    H, R = resolution // 2, resolution
    corner = torch.tensor([[a, b, cc] for a in (0, 1, 2) for b in (0, 1, 2) for cc in (0, 1, 2)], device=c.device)
    fields = []
    with torch.inference_mode():
        for b in range(signs.shape[0]):
            pos = signs[b] > 0
            # 512 cells whose 8 signs differ: the 1024 cells inside them (bases 2m + {0,1}^3) may cross the level
            # away from the band, so their corners (2m + {0,1,2}^3) become explicit with their fill values
            mixed = torch.zeros(H - 1, H - 1, H - 1, dtype=torch.bool, device=pos.device)
            anyp = torch.zeros_like(mixed)
            allp = torch.ones_like(mixed)
            for a, bb, cc in _CORNERS.tolist():
                v = pos[a:a + H - 1, bb:bb + H - 1, cc:cc + H - 1]
                anyp |= v
                allp &= v
            mixed = anyp & ~allp
            del anyp, allp
            side = SideBits(pos)
            del pos
            sel = c[:, 0] == b
            band, bv = c[sel, 1:], vals[sel]
            extra = _explicit_off_band(mixed, band, R, corner if complete else None)
            del mixed
            field = RefinedField(band, bv, R, float(level), side, 2, 1.0, -1.0)
            if len(extra):
                # merged through int64 keys, never an [N + E, 3] copy before the last step: the off-band corners
                # can outnumber the band several times (tens of millions at 1024)
                ev = torch.cat([field.fill_fn(extra[i:i + _CHUNK]).to(dtype) for i in range(0, len(extra), _CHUNK)])
                k = torch.cat([_flat_keys(band, R), _flat_keys(extra, R)])
                del extra
                o = torch.argsort(k)
                k = k[o]
                field.values = torch.cat([bv, ev])[o]
                del o, ev
                field.coords = torch.stack([torch.div(k, R * R, rounding_mode="floor"),
                                            torch.div(k, R, rounding_mode="floor").remainder_(R), k.remainder_(R)], 1)
                del k
            fields.append(field)
    return fields
