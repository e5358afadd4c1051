"""`SpatialSparseAttention`: the SS-DiT self-attention layer (paper Sec. 4.1, Eq. 6-8; ablations of Sec. 6.1).

Parameter names follow the authors' release (shared/reference/official-release.md): ``proj_q`` (C -> H*D),
``proj_k``/``proj_v`` (C -> Hkv*D), ``proj_o``, all bias-free; ``compression_key``/``compression_value``;
``intra_block_pe`` [m_cmp, m_cmp, m_cmp, Hkv*D] added to keys only, indexed by the position inside the compression
block (Eq. 7); ``gate.0`` Linear(C, 3, no bias) + sigmoid per branch; out = g0*cmp + g1*slc + g2*win, then proj_o.
No positional encoding inside attention.

Compression networks (the delta of Eq. 7):
* v1.0: GroupNorm-SiLU -> mean-pool to the m_cmp^3 blocks -> conv3-GN-SiLU-conv3 on the block grid, plus a skip:
  the pooled raw input (``cmp_skip="input"``, the release) or the pooled GroupNorm-SiLU features (``"features"``,
  what d3s2's own v1.0-shaped models were trained with);
* v1.1: 1x1 conv + SiLU per token, then mean-pool to the blocks.
``pool_divisor``: the block mean divides by the token count n (``"count"``) or by n + 1 (``"count_plus_one"``, the
release's ``scatter_reduce`` mean; see :mod:`d3s2.sparse.pool`). The release's configs set the release's values.
Parameter names inside these networks are d3s2's (``norm1``/``conv1``/``norm2``/``conv2`` for v1.0, ``conv`` for
v1.1, sparse convs wrapped as ``.conv``); ``d3s2.models.ss_dit.OFFICIAL_KEY_MAP`` renames the release's
``act_layers`` / ``out_layers`` indices to them.

A layout (:func:`SpatialSparseAttention.make_layout`) is built once per token set and passed to every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.ops.ssa import BRANCHES, SSALayout, build_ssa_layout, mean_pool_blocks, spatial_sparse_attention
from d3s2.sparse.pool import POOL_DIVISORS

__all__ = ["SSAConfig", "SpatialSparseAttention", "pack_tokens", "unpack_tokens"]


@dataclass
class SSAConfig:
    """Config of one SSA layer. ``mode``: "ssa" (paper), "nsa" (1D blocks over token order, Sec. 6.1 ablation) or
    "full" (dense attention per sample; ``full_pack=2`` packs 2^3 neighbourhoods into one token like Trellis)."""

    dim: int = 1024
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 32
    version: str = "v1.1"
    m_cmp: int = 8
    m_slc: int = 8
    m_win: int = 8
    top_k: int = 8
    branches: tuple[str, ...] = BRANCHES
    mode: str = "ssa"
    full_pack: int = 1
    norm_groups: int = 32
    backend: str = "auto"
    pool_divisor: str = "count"  # "count" | "count_plus_one" (the release)
    cmp_skip: str = "features"  # v1.0 compression skip: "features" | "input" (the release)
    extra: dict = field(default_factory=dict)

    @classmethod
    def v1_0(cls, resolution: int = 1024, **kw) -> "SSAConfig":
        """Release v1.0: m_cmp 4, m_slc 8, top-k 32 at 512 / 8 at 1024, conv compression."""
        base = dict(version="v1.0", m_cmp=4, m_slc=8, m_win=8, top_k=32 if resolution <= 512 else 8)
        return cls(**{**base, **kw})

    @classmethod
    def v1_1(cls, **kw) -> "SSAConfig":
        """Release v1.1: m_cmp 8, m_slc 8, top-k 8, 1x1-conv compression."""
        return cls(**{**dict(version="v1.1", m_cmp=8, m_slc=8, m_win=8, top_k=8), **kw})

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise D3S2Error(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.version not in ("v1.0", "v1.1"):
            raise D3S2Error(f"SSA version must be 'v1.0' or 'v1.1', got {self.version!r}")
        if self.mode not in ("ssa", "nsa", "full"):
            raise D3S2Error(f"SSA mode must be 'ssa', 'nsa' or 'full', got {self.mode!r}")
        if self.full_pack not in (1, 2):
            raise D3S2Error(f"full_pack must be 1 or 2, got {self.full_pack}")
        if self.pool_divisor not in POOL_DIVISORS:
            raise D3S2Error(f"SSA pool_divisor must be one of {', '.join(POOL_DIVISORS)}, got {self.pool_divisor!r}")
        if self.cmp_skip not in ("features", "input"):
            raise D3S2Error(f"SSA cmp_skip must be 'features' or 'input', got {self.cmp_skip!r}")
        bad = [b for b in self.branches if b not in BRANCHES]
        if bad or not self.branches:
            raise D3S2Error(f"branches must be a non-empty subset of {BRANCHES}, got {self.branches}")


class _ConvWrap(nn.Module):
    """Holds a SparseConv3d as ``.conv`` (torchsparse-style checkpoint keys)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        from d3s2.sparse import SparseConv3d

        self.conv = SparseConv3d(cin, cout, k)

    def forward(self, x):
        return self.conv(x)


