"""`SparseTensor`: active voxels of a batch of sparse grids (paper Sec. 3.1, the sparse SDF volume).

Rows are voxels: integer coordinates ``[N, 4]`` = (batch, x, y, z) and features ``[N, C]``. Rows are kept sorted by
batch index (stable: the order inside a sample is the caller's), so sample ``b`` owns rows
``batch_offsets[b]:batch_offsets[b+1]``. ``resolution`` is the side of this tensor's grid (coordinates lie in
``[0, resolution)``); ``stride`` is how many voxels of the grid it was derived from one voxel spans (bookkeeping:
a strided conv or pooling doubles it, subdivision halves it, never below 1).

Tensors with the same coordinates share one cache (`.replace`, `.to(dtype)`, the outputs of submanifold ops), so
neighbour maps, parent voxels and per-row batch indices are built once per coordinate set.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from d3s2.errors import D3S2Error
from d3s2.sparse.neighbors import KeyIndex, build_key_index

__all__ = ["SparseTensor"]


class _Cache(dict):
    """Per-coordinate-set memo shared by every SparseTensor with these coordinates."""


class SparseTensor:
    """Sparse voxel features: ``feats [N, C]`` at ``coords [N, 4]`` (batch, x, y, z).

    Duplicate (batch, x, y, z) rows are rejected with a D3S2Error. If the rows are not sorted by batch index they are
    reordered (stably, features together with coordinates). ``shape`` is ``(batch_size, C)`` (TRELLIS convention);
    the number of voxels is ``num_voxels`` / ``len(x)``.
    """

    __slots__ = ("feats", "coords", "batch_size", "resolution", "stride", "_cache")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        resolution: int | None = None,
        stride: int = 1,
        *,
        _cache: _Cache | None = None,
    ) -> None:
        if _cache is not None:  # internal: coordinates already validated, sorted and unique
            self.feats, self.coords, self.batch_size = feats, coords, int(batch_size)
            self.resolution, self.stride, self._cache = resolution, int(stride), _cache
            return
        if not isinstance(feats, torch.Tensor) or not isinstance(coords, torch.Tensor):
            raise D3S2Error("SparseTensor needs torch tensors: feats [N, C] and coords [N, 4]")
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise D3S2Error(f"coords must have shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if coords.dtype.is_floating_point or coords.dtype == torch.bool:
            raise D3S2Error(f"coords must be an integer tensor, got {coords.dtype}")
        if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise D3S2Error(f"feats must be [N, C] with N = {coords.shape[0]} rows of coords, got {tuple(feats.shape)}")
        if feats.device != coords.device:
            raise D3S2Error(f"feats ({feats.device}) and coords ({coords.device}) must be on the same device")
        if stride < 1:
            raise D3S2Error(f"stride must be >= 1, got {stride}")
        coords = coords.to(torch.int32)
        n = coords.shape[0]
        if n:
            lo = coords.amin(0).tolist()
            hi = coords.amax(0).tolist()
            if min(lo) < 0:
                raise D3S2Error("coords must be non-negative: shift the grid so that every voxel has x, y, z >= 0")
        else:
            hi = [-1, -1, -1, -1]
        if batch_size is None:
            batch_size = hi[0] + 1 if n else 1
        if hi[0] >= batch_size:
            raise D3S2Error(f"batch index {hi[0]} out of range for batch_size {batch_size}")
        if resolution is not None and max(hi[1:]) >= resolution:
            raise D3S2Error(f"voxel coordinate {max(hi[1:])} outside a grid of resolution {resolution}")
        if n > 1 and not bool((coords[1:, 0] >= coords[:-1, 0]).all()):
            order = torch.sort(coords[:, 0], stable=True).indices
            coords, feats = coords[order], feats[order]
        self.feats, self.coords, self.batch_size = feats, coords, int(batch_size)
        self.resolution, self.stride, self._cache = resolution, int(stride), _Cache()
        index = self.key_index()
        if n > 1 and bool((index.sorted_keys[1:] == index.sorted_keys[:-1]).any()):
            raise D3S2Error("duplicate voxel coordinates: every (batch, x, y, z) must appear once (deduplicate first)")

    # ------------------------------------------------------------------ basic properties
    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def num_voxels(self) -> int:
        return int(self.feats.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.feats.shape[1])

    def __len__(self) -> int:
        return self.num_voxels

    def __repr__(self) -> str:
        return (f"SparseTensor(voxels={self.num_voxels}, channels={self.num_channels}, batch_size={self.batch_size}, "
                f"resolution={self.resolution}, stride={self.stride}, dtype={self.dtype}, device={self.device})")

    def _memo(self, key: Any, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def extent(self) -> int:
        """Grid side used for packing keys: ``resolution`` if known, else max coordinate + 1."""
        if self.resolution is not None:
            return int(self.resolution)
        return self._memo("extent", lambda: int(self.coords[:, 1:].max()) + 1 if self.num_voxels else 1)

    @property
    def batch_offsets(self) -> torch.Tensor:
        """[batch_size + 1] int64 row offsets of the samples."""
        def build():
            counts = torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)
            return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return self._memo("batch_offsets", build)

    @property
    def batch_counts(self) -> torch.Tensor:
        off = self.batch_offsets
        return off[1:] - off[:-1]

    @property
    def batch_idx(self) -> torch.Tensor:
        """[N] int64 batch index of every row."""
        return self._memo("batch_idx", lambda: self.coords[:, 0].long())

    @property
    def layout(self) -> list[slice]:
        """Row slice of every sample."""
        off = self._memo("batch_offsets_list", lambda: self.batch_offsets.tolist())
        return [slice(off[b], off[b + 1]) for b in range(self.batch_size)]

    def key_index(self, pad: int = 1) -> KeyIndex:
        return self._memo(("key_index", pad), lambda: build_key_index(self.coords, self.batch_size, self.extent, pad))

    def same_coords(self, other: "SparseTensor") -> bool:
        if self._cache is other._cache:
            return True
        return (self.coords.shape == other.coords.shape and self.batch_size == other.batch_size
                and torch.equal(self.coords, other.coords))

    # ------------------------------------------------------------------ new tensors
    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> "SparseTensor":
        """Same coordinates (and cache) with new features ``[N, C']``; with ``coords``, a fresh checked tensor."""
        if coords is not None:
            return SparseTensor(feats, coords, self.batch_size, self.resolution, self.stride)
        if feats.dim() != 2 or feats.shape[0] != self.num_voxels:
            raise D3S2Error(f"replace() needs features [{self.num_voxels}, C], got {tuple(feats.shape)}")
        return SparseTensor(feats, self.coords, self.batch_size, self.resolution, self.stride, _cache=self._cache)

    def _derived(self, feats, coords, cache, resolution, stride) -> "SparseTensor":
        return SparseTensor(feats, coords, self.batch_size, resolution, stride, _cache=cache)

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Like ``Tensor.to`` on the features; coordinates follow the device (and keep the cache if it stays)."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        return SparseTensor(feats, self.coords.to(feats.device), self.batch_size, self.resolution, self.stride,
                            _cache=_Cache())

    def cuda(self) -> "SparseTensor":
        return self.to("cuda")

    def cpu(self) -> "SparseTensor":
        return self.to("cpu")

    def float(self) -> "SparseTensor":
        return self.replace(self.feats.float())

    def half(self) -> "SparseTensor":
        return self.replace(self.feats.half())

    def detach(self) -> "SparseTensor":
        return self.replace(self.feats.detach())

    # ------------------------------------------------------------------ elementwise arithmetic on shared coordinates
    def _binary(self, other, op) -> "SparseTensor":
        if isinstance(other, SparseTensor):
            if not self.same_coords(other):
                raise D3S2Error("sparse tensors with different coordinates cannot be combined elementwise")
            other = other.feats
        return self.replace(op(self.feats, other))

    def __add__(self, other):
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._binary(other, torch.sub)

    def __mul__(self, other):
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __neg__(self):
        return self.replace(-self.feats)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def cat(tensors: Sequence["SparseTensor"]) -> "SparseTensor":
        """Concatenate batches: samples of ``tensors[1]`` follow those of ``tensors[0]``, and so on."""
        tensors = list(tensors)
        if not tensors:
            raise D3S2Error("SparseTensor.cat needs at least one tensor")
        chans = {t.num_channels for t in tensors}
        if len(chans) != 1:
            raise D3S2Error(f"SparseTensor.cat: channel counts differ {sorted(chans)}")
        if len({t.stride for t in tensors}) != 1:
            raise D3S2Error("SparseTensor.cat: strides differ")
        res = {t.resolution for t in tensors}
        resolution = None if None in res else max(res)
        coords, base = [], 0
        for t in tensors:
            c = t.coords.clone()
            c[:, 0] += base
            coords.append(c)
            base += t.batch_size
        feats = torch.cat([t.feats for t in tensors], dim=0)
        coords_all = torch.cat(coords, dim=0)
        # rows are sorted and unique per input, and batch indices do not overlap: skip the checks
        return SparseTensor(feats, coords_all, base, resolution, tensors[0].stride, _cache=_Cache())

    def split(self) -> list["SparseTensor"]:
        """One tensor per sample (batch index 0, batch_size 1); empty samples give empty tensors."""
        out = []
        for sl in self.layout:
            c = self.coords[sl].clone()
            c[:, 0] = 0
            out.append(SparseTensor(self.feats[sl], c, 1, self.resolution, self.stride, _cache=_Cache()))
        return out

    # ------------------------------------------------------------------ dense conversion
    def to_dense(self) -> torch.Tensor:
        """Dense ``[B, C, R, R, R]`` grid (zeros where inactive), R = ``resolution`` or max coordinate + 1."""
        r = self.extent
        dense = self.feats.new_zeros(self.batch_size, r, r, r, self.num_channels)
        c = self.coords.long()
        dense = dense.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), self.feats)
        return dense.permute(0, 4, 1, 2, 3).contiguous()

    @staticmethod
    def from_dense(dense: torch.Tensor, mask: torch.Tensor | None = None, stride: int = 1) -> "SparseTensor":
        """Active voxels of a dense ``[B, C, X, Y, Z]`` grid: ``mask`` ([B, X, Y, Z] bool) or, by default, voxels
        with any non-zero channel. ``resolution`` = max(X, Y, Z)."""
        if dense.dim() != 5:
            raise D3S2Error(f"from_dense needs a [B, C, X, Y, Z] tensor, got {tuple(dense.shape)}")
        b, _, x, y, z = dense.shape
        if mask is None:
            mask = (dense != 0).any(dim=1)
        if mask.shape != (b, x, y, z) or mask.dtype != torch.bool:
            raise D3S2Error(f"mask must be a bool tensor of shape {(b, x, y, z)}, got {mask.dtype} {tuple(mask.shape)}")
        coords = mask.nonzero()  # row-major: sorted by batch, unique
        feats = dense.permute(0, 2, 3, 4, 1)[mask]
        return SparseTensor(feats, coords.to(torch.int32), b, max(x, y, z), stride, _cache=_Cache())
