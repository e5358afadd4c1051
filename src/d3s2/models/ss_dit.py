"""SS-DiT: the sparse rectified-flow transformer of the 512^3 and 1024^3 stages (paper Sec. 4, 4.1, 4.2, 5.2).

Input: a sparse latent (:class:`~d3s2.sparse.SparseTensor`, 16 channels on the latent coordinates), timesteps in
0..1000 and image tokens. Architecture (shared/reference/official-release.md, "SparseDiT"):

    h = input_layer(feats) + APE(coords * pe_factor)            # pe_factor 1.0 at 512, 0.5 at 1024
    24 x ModulatedTransformerCrossBlock(self_attn = SpatialSparseAttention, window shift m_win/2 on odd blocks)
    out = out_layer(LayerNorm_no_affine(h))

Self-attention is SSA (GQA: 32 query heads x 32, 2 KV heads); cross-attention to the image tokens uses 32 heads x 32.
v1.0 models own ``cond_proj`` (sparse conditioning, Eq. 9; see :mod:`d3s2.models.conditioning`): the raw DINOv2 tokens
of the foreground arrive padded with their coordinates and key mask, and ``cond_proj(tokens + APE(coords))`` gives
the cross-attention context. v1.1 models cross-attend to the 1374 dense tokens directly.

The SSA layout of the token set is built once per forward and shared by all blocks; it is cached on the sparse
tensor's coordinate cache, so every sampling step (``x.replace(new_feats)``) reuses it. Inside the model tokens run in
the layout's order (sample, 8^3 selection block, compression sub-block, voxel), the release's "8^3 block then position"
order; the output is returned in the caller's order.

The release's key layout (read off the authors' classes, shared/reference/official_state_dict_keys.json) loads strictly
through :func:`load_official_state_dict`; the release computes ``cond_proj(tokens) + PE(coords)`` for v1.0
(``cond_pe_after_proj: true`` in the configs built from a release folder, see :mod:`d3s2.pipelines.release_config`),
d3s2's own models may use Eq. 9's order (Linear of tokens + PE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.models.dense_vae import load_official_state_dict as _load
from d3s2.nn.blocks import ModulatedTransformerCrossBlock, cached_ragged_rows, init_dit_weights
from d3s2.nn.embeddings import AbsolutePositionEmbedder, TimestepEmbedder
from d3s2.nn.ssa import SSAConfig, SpatialSparseAttention

__all__ = ["SSDiTConfig", "SSDiT", "OFFICIAL_KEY_MAP", "remap_official_keys", "load_official_state_dict"]


@dataclass
class SSDiTConfig:
    """SS-DiT (defaults: release v1.1 at 512^3; the YAMLs under configs/ hold the four release models)."""

    resolution: int = 64  # latent grid (voxel resolution / 8)
    in_channels: int = 16
    out_channels: int = 16
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_ratio: float = 4.0
    pe_factor: float = 1.0
    qkv_bias: bool = True  # cross-attention projections (assumed)
    # SSA (paper Sec. 4.1, 5.2)
    version: str = "v1.1"
    m_cmp: int = 8
    m_slc: int = 8
    m_win: int = 8
    top_k: int = 8
    window_shift: int = 4  # applied on odd blocks
    ssa_mode: str = "ssa"  # "ssa" | "nsa" | "full" (ablations, Sec. 6.1)
    ssa_norm_groups: int = 32
    ssa_backend: str = "auto"
    pool_divisor: str = "count"  # SSA block mean: "count" | "count_plus_one" (the release, see d3s2.sparse.pool)
    cmp_skip: str = "features"  # v1.0 compression skip: "features" | "input" (the release)
    # Sparse conditioning (Eq. 9, v1.0): cond_proj + APE of the condition-token coordinates
    sparse_conditioning: bool = False
    cond_pe_after_proj: bool = False  # False: Eq. 9, Linear(tokens + PE); True: Linear(tokens) + PE (unverified)
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.model_channels < 6:
            raise D3S2Error("SS-DiT: model_channels must be at least 6 (positional embedding)")
        if self.num_heads % self.num_kv_heads:
            raise D3S2Error(f"SS-DiT: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                            f"({self.num_kv_heads})")
        if self.window_shift < 0 or self.window_shift >= max(self.m_win, 1):
            raise D3S2Error(f"SS-DiT: window_shift must lie in [0, m_win={self.m_win}), got {self.window_shift}")

    def ssa_config(self) -> SSAConfig:
        return SSAConfig(dim=self.model_channels, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         head_dim=self.head_dim, version=self.version, m_cmp=self.m_cmp, m_slc=self.m_slc,
                         m_win=self.m_win, top_k=self.top_k, mode=self.ssa_mode, norm_groups=self.ssa_norm_groups,
                         backend=self.ssa_backend, pool_divisor=self.pool_divisor, cmp_skip=self.cmp_skip)


class SSDiT(nn.Module):
    """``forward(x: SparseTensor [N, in], t [B] in 0..1000, cond [B, L, C_cond], cond_mask=None, cond_coords=None)``
    -> SparseTensor of velocities ``[N, out]`` on the same coordinates.

    ``cond_mask`` ``[B, L]`` bool marks real condition tokens (ragged sparse conditioning); ``cond_coords``
    ``[B, L, 3]`` are their (w, h, 0/1) coordinates, required when ``sparse_conditioning`` is on. ``layout`` may be
    passed to reuse an :class:`~d3s2.ops.ssa.SSALayout` built by :meth:`make_layout`.
    """

    config_class = SSDiTConfig

    def __init__(self, config: SSDiTConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or SSDiTConfig()
        c = cfg.model_channels
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = nn.Linear(cfg.in_channels, c)
        self.pos_embedder = AbsolutePositionEmbedder(c, 3, factor=cfg.pe_factor)
        if cfg.sparse_conditioning:
            self.cond_proj = nn.Linear(cfg.cond_channels, c)
            pe_dim = c if cfg.cond_pe_after_proj else cfg.cond_channels
            self.cond_pos_embedder = AbsolutePositionEmbedder(pe_dim, 3)
        ctx = c if cfg.sparse_conditioning else cfg.cond_channels
        ssa_cfg = cfg.ssa_config()
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(
                c, ctx, cfg.num_heads, head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                self_attn=SpatialSparseAttention(ssa_cfg), use_checkpoint=cfg.use_checkpoint,
            )
            for _ in range(cfg.num_blocks)
        )
        self.out_layer = nn.Linear(c, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation (see `init_dit_weights`); skipped for models built on the meta device."""
        if self.input_layer.weight.is_meta:
            return
        init_dit_weights(self)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for block in self.blocks:
            block.use_checkpoint = enabled

    # ------------------------------------------------------------------ layout
    def _layout_key(self) -> tuple:
        cfg = self.config
        return ("ss_dit_layout", cfg.m_cmp, cfg.m_slc, cfg.m_win, cfg.ssa_mode)

    def make_layout(self, coords: torch.Tensor, batch_size: int | None = None):
        """SSA layout of latent coordinates ``[N, 4]`` (one build serves every block and every sampling step)."""
        if not self.blocks:
            raise D3S2Error("SS-DiT with no blocks has no attention layout")
        return self.blocks[0].self_attn.make_layout(coords, batch_size=batch_size)

    def layout_for(self, x: Any):
        """The layout of ``x``'s coordinates, cached in the coordinate cache that ``x.replace(...)`` tensors share."""
        cache = getattr(x, "_cache", None)
        key = self._layout_key()
        if cache is not None and key in cache:
            return cache[key]
        layout = self.make_layout(x.coords, batch_size=int(x.batch_size))
        if cache is not None:
            cache[key] = layout
        return layout

    # ------------------------------------------------------------------ forward
    def embed_condition(self, cond: torch.Tensor, cond_coords: torch.Tensor | None) -> torch.Tensor:
        """Eq. 9 (v1.0): ``cond_proj(tokens + APE(coords))``; identity for dense (v1.1) conditioning."""
        if not self.config.sparse_conditioning:
            return cond
        if cond_coords is None:
            raise D3S2Error("this SS-DiT uses sparse conditioning (v1.0): pass cond_coords [B, L, 3] with the tokens "
                            "(see d3s2.models.conditioning.sparse_condition)")
        if cond_coords.shape[:2] != cond.shape[:2] or cond_coords.shape[-1] != 3:
            raise D3S2Error(f"cond_coords must be [B, L, 3] matching cond {tuple(cond.shape[:2])}, "
                            f"got {tuple(cond_coords.shape)}")
        b, l, _ = cond.shape
        pe = self.cond_pos_embedder(cond_coords.reshape(b * l, 3)).view(b, l, -1)
        w = self.cond_proj.weight
        if self.config.cond_pe_after_proj:
            return self.cond_proj(cond.to(w.dtype)) + pe.to(w.dtype)
        return self.cond_proj((cond.float() + pe).to(w.dtype))

    def forward(self, x: Any, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                cond_coords: torch.Tensor | None = None, layout=None) -> Any:
        cfg = self.config
        if not hasattr(x, "feats") or not hasattr(x, "coords"):
            raise D3S2Error("SS-DiT expects a SparseTensor latent (d3s2.sparse.SparseTensor)")
        feats = x.feats
        if feats.dim() != 2 or feats.shape[1] != cfg.in_channels:
            raise D3S2Error(f"SS-DiT expects latent features [N, {cfg.in_channels}], got {tuple(feats.shape)}")
        b = int(x.batch_size)
        if cond.ndim != 3 or cond.shape[0] != b or cond.shape[2] != cfg.cond_channels:
            raise D3S2Error(f"SS-DiT expects cond [B={b}, L, {cfg.cond_channels}], got {tuple(cond.shape)}")
        if layout is None:
            layout = self.layout_for(x)
        if layout.num_tokens != feats.shape[0]:
            raise D3S2Error(f"layout has {layout.num_tokens} tokens but the latent has {feats.shape[0]}")
        dtype = self.input_layer.weight.dtype
        t = torch.as_tensor(t, device=feats.device).reshape(-1).expand(b)
        t_emb = self.t_embedder(t)
        ctx = self.embed_condition(cond, cond_coords).to(dtype)

        coords_sorted = layout.sorted_coords if layout.sorted_coords is not None else layout.to_sorted(x.coords.long())
        h = self.input_layer(layout.to_sorted(feats).to(dtype))
        h = h + self.pos_embedder(coords_sorted[:, 1:]).to(dtype)
        offsets = cached_ragged_rows(layout._cache, layout.sample_token_offsets)  # read to the host once per layout
        for i, block in enumerate(self.blocks):
            shift = cfg.window_shift if i % 2 == 1 else 0
            h = block(h, t_emb, ctx, cond_mask, batch_offsets=offsets,
                      attn_kwargs={"layout": layout, "window_shift": shift, "inputs_sorted": True})
        h = F.layer_norm(h.float(), h.shape[-1:]).to(dtype)
        return x.replace(layout.from_sorted(self.out_layer(h)))


