"""Serialization of sparse voxels into spatially coherent blocks and windows (paper Sec. 4.1, Algorithm 1).

Spatial Sparse Attention partitions tokens by their 3D coordinates: the space is cut into cubes of ``m^3`` voxels and
the active voxels inside one cube form a block (paper Fig. 3). Kernels need the tokens of a block to be contiguous in
memory, so we sort them and hand the kernels a block start offset array (``C`` in Algorithm 1).

The order is (batch, block, sub-block, voxel): blocks in raster order of their block coordinates, and inside a block
the ``sub_block^3`` sub-blocks in raster order, then voxels in raster order. With ``block=8, sub_block=4`` every
4^3 compression block of SSA v1.0 is then also contiguous inside its 8^3 selection block.

Everything here is vectorised torch (sort / unique_consecutive on packed int64 keys); nothing loops over voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d3s2.errors import D3S2Error

__all__ = ["BlockLayout", "WindowPartition", "serialize_blocks", "window_partition", "pack_keys"]


def pack_keys(fields: list[torch.Tensor], extents: list[int]) -> torch.Tensor:
    """Mixed-radix packing of non-negative integer columns into one int64 key (first field most significant)."""
    total = 1
    for e in extents:
        total *= max(int(e), 1)
    if total >= 2**62:
        raise D3S2Error(f"coordinate range too large to pack into int64 keys (extents {extents})")
    key = torch.zeros_like(fields[0], dtype=torch.int64)
    for f, e in zip(fields, extents):
        key = key * max(int(e), 1) + f.to(torch.int64)
    return key


@dataclass
class BlockLayout:
    """Tokens sorted by block.

    perm:           [N] int64, ``sorted = x[perm]``.
    inverse:        [N] int64, ``x = sorted[inverse]``.
    block_offsets:  [num_blocks + 1] int64, tokens of block ``j`` are ``sorted[block_offsets[j]:block_offsets[j+1]]``.
    block_coords:   [num_blocks, 4] int64, (batch, bx, by, bz) of each block.
    token_block:    [N] int64, block index of each *sorted* token.
    batch_offsets:  [batch_size + 1] int64, blocks of sample ``b`` are ``block_offsets`` entries
                    ``batch_offsets[b]:batch_offsets[b+1]``; tokens of sample ``b`` start at
                    ``block_offsets[batch_offsets[b]]``.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    block_offsets: torch.Tensor
    block_coords: torch.Tensor
    token_block: torch.Tensor
    batch_offsets: torch.Tensor
    block_size: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_coords.shape[0])

    def block_sizes(self) -> torch.Tensor:
        return self.block_offsets[1:] - self.block_offsets[:-1]


def _check_coords(coords: torch.Tensor) -> None:
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise D3S2Error(f"coords must have shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point:
        raise D3S2Error(f"coords must be an integer tensor, got {coords.dtype}")
    if coords.numel() and int(coords.min()) < 0:
        raise D3S2Error("coords must be non-negative (batch index and grid position)")


def serialize_blocks(
    coords: torch.Tensor,
    block_size: int = 8,
    sub_block_size: int | None = 4,
    batch_size: int | None = None,
) -> BlockLayout:
    """Sort voxels by (batch, ``block_size^3`` block, ``sub_block_size^3`` sub-block, voxel).

    ``sub_block_size`` must divide ``block_size`` (or be None for plain raster order inside the block).
    """
    _check_coords(coords)
    if sub_block_size is not None and (sub_block_size <= 0 or block_size % sub_block_size):
        raise D3S2Error(f"sub_block_size {sub_block_size} must divide block_size {block_size}")
    device = coords.device
    c = coords.to(torch.int64)
    n = c.shape[0]
    if batch_size is None:
        batch_size = int(c[:, 0].max()) + 1 if n else 0
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return BlockLayout(
            perm=empty, inverse=empty, block_offsets=torch.zeros(1, dtype=torch.int64, device=device),
            block_coords=torch.zeros(0, 4, dtype=torch.int64, device=device), token_block=empty,
            batch_offsets=torch.zeros(batch_size + 1, dtype=torch.int64, device=device), block_size=block_size,
        )
    xyz = c[:, 1:]
    blk = torch.div(xyz, block_size, rounding_mode="floor")
    local = xyz - blk * block_size
    nb = int(blk.max()) + 1
    fields = [c[:, 0], blk[:, 0], blk[:, 1], blk[:, 2]]
    extents = [batch_size, nb, nb, nb]
    if sub_block_size is not None and sub_block_size < block_size:
        ns = block_size // sub_block_size
        sub = torch.div(local, sub_block_size, rounding_mode="floor")
        vox = local - sub * sub_block_size
        fields += [sub[:, 0], sub[:, 1], sub[:, 2], vox[:, 0], vox[:, 1], vox[:, 2]]
        extents += [ns, ns, ns, sub_block_size, sub_block_size, sub_block_size]
    else:
        fields += [local[:, 0], local[:, 1], local[:, 2]]
        extents += [block_size] * 3
    key = pack_keys(fields, extents)
    sorted_key, perm = torch.sort(key, stable=True)
    if n > 1 and bool((sorted_key[1:] == sorted_key[:-1]).any()):
        raise D3S2Error("duplicate voxel coordinates: every (batch, x, y, z) must appear once")
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=device)
    block_key = pack_keys([c[perm, 0], blk[perm, 0], blk[perm, 1], blk[perm, 2]], [batch_size, nb, nb, nb])
    _, token_block, counts = torch.unique_consecutive(block_key, return_inverse=True, return_counts=True)
    block_offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    block_offsets[1:] = torch.cumsum(counts, 0)
    first = block_offsets[:-1]
    block_coords = torch.cat([c[perm[first], :1], blk[perm[first]]], dim=1)
    blocks_per_batch = torch.bincount(block_coords[:, 0], minlength=batch_size)
    batch_offsets = torch.zeros(batch_size + 1, dtype=torch.int64, device=device)
    batch_offsets[1:] = torch.cumsum(blocks_per_batch, 0)
    return BlockLayout(
        perm=perm, inverse=inverse, block_offsets=block_offsets, block_coords=block_coords,
        token_block=token_block, batch_offsets=batch_offsets, block_size=block_size,
    )


@dataclass
class WindowPartition:
    """Tokens grouped by (batch, window): ``sorted = x[perm]``; window ``w`` is ``sorted[offsets[w]:offsets[w+1]]``
    (varlen ``cu_seqlens`` layout)."""

    perm: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_windows(self) -> int:
        return int(self.offsets.numel() - 1)


def window_partition(coords: torch.Tensor, window: int, shift: int = 0, batch_size: int | None = None) -> WindowPartition:
    """Partition voxels into non-overlapping ``window^3`` windows, shifted by ``shift`` voxels along each axis
    (Swin / Trellis style: window index = ``(x + shift) // window``)."""
    _check_coords(coords)
    if window <= 0 or not (0 <= shift < window):
        raise D3S2Error(f"window must be positive and 0 <= shift < window, got window={window}, shift={shift}")
    shifted = coords.to(torch.int64).clone()
    shifted[:, 1:] += shift
    layout = serialize_blocks(shifted, block_size=window, sub_block_size=None, batch_size=batch_size)
    return WindowPartition(perm=layout.perm, inverse=layout.inverse, offsets=layout.block_offsets)