class CompressionV10(nn.Module):
    """GN-SiLU -> mean-pool to compression blocks -> conv3-GN-SiLU-conv3 on the block grid, + pooled skip."""

    def __init__(self, channels: int, groups: int, pool_divisor: str = "count", skip: str = "features"):
        super().__init__()
        from d3s2.sparse import SparseGroupNorm

        self.pool_divisor, self.skip = pool_divisor, skip
        self.norm1 = SparseGroupNorm(groups, channels)
        self.conv1 = _ConvWrap(channels, channels, 3)
        self.norm2 = SparseGroupNorm(groups, channels)
        self.conv2 = _ConvWrap(channels, channels, 3)

    def forward(self, feats_sorted: torch.Tensor, layout: SSALayout) -> torch.Tensor:
        return compress_v10((self,), feats_sorted, layout)


def compress_v10(nets: Sequence[CompressionV10], feats_sorted: torch.Tensor, layout: SSALayout) -> torch.Tensor:
    """Run several v1.0 compression networks at once on their inputs placed side by side in the channels
    ([N, len(nets) * C] -> [Nc, len(nets) * C]): each GroupNorm group and each grouped conv3 sees only its own
    network's channels, so the result equals running them one by one, with a fraction of the kernel launches (the
    key and value networks of a layer run together; the launches dominate at small token counts). The networks share
    their pooling divisor and skip."""
    divisor, skip = nets[0].pool_divisor, nets[0].skip
    h = F.silu(_group_norm([n.norm1 for n in nets], feats_sorted, _host_offsets(layout, "token")))
    pooled = mean_pool_blocks(h, layout, divisor)
    y = _block_conv3([n.conv1 for n in nets], pooled, layout)
    y = F.silu(_group_norm([n.norm2 for n in nets], y, _host_offsets(layout, "cmp")))
    y = _block_conv3([n.conv2 for n in nets], y, layout)
    return y + (mean_pool_blocks(feats_sorted, layout, divisor) if skip == "input" else pooled)


def _host_offsets(layout: SSALayout, kind: str) -> list[int]:
    """Per-sample row offsets as Python ints, read once per layout (not per layer call)."""
    key = ("host_offsets", kind)
    if key not in layout._cache:
        t = layout.sample_token_offsets if kind == "token" else layout.sample_cmp_offsets
        layout._cache[key] = t.tolist()
    return layout._cache[key]