# The release's SSA compression networks are torchsparse Sequentials (``act_layers`` / ``out_layers`` indices); d3s2
# names their layers. Renames per version, applied inside ``compression_key.`` / ``compression_value.`` only.
OFFICIAL_KEY_MAP: dict[str, dict[str, str]] = {
    "v1.0": {"act_layers.0.": "norm1.", "out_layers.0.": "conv1.", "out_layers.1.": "norm2.", "out_layers.3.": "conv2."},
    "v1.1": {"act_layers.0.": "conv."},
}


def remap_official_keys(state_dict: dict[str, torch.Tensor], version: str) -> dict[str, torch.Tensor]:
    """The release's SS-DiT keys -> d3s2's (see :data:`OFFICIAL_KEY_MAP`)."""
    renames = OFFICIAL_KEY_MAP[version]
    out = {}
    for key, value in state_dict.items():
        for net in (".compression_key.", ".compression_value."):
            i = key.find(net)
            if i < 0:
                continue
            head, tail = key[:i + len(net)], key[i + len(net):]
            for old, new in renames.items():
                if tail.startswith(old):
                    key = head + new + tail[len(old):]
                    break
            break
        out[key] = value
    return out


def load_official_state_dict(model: SSDiT, state_dict: dict[str, torch.Tensor], key_map=None, strict: bool = True,
                             assign: bool = False):
    """Load the authors' ``torch.load(model_sparse_{512,1024}.ckpt)["dit"]`` (renames of :data:`OFFICIAL_KEY_MAP` for
    the model's version; ``key_map``: extra prefix renames)."""
    sd = remap_official_keys(state_dict, model.config.version)
    return _load(model, sd, key_map or {}, strict=strict, assign=assign)
