"""Dense structure DiT (paper Sec. 5.2, the "extra DiT to predict the indices"; architecture of the authors' release).

A rectified-flow transformer over the 8 x 16^3 latent of :class:`~d3s2.models.dense_vae.DenseShapeVAE`: patchify
(patch 1 -> 4096 tokens), ``input_layer`` Linear, add the APE buffer ``pos_emb`` [tokens, C] (kept in the state dict as
the release does), 24 :class:`~d3s2.nn.blocks.ModulatedTransformerCrossBlock` (qk RMS norm in self-attention,
cross-attention to image tokens ``[B, L, C_cond]``), a non-affine LayerNorm and ``out_layer``; no final adaLN.
Timesteps enter in 0..1000 (flow time t times 1000).

State-dict keys: ``t_embedder.mlp.{0,2}``, ``input_layer``, ``pos_emb``, ``blocks.{i}.{adaLN_modulation.1, norm2,
self_attn.{to_qkv, q_rms_norm.gamma, k_rms_norm.gamma, to_out}, cross_attn.{to_q, to_kv, to_out}, mlp.mlp.{0,2}}``,
``out_layer``. The names come from the release notes; biases on ``to_qkv``/``to_q``/``to_kv`` (``qkv_bias``) are
assumed (unverified) and can be switched off in the config. :data:`OFFICIAL_KEY_MAP` takes prefix renames if a real
checkpoint shows different keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.models.dense_vae import load_official_state_dict as _load
from d3s2.nn.blocks import ModulatedTransformerCrossBlock, init_dit_weights
from d3s2.nn.embeddings import AbsolutePositionEmbedder, TimestepEmbedder, grid_coords

__all__ = ["DenseDiTConfig", "DenseDiT", "OFFICIAL_KEY_MAP", "load_official_state_dict"]


@dataclass
class DenseDiTConfig:
    """Dense structure DiT (defaults: the paper / release model)."""

    resolution: int = 16
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    head_dim: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 1
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False
    qkv_bias: bool = True
    pe_factor: float = 1.0
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.resolution % self.patch_size:
            raise D3S2Error(f"dense DiT: resolution {self.resolution} is not divisible by patch_size {self.patch_size}")
        if self.model_channels < 6:
            raise D3S2Error("dense DiT: model_channels must be at least 6 (positional embedding)")

    @property
    def num_tokens(self) -> int:
        return (self.resolution // self.patch_size) ** 3


class DenseDiT(nn.Module):
    """``forward(x [B, in, R, R, R], t [B] in 0..1000, cond [B, L, C_cond]) -> velocity [B, out, R, R, R]``."""

    config_class = DenseDiTConfig

    def __init__(self, config: DenseDiTConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or DenseDiTConfig()
        c, p = cfg.model_channels, cfg.patch_size
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = nn.Linear(cfg.in_channels * p**3, c)
        ape = AbsolutePositionEmbedder(c, 3, factor=cfg.pe_factor)
        self.register_buffer("pos_emb", ape(grid_coords(cfg.resolution // p, device=ape.freqs.device)))
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(
                c,
                cfg.cond_channels,
                cfg.num_heads,
                head_dim=cfg.head_dim,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                qk_rms_norm=cfg.qk_rms_norm,
                qk_rms_norm_cross=cfg.qk_rms_norm_cross,
                use_checkpoint=cfg.use_checkpoint,
            )
            for _ in range(cfg.num_blocks)
        )
        self.out_layer = nn.Linear(c, cfg.out_channels * p**3)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation (see `init_dit_weights`); skipped for models built on the meta device."""
        if self.pos_emb.is_meta:
            return
        init_dit_weights(self)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for block in self.blocks:
            block.use_checkpoint = enabled

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, R, R, R]`` -> tokens ``[B, (R/p)^3, C p^3]`` in raster order of the patch grid."""
        b, c, r = x.shape[0], x.shape[1], x.shape[2]
        p, g = self.config.patch_size, x.shape[2] // self.config.patch_size
        x = x.reshape(b, c, g, p, g, p, g, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, g**3, c * p**3)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b, p, g = tokens.shape[0], cfg.patch_size, cfg.resolution // cfg.patch_size
        c = tokens.shape[2] // p**3
        x = tokens.reshape(b, g, g, g, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, g * p, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.config
        r = cfg.resolution
        if x.ndim != 5 or tuple(x.shape[1:]) != (cfg.in_channels, r, r, r):
            raise D3S2Error(f"dense DiT expects x [B, {cfg.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        if cond.ndim != 3 or cond.shape[0] != x.shape[0] or cond.shape[2] != cfg.cond_channels:
            raise D3S2Error(f"dense DiT expects cond [B={x.shape[0]}, L, {cfg.cond_channels}], got {tuple(cond.shape)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        dtype = self.input_layer.weight.dtype
        h = self.input_layer(self.patchify(x).to(dtype)) + self.pos_emb.to(dtype)[None]
        t_emb = self.t_embedder(t)
        cond = cond.to(dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond, cond_mask)
        h = F.layer_norm(h.float(), h.shape[-1:]).to(dtype)
        return self.unpatchify(self.out_layer(h))


OFFICIAL_KEY_MAP: dict[str, str] = {}


def load_official_state_dict(model: DenseDiT, state_dict: dict[str, torch.Tensor], key_map=None, strict: bool = True,
                             assign: bool = False):
    """Load the authors' ``torch.load(model_dense.ckpt)["dit"]`` after :data:`OFFICIAL_KEY_MAP` renames."""
    return _load(model, state_dict, OFFICIAL_KEY_MAP if key_map is None else key_map, strict=strict, assign=assign)
