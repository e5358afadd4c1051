"""Neighbour maps for sparse convolution (paper Sec. 3.1: the sparse SDF VAE is a sparse 3D conv net).

A sparse convolution is ``out[o] = sum_k in[o * stride + offset_k] @ W[k]`` over the kernel offsets ``k`` whose input
voxel exists. For every offset we need the list of (input row, output row) pairs: the *neighbour map*. We build it by
packing (batch, x, y, z) into one int64 key, sorting the input keys once, and looking every query up with
``torch.searchsorted``. Everything is vectorised over voxels; the only Python loop is over chunks of kernel offsets.

Kernel offset order (the ``K^3`` axis of the weights) follows torchsparse, so torchsparse checkpoints (the authors'
release, keys ``<module>.conv.kernel``) map onto ours without reordering. Found in mit-han-lab/torchsparse,
``torchsparse/nn/utils/kernel.py::get_kernel_offsets`` (commit 74099d10): per axis ``r = arange(-k//2 + 1, k//2 + 1)``
(Python floor division: ``[-1, 0, 1]`` for k=3, ``[0, 1]`` for k=2, ``[0]`` for k=1); for an odd kernel volume the
list is ``[(x, y, z) for z in r for y in r for x in r]`` (x fastest), for an even one
``[(x, y, z) for x in r for y in r for z in r]`` (z fastest) -- torchsparse keeps the odd order for MinkowskiEngine
compatibility. A later variant of the same function (torch.arange / make_nlist, found through the code search
without a repository name) builds the identical order for cubic kernels. Not yet checked against a real torchsparse
checkpoint. With stride s, output voxel p reads input voxel ``s * p + offset`` (torchsparse multiplies the offsets by
the input tensor stride in its finest-grid units; in our per-level units that is the same map).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from d3s2.errors import D3S2Error

__all__ = ["kernel_offsets", "KeyIndex", "NeighborMap", "build_key_index", "build_neighbor_map", "downsample_coords"]

# Upper bound on (offsets x queries) looked up at once; bounds the temporary memory of the vectorised search.
_CHUNK_ELEMENTS = 1 << 24


def kernel_offsets(kernel_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Kernel offsets ``[k^3, 3]`` (int64) in torchsparse's order (see the module docstring). Read-only: the tensor
    is cached per (size, device), so that a forward pass makes no host-to-device copy (CUDA-graph capturable)."""
    k = int(kernel_size)
    if k < 1:
        raise D3S2Error(f"kernel_size must be >= 1, got {kernel_size}")
    return _kernel_offsets(k, str(torch.device(device)) if device is not None else "cpu")