def _group_norm(norms, x: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """GroupNorm per sample over its rows (what SparseGroupNorm computes), through F.group_norm on [1, C, n_b]
    views: one fused kernel per sample instead of row scatters, whose backward is slow at 100k+ rows. Several norms
    (same eps) act on consecutive channel slices of ``x``."""
    groups = sum(n.num_groups for n in norms)
    weight, bias, eps = _side_by_side([n.weight for n in norms]), _side_by_side([n.bias for n in norms]), norms[0].eps
    outs = []
    for b in range(len(offsets) - 1):
        xb = x[offsets[b]:offsets[b + 1]]
        if xb.shape[0] == 0:
            outs.append(xb)
            continue
        yb = F.group_norm(xb.t().unsqueeze(0), groups, weight, bias, eps)
        outs.append(yb[0].t())
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _side_by_side(params: list, dim: int = 0):
    """Parameters of several networks concatenated along ``dim`` (the one tensor itself for one network, no copy;
    None when the networks have none)."""
    if params[0] is None:
        return None
    return params[0] if len(params) == 1 else torch.cat(params, dim)


_DENSE_LIMIT = 1 << 27  # cells x channels of the dense block grid, above which the sparse conv is used


def _block_conv3(wraps, feats: torch.Tensor, layout: SSALayout) -> torch.Tensor:
    """Submanifold 3x3x3 conv on the compression-block grid. The block grid is coarse (m_cmp times smaller than the
    token grid), so it is scattered into a dense channels-last volume and run through F.conv3d (cuDNN); reading the
    output at the active blocks only, with zeros at inactive ones, is exactly the submanifold conv. Several convs act
    on consecutive channel slices (one grouped conv). Falls back to d3s2.sparse's gather-GEMM-scatter when the dense
    volume would be large."""
    key = ("dense_block_grid",)
    if key not in layout._cache:
        cc = layout.cmp_coords
        ext = (cc.max(0).values + 1).tolist()
        lin = ((cc[:, 0] * ext[1] + cc[:, 1]) * ext[2] + cc[:, 2]) * ext[3] + cc[:, 3]
        layout._cache[key] = (ext, lin)
    ext, lin = layout._cache[key]
    c = feats.shape[1]
    convs = [w.conv for w in wraps]
    if ext[0] * ext[1] * ext[2] * ext[3] * c > _DENSE_LIMIT:
        _, blk = _sparse_views(layout, feats.device)
        parts = feats.chunk(len(convs), dim=1)
        return torch.cat([cv(blk.replace(x.contiguous())).feats for cv, x in zip(convs, parts)], 1)
    from d3s2.sparse import kernel_to_dense_weight

    grid = feats.new_zeros(ext[0] * ext[1] * ext[2] * ext[3], c).index_copy(0, lin, feats)
    grid = grid.view(ext[0], ext[1], ext[2], ext[3], c).permute(0, 4, 1, 2, 3)  # channels-last 3D view
    # out-channels side by side: the grouped conv's weight
    w = kernel_to_dense_weight(_side_by_side([cv.kernel for cv in convs], dim=2).to(feats.dtype))
    b = _side_by_side([cv.bias for cv in convs])
    b = b.to(feats.dtype) if b is not None else None
    out = F.conv3d(grid, w, b, padding=1, groups=len(convs))
    return out.permute(0, 2, 3, 4, 1).reshape(-1, c).index_select(0, lin)


class CompressionV11(nn.Module):
    """1x1 conv + SiLU per token, then mean-pool to compression blocks."""

    def __init__(self, channels: int, pool_divisor: str = "count"):
        super().__init__()
        self.pool_divisor = pool_divisor
        self.conv = _ConvWrap(channels, channels, 1)

    def forward(self, feats_sorted: torch.Tensor, layout: SSALayout) -> torch.Tensor:
        # a 1x1 sparse conv is a per-row matmul; skip the neighbour map
        w = self.conv.conv.kernel[0].to(feats_sorted.dtype)
        b = self.conv.conv.bias
        h = feats_sorted @ w + (b.to(feats_sorted.dtype) if b is not None else 0)
        return mean_pool_blocks(F.silu(h), layout, self.pool_divisor)


def _sparse_views(layout: SSALayout, device):
    """Token-level and block-level SparseTensors of a layout, made once (their neighbour maps are cached with them)."""
    key = ("sparse_views", str(device))
    if key not in layout._cache:
        from d3s2.sparse import SparseTensor

        if layout.sorted_coords is None:
            raise D3S2Error("the v1.0 conv compression needs a spatial layout (mode='spatial')")
        tok = SparseTensor(torch.zeros(layout.num_tokens, 0, device=device), layout.sorted_coords,
                           batch_size=layout.batch_size)
        blk = SparseTensor(torch.zeros(layout.num_cmp, 0, device=device), layout.cmp_coords,
                           batch_size=layout.batch_size, stride=layout.m_cmp)
        layout._cache[key] = (tok, blk)
    return layout._cache[key]


def pack_tokens(x: torch.Tensor, coords: torch.Tensor, factor: int = 2):
    """Trellis-style packing: the tokens of each ``factor^3`` cell become one token whose features are the children's
    features concatenated (zeros for absent children). Returns (packed [P, factor^3 * C], parent coords [P, 4],
    slot index [N] of each token in the packed buffer (row * factor^3 + child))."""
    c = coords.long()
    parent = torch.cat([c[:, :1], torch.div(c[:, 1:], factor, rounding_mode="floor")], 1)
    child = c[:, 1:] - parent[:, 1:] * factor
    child_id = (child[:, 0] * factor + child[:, 1]) * factor + child[:, 2]
    uniq, row = torch.unique(parent, dim=0, return_inverse=True)
    f3 = factor ** 3
    slot = row * f3 + child_id
    packed = x.new_zeros(uniq.shape[0] * f3, *x.shape[1:])
    packed[slot] = x
    return packed.view(uniq.shape[0], f3, *x.shape[1:]), uniq, slot


def unpack_tokens(packed: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return packed.reshape(-1, *packed.shape[2:])[slot]


class SpatialSparseAttention(nn.Module):
    """SSA self-attention on tokens ``x [N, C]`` with a prebuilt :class:`SSALayout` of their coordinates."""

    def __init__(self, config: SSAConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.proj_q = nn.Linear(cfg.dim, h * d, bias=False)
        self.proj_k = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.proj_v = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.proj_o = nn.Linear(h * d, cfg.dim, bias=False)
        if cfg.mode != "full":
            kvc = hkv * d
            self.intra_block_pe = nn.Parameter(torch.zeros(cfg.m_cmp, cfg.m_cmp, cfg.m_cmp, kvc))
            nn.init.normal_(self.intra_block_pe, std=0.02)
            if cfg.version == "v1.0" and cfg.mode == "ssa":
                self.compression_key = CompressionV10(kvc, cfg.norm_groups, cfg.pool_divisor, cfg.cmp_skip)
                self.compression_value = CompressionV10(kvc, cfg.norm_groups, cfg.pool_divisor, cfg.cmp_skip)
            else:  # v1.1, and the NSA ablation (1D blocks have no 3D grid for a conv3)
                self.compression_key = CompressionV11(kvc, cfg.pool_divisor)
                self.compression_value = CompressionV11(kvc, cfg.pool_divisor)
            self.gate = nn.Sequential(nn.Linear(cfg.dim, 3, bias=False))

    def make_layout(self, coords: torch.Tensor, batch_size: int | None = None) -> SSALayout:
        """The layout of a token set for this layer's config; build once, reuse for every layer and step."""
        cfg = self.config
        return build_ssa_layout(coords, m_cmp=cfg.m_cmp, m_slc=cfg.m_slc, m_win=cfg.m_win, batch_size=batch_size,
                                mode="nsa" if cfg.mode == "nsa" else "spatial")

    def forward(self, x: torch.Tensor, layout: SSALayout, window_shift: int = 0, inputs_sorted: bool = False):
        cfg = self.config
        if x.dim() != 2 or x.shape[1] != cfg.dim:
            raise D3S2Error(f"SSA input must be [N, {cfg.dim}], got {tuple(x.shape)}")
        n = x.shape[0]
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        xs = x if inputs_sorted else layout.to_sorted(x)
        q = self.proj_q(xs).view(n, h, d)
        k_tok = self.proj_k(xs)
        v_tok = self.proj_v(xs)
        if cfg.mode == "full":
            o = self._full(q, k_tok.view(n, hkv, d), v_tok.view(n, hkv, d), layout)
        else:
            o = self.attend(q, k_tok, v_tok, self.gate(xs), layout, window_shift)
        out = self.proj_o(o.reshape(n, h * d))
        return out if inputs_sorted else layout.from_sorted(out)

    def attend(self, q: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor, gate_logits: torch.Tensor,
               layout: SSALayout, window_shift: int = 0) -> torch.Tensor:
        """The attention op between the projections, on block-sorted tokens: compression networks (Eq. 7), then
        compression / selection / window attention and the gated sum (Eq. 6). q [N, H, D], k_tok/v_tok [N, Hkv*D],
        gate_logits [N, 3] (pre-sigmoid). Returns [N, H, D]."""
        cfg = self.config
        n = q.shape[0]
        hkv, d = cfg.num_kv_heads, cfg.head_dim
        k_cmp = v_cmp = None
        if "cmp" in cfg.branches or "slc" in cfg.branches:
            k_cmp, v_cmp = self.compress(k_tok, v_tok, layout)
        sel = [BRANCHES.index(b) for b in cfg.branches]
        gl = gate_logits[:, sel] if len(sel) < 3 else gate_logits
        return spatial_sparse_attention(
            q, k_tok.view(n, hkv, d), v_tok.view(n, hkv, d), layout, k_cmp=k_cmp, v_cmp=v_cmp, gate_logits=gl,
            top_k=cfg.top_k, branches=cfg.branches, window_shift=window_shift, backend=cfg.backend, inputs_sorted=True,
        )

    def compress(self, k_tok: torch.Tensor, v_tok: torch.Tensor, layout: SSALayout):
        """Compressed keys and values [Nc, Hkv, D] (Eq. 7): the intra-block PE is added to the keys, then the key and
        value compression networks (v1.0: both in one pass)."""
        hkv, d = self.config.num_kv_heads, self.config.head_dim
        pe = self.intra_block_pe.reshape(-1, hkv * d)
        k_in = k_tok + pe[layout.token_pe_index].to(k_tok.dtype)
        if isinstance(self.compression_key, CompressionV10):
            kv = compress_v10((self.compression_key, self.compression_value), torch.cat([k_in, v_tok], 1), layout)
            return kv[:, :hkv * d].reshape(-1, hkv, d), kv[:, hkv * d:].reshape(-1, hkv, d)
        return (self.compression_key(k_in, layout).view(-1, hkv, d),
                self.compression_value(v_tok, layout).view(-1, hkv, d))

    def _full(self, q, k, v, layout: SSALayout):
        """Dense attention inside each sample (SDPA), optionally over 2^3-packed tokens."""
        cfg = self.config
        g = cfg.num_heads // cfg.num_kv_heads
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        slot = None
        if cfg.full_pack > 1:
            if layout.sorted_coords is None:
                raise D3S2Error("token packing needs a spatial layout")
            f3 = cfg.full_pack ** 3
            qp, parents, slot = pack_tokens(q, layout.sorted_coords, cfg.full_pack)
            kp, _, _ = pack_tokens(k, layout.sorted_coords, cfg.full_pack)
            vp, _, _ = pack_tokens(v, layout.sorted_coords, cfg.full_pack)
            # [P, f3, H, D] -> [P, H, f3*D]: one packed token per cell, children concatenated per head
            q, k, v = (t.permute(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], f3 * t.shape[3]) for t in (qp, kp, vp))
            off = torch.searchsorted(parents[:, 0].contiguous(), torch.arange(layout.batch_size + 1, device=q.device))
        else:
            off = layout.sample_token_offsets
        scale = 1.0 / math.sqrt(q.shape[-1])  # packed tokens: the dot runs over all children's channels
        outs = []
        bounds = off.tolist()  # full attention is the ablation baseline: one host sync per call is acceptable
        for b in range(layout.batch_size):
            s, e = bounds[b], bounds[b + 1]
            qi, ki, vi = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0].transpose(0, 1))
        o = torch.cat(outs)
        if slot is not None:
            f3 = cfg.full_pack ** 3
            o = o.reshape(o.shape[0], o.shape[1], f3, cfg.head_dim).permute(0, 2, 1, 3)
            o = unpack_tokens(o, slot)
        return o

    @classmethod
    def from_config(cls, **kw) -> "SpatialSparseAttention":
        return cls(SSAConfig(**kw))

    def with_backend(self, backend: str) -> "SpatialSparseAttention":
        self.config = replace(self.config, backend=backend)
        return self
