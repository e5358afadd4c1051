"""Transformer blocks of the DiTs (paper Sec. 4, Fig. 2 lower half; layout of the authors' release).

:class:`ModulatedTransformerCrossBlock` is the DiT block of both the dense structure DiT and the SS-DiT:

    mod = adaLN_modulation(t_emb)                # SiLU -> Linear(C, 6C): shift/scale/gate for attention and MLP
    x = x + gate_msa * self_attn(norm1(x) * (1 + scale_msa) + shift_msa)      # norm1: no affine
    x = x + cross_attn(norm2(x), context)                                       # norm2: affine, not modulated
    x = x + gate_mlp * mlp(norm3(x) * (1 + scale_mlp) + shift_mlp)             # norm3: no affine

The chunk order of ``mod`` is (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), the usual DiT order
(unverified against the authors' weights). Three input formats:

- dense tokens ``[B, N, C]``: ``self_attn(h, **attn_kwargs)``;
- ragged rows ``[N_total, C]`` sorted by sample, with ``batch_offsets`` ``[B+1]``: ``self_attn(h_rows, **attn_kwargs)``
  (the SS-DiT passes Spatial Sparse Attention as ``self_attn`` and its layout in ``attn_kwargs``);
- a sparse tensor-like object (``.feats``, ``.batch_offsets``, ``.replace(feats)``; d3s2.sparse.SparseTensor):
  ``self_attn(x.replace(h_rows), **attn_kwargs)``, result returned as ``x.replace(...)``.

In the ragged formats the per-sample modulation is applied segment by segment (no ``[N, C]`` copies of the six
modulation vectors) and cross-attention runs on the samples padded to the longest one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d3s2.nn.attention import MultiHeadCrossAttention, MultiHeadSelfAttention
from d3s2.nn.norms import LayerNorm32

__all__ = ["FeedForward", "ModulatedTransformerCrossBlock", "RaggedRows", "init_dit_weights", "modulate", "pad_rows",
           "unpad_rows", "cached_ragged_rows", "ragged_rows_of", "rows_batch_index"]


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear (parameters ``mlp.0``, ``mlp.2``; inside a block: ``mlp.mlp.0``, ``mlp.mlp.2``)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rows_batch_index(batch_offsets: torch.Tensor) -> torch.Tensor:
    """Sample index of every row, from row offsets ``[B+1]`` (rows sorted by sample)."""
    counts = (batch_offsets[1:] - batch_offsets[:-1]).to(torch.long)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=batch_offsets.device), counts)


def _counts(batch_offsets: torch.Tensor) -> list[int]:
    return (batch_offsets[1:] - batch_offsets[:-1]).tolist()


class RaggedRows:
    """Row segments of a batch (``offsets`` [B+1] on the device, ``counts`` as Python ints) with the pad/unpad index
    built once. Made once per token set (cached on the SSA layout or the sparse tensor), so that no block forward
    reads sizes back from the GPU: a host sync per block would stall the launch queue (every block waits for the
    previous one to finish) and would make the forward impossible to capture in a CUDA graph."""

    def __init__(self, offsets: torch.Tensor) -> None:
        self.counts = _counts(offsets)
        self.n_max = max(self.counts, default=0)
        self.uniform = len(set(self.counts)) <= 1  # e.g. the two halves of a classifier-free-guidance batch
        self._index: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def _build(self, device) -> None:
        counts = torch.tensor(self.counts, device=device)
        self._mask = torch.arange(self.n_max, device=device)[None, :] < counts[:, None]
        self._index = torch.nonzero(self._mask.reshape(-1)).squeeze(1)  # padded slot of every row, in row order

    def pad(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N_total, C]`` -> ``[B, N_max, C]`` (zeros in padding) and the ``[B, N_max]`` mask (None if uniform)."""
        b, c = len(self.counts), feats.shape[1]
        if self.uniform:
            return feats.view(b, self.n_max, c), None
        if self._index is None or self._index.device != feats.device:
            self._build(feats.device)
        padded = feats.new_zeros(b * self.n_max, c).index_copy(0, self._index, feats)
        return padded.view(b, self.n_max, c), self._mask

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        flat = padded.reshape(-1, padded.shape[-1])
        return flat if self.uniform else flat.index_select(0, self._index)


def cached_ragged_rows(cache: dict | None, offsets: torch.Tensor) -> RaggedRows:
    """The :class:`RaggedRows` of ``offsets``, memoised in ``cache`` (a token set's cache: a sparse tensor's
    coordinate cache, an SSA layout's); built afresh without one."""
    if cache is None:
        return RaggedRows(offsets)
    if "ragged_rows" not in cache:
        cache["ragged_rows"] = RaggedRows(offsets)
    return cache["ragged_rows"]


def ragged_rows_of(x: Any) -> RaggedRows:
    """The :class:`RaggedRows` of a sparse tensor-like ``x`` (``feats``, ``batch_offsets``, ``replace``), memoised in
    its coordinate cache (shared by ``x.replace``) when it has one."""
    return cached_ragged_rows(getattr(x, "_cache", None), x.batch_offsets)