@functools.lru_cache(maxsize=None)
def _kernel_offsets(k: int, device: str) -> torch.Tensor:
    r = list(range((-k) // 2 + 1, k // 2 + 1))
    if (k**3) % 2 == 1:
        offs = [(x, y, z) for z in r for y in r for x in r]
    else:
        offs = [(x, y, z) for x in r for y in r for z in r]
    return torch.tensor(offs, dtype=torch.int64, device=device)


@dataclass
class KeyIndex:
    """Sorted packed keys of a set of voxels: ``sorted_keys[j]`` is the key of row ``perm[j]``.

    Keys are ``((b * S + x + pad) * S + y + pad) * S + z + pad`` with ``S = extent + 2 * pad``, so that coordinates in
    ``[-pad, extent + pad)`` pack without colliding and adding a packed offset to a key equals packing the moved voxel.
    """

    sorted_keys: torch.Tensor
    perm: torch.Tensor
    extent: int
    pad: int
    batch_size: int

    @property
    def side(self) -> int:
        return self.extent + 2 * self.pad

    def pack(self, coords: torch.Tensor) -> torch.Tensor:
        c = coords.to(torch.int64)
        s = self.side
        return ((c[:, 0] * s + c[:, 1] + self.pad) * s + c[:, 2] + self.pad) * s + c[:, 3] + self.pad

    def pack_delta(self, offsets: torch.Tensor) -> torch.Tensor:
        s = self.side
        o = offsets.to(torch.int64)
        return (o[:, 0] * s + o[:, 1]) * s + o[:, 2]

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Row of every key (any shape), -1 where absent."""
        n = self.sorted_keys.numel()
        if n == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self.sorted_keys, keys.reshape(-1)).clamp_(max=n - 1)
        hit = self.sorted_keys[pos] == keys.reshape(-1)
        rows = torch.where(hit, self.perm[pos], torch.full_like(pos, -1))
        return rows.reshape(keys.shape)


def build_key_index(coords: torch.Tensor, batch_size: int, extent: int, pad: int = 1) -> KeyIndex:
    """Sort the packed keys of ``coords`` ([N, 4], all in ``[0, extent)``). Duplicates are left for the caller."""
    side = extent + 2 * pad
    if max(batch_size, 1) * side**3 >= 2**62:
        raise D3S2Error(f"grid too large to pack into int64 keys (batch {batch_size}, extent {extent})")
    index = KeyIndex(torch.empty(0, dtype=torch.int64, device=coords.device), torch.empty(0, dtype=torch.int64,
                     device=coords.device), int(extent), int(pad), int(batch_size))
    keys = index.pack(coords)
    index.sorted_keys, index.perm = torch.sort(keys)
    return index


@dataclass
class NeighborMap:
    """(input row, output row) pairs grouped by kernel offset: offset ``k`` owns ``in_idx[ptr[k]:ptr[k+1]]``.

    ``identity_offset``: the offset whose map is ``in == out == arange(num_out)`` (the centre of a submanifold conv),
    handled as a plain GEMM without gathers; its pairs are not stored. Within one offset every output row and every
    input row appears at most once, so scatters never collide.
    """

    in_idx: torch.Tensor
    out_idx: torch.Tensor
    counts: list[int]
    num_in: int
    num_out: int
    identity_offset: int | None = None

    @property
    def kernel_volume(self) -> int:
        return len(self.counts)

    @property
    def num_pairs(self) -> int:
        """All (input, output) pairs, the identity offset included: the work of one convolution."""
        return sum(self.counts) + (self.num_out if self.identity_offset is not None else 0)

    def pairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = sum(self.counts[:k])
        end = start + self.counts[k]
        return self.in_idx[start:end], self.out_idx[start:end]


def build_neighbor_map(
    index: KeyIndex, out_coords: torch.Tensor, kernel_size: int, stride: int = 1, submanifold: bool = False
) -> NeighborMap:
    """Pairs ``(row of input voxel stride * p + offset_k, row of p)`` for every output voxel p in ``out_coords``.

    ``index`` must have ``pad >= max |offset|`` (1 covers kernels 1, 2 and 3).
    """
    device = index.sorted_keys.device
    offsets = kernel_offsets(kernel_size, device=device)
    need_pad = int(offsets.abs().max())
    if need_pad > index.pad:
        raise D3S2Error(f"kernel_size {kernel_size} needs a key index padded by {need_pad}, got {index.pad}")
    num_out = int(out_coords.shape[0])
    q = out_coords.to(torch.int64)
    if stride != 1:
        q = torch.cat([q[:, :1], q[:, 1:] * stride], dim=1)
    qkeys = index.pack(q)
    deltas = index.pack_delta(offsets)
    identity = None
    if submanifold and stride == 1:
        zero = (offsets == 0).all(dim=1).nonzero()
        identity = int(zero[0, 0]) if zero.numel() else None
    kv = offsets.shape[0]
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    per_chunk = max(1, _CHUNK_ELEMENTS // max(num_out, 1))
    for start in range(0, kv, per_chunk):
        ks = torch.arange(start, min(kv, start + per_chunk), device=device)
        if identity is not None:
            ks = ks[ks != identity]
        if ks.numel() == 0:
            continue
        rows = index.lookup(qkeys[None, :] + deltas[ks][:, None])  # [k, num_out]
        hit = rows >= 0
        kk, oo = hit.nonzero(as_tuple=True)  # row-major: grouped by offset, outputs ascending
        ins.append(rows[kk, oo])
        outs.append(oo)
        counts.append(torch.zeros(kv, dtype=torch.int64, device=device).index_add_(0, ks[kk], torch.ones_like(kk)))
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    count_list = torch.stack(counts).sum(0).tolist() if counts else [0] * kv
    if identity is not None:
        count_list[identity] = 0
    return NeighborMap(
        in_idx=torch.cat(ins) if ins else empty,
        out_idx=torch.cat(outs) if outs else empty,
        counts=[int(c) for c in count_list],
        num_in=int(index.perm.numel()),
        num_out=num_out,
        identity_offset=identity,
    )


def downsample_coords(coords: torch.Tensor, batch_size: int, extent: int, factor: int = 2):
    """Unique parent voxels ``(b, c // factor)`` sorted by (batch, x, y, z), and each input row's parent row."""
    c = coords.to(torch.int64)
    parents = torch.cat([c[:, :1], torch.div(c[:, 1:], factor, rounding_mode="floor")], dim=1)
    pext = max(1, -(-extent // factor))
    index = KeyIndex(c.new_zeros(0), c.new_zeros(0), pext, 0, batch_size)
    keys = index.pack(parents)
    ukeys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    z = ukeys % pext
    rest = ukeys // pext
    y = rest % pext
    rest = rest // pext
    x = rest % pext
    b = rest // pext
    pcoords = torch.stack([b, x, y, z], dim=1).to(torch.int32)
    return pcoords, inverse
