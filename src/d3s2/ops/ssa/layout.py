"""Token layout for Spatial Sparse Attention (paper Sec. 4.1, Fig. 3, Algorithm 1 step 2).

An :class:`SSALayout` is computed ONCE per token set (the sample coordinates) and reused by every SSA layer and every
sampling step: the token set never changes inside a generation stage. It holds

* the block sort permutation (tokens sorted by sample, ``m_slc^3`` selection block, ``m_cmp^3`` compression block),
* compression / selection block token offsets (``C`` in Algorithm 1), the compression-block -> selection-block map,
* window partitions for shift 0 and ``m_win/2`` (windows as varlen segments),
* per-sample offsets, and per-token / per-block index ranges the kernels read directly.

Everything is built with vectorised torch ops on the coordinates' device; the host synchronises only here (to size the
kernel grids), never inside a layer's forward. ``mode="nsa"`` builds the same structure from fixed-length 1D blocks
over the token order (the NSA ablation of Sec. 6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d3s2.errors import D3S2Error
from d3s2.sparse.serialize import pack_keys, serialize_blocks, window_partition

__all__ = ["SSALayout", "WindowLayout", "build_ssa_layout"]


@dataclass
class WindowLayout:
    """Tokens (in the layout's block-sorted order) regrouped by ``m_win^3`` window.

    perm:    [N] int64 or None, ``windowed = sorted[perm]``; None when windows are already contiguous in block order.
    inverse: [N] int64 or None.
    offsets: [W + 1] int64 window token offsets (varlen segments).
    token_lo / token_hi: [N] int32, the window range of each windowed token (its attention segment).
    token_seg: [N] int32 window id of each windowed token.
    """

    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    offsets: torch.Tensor
    token_lo: torch.Tensor
    token_hi: torch.Tensor
    token_seg: torch.Tensor
    max_window_tokens: int


@dataclass
class SSALayout:
    """Block structure of one token set; see the module docstring. All index tensors live on one device.

    ``perm``/``inverse`` map the caller's token order to the block-sorted order (``sorted = x[perm]``); both are None
    when the input is already in block order (e.g. the DiT keeps tokens sorted), so no gather is needed.
    """

    num_tokens: int
    batch_size: int
    mode: str
    m_cmp: int
    m_slc: int
    m_win: int
    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    sorted_coords: torch.Tensor | None  # [N, 4] int64 (spatial mode)
    token_sample: torch.Tensor  # [N] int32, sample of each sorted token
    sample_token_offsets: torch.Tensor  # [B + 1] int64
    # compression blocks
    cmp_offsets: torch.Tensor  # [Nc + 1] int64 token offsets
    cmp_sample: torch.Tensor  # [Nc] int32
    cmp_coords: torch.Tensor | None  # [Nc, 4] int64 (batch, coarse x, y, z) (spatial mode)
    sample_cmp_offsets: torch.Tensor  # [B + 1] int64
    token_cmp: torch.Tensor  # [N] int64 compression block of each sorted token
    token_pe_index: torch.Tensor  # [N] int64 position inside the m_cmp^3 block (intra-block PE, Eq. 7)
    # selection blocks
    slc_offsets: torch.Tensor  # [Ns + 1] int64 token offsets
    slc_sample: torch.Tensor  # [Ns] int32
    sample_slc_offsets: torch.Tensor  # [B + 1] int64
    cmp_slc: torch.Tensor  # [Nc] int64 selection block of each compression block
    slc_cmp_start: torch.Tensor  # [Ns] int32 first compression block of each selection block
    slc_cmp_count: torch.Tensor  # [Ns] int32 number of compression blocks inside it
    cmp_per_slc: int  # upper bound of slc_cmp_count ((m_slc / m_cmp)^3 in spatial mode)
    # [Ns] int32 selection blocks of each sample (same range) by decreasing slc_cmp_count: the scoring kernel scans
    # them in this order, so that the blocks of one chunk hold about as many compression blocks
    slc_scan_order: torch.Tensor
    max_slc_tokens: int
    # kernel-facing per-row ranges
    token_cmp_lo: torch.Tensor  # [N] int32 compression blocks of the token's sample
    token_cmp_hi: torch.Tensor
    cmp_token_lo: torch.Tensor  # [Nc] int32 tokens of the compression block's sample
    cmp_token_hi: torch.Tensor
    token_slc_lo: torch.Tensor  # [N] int32 selection blocks of the token's sample
    token_slc_hi: torch.Tensor
    windows: dict[int, WindowLayout] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_cmp(self) -> int:
        return int(self.cmp_offsets.numel() - 1)

    @property
    def num_slc(self) -> int:
        return int(self.slc_offsets.numel() - 1)

    @property
    def device(self) -> torch.device:
        return self.cmp_offsets.device

    def window(self, shift: int) -> WindowLayout:
        if shift not in self.windows:
            raise D3S2Error(f"window shift {shift} not in this layout (have {sorted(self.windows)}); build it with shifts=")
        return self.windows[shift]

    def to_sorted(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.perm is None else x.index_select(0, self.perm)

    def from_sorted(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x.index_select(0, self.inverse)


def _offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    off = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    off[1:] = torch.cumsum(counts, 0)
    return off


def _segment_ranges(seg_of_row: torch.Tensor, seg_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, [lo, hi) = the offsets of its segment (int32 for the kernels)."""
    return seg_offsets[seg_of_row].to(torch.int32), seg_offsets[seg_of_row + 1].to(torch.int32)


def _window_layout(token_seg: torch.Tensor, offsets: torch.Tensor, perm, inverse) -> WindowLayout:
    lo, hi = _segment_ranges(token_seg, offsets)
    sizes = offsets[1:] - offsets[:-1]
    return WindowLayout(
        perm=perm, inverse=inverse, offsets=offsets, token_lo=lo, token_hi=hi, token_seg=token_seg.to(torch.int32),
        max_window_tokens=int(sizes.max()) if sizes.numel() else 0,
    )


def build_ssa_layout(
    coords: torch.Tensor,
    *,
    m_cmp: int = 4,
    m_slc: int = 8,
    m_win: int = 8,
    shifts: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    mode: str = "spatial",
) -> SSALayout:
    """Build the layout of one (batched) token set.

    coords: [N, 4] integer (batch, x, y, z), rows sorted by batch or not (the permutation handles any order).
    mode: "spatial" (SSA: blocks are m^3 sub-grids of 3D space) or "nsa" (blocks are runs of m^3 consecutive tokens of
    each sample in the given order, windows runs of m_win^3 tokens; shifts move the run boundaries by shift^3 tokens).
    shifts: window shifts to prepare (default (0, m_win // 2)).
    """
    if coords.dim() != 2 or coords.shape[1] != 4 or coords.dtype.is_floating_point:
        raise D3S2Error(f"coords must be an integer tensor [N, 4] (batch, x, y, z), got {tuple(coords.shape)} {coords.dtype}")
    if m_cmp <= 0 or m_slc <= 0 or m_slc % m_cmp:
        raise D3S2Error(f"m_slc ({m_slc}) must be a positive multiple of m_cmp ({m_cmp}) (paper Sec. 4.1)")
    if mode not in ("spatial", "nsa"):
        raise D3S2Error(f"unknown layout mode {mode!r}: use 'spatial' (SSA) or 'nsa' (1D blocks)")
    n = int(coords.shape[0])
    if n == 0:
        raise D3S2Error("SSA layout needs at least one token")
    if shifts is None:
        shifts = (0, m_win // 2) if m_win > 1 else (0,)
    device = coords.device
    c = coords.to(torch.int64)
    if batch_size is None:
        batch_size = int(c[:, 0].max()) + 1
    if int(c[:, 0].min()) < 0 or int(c[:, 0].max()) >= batch_size:
        raise D3S2Error(f"batch indices must lie in [0, {batch_size})")

    if mode == "spatial":
        bl = serialize_blocks(c, block_size=m_slc, sub_block_size=m_cmp if m_cmp < m_slc else None, batch_size=batch_size)
        perm = bl.perm
        sc = c.index_select(0, perm)
        slc_offsets = bl.block_offsets
        token_slc = bl.token_block
        slc_sample = bl.block_coords[:, 0]
        sample_slc_offsets = bl.batch_offsets
        cblk = torch.div(sc[:, 1:], m_cmp, rounding_mode="floor")
        ncb = int(cblk.max()) + 1
        ckey = pack_keys([sc[:, 0], cblk[:, 0], cblk[:, 1], cblk[:, 2]], [batch_size, ncb, ncb, ncb])
        _, token_cmp, cmp_counts = torch.unique_consecutive(ckey, return_inverse=True, return_counts=True)
        cmp_offsets = _offsets_from_counts(cmp_counts)
        first = cmp_offsets[:-1]
        cmp_coords = torch.cat([sc[first, :1], cblk[first]], dim=1)
        local = sc[:, 1:] - cblk * m_cmp
        token_pe_index = (local[:, 0] * m_cmp + local[:, 1]) * m_cmp + local[:, 2]
        sorted_coords = sc
    else:
        # NSA ablation: stable sort by batch only, then fixed-length runs inside each sample.
        perm = torch.sort(c[:, 0], stable=True).indices
        sc = c.index_select(0, perm)
        counts = torch.bincount(sc[:, 0], minlength=batch_size)
        tok_off = _offsets_from_counts(counts)
        local_idx = torch.arange(n, device=device) - tok_off[sc[:, 0]]
        lc, ls = m_cmp ** 3, m_slc ** 3
        # globally unique run ids, ordered by (sample, run)
        max_runs_c = int((counts.max() + lc - 1) // lc)
        max_runs_s = int((counts.max() + ls - 1) // ls)
        _, token_cmp, cmp_counts = torch.unique_consecutive(sc[:, 0] * max_runs_c + local_idx // lc, return_inverse=True,
                                                            return_counts=True)
        _, token_slc, slc_counts = torch.unique_consecutive(sc[:, 0] * max_runs_s + local_idx // ls, return_inverse=True,
                                                            return_counts=True)
        cmp_offsets = _offsets_from_counts(cmp_counts)
        slc_offsets = _offsets_from_counts(slc_counts)
        slc_sample = sc[slc_offsets[:-1], 0]
        sample_slc_offsets = _offsets_from_counts(torch.bincount(slc_sample, minlength=batch_size))
        cmp_coords = None
        token_pe_index = local_idx % lc
        sorted_coords = None

    identity = bool(torch.equal(perm, torch.arange(n, device=device)))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=device)
    token_sample = sc[:, 0]
    sample_token_offsets = _offsets_from_counts(torch.bincount(token_sample, minlength=batch_size))
    num_cmp = cmp_offsets.numel() - 1
    cmp_sample = token_sample[cmp_offsets[:-1]]
    sample_cmp_offsets = _offsets_from_counts(torch.bincount(cmp_sample, minlength=batch_size))
    cmp_slc = token_slc[cmp_offsets[:-1]]
    num_slc = slc_offsets.numel() - 1
    slc_cmp_count = torch.bincount(cmp_slc, minlength=num_slc)
    slc_cmp_start = _offsets_from_counts(slc_cmp_count)[:-1]
    slc_sizes = slc_offsets[1:] - slc_offsets[:-1]

    token_cmp_lo, token_cmp_hi = _segment_ranges(token_sample, sample_cmp_offsets)
    cmp_token_lo, cmp_token_hi = _segment_ranges(cmp_sample, sample_token_offsets)
    token_slc_lo, token_slc_hi = _segment_ranges(token_sample, sample_slc_offsets)

    windows: dict[int, WindowLayout] = {}
    for shift in shifts:
        if mode == "spatial":
            if shift == 0 and m_win == m_slc:
                # the shift-0 windows are the selection blocks themselves, already contiguous: no gather needed
                windows[shift] = _window_layout(token_slc, slc_offsets, None, None)
                continue
            wp = window_partition(sc, m_win, shift, batch_size=batch_size)
            wperm = wp.perm
            woff = wp.offsets
            wsizes = woff[1:] - woff[:-1]
            wseg = torch.repeat_interleave(torch.arange(wsizes.numel(), device=device), wsizes)
        else:
            lw = m_win ** 3
            off = shift ** 3 if shift else 0
            local_idx = torch.arange(n, device=device) - sample_token_offsets[token_sample]
            max_runs = int((sample_token_offsets[1:] - sample_token_offsets[:-1]).max() + off + lw) // lw + 1
            key = token_sample * max_runs + (local_idx + off) // lw
            _, wseg, wcounts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
            woff = _offsets_from_counts(wcounts)
            wperm = None
        if wperm is not None and bool(torch.equal(wperm, torch.arange(n, device=device))):
            wperm = None
        winv = None
        if wperm is not None:
            winv = torch.empty_like(wperm)
            winv[wperm] = torch.arange(n, device=device)
        windows[shift] = _window_layout(wseg, woff, wperm, winv)

    cmp_per_slc = int(slc_cmp_count.max()) if mode == "nsa" else (m_slc // m_cmp) ** 3
    slc_scan_order = torch.argsort(slc_sample.long() * (cmp_per_slc + 1) + (cmp_per_slc - slc_cmp_count), stable=True)
    return SSALayout(
        num_tokens=n, batch_size=batch_size, mode=mode, m_cmp=m_cmp, m_slc=m_slc, m_win=m_win,
        perm=None if identity else perm, inverse=None if identity else inverse, sorted_coords=sorted_coords,
        token_sample=token_sample.to(torch.int32), sample_token_offsets=sample_token_offsets,
        cmp_offsets=cmp_offsets, cmp_sample=cmp_sample.to(torch.int32), cmp_coords=cmp_coords,
        sample_cmp_offsets=sample_cmp_offsets, token_cmp=token_cmp, token_pe_index=token_pe_index,
        slc_offsets=slc_offsets, slc_sample=slc_sample.to(torch.int32), sample_slc_offsets=sample_slc_offsets,
        cmp_slc=cmp_slc, slc_cmp_start=slc_cmp_start.to(torch.int32), slc_cmp_count=slc_cmp_count.to(torch.int32),
        cmp_per_slc=cmp_per_slc, slc_scan_order=slc_scan_order.to(torch.int32),
        max_slc_tokens=int(slc_sizes.max()),
        token_cmp_lo=token_cmp_lo, token_cmp_hi=token_cmp_hi, cmp_token_lo=cmp_token_lo, cmp_token_hi=cmp_token_hi,
        token_slc_lo=token_slc_lo, token_slc_hi=token_slc_hi, windows=windows,
    )