def pad_rows(feats: torch.Tensor, batch_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows ``[N_total, C]`` -> padded ``[B, N_max, C]`` (zeros) and a ``[B, N_max]`` mask of real rows."""
    counts = _counts(batch_offsets)
    n_max = max(counts, default=0)
    parts = [F.pad(p, (0, 0, 0, n_max - p.shape[0])) for p in feats.split(counts)]
    padded = torch.stack(parts) if parts else feats.new_zeros(0, 0, feats.shape[1])
    mask = torch.arange(n_max, device=feats.device)[None, :] < torch.tensor(counts, device=feats.device)[:, None]
    return padded, mask


def unpad_rows(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_rows` (row order preserved)."""
    return padded[mask]


def _segmentwise(rows: torch.Tensor, counts: list[int], fn) -> torch.Tensor:
    """``cat([fn(segment_b, b)])`` over the samples' row segments."""
    parts = [fn(p, i) for i, p in enumerate(rows.split(counts))]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def _is_sparse(x: Any) -> bool:
    return not isinstance(x, torch.Tensor) and hasattr(x, "feats")


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention + cross-attention + MLP block (see module docstring).

    Args:
        channels: model width C.
        ctx_channels: width of the conditioning tokens.
        num_heads, head_dim: attention heads (both attentions use ``num_heads * head_dim`` inner width).
        num_kv_heads: key/value heads of the default self-attention (GQA); None = num_heads.
        self_attn: a module to use as self-attention instead of the default dense one (e.g. SSA in the SS-DiT).
            It is called with the modulated tokens in the block's input format ([B, N, C]; [N, C] rows; or the sparse
            object) plus ``attn_kwargs``, and returns the same format (a sparse object or its feature rows).
        use_checkpoint: recompute the block in backward (gradient checkpointing) while training.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        self_attn: nn.Module | None = None,
        use_checkpoint: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=eps)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=eps)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=eps)
        self.self_attn = self_attn if self_attn is not None else MultiHeadSelfAttention(
            channels, num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads, qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm
        )
        self.cross_attn = MultiHeadCrossAttention(
            channels, ctx_channels, num_heads, head_dim=head_dim, qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross
        )
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(
        self,
        x: Any,
        t_emb: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        batch_offsets: "torch.Tensor | RaggedRows | None" = None,
        attn_kwargs: dict[str, Any] | None = None,
    ):
        """``x``: ``[B, N, C]``, ``[N_total, C]`` with ``batch_offsets``, or sparse tensor-like; ``t_emb``: ``[B, C]``;
        ``context``: ``[B, L, C_ctx]`` (``context_mask`` ``[B, L]`` bool for ragged conditions); ``attn_kwargs`` go to
        ``self_attn``. ``batch_offsets`` may be a :class:`RaggedRows` (no host sync inside the block)."""
        args = (x, t_emb, context, context_mask, batch_offsets, attn_kwargs or {})
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, x, t_emb, context, context_mask, batch_offsets, attn_kwargs):
        mods = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        if _is_sparse(x):
            feats = self._forward_rows(x.feats, ragged_rows_of(x), mods, context, context_mask,
                                       lambda h: self.self_attn(x.replace(h), **attn_kwargs))
            return x.replace(feats)
        if batch_offsets is not None:
            rows = batch_offsets if isinstance(batch_offsets, RaggedRows) else RaggedRows(batch_offsets)
            return self._forward_rows(x, rows, mods, context, context_mask,
                                      lambda h: self.self_attn(h, **attn_kwargs))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.unsqueeze(1) for m in mods)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa * self.self_attn(h, **attn_kwargs)
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        h = modulate(self.norm3(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)

    def _forward_rows(self, feats, rows: RaggedRows, mods, context, context_mask, attend):
        if feats.shape[0] == 0:
            return feats
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        counts = rows.counts
        h = _segmentwise(self.norm1(feats), counts, lambda p, b: modulate(p, shift_msa[b], scale_msa[b]))
        attn = attend(h)
        attn = attn.feats if _is_sparse(attn) else attn
        feats = feats + _segmentwise(attn, counts, lambda p, b: p * gate_msa[b])
        padded, _ = rows.pad(self.norm2(feats))
        feats = feats + rows.unpad(self.cross_attn(padded, context, context_mask))
        h = _segmentwise(self.norm3(feats), counts, lambda p, b: modulate(p, shift_mlp[b], scale_mlp[b]))
        return feats + _segmentwise(self.mlp(h), counts, lambda p, b: p * gate_mlp[b])


def init_dit_weights(model: nn.Module) -> None:
    """DiT initialisation shared by the dense and sparse DiTs: Xavier linears with zero bias, N(0, 0.02) timestep MLP,
    zero adaLN modulation and zero output layer, so every block starts as the identity and the model predicts zero.

    Expects ``model.t_embedder.mlp``, ``model.blocks[i].adaLN_modulation`` and ``model.out_layer``. Models built on
    the meta device (for loading a checkpoint, d3s2.models.loading) are left alone."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.out_layer.weight)
    nn.init.zeros_(model.out_layer.bias)
