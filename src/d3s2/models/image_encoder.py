"""Image conditioner of the DiTs (paper Sec. 4.2, 5.2): DINOv2 ViT-L/14 with 4 registers, in plain PyTorch.

Release recipe (shared/reference/official-release.md): RGB (+ mask) image in [0, 1] at 518 px, ImageNet
normalisation, the final tokens *before* the last norm (DINOv2's ``x_prenorm``), then a non-affine LayerNorm:
``[B, 1374, 1024]`` = 1 CLS + 4 registers + 37 x 37 patches. The mask channel is not seen by DINOv2; it selects the
foreground tokens for sparse conditioning (:mod:`d3s2.models.conditioning`).

State-dict keys follow the official ``dinov2_vitl14_reg`` hub checkpoint (``dinov2_vitl14_reg4_pretrain.pth``):
``cls_token``, ``pos_embed`` [1, 1 + 37^2, C] (row 0 = CLS), ``register_tokens``, ``mask_token``, ``patch_embed.proj``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``. timm's
``vit_large_patch14_reg4_dinov2`` layout (``reg_token``, patch-only ``pos_embed`` with the CLS position folded into
``cls_token``, no ``mask_token``; timm's ``_convert_dinov2``) is converted on load and gives identical outputs.
Positional embeddings are resized for other image sizes with bicubic interpolation (antialiased, no offset), as the
DINOv2 hub's register models do; at 518 px they are used as stored.

Weights come from a local file (``weights=path``, .pth/.pt or .safetensors) or, when present, the Hugging Face cache
(``timm/vit_large_patch14_reg4_dinov2.lvd142m``; the cache folder is read from ``HF_HUB_CACHE`` / ``HF_HOME`` at each
call) or the torch hub cache. This module downloads nothing: :func:`d3s2.pipelines.hub.fetch_dinov2_weights` puts
timm's file into the Hugging Face cache (``d3s2 generate --weights wushuang98/Direct3D-S2`` does it once). No torch
hub code is run. The ``tiny`` config is the same network, small enough to train on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error

__all__ = ["ImageEncoderConfig", "DINOv2Encoder", "convert_dinov2_state_dict", "interpolate_pos_embed",
           "load_dinov2_weights", "find_dinov2_weights", "OFFICIAL_FILENAME", "HF_REPO", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_FILENAME = "dinov2_vitl14_reg4_pretrain.pth"
HF_REPO = "timm/vit_large_patch14_reg4_dinov2.lvd142m"


@dataclass
class ImageEncoderConfig:
    """Defaults: DINOv2 ViT-L/14 with 4 registers at 518 px. ``tiny()`` gives a CPU-trainable variant."""

    image_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_registers: int = 4
    pos_grid: int = 37  # grid of the stored positional embedding
    weights: str | None = None

    @classmethod
    def tiny(cls, **kw) -> "ImageEncoderConfig":
        base = dict(image_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_registers=4, pos_grid=4)
        return cls(**{**base, **kw})

    @property
    def num_tokens(self) -> int:
        g = self.image_size // self.patch_size
        return 1 + self.num_registers + g * g


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINOv2 (register models) positional-embedding resize: ``[1, 1 + G^2, C]`` -> ``[1, 1 + gh*gw, C]``; the CLS
    row is kept, the patch grid is resized bicubically (antialiased, no offset); unchanged when the grid matches."""
    n = pos_embed.shape[1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise D3S2Error(f"pos_embed has {n} patch positions, not a square grid")
    if grid_h == g and grid_w == g:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


class DINOv2Encoder(nn.Module):
    """``forward(image [B, 3 or 4, H, W] in [0, 1]) -> tokens [B, 1 + R + (H/14)(W/14), C]`` (non-affine normed
    ``x_prenorm``). A 4th (mask) channel is ignored here; use :meth:`split_mask` to get it for sparse conditioning."""

    config_class = ImageEncoderConfig

    def __init__(self, config: ImageEncoderConfig | None = None, weights: str | os.PathLike | None = None,
                 load_weights: bool = False) -> None:
        super().__init__()
        cfg = self.config = config or ImageEncoderConfig()
        c = cfg.embed_dim
        if c % cfg.num_heads:
            raise D3S2Error(f"image encoder: embed_dim {c} is not divisible by num_heads {cfg.num_heads}")
        self.patch_embed = _PatchEmbed(cfg.patch_size, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, c))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, c))
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # unused at inference; kept for strict loading
        self.blocks = nn.ModuleList(_Block(c, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(c, eps=1e-6)  # DINOv2's last norm: loaded, not applied (the release uses x_prenorm)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if not self.cls_token.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            nn.init.normal_(self.register_tokens, std=1e-6)
        weights = weights if weights is not None else cfg.weights
        if weights is not None or load_weights:
            load_dinov2_weights(self, weights)

    @staticmethod
    def split_mask(image: torch.Tensor) -> torch.Tensor | None:
        return image[:, 3] if image.shape[1] == 4 else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if image.dim() != 4 or image.shape[1] not in (3, 4):
            raise D3S2Error(f"image encoder expects [B, 3 or 4, H, W] in [0, 1], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise D3S2Error(f"image size {h}x{w} is not a multiple of the patch size {cfg.patch_size}")
        x = (image[:, :3].to(self.mean.dtype) - self.mean) / self.std
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, h // cfg.patch_size, w // cfg.patch_size)
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return F.layer_norm(x.float(), x.shape[-1:])


def convert_dinov2_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-hub or timm DINOv2-reg state dict -> this module's keys (official layout)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    if "reg_token" in sd:  # timm: no_embed_class layout, CLS position folded into cls_token
        out = dict(sd)
        out["register_tokens"] = out.pop("reg_token")
        pe = out.pop("pos_embed")
        out["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
        out.setdefault("mask_token", pe.new_zeros(1, pe.shape[-1]))
        return out
    return sd


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise D3S2Error(f"{path}: reading .safetensors needs the 'safetensors' package (pip install "
                            "safetensors), or give the .pth file") from exc
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


def find_dinov2_weights() -> Path | None:
    """A cached DINOv2 ViT-L/14-reg file: the Hugging Face cache (timm weights) or the torch hub cache."""
    from d3s2.hub_settings import hub_cache_dir

    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin"):
            p = try_to_load_from_cache(HF_REPO, name, cache_dir=hub_cache_dir())
            if isinstance(p, str) and os.path.isfile(p):
                return Path(p)
    except ImportError:
        pass
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    p = hub / OFFICIAL_FILENAME
    return p if p.is_file() else None


def load_dinov2_weights(model: DINOv2Encoder, weights: str | os.PathLike | None = None) -> DINOv2Encoder:
    """Load DINOv2 weights (official or timm keys) strictly into ``model``; a clear error when no file is found."""
    path = Path(weights) if weights is not None else find_dinov2_weights()
    if path is None or not path.is_file():
        where = f"{path}" if path is not None else "no weights= file given and none in the caches"
        raise D3S2Error(
            f"DINOv2 ViT-L/14-reg weights not found ({where}): download {OFFICIAL_FILENAME} (the official "
            f"dinov2_vitl14_reg checkpoint) or {HF_REPO}/model.safetensors and pass weights=PATH, or put "
            f"{OFFICIAL_FILENAME} in ~/.cache/torch/hub/checkpoints/ (a hub id such as --weights "
            "wushuang98/Direct3D-S2 downloads it when online)"
        )
    sd = convert_dinov2_state_dict(_read_weights(path))
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise D3S2Error(f"{path}: not a DINOv2-reg checkpoint for this config: {len(missing)} missing keys (first: "
                        f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise D3S2Error(f"{path}: shapes do not match the image-encoder config: {' '.join(str(exc).split())[:300]}")
    return model
